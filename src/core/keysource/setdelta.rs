//! A new version of a set already in shared data, written over the live version in its own
//! slot: only the buckets whose records change are rewritten. A full build (`SetWriter`) holds
//! two sets in shared data at its peak, the live one and the one being built, and Envoy's
//! allocator keeps that peak's pages for minutes after the old one is cleared; a delta that adds
//! or revokes a few keys rewrites a few buckets of about 2 KB each, so memory stays where the
//! first load left it.
//!
//! Each record of the document is looked up in the live set by digest as it is read. The same
//! id and profile is unchanged, and marked seen; anything else is a change, held in the VM. Once
//! the document is read, the live records never seen are the deletions. Profile numbers are
//! stable: the live profiles keep theirs and new ones are appended, so a VM still reading with
//! the old header never maps a record to another record's profile (a new number it does not
//! know reads as no record, until the meta announces the version).
//!
//! What a delta cannot settle alone it leaves to a full build (`DeltaStop`): more than
//! `MAX_CHANGES` records changed, added or removed; a possible duplicate (the full build names
//! both records); a bucket fuller than its seen bits; a set grown past its bucket count, or a
//! profile table mostly unused.

use super::service::KeyService;
use super::setbuckets::{
    bucket_count, digest_bucket, digest_entries, digest_key, encode_digest_entry, encode_id_entry,
    id_bucket, id_entries, id_key, tagged, write_header, BuildError, Intake, Layout, SharedSet,
};
use super::store::SharedStore;
use crate::core::config_error::ConfigError;
use crate::core::digest::Digest;
use crate::core::keyset::{digest_prefix, sorted_indexes};

/// Records a delta may change, add or remove; more goes to a full build. Each is held in the
/// VM until the document is read (about 100 bytes) and costs two bucket rewrites.
pub const MAX_CHANGES: usize = 8192;
/// Records a digest bucket may hold for a delta (its seen bits): 8 times the average.
const SEEN_BITS: usize = 256;
const SEEN_WORDS: usize = SEEN_BITS / 64;
/// Buckets read or rewritten per step, each a host call or two of about 2 KB: about a
/// millisecond of a VM's tick.
const BUCKETS_PER_STEP: usize = 256;
/// A profile table this many times larger than what the document uses is compacted by a full
/// build.
const PROFILE_SLACK: usize = 2;
const UNREAD: u16 = u16::MAX;
/// A bucket rewritten only for the records it loses.
const NO_CHANGE: u32 = u32::MAX;

/// Why a delta stops and a full build takes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaStop {
    TooManyChanges,
    /// A digest or id seen twice: the full build finds and names the duplicate.
    MaybeDuplicate,
    BucketTooFull,
    /// The set outgrew its bucket count, or its profile table holds mostly unused profiles.
    Outgrown,
}

impl DeltaStop {
    /// Why, for the log line.
    pub fn reason(self) -> &'static str {
        match self {
            DeltaStop::TooManyChanges => "more records changed than an in-place update rewrites",
            DeltaStop::MaybeDuplicate => "a digest or id appears twice",
            DeltaStop::BucketTooFull => "a bucket holds more records than an update tracks",
            DeltaStop::Outgrown => "the set outgrew its layout",
        }
    }
}

/// Why a delta could not go on.
#[derive(Debug, PartialEq, Eq)]
pub enum DeltaError {
    /// The document holds an invalid record.
    Invalid(ConfigError),
    Store,
    /// A full build takes over.
    Stop(DeltaStop),
}

impl From<BuildError> for DeltaError {
    fn from(error: BuildError) -> DeltaError {
        match error {
            BuildError::Invalid(e) => DeltaError::Invalid(e),
            BuildError::Store => DeltaError::Store,
        }
    }
}

/// A record of the document that the live set does not hold as it is.
#[derive(Debug)]
struct Change {
    position: u32,
    digest: Digest,
    profile: u32,
    id: Vec<u8>,
}

