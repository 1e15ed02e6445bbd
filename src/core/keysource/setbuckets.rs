//! A key set looked up in shared data, one copy for the whole process: no VM copies the set in.
//! The set is stored as buckets of binary records keyed by digest prefix (and a second, smaller
//! index of buckets keyed by a hash of the id, for id:secret keys), in one of two slots that
//! versions alternate between. A request reads one bucket (two for an id:secret key) and scans a
//! few dozen records; a VM holds only the set's distinct profiles.
//!
//! The VM that fetched a document writes the records of each part into the next version's slot
//! as the part arrives (`SetWriter`), so it never holds the whole set; duplicates are found in
//! the bucket they land in. Every bucket starts with the tag of the build that wrote it, so
//! whatever an older or failed build left in the slot reads as empty. The slot's header (tag,
//! version, bucket count, profiles) is written last, then the meta that announces the version;
//! the slot the old version used is emptied in slices after that (`clear_slice`).
//!
//! Digest bucket: tag, then per record digest (32), profile number (u32), document position
//! (u32), id length (u16), id. Id bucket: tag, then per record id length (u16), id, digest
//! prefix (u64), document position (u32). Header: format, tag, version, bucket count, record
//! count, then the profiles (`profile_spec`s as JSON).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::service::KeyService;
use super::store::{Reader, SharedStore};
use crate::core::config_error::ConfigError;
use crate::core::digest::Digest;
use crate::core::keyset::{digest_prefix, KeyProfile, KeyRecord, KeyRecordSpec};

const FORMAT: u8 = 1;
/// Records a bucket holds on average at most: one bucket read (about 2 KB) per request.
const RECORDS_PER_BUCKET: u64 = 32;
/// The smallest record a document can hold (`{"id":"a","secret_sha256":"<64 hex>"},`), to size
/// the bucket count from the document's length before its records are counted.
const MIN_RECORD_BYTES: u64 = 80;
const MIN_BUCKETS: u64 = 64;
const MAX_BUCKETS: u64 = 1 << 16;
/// Buckets emptied per slice when an old slot is cleared: 512 host calls, under a millisecond,
/// on the short ticks of a VM at work (`Fetch::wants_short_ticks`), so 64K buckets are cleared
/// in a few seconds (256 ticks) and the memory they held is free soon after a reload.
pub const BUCKETS_PER_SLICE: u32 = 256;

/// The digest of a profile written as a record (never looked up).
const BLANK_DIGEST: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A set's profile as a record without id or digest, as the header stores it.
fn profile_spec(p: &KeyProfile) -> KeyRecordSpec {
    p.to_spec("profile".into(), BLANK_DIGEST.into())
}