/// Digests or ids, looked up by binary search once sealed (the key set's one sort, rather
/// than a hash set or a sort of their own per type: keygate.wasm stays small).
#[derive(Debug, Default)]
struct ByteSet {
    items: Vec<Vec<u8>>,
    /// `items` positions in byte order, once sealed.
    order: Vec<u32>,
}

impl ByteSet {
    fn push(&mut self, bytes: &[u8]) {
        self.items.push(bytes.to_vec());
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    /// Sorts the items; whether one is there twice.
    fn seal(&mut self) -> bool {
        let items = &self.items;
        let key = |n: &u32| items.get(*n as usize);
        self.order = sorted_indexes(items.len() as u32, &|a, b| key(a).cmp(&key(b)));
        self.order.windows(2).any(|w| match w {
            [a, b] => key(a) == key(b),
            _ => false,
        })
    }

    fn contains(&self, bytes: &[u8]) -> bool {
        self.order
            .binary_search_by(|n| {
                self.items
                    .get(*n as usize)
                    .map_or(std::cmp::Ordering::Less, |item| item.as_slice().cmp(bytes))
            })
            .is_ok()
    }
}

/// A bucket an update rewrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Unit {
    Digest(u32),
    Id(u32),
}

#[derive(Debug)]
enum Phase {
    /// The document is being read; each record compared with the live set.
    Reading,
    /// Finding the live records the document no longer holds, from digest bucket `next` on.
    Scanning {
        next: u32,
    },
    /// Checking each change's id against the live records kept, from change `next` on.
    CheckingIds {
        next: usize,
    },
    /// Compared: nothing is written until `apply_step`.
    Compared,
    /// Rewriting the buckets of `units` (sorted; each bucket once per change that belongs in
    /// it, `NO_CHANGE` for one that only loses records), from `next` on.
    Applying {
        units: Vec<(Unit, u32)>,
        next: usize,
    },
    Applied,
}

/// One version written over the live one, in place.
#[derive(Debug)]
pub struct SetDelta {
    /// The live version, its record count and how many profiles its header holds.
    base: (u64, u32, usize),
    layout: Layout,
    pub(super) intake: Intake,
    /// Which profile numbers the document's records use.
    used_profiles: Vec<bool>,
    /// `SEEN_BITS` per digest bucket: the live records the document holds.
    seen: Vec<u64>,
    /// Records in each digest bucket when it was read (`UNREAD`: not yet), and how many of
    /// them are seen.
    bucket_len: Vec<u16>,
    bucket_seen: Vec<u16>,
    changes: Vec<Change>,
    change_digests: ByteSet,
    change_ids: ByteSet,
    /// Live records that are gone: their digests and ids, and ids a changed record dropped.
    deleted_digests: ByteSet,
    dropped_ids: ByteSet,
    phase: Phase,
}

impl SetDelta {
    /// An update of `live` (the stored version) in its slot.
    pub fn start(live: &SharedSet) -> SetDelta {
        let layout = live.layout();
        let buckets = layout.buckets as usize;
        let intake = Intake::numbered(&live.profiles());
        let profiles = intake.profiles.specs.len();
        SetDelta {
            base: (live.version, live.records(), profiles),
            layout,
            used_profiles: vec![false; profiles],
            intake,
            seen: vec![0; buckets * SEEN_WORDS],
            bucket_len: vec![UNREAD; buckets],
            bucket_seen: vec![0; buckets],
            changes: Vec::new(),
            change_digests: ByteSet::default(),
            change_ids: ByteSet::default(),
            deleted_digests: ByteSet::default(),
            dropped_ids: ByteSet::default(),
            phase: Phase::Reading,
        }
    }

    pub fn slot(&self) -> u64 {
        self.layout.slot
    }

    /// Records changed, added or removed (known once compared).
    pub fn changed(&self) -> usize {
        self.changes.len() + self.deleted_digests.len()
    }

    /// Compares the records added since the last flush with the live set.
    pub fn flush(
        &mut self,
        service: &KeyService,
        store: &dyn SharedStore,
    ) -> Result<(), DeltaError> {
        let pending = self.intake.take();
        if bucket_count(u64::from(self.intake.records)) > self.layout.buckets.saturating_mul(2) {
            return Err(DeltaError::Stop(DeltaStop::Outgrown));
        }
        let mut read: Option<(u32, Vec<u8>)> = None;
        for (position, record, profile) in pending {
            self.use_profile(profile);
            let bucket = digest_bucket(digest_prefix(&record.digest), self.layout.buckets);
            if read.as_ref().is_none_or(|(b, _)| *b != bucket) {
                read = Some((bucket, self.read(service, store, Unit::Digest(bucket))));
            }
            let bytes = read.as_ref().map_or(&[][..], |(_, bytes)| bytes);
            let id = record.id.as_bytes();
            let mut len = 0;
            let mut live = None;
            if let Some(entries) = tagged(bytes, self.layout.tag) {
                for (i, e) in digest_entries(entries).enumerate() {
                    len = i + 1;
                    if live.is_none() && e.digest == record.digest {
                        let dropped_id = (e.id != id).then(|| e.id.to_vec());
                        live = Some((i, e.profile == profile && dropped_id.is_none(), dropped_id));
                    }
                }
            }
            self.note_len(bucket, len)?;
            if let Some((i, unchanged, dropped_id)) = live {
                if !self.mark_seen(bucket, i) {
                    return Err(DeltaError::Stop(DeltaStop::MaybeDuplicate));
                }
                if unchanged {
                    continue;
                }
                if let Some(dropped) = dropped_id {
                    self.dropped_ids.push(&dropped);
                }
            }
            self.change_digests.push(&record.digest);
            self.change_ids.push(id);
            self.changes.push(Change {
                position,
                digest: record.digest,
                profile,
                id: id.to_vec(),
            });
            if self.changes.len() + self.dropped_ids.len() > MAX_CHANGES {
                return Err(DeltaError::Stop(DeltaStop::TooManyChanges));
            }
        }
        Ok(())
    }

    /// Every part is read: finds what the document removed and checks the changes' ids, a
    /// slice per step. Writes nothing. True once compared.
    pub fn compare_step(
        &mut self,
        service: &KeyService,
        store: &dyn SharedStore,
    ) -> Result<bool, DeltaError> {
        match self.phase {
            Phase::Reading => {
                // The document's changes twice: a duplicate, for the whole build to name.
                if self.change_digests.seal() || self.change_ids.seal() {
                    return Err(DeltaError::Stop(DeltaStop::MaybeDuplicate));
                }
                let used = self.used_profiles.iter().filter(|u| **u).count();
                if self.intake.profiles.specs.len() > PROFILE_SLACK * used + 64 {
                    return Err(DeltaError::Stop(DeltaStop::Outgrown));
                }
                self.phase = Phase::Scanning { next: 0 };
                Ok(false)
            }
            Phase::Scanning { next } => {
                // Up to `BUCKETS_PER_STEP` buckets read; one whose every record was seen is
                // passed over without a read.
                let mut end = next;
                let mut reads = 0;
                while end < self.layout.buckets && reads < BUCKETS_PER_STEP {
                    if self.find_deleted(service, store, end)? {
                        reads += 1;
                    }
                    end += 1;
                }
                self.phase = if end < self.layout.buckets {
                    Phase::Scanning { next: end }
                } else {
                    self.deleted_digests.seal();
                    self.dropped_ids.seal();
                    Phase::CheckingIds { next: 0 }
                };
                Ok(false)
            }
            Phase::CheckingIds { next } => {
                let end = next
                    .saturating_add(BUCKETS_PER_STEP / 2)
                    .min(self.changes.len());
                for n in next..end {
                    if self.id_kept_elsewhere(service, store, n) {
                        return Err(DeltaError::Stop(DeltaStop::MaybeDuplicate));
                    }
                }
                self.phase = if end < self.changes.len() {
                    Phase::CheckingIds { next: end }
                } else {
                    Phase::Compared
                };
                Ok(matches!(self.phase, Phase::Compared))
            }
            _ => Ok(true),
        }
    }