/// The profiles of a stored header (`profile_spec`s as a JSON array), validated again like any
/// record.
fn decode_profiles(bytes: &[u8]) -> Result<Vec<Arc<KeyProfile>>, String> {
    let specs: Vec<KeyRecordSpec> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    specs
        .into_iter()
        .enumerate()
        .map(|(i, spec)| {
            KeyRecord::from_spec(spec, &format!("profiles[{i}]"))
                .map(|record| record.profile)
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// Buckets (a power of two) for a document of `document_bytes`: at most `RECORDS_PER_BUCKET`
/// records each whatever the records' size.
pub fn bucket_count(document_bytes: u64) -> u32 {
    let wanted = (document_bytes / MIN_RECORD_BYTES / RECORDS_PER_BUCKET).max(1);
    wanted.next_power_of_two().clamp(MIN_BUCKETS, MAX_BUCKETS) as u32
}

/// The slot a version is stored in.
pub fn slot_of(version: u64) -> u64 {
    version % 2
}

fn header_key(service: &KeyService, slot: u64) -> String {
    service.key(&format!("s{slot}.h"))
}

fn digest_key(service: &KeyService, slot: u64, bucket: u32) -> String {
    service.key(&format!("s{slot}.d{bucket}"))
}

fn id_key(service: &KeyService, slot: u64, bucket: u32) -> String {
    service.key(&format!("s{slot}.i{bucket}"))
}

/// Digests are evenly spread: their leading bits pick the bucket.
fn digest_bucket(prefix: u64, buckets: u32) -> u32 {
    let bits = buckets.trailing_zeros();
    prefix.checked_shr(64 - bits).unwrap_or(0) as u32
}

/// FNV-1a: ids come from the key service, not from requests, so a plain hash spreads them.
fn id_bucket(id: &[u8], buckets: u32) -> u32 {
    let hash = id.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    (hash & u64::from(buckets - 1)) as u32
}

/// A digest bucket's record as stored.
struct DigestEntry<'a> {
    digest: &'a [u8],
    profile: u32,
    position: u32,
    id: &'a [u8],
}

fn digest_entries(mut r: Reader<'_>) -> impl Iterator<Item = DigestEntry<'_>> {
    std::iter::from_fn(move || {
        let digest = r.take(32)?;
        let profile = r.u32()?;
        let position = r.u32()?;
        let len = usize::from(r.u16()?);
        Some(DigestEntry {
            digest,
            profile,
            position,
            id: r.take(len)?,
        })
    })
}

/// An id bucket's record as stored.
struct IdEntry<'a> {
    id: &'a [u8],
    prefix: u64,
    position: u32,
}

fn id_entries(mut r: Reader<'_>) -> impl Iterator<Item = IdEntry<'_>> {
    std::iter::from_fn(move || {
        let len = usize::from(r.u16()?);
        let id = r.take(len)?;
        Some(IdEntry {
            id,
            prefix: r.u64()?,
            position: r.u32()?,
        })
    })
}

/// The records of a bucket written by the build tagged `tag` (none when another build wrote it).
fn tagged(bytes: &[u8], tag: u64) -> Option<Reader<'_>> {
    let mut r = Reader(bytes);
    (r.u64()? == tag).then_some(r)
}

/// Why a build could not go on.
#[derive(Debug, PartialEq, Eq)]
pub enum BuildError {
    /// The document holds an invalid or duplicate record.
    Invalid(ConfigError),
    /// The shared store refused a write.
    Store,
}

/// The first duplicate of the document so far: later position, field, earlier position.
type Duplicate = (u32, &'static str, u32);

/// One version being written into its slot, part by part.
#[derive(Debug)]
pub struct SetWriter {
    slot: u64,
    tag: u64,
    buckets: u32,
    /// Distinct profiles, each validated once; numbered in `numbers` (by address: each lives
    /// in `profiles` until the build ends) in order of appearance.
    profiles: HashSet<Arc<KeyProfile>>,
    numbers: HashMap<usize, u32>,
    specs: Vec<KeyRecordSpec>,
    /// Buckets this build wrote: the first write of one replaces what an older build left.
    written_digest: Vec<bool>,
    written_id: Vec<bool>,
    /// This part's validated records, with their position in the document.
    pending: Vec<(u32, KeyRecord)>,
    records: u32,
}

impl SetWriter {
    /// A build of the version to be stored in `slot`, tagged `tag` (unique per build: the
    /// time it started), for a document of `document_bytes`.
    pub fn start(slot: u64, tag: u64, document_bytes: u64) -> SetWriter {
        let buckets = bucket_count(document_bytes);
        SetWriter {
            slot,
            tag,
            buckets,
            profiles: HashSet::new(),
            numbers: HashMap::new(),
            specs: Vec::new(),
            written_digest: vec![false; buckets as usize],
            written_id: vec![false; buckets as usize],
            pending: Vec::new(),
            records: 0,
        }
    }

    pub fn slot(&self) -> u64 {
        self.slot
    }

    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Validates one record of the document (at `position` in `keys`), to be written by the
    /// next `flush`.
    pub fn add(&mut self, position: usize, spec: KeyRecordSpec) -> Result<(), ConfigError> {
        let path = format!("keys[{position}]");
        let record = KeyRecord::from_spec_sharing(spec, &path, &mut self.profiles)?;
        let position = u32::try_from(position)
            .map_err(|_| ConfigError::new("keys", "too many keys for one set"))?;
        let next = self.numbers.len() as u32;
        let specs = &mut self.specs;
        self.numbers
            .entry(Arc::as_ptr(&record.profile) as usize)
            .or_insert_with(|| {
                specs.push(profile_spec(&record.profile));
                next
            });
        self.pending.push((position, record));
        Ok(())
    }

    /// Writes the records added since the last flush into their buckets: one read and one write
    /// per bucket they touch. Refuses the first duplicate id or digest of the document (its id
    /// before its digest), as `KeySet::from_document` does.
    pub fn flush(
        &mut self,
        service: &KeyService,
        store: &dyn SharedStore,
    ) -> Result<(), BuildError> {
        let mut pending = std::mem::take(&mut self.pending);
        self.records = self.records.saturating_add(pending.len() as u32);
        let buckets = self.buckets;
        let mut first: Option<Duplicate> = None;
        let mut note = |found: Duplicate| {
            if first.is_none_or(|f| (found.0, found.1) < (f.0, f.1)) {
                first = Some(found);
            }
        };
        // By digest bucket, in document order within each.
        pending.sort_by_key(|(position, r)| {
            (digest_bucket(digest_prefix(&r.digest), buckets), *position)
        });
        for group in pending.chunk_by(|(_, a), (_, b)| {
            digest_bucket(digest_prefix(&a.digest), buckets)
                == digest_bucket(digest_prefix(&b.digest), buckets)
        }) {
            let Some((_, head)) = group.first() else {
                continue;
            };
            let bucket = digest_bucket(digest_prefix(&head.digest), buckets);
            let key = digest_key(service, self.slot, bucket);
            let mut value = self.existing(store, &key, bucket, true);
            for (position, record) in group {
                let earlier = digest_entries(Reader(value.get(8..).unwrap_or_default()))
                    .find(|e| e.digest == record.digest)
                    .map(|e| e.position);
                if let Some(earlier) = earlier {
                    note((*position, "secret_sha256", earlier));
                }
                let profile = self
                    .numbers
                    .get(&(Arc::as_ptr(&record.profile) as usize))
                    .copied()
                    .unwrap_or(0);
                value.extend_from_slice(&record.digest);
                value.extend_from_slice(&profile.to_le_bytes());
                value.extend_from_slice(&position.to_le_bytes());
                value.extend_from_slice(&(record.id.len() as u16).to_le_bytes());
                value.extend_from_slice(record.id.as_bytes());
            }
            store.set(&key, &value, 0).map_err(|_| BuildError::Store)?;
        }
        pending.sort_by_key(|(position, r)| (id_bucket(r.id.as_bytes(), buckets), *position));
        for group in pending.chunk_by(|(_, a), (_, b)| {
            id_bucket(a.id.as_bytes(), buckets) == id_bucket(b.id.as_bytes(), buckets)
        }) {
            let Some((_, head)) = group.first() else {
                continue;
            };
            let bucket = id_bucket(head.id.as_bytes(), buckets);
            let key = id_key(service, self.slot, bucket);
            let mut value = self.existing(store, &key, bucket, false);
            for (position, record) in group {
                let earlier = id_entries(Reader(value.get(8..).unwrap_or_default()))
                    .find(|e| e.id == record.id.as_bytes())
                    .map(|e| e.position);
                if let Some(earlier) = earlier {
                    note((*position, "id", earlier));
                }
                value.extend_from_slice(&(record.id.len() as u16).to_le_bytes());
                value.extend_from_slice(record.id.as_bytes());
                value.extend_from_slice(&digest_prefix(&record.digest).to_le_bytes());
                value.extend_from_slice(&position.to_le_bytes());
            }
            store.set(&key, &value, 0).map_err(|_| BuildError::Store)?;
        }
        match first {
            Some((later, field, earlier)) => {
                let what = if field == "id" { "key id" } else { "digest" };
                Err(BuildError::Invalid(ConfigError::new(
                    format!("keys[{later}].{field}"),
                    format!("duplicate {what} (also keys[{earlier}])"),
                )))
            }
            None => Ok(()),
        }
    }

    /// A bucket's value so far in this build: its tag alone on the build's first write to it.
    fn existing(
        &mut self,
        store: &dyn SharedStore,
        key: &str,
        bucket: u32,
        digest: bool,
    ) -> Vec<u8> {
        let written = if digest {
            &mut self.written_digest
        } else {
            &mut self.written_id
        };
        let first = written
            .get_mut(bucket as usize)
            .is_none_or(|w| !std::mem::replace(w, true));
        match store.get(key) {
            Some((bytes, _)) if !first && tagged(&bytes, self.tag).is_some() => bytes,
            _ => self.tag.to_le_bytes().to_vec(),
        }
    }

    /// Every part is in: writes the slot's header for `version` (the meta, written next,
    /// announces it). Returns the record count.
    pub fn finish(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        version: u64,
    ) -> Result<usize, BuildError> {
        let profiles = serde_json::to_vec(&self.specs).map_err(|_| BuildError::Store)?;
        let mut header = Vec::with_capacity(32 + profiles.len());
        header.push(FORMAT);
        header.extend_from_slice(&self.tag.to_le_bytes());
        header.extend_from_slice(&version.to_le_bytes());
        header.extend_from_slice(&self.buckets.to_le_bytes());
        header.extend_from_slice(&self.records.to_le_bytes());
        header.extend_from_slice(&profiles);
        store
            .set(&header_key(service, self.slot), &header, 0)
            .map_err(|_| BuildError::Store)?;
        Ok(self.records as usize)
    }
}

/// A version in shared data as one VM reads it: the slot's header, its profiles decoded once.
#[derive(Debug)]
pub struct SharedSet {
    pub version: u64,
    slot: u64,
    tag: u64,
    buckets: u32,
    records: usize,
    profiles: Vec<Arc<KeyProfile>>,
}

impl SharedSet {
    /// Reads the header of `version`'s slot. `Ok(None)`: the slot holds another version (the
    /// meta moved on meanwhile); `Err`: the stored bytes do not decode.
    pub fn load(
        service: &KeyService,
        store: &dyn SharedStore,
        version: u64,
    ) -> Result<Option<SharedSet>, String> {
        let slot = slot_of(version);
        let Some((bytes, _)) = store.get(&header_key(service, slot)) else {
            return Ok(None);
        };
        if bytes.is_empty() {
            // Cleared after its version was replaced.
            return Ok(None);
        }
        let mut r = Reader(&bytes);
        if r.u8() != Some(FORMAT) {
            return Err("stored key-set header: unknown format".to_string());
        }
        let (Some(tag), Some(stored), Some(buckets), Some(records)) =
            (r.u64(), r.u64(), r.u32(), r.u32())
        else {
            return Err("stored key-set header: truncated".to_string());
        };
        if stored != version {
            return Ok(None);
        }
        if !buckets.is_power_of_two() {
            return Err("stored key-set header: bad bucket count".to_string());
        }
        let profiles =
            decode_profiles(r.rest()).map_err(|e| format!("stored key-set profiles: {e}"))?;
        Ok(Some(SharedSet {
            version,
            slot,
            tag,
            buckets,
            records: records as usize,
            profiles,
        }))
    }

    pub fn len(&self) -> usize {
        self.records
    }

    /// What empties this version's slot once a newer one is announced.
    pub fn clearing(&self) -> Clearing {
        Clearing {
            slot: self.slot,
            buckets: self.buckets,
            next: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// The record whose secret has this digest: one bucket read.
    pub fn by_digest(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        digest: &Digest,
    ) -> Option<KeyRecord> {
        let bucket = digest_bucket(digest_prefix(digest), self.buckets);
        let (bytes, _) = store.get(&digest_key(service, self.slot, bucket))?;
        let entry = digest_entries(tagged(&bytes, self.tag)?).find(|e| e.digest == digest)?;
        self.record(&entry)
    }

    /// The record with this id: its id bucket gives its digest bucket.
    pub fn by_id(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        id: &str,
    ) -> Option<KeyRecord> {
        let bucket = id_bucket(id.as_bytes(), self.buckets);
        let (bytes, _) = store.get(&id_key(service, self.slot, bucket))?;
        let prefix = id_entries(tagged(&bytes, self.tag)?)
            .find(|e| e.id == id.as_bytes())?
            .prefix;
        let bucket = digest_bucket(prefix, self.buckets);
        let (bytes, _) = store.get(&digest_key(service, self.slot, bucket))?;
        let entry = digest_entries(tagged(&bytes, self.tag)?).find(|e| e.id == id.as_bytes())?;
        self.record(&entry)
    }

    fn record(&self, entry: &DigestEntry<'_>) -> Option<KeyRecord> {
        let digest = entry.digest.try_into().ok()?;
        let profile = Arc::clone(self.profiles.get(entry.profile as usize)?);
        let id = String::from_utf8(entry.id.to_vec()).ok()?;
        KeyRecord::with_checked_profile(id, digest, profile)
    }
}

/// A slot a replaced version used, emptied a slice at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clearing {
    pub slot: u64,
    pub buckets: u32,
    pub next: u32,
}

impl Clearing {
    /// Empties up to `BUCKETS_PER_SLICE` more buckets of both indexes, the header last. True
    /// once the slot is empty.
    pub fn step(&mut self, service: &KeyService, store: &dyn SharedStore) -> bool {
        let end = self
            .next
            .saturating_add(BUCKETS_PER_SLICE)
            .min(self.buckets);
        for bucket in self.next..end {
            let _ = store.set(&digest_key(service, self.slot, bucket), &[], 0);
            let _ = store.set(&id_key(service, self.slot, bucket), &[], 0);
        }
        self.next = end;
        if end < self.buckets {
            return false;
        }
        let _ = store.set(&header_key(service, self.slot), &[], 0);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::digest::sha256;
    use crate::core::keysource::test_host::service;
    use crate::core::memory_store::MemoryStore;
    use serde_json::json;

    fn spec(i: usize) -> KeyRecordSpec {
        serde_json::from_value(json!({"id": format!("k{i}"),
            "secret_sha256": hex::encode(sha256(format!("s{i}").as_bytes())),
            "tenant": format!("t{}", i % 3)}))
        .unwrap()
    }

    /// Writes `specs` as `version` in parts of `part` records; the build's outcome.
    fn build(
        store: &MemoryStore,
        specs: &[KeyRecordSpec],
        part: usize,
        version: u64,
        tag: u64,
    ) -> Result<usize, BuildError> {
        let service = service(json!({}));
        let mut writer = SetWriter::start(slot_of(version), tag, specs.len() as u64 * 100);
        for (n, chunk) in specs.chunks(part).enumerate() {
            for (i, spec) in chunk.iter().enumerate() {
                writer
                    .add(n * part + i, spec.clone())
                    .map_err(BuildError::Invalid)?;
            }
            writer.flush(&service, store)?;
        }
        writer.finish(&service, store, version)
    }

    fn loaded(store: &MemoryStore, version: u64) -> SharedSet {
        SharedSet::load(&service(json!({})), store, version)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn every_record_is_found_by_digest_and_by_id_with_its_profile() {
        let store = MemoryStore::default();
        let specs: Vec<_> = (0..5000).map(spec).collect();
        assert_eq!(build(&store, &specs, 700, 1, 11), Ok(5000));
        let set = loaded(&store, 1);
        let service = service(json!({}));
        assert_eq!(set.len(), 5000);
        for i in [0, 1, 2, 999, 4999] {
            let digest = sha256(format!("s{i}").as_bytes());
            let found = set.by_digest(&service, &store, &digest).unwrap();
            assert_eq!(found.id, format!("k{i}"));
            assert_eq!(
                found.fields.tenant.as_deref(),
                Some(format!("t{}", i % 3).as_str())
            );
            assert_eq!(
                set.by_id(&service, &store, &format!("k{i}")).unwrap(),
                found
            );
        }
        assert!(set.by_digest(&service, &store, &sha256(b"nope")).is_none());
        assert!(set.by_id(&service, &store, "nope").is_none());
    }

    #[test]
    fn the_first_duplicate_of_the_document_is_refused_naming_both_positions() {
        let store = MemoryStore::default();
        let mut specs: Vec<_> = (0..300).map(spec).collect();
        specs[250].id = "k7".into();
        specs[120].secret_sha256 = specs[3].secret_sha256.clone();
        let refused = build(&store, &specs, 100, 1, 1).unwrap_err();
        assert_eq!(
            refused,
            BuildError::Invalid(ConfigError::new(
                "keys[120].secret_sha256",
                "duplicate digest (also keys[3])"
            ))
        );
        // Both in one record: the id is named, as in a whole-document parse.
        specs[120].id = "k3".into();
        let refused = build(&store, &specs, 1000, 1, 2).unwrap_err();
        assert!(
            matches!(refused, BuildError::Invalid(e) if e.to_string().starts_with("keys[120].id"))
        );
    }

    #[test]
    fn what_a_failed_or_older_build_left_in_the_slot_is_not_read() {
        let store = MemoryStore::default();
        let service = service(json!({}));
        let old: Vec<_> = (0..100).map(spec).collect();
        build(&store, &old, 100, 1, 5).unwrap();
        // Version 3 reuses slot 1 with a different tag and only the first ten records.
        build(&store, &old[..10], 100, 3, 6).unwrap();
        let set = loaded(&store, 3);
        assert!(set.by_id(&service, &store, "k5").is_some());
        let gone = sha256(b"s50");
        assert!(set.by_digest(&service, &store, &gone).is_none());
        assert!(set.by_id(&service, &store, "k50").is_none());
        // The header names its version: version 1 is no longer in the slot.
        assert!(SharedSet::load(&service, &store, 1).unwrap().is_none());
    }

    #[test]
    fn a_cleared_slot_holds_nothing() {
        let store = MemoryStore::default();
        let service = service(json!({}));
        let specs: Vec<_> = (0..100).map(spec).collect();
        build(&store, &specs, 100, 2, 9).unwrap();
        let buckets = loaded(&store, 2).buckets;
        let mut clearing = Clearing {
            slot: 0,
            buckets,
            next: 0,
        };
        while !clearing.step(&service, &store) {}
        assert!(SharedSet::load(&service, &store, 2).unwrap().is_none());
        let key = digest_key(
            &service,
            0,
            digest_bucket(digest_prefix(&sha256(b"s1")), buckets),
        );
        assert_eq!(store.get(&key).map(|(v, _)| v.len()), Some(0));
    }

    #[test]
    fn the_bucket_count_follows_the_document_size() {
        assert_eq!(bucket_count(0), 64);
        assert_eq!(bucket_count(123_000_000), 1 << 16);
        assert_eq!(bucket_count(12_000_000), 8192);
    }
}