    /// Rewrites the next buckets the changes touch (digest buckets first: a revoked key stops
    /// being found at once). True once every one is written.
    pub fn apply_step(
        &mut self,
        service: &KeyService,
        store: &dyn SharedStore,
    ) -> Result<bool, DeltaError> {
        if matches!(self.phase, Phase::Compared) {
            // New profiles go into the live header first: a VM that reads a rewritten record
            // before the version is announced finds its profile there.
            let (version, records, profiles) = self.base;
            if self.intake.profiles.specs.len() > profiles {
                let specs = &self.intake.profiles.specs;
                write_header(service, store, self.layout, version, records, specs)?;
            }
            self.phase = Phase::Applying {
                units: self.units(),
                next: 0,
            };
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Applied);
        let Phase::Applying { units, mut next } = phase else {
            let applied = matches!(phase, Phase::Applied);
            self.phase = phase;
            return Ok(applied);
        };
        // Whole buckets, up to `BUCKETS_PER_STEP` of them.
        let runs = units
            .get(next..)
            .unwrap_or_default()
            .chunk_by(|a, b| a.0 == b.0);
        let mut written = Ok(());
        for run in runs.take(BUCKETS_PER_STEP) {
            if let Some((unit, _)) = run.first() {
                written = written.and_then(|()| self.rewrite(service, store, *unit, run));
            }
            next += run.len();
        }
        let done = next >= units.len();
        if !done {
            self.phase = Phase::Applying { units, next };
        }
        written.map(|()| done)
    }

    /// Where the update writes: the live version's slot and buckets. Its header is written
    /// over the live one, the profiles appended to.
    pub(super) fn layout(&self) -> Layout {
        self.layout
    }

    fn read(&self, service: &KeyService, store: &dyn SharedStore, unit: Unit) -> Vec<u8> {
        let key = match unit {
            Unit::Digest(b) => digest_key(service, self.layout.slot, b),
            Unit::Id(b) => id_key(service, self.layout.slot, b),
        };
        store.get(&key).map(|(bytes, _)| bytes).unwrap_or_default()
    }

    fn use_profile(&mut self, profile: u32) {
        let n = profile as usize;
        if self.used_profiles.len() <= n {
            self.used_profiles.resize(n + 1, false);
        }
        if let Some(used) = self.used_profiles.get_mut(n) {
            *used = true;
        }
    }

    fn note_len(&mut self, bucket: u32, len: usize) -> Result<(), DeltaError> {
        if len > SEEN_BITS {
            return Err(DeltaError::Stop(DeltaStop::BucketTooFull));
        }
        if let Some(known) = self.bucket_len.get_mut(bucket as usize) {
            *known = len as u16;
        }
        Ok(())
    }

    fn seen_bit(&self, bucket: u32, i: usize) -> Option<(usize, u64)> {
        (i < SEEN_BITS).then(|| (bucket as usize * SEEN_WORDS + i / 64, 1u64 << (i % 64)))
    }

    fn is_seen(&self, bucket: u32, i: usize) -> bool {
        self.seen_bit(bucket, i)
            .and_then(|(word, bit)| self.seen.get(word).map(|w| w & bit != 0))
            .unwrap_or(false)
    }

    /// Marks the live record `i` of `bucket` seen; false if it already was.
    fn mark_seen(&mut self, bucket: u32, i: usize) -> bool {
        let Some((word, bit)) = self.seen_bit(bucket, i) else {
            return false;
        };
        let Some(w) = self.seen.get_mut(word) else {
            return false;
        };
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        if let Some(n) = self.bucket_seen.get_mut(bucket as usize) {
            *n += 1;
        }
        true
    }

    /// Notes the records of `bucket` the document does not hold; whether the bucket was read
    /// (one whose every record was seen is not).
    fn find_deleted(
        &mut self,
        service: &KeyService,
        store: &dyn SharedStore,
        bucket: u32,
    ) -> Result<bool, DeltaError> {
        let (len, seen) = (
            self.bucket_len
                .get(bucket as usize)
                .copied()
                .unwrap_or(UNREAD),
            self.bucket_seen.get(bucket as usize).copied().unwrap_or(0),
        );
        if len != UNREAD && seen == len {
            return Ok(false);
        }
        let bytes = self.read(service, store, Unit::Digest(bucket));
        let Some(entries) = tagged(&bytes, self.layout.tag) else {
            return Ok(true);
        };
        for (i, e) in digest_entries(entries).enumerate() {
            if self.is_seen(bucket, i) {
                continue;
            }
            let Ok(digest) = Digest::try_from(e.digest) else {
                continue;
            };
            self.deleted_digests.push(&digest);
            self.dropped_ids.push(e.id);
        }
        if self.changes.len() + self.dropped_ids.len() > MAX_CHANGES {
            return Err(DeltaError::Stop(DeltaStop::TooManyChanges));
        }
        Ok(true)
    }

    /// Whether change `n`'s id belongs to a live record the document keeps under another
    /// digest: the same id twice.
    fn id_kept_elsewhere(&self, service: &KeyService, store: &dyn SharedStore, n: usize) -> bool {
        let Some(change) = self.changes.get(n) else {
            return false;
        };
        let buckets = self.layout.buckets;
        let id_bytes = self.read(service, store, Unit::Id(id_bucket(&change.id, buckets)));
        let Some(prefix) = tagged(&id_bytes, self.layout.tag)
            .and_then(|r| id_entries(r).find(|e| e.id == change.id.as_slice()))
            .map(|e| e.prefix)
        else {
            return false;
        };
        let bucket = digest_bucket(prefix, buckets);
        let bytes = self.read(service, store, Unit::Digest(bucket));
        let Some(entries) = tagged(&bytes, self.layout.tag) else {
            return false;
        };
        let kept = digest_entries(entries)
            .enumerate()
            .find(|(_, e)| e.id == change.id.as_slice())
            .is_some_and(|(i, e)| {
                e.digest != change.digest
                    && self.is_seen(bucket, i)
                    && !self.change_digests.contains(e.digest)
            });
        kept
    }

    /// The buckets to rewrite, digest buckets first, each with the changes that belong in it.
    fn units(&self) -> Vec<(Unit, u32)> {
        let buckets = self.layout.buckets;
        let digest_unit = |d: &[u8]| {
            Unit::Digest(digest_bucket(
                Digest::try_from(d).map_or(0, |d| digest_prefix(&d)),
                buckets,
            ))
        };
        let id_unit = |id: &[u8]| Unit::Id(id_bucket(id, buckets));
        let mut units = Vec::new();
        for (n, change) in (0u32..).zip(&self.changes) {
            units.push((digest_unit(&change.digest), n));
            units.push((id_unit(&change.id), n));
        }
        for digest in &self.deleted_digests.items {
            units.push((digest_unit(digest), NO_CHANGE));
        }
        for id in &self.dropped_ids.items {
            units.push((id_unit(id), NO_CHANGE));
        }
        let key = |n: &u32| units.get(*n as usize).copied();
        sorted_indexes(units.len() as u32, &|a, b| key(a).cmp(&key(b)))
            .iter()
            .filter_map(key)
            .collect()
    }

    /// Rewrites one bucket: its live records but those changed or gone, then the changes that
    /// belong in it.
    fn rewrite(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        unit: Unit,
        changes: &[(Unit, u32)],
    ) -> Result<(), DeltaError> {
        let bytes = self.read(service, store, unit);
        let live = tagged(&bytes, self.layout.tag);
        let changes = changes
            .iter()
            .filter_map(|(_, n)| self.changes.get(*n as usize));
        let mut value = Vec::with_capacity(bytes.len() + 64);
        value.extend_from_slice(&self.layout.tag.to_le_bytes());
        let key = match unit {
            Unit::Digest(bucket) => {
                for e in live.into_iter().flat_map(digest_entries) {
                    let gone = self.change_digests.contains(e.digest)
                        || self.deleted_digests.contains(e.digest);
                    if !gone {
                        encode_digest_entry(&mut value, e.digest, e.profile, e.position, e.id);
                    }
                }
                for c in changes {
                    encode_digest_entry(&mut value, &c.digest, c.profile, c.position, &c.id);
                }
                digest_key(service, self.layout.slot, bucket)
            }
            Unit::Id(bucket) => {
                for e in live.into_iter().flat_map(id_entries) {
                    if !self.change_ids.contains(e.id) && !self.dropped_ids.contains(e.id) {
                        encode_id_entry(&mut value, e.id, e.prefix, e.position);
                    }
                }
                for c in changes {
                    encode_id_entry(&mut value, &c.id, digest_prefix(&c.digest), c.position);
                }
                id_key(service, self.layout.slot, bucket)
            }
        };
        store.set(&key, &value, 0).map_err(|_| DeltaError::Store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::digest::sha256;
    use crate::core::keyset::KeyRecordSpec;
    use crate::core::keysource::setbuckets::SetWriter;
    use crate::core::keysource::store::StoreError;
    use crate::core::keysource::test_host::service;
    use crate::core::memory_store::MemoryStore;
    use serde_json::json;
    use std::cell::RefCell;

    fn spec(id: &str, secret: &str, tenant: &str) -> KeyRecordSpec {
        serde_json::from_value(json!({"id": id,
            "secret_sha256": hex::encode(sha256(secret.as_bytes())), "tenant": tenant}))
        .unwrap()
    }

    fn set_of(n: usize) -> Vec<KeyRecordSpec> {
        (0..n)
            .map(|i| spec(&format!("k{i}"), &format!("s{i}"), &format!("t{}", i % 3)))
            .collect()
    }

    /// A store that remembers which keys were written.
    #[derive(Default)]
    struct WatchedStore {
        inner: MemoryStore,
        written: RefCell<Vec<String>>,
    }

    impl SharedStore for WatchedStore {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
            self.written.borrow_mut().push(key.to_string());
            self.inner.set(key, value, cas)
        }
    }

    /// `specs` built whole as version 1.
    fn stored(store: &dyn SharedStore, specs: &[KeyRecordSpec]) -> SharedSet {
        let service = service(json!({}));
        let mut writer = SetWriter::start(1, 7);
        for (i, spec) in specs.iter().enumerate() {
            writer.intake.add(i, spec.clone()).unwrap();
        }
        writer.flush(&service, store).unwrap();
        while !writer.assemble_step(&service, store).unwrap() {}
        let layout = writer.layout();
        writer.intake.publish(&service, store, layout, 1).unwrap();
        SharedSet::load(&service, store, 1).unwrap().unwrap()
    }

    /// `specs` read in parts of 100 records and compared with `live`.
    fn compared(
        store: &dyn SharedStore,
        live: &SharedSet,
        specs: &[KeyRecordSpec],
    ) -> Result<SetDelta, DeltaError> {
        let service = service(json!({}));
        let mut delta = SetDelta::start(live);
        for (n, part) in specs.chunks(100).enumerate() {
            for (i, spec) in part.iter().enumerate() {
                let added = delta.intake.add(n * 100 + i, spec.clone());
                added.map_err(DeltaError::Invalid)?;
            }
            delta.flush(&service, store)?;
        }
        while !delta.compare_step(&service, store)? {}
        Ok(delta)
    }

    /// `specs` compared with `live` and, unless the update stops, written over it as version 2.
    fn update(
        store: &dyn SharedStore,
        live: &SharedSet,
        specs: &[KeyRecordSpec],
    ) -> Result<SetDelta, DeltaError> {
        let service = service(json!({}));
        let mut delta = compared(store, live, specs)?;
        while !delta.apply_step(&service, store)? {}
        delta.intake.publish(&service, store, delta.layout(), 2)?;
        Ok(delta)
    }

    #[test]
    fn an_update_rewrites_only_the_buckets_it_changes_and_is_found_in_the_same_slot() {
        let store = WatchedStore::default();
        let service = service(json!({}));
        let mut specs = set_of(3000);
        let live = stored(&store, &specs);
        store.written.borrow_mut().clear();
        specs.remove(5); // revoked
        specs[6].tenant = Some("moved".into()); // k7: a new profile
        specs[8] = spec("k9", "rotated", "t0"); // k9: a new secret
        specs.push(spec("fresh", "new-secret", "brand-new"));
        let delta = update(&store, &live, &specs).unwrap();
        // k5 gone, k7 changed, fresh added, and k9 both: its old secret gone, its new added.
        assert_eq!(delta.changed(), 5);
        let written = store.written.borrow().clone();
        // Five changed or gone digests and four ids, at most one bucket each, and the header
        // twice (its new profiles before any record refers to them, then the version).
        assert!(written.len() <= 11, "{written:?}");
        assert!(written.iter().all(|k| k.starts_with(&service.key("s1."))));

        let set = SharedSet::load(&service, &store, 2).unwrap().unwrap();
        assert_eq!(set.len(), 3000);
        assert!(SharedSet::load(&service, &store, 1).unwrap().is_none());
        assert!(set.by_digest(&service, &store, &sha256(b"s5")).is_none());
        assert!(set.by_id(&service, &store, "k5").is_none());
        let k7 = set.by_id(&service, &store, "k7").unwrap();
        assert_eq!(k7.profile.fields.tenant.as_deref(), Some("moved"));
        assert!(set.by_digest(&service, &store, &sha256(b"s9")).is_none());
        let k9 = set.by_id(&service, &store, "k9").unwrap();
        assert_eq!(k9.digest, sha256(b"rotated"));
        let fresh = set
            .by_digest(&service, &store, &sha256(b"new-secret"))
            .unwrap();
        assert_eq!(fresh.id.as_str(), "fresh");
        assert_eq!(fresh.profile.fields.tenant.as_deref(), Some("brand-new"));
        let kept = set.by_id(&service, &store, "k2999").unwrap();
        assert_eq!(kept.profile.fields.tenant.as_deref(), Some("t2"));
        // The old header's profiles keep their numbers: a VM still on version 1 reads the
        // unchanged records as before.
        assert_eq!(
            live.by_id(&service, &store, "k2999").unwrap().profile,
            kept.profile
        );
    }

    #[test]
    fn the_same_document_changes_nothing() {
        let store = WatchedStore::default();
        let specs = set_of(500);
        let live = stored(&store, &specs);
        store.written.borrow_mut().clear();
        assert_eq!(update(&store, &live, &specs).unwrap().changed(), 0);
        // Only the header.
        assert_eq!(store.written.borrow().len(), 1);
    }

    #[test]
    fn what_a_delta_cannot_settle_goes_to_a_whole_build() {
        let store = MemoryStore::default();
        let specs = set_of(400);
        let live = stored(&store, &specs);
        let stop = |specs: &[KeyRecordSpec]| match update(&store, &live, specs) {
            Err(DeltaError::Stop(stop)) => Some(stop),
            _ => None,
        };
        let mut twice = specs.clone();
        twice.push(specs[10].clone());
        assert_eq!(stop(&twice), Some(DeltaStop::MaybeDuplicate));
        // A new secret under the id of a record the document keeps.
        let mut taken = specs.clone();
        taken.push(spec("k3", "other", "t0"));
        assert_eq!(stop(&taken), Some(DeltaStop::MaybeDuplicate));
        let mut new_twice = specs.clone();
        new_twice.push(spec("x", "dup", "t0"));
        new_twice.push(spec("y", "dup", "t0"));
        assert_eq!(stop(&new_twice), Some(DeltaStop::MaybeDuplicate));
        let all_new: Vec<_> = (0..MAX_CHANGES + 1)
            .map(|i| spec(&format!("n{i}"), &format!("n{i}"), "t"))
            .collect();
        assert!(matches!(
            stop(&all_new),
            Some(DeltaStop::TooManyChanges | DeltaStop::Outgrown)
        ));
        // None of it was written: the live set is as it was.
        let service = service(json!({}));
        assert!(SharedSet::load(&service, &store, 2).unwrap().is_none());
        assert!(live.by_id(&service, &store, "k10").is_some());
        assert!(live.by_id(&service, &store, "x").is_none());
    }

    #[test]
    fn a_rotated_secret_frees_its_old_id_and_a_record_may_take_it() {
        let store = MemoryStore::default();
        let service = service(json!({}));
        let mut specs = set_of(300);
        let live = stored(&store, &specs);
        // k1's secret now belongs to a record named k1-new; k1 comes back with another secret.
        specs[1] = spec("k1-new", "s1", "t1");
        specs.push(spec("k1", "s1-again", "t1"));
        update(&store, &live, &specs).unwrap();
        let set = SharedSet::load(&service, &store, 2).unwrap().unwrap();
        assert_eq!(
            set.by_digest(&service, &store, &sha256(b"s1"))
                .unwrap()
                .id
                .as_str(),
            "k1-new"
        );
        assert_eq!(
            set.by_id(&service, &store, "k1").unwrap().digest,
            sha256(b"s1-again")
        );
        assert!(set.by_id(&service, &store, "k1-new").is_some());
    }

    #[test]
    fn an_update_of_many_buckets_is_written_over_several_steps() {
        let store = MemoryStore::default();
        let service = service(json!({}));
        let specs = set_of(20_000);
        let live = stored(&store, &specs);
        // Every 25th key revoked: 800 digest buckets and as many id buckets to rewrite.
        let kept: Vec<_> = (0..20_000)
            .filter(|i| i % 25 != 0)
            .map(|i| specs[i].clone())
            .collect();
        let mut delta = compared(&store, &live, &kept).unwrap();
        let mut steps = 0;
        while !delta.apply_step(&service, &store).unwrap() {
            steps += 1;
        }
        assert!(steps >= 3, "{steps}");
        let layout = delta.layout();
        delta.intake.publish(&service, &store, layout, 2).unwrap();
        let set = SharedSet::load(&service, &store, 2).unwrap().unwrap();
        assert_eq!(set.len(), 19_200);
        for i in (0..20_000).step_by(7) {
            let found = set.by_id(&service, &store, &format!("k{i}")).is_some();
            assert_eq!(found, i % 25 != 0, "k{i}");
            let by_digest = set.by_digest(&service, &store, &sha256(format!("s{i}").as_bytes()));
            assert_eq!(by_digest.is_some(), i % 25 != 0, "s{i}");
        }
    }

    #[test]
    fn a_vm_on_the_old_header_finds_a_rewritten_record_with_a_new_profile() {
        let store = MemoryStore::default();
        let service = service(json!({}));
        let mut specs = set_of(300);
        let live = stored(&store, &specs);
        // A second VM on version 1 that reads nothing until the update is announced.
        let late = SharedSet::load(&service, &store, 1).unwrap().unwrap();
        specs[4].tenant = Some("moved".into());
        let mut delta = compared(&store, &live, &specs).unwrap();
        while !delta.apply_step(&service, &store).unwrap() {}
        // Rewritten, not yet announced: the VM on version 1 rereads the header's profiles for
        // the number it does not know.
        let k4 = live.by_id(&service, &store, "k4").unwrap();
        assert_eq!(k4.profile.fields.tenant.as_deref(), Some("moved"));
        assert_eq!(
            live.by_id(&service, &store, "k5")
                .unwrap()
                .profile
                .fields
                .tenant
                .as_deref(),
            Some("t2")
        );
        // Announced before the other VM read the meta: it finds the profile in the header of
        // version 2.
        let layout = delta.layout();
        delta.intake.publish(&service, &store, layout, 2).unwrap();
        let k4 = late.by_id(&service, &store, "k4").unwrap();
        assert_eq!(k4.profile.fields.tenant.as_deref(), Some("moved"));
    }
}
