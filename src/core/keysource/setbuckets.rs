//! A key set looked up in shared data, one copy for the whole process: no VM copies the set in.
//! The set is stored as buckets of binary records keyed by digest prefix (and a second, smaller
//! index of buckets keyed by a hash of the id, for id:secret keys), in one of two slots that
//! versions alternate between. A request reads one bucket (two for an id:secret key) and scans a
//! few dozen records; a VM holds only the set's distinct profiles.
//!
//! The VM that fetched a document stages the records of each part in shared data as the part
//! arrives (`SetWriter`), grouped by the buckets they belong to, so it never holds the whole
//! set. Once every part is in, it assembles one group per step: reads the group's staged
//! values, finds duplicates, writes each bucket **once**, at its final size, and empties the
//! staged values. A bucket grown record by record would leave a freed copy of every size it
//! passed through, scattered among live values where Envoy's allocator can never hand the pages
//! back (+47% RSS after five reloads at 1M keys); staged values are larger than any bucket and
//! are all freed together. Every bucket starts with the tag of the build that wrote it, so
//! whatever an older or failed build left in the slot reads as empty. The slot's header (tag,
//! version, bucket count, profiles) is written last, then the meta that announces the version;
//! the slot the old version used is emptied in slices after that (`Clearing`). A whole build is
//! for a first version, or one an update in place (`setdelta`) cannot settle: most new versions
//! are written over the live one, in its slot.
//!
//! Digest bucket: tag, then per record digest (32), profile number (u32), document position
//! (u32), id length (u16), id. Id bucket: tag, then per record id length (u16), id, digest
//! prefix (u64), document position (u32). A staged value: tag, then records encoded as in the
//! bucket of its index. Header: format, tag, version, bucket count, record count, then the
//! profiles (`profile_spec`s as JSON).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::service::KeyService;
use super::store::{Reader, SharedStore};
use crate::core::config_error::ConfigError;
use crate::core::digest::Digest;
use crate::core::keyset::{digest_prefix, sorted_indexes, KeyProfile, KeyRecord, KeyRecordSpec};

const FORMAT: u8 = 1;
/// Records a bucket holds on average at most: one bucket read (about 2 KB) per request. The
/// count is chosen once the records are counted, when the build is assembled.
pub(super) const RECORDS_PER_BUCKET: u64 = 32;
/// Staged groups per index, also the fewest buckets: a group is a fixed slice of the digest's
/// leading bits (of the id hash's low bits), so records are grouped before the bucket count is
/// known and every bucket lies in one group.
const GROUPS: u32 = 256;
const MIN_BUCKETS: u64 = GROUPS as u64;
const MAX_BUCKETS: u64 = 1 << 16;
/// Buckets emptied per slice when an old slot is cleared: 512 host calls, under a millisecond,
/// on the short ticks of a VM at work (`Fetch::wants_short_ticks`), so 64K buckets are cleared
/// in a few seconds (256 ticks) and the memory they held is free soon after a reload.
pub const BUCKETS_PER_SLICE: u32 = 256;
/// Staged records held in the VM before they are written out, one value per group and index
/// (values of about 4 KB, larger than any bucket, each written once and read once; at 1M keys
/// a group is about 4,000 records, read and written in one assembly step).
const STAGE_FLUSH_BYTES: usize = 2 * 1024 * 1024;
/// Records assembled per step at most (whole groups; at least one): at 1M keys one group a
/// step, a small set in one step.
const RECORDS_PER_STEP: usize = 4096;

/// The digest of a profile written as a record (never looked up).
const BLANK_DIGEST: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A set's profile as a record without id or digest, as the header stores it.
pub(super) fn profile_spec(p: &KeyProfile) -> KeyRecordSpec {
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

/// A set's distinct profiles, numbered in order of appearance: records store the number, the
/// header the profiles.
#[derive(Debug, Default)]
pub(super) struct ProfileTable {
    /// Each validated once and shared by every record that grants the same; numbered in
    /// `numbers` by address (each lives here until the build ends).
    profiles: HashSet<Arc<KeyProfile>>,
    numbers: HashMap<usize, u32>,
    pub(super) specs: Vec<KeyRecordSpec>,
}

impl ProfileTable {
    fn numbered(stored: &[Arc<KeyProfile>]) -> ProfileTable {
        let mut table = ProfileTable::default();
        for profile in stored {
            table.profiles.insert(Arc::clone(profile));
            table.number(profile);
        }
        table
    }

    /// Validates the record at `position` of the document; it and its profile's number.
    pub(super) fn record(
        &mut self,
        position: usize,
        spec: KeyRecordSpec,
    ) -> Result<(u32, KeyRecord, u32), ConfigError> {
        let path = format!("keys[{position}]");
        let record = KeyRecord::from_spec_sharing(spec, &path, &mut self.profiles)?;
        let position = u32::try_from(position)
            .map_err(|_| ConfigError::new("keys", "too many keys for one set"))?;
        let number = self.number(&record.profile);
        Ok((position, record, number))
    }

    fn number(&mut self, profile: &Arc<KeyProfile>) -> u32 {
        let next = self.numbers.len() as u32;
        let specs = &mut self.specs;
        *self
            .numbers
            .entry(Arc::as_ptr(profile) as usize)
            .or_insert_with(|| {
                specs.push(profile_spec(profile));
                next
            })
    }
}

/// The document's records as they are read: validated, numbered by profile, and held until
/// the writer's next flush.
#[derive(Debug, Default)]
pub(super) struct Intake {
    pub(super) profiles: ProfileTable,
    /// Records since the last flush: position in the document, record, profile number.
    pending: Vec<(u32, KeyRecord, u32)>,
    /// Records taken so far.
    pub(super) records: u32,
}

impl Intake {
    /// An intake that keeps the numbers of a stored version's profiles.
    pub(super) fn numbered(stored: &[Arc<KeyProfile>]) -> Intake {
        Intake {
            profiles: ProfileTable::numbered(stored),
            ..Intake::default()
        }
    }

    /// Validates the record at `position` of the document's `keys`.
    pub(crate) fn add(&mut self, position: usize, spec: KeyRecordSpec) -> Result<(), ConfigError> {
        self.pending.push(self.profiles.record(position, spec)?);
        Ok(())
    }

    /// Every record is in: writes the header of `version`, its buckets laid out as `layout`
    /// (the meta, written next, announces it). Returns the record count.
    pub(super) fn publish(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        layout: Layout,
        version: u64,
    ) -> Result<usize, BuildError> {
        write_header(
            service,
            store,
            layout,
            version,
            self.records,
            &self.profiles.specs,
        )?;
        Ok(self.records as usize)
    }

    /// The records added since the last call.
    pub(super) fn take(&mut self) -> Vec<(u32, KeyRecord, u32)> {
        let pending = std::mem::take(&mut self.pending);
        self.records = self.records.saturating_add(pending.len() as u32);
        pending
    }
}

/// Appends a digest bucket's record.
pub(super) fn encode_digest_entry(
    out: &mut Vec<u8>,
    digest: &[u8],
    profile: u32,
    position: u32,
    id: &[u8],
) {
    out.extend_from_slice(digest);
    out.extend_from_slice(&profile.to_le_bytes());
    out.extend_from_slice(&position.to_le_bytes());
    out.extend_from_slice(&(id.len() as u16).to_le_bytes());
    out.extend_from_slice(id);
}

/// Appends an id bucket's record.
pub(super) fn encode_id_entry(out: &mut Vec<u8>, id: &[u8], prefix: u64, position: u32) {
    out.extend_from_slice(&(id.len() as u16).to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(&prefix.to_le_bytes());
    out.extend_from_slice(&position.to_le_bytes());
}

/// Buckets (a power of two) for `records` records: at most `RECORDS_PER_BUCKET` each on
/// average, up to 2M records.
pub fn bucket_count(records: u64) -> u32 {
    let wanted = (records / RECORDS_PER_BUCKET).max(1);
    wanted.next_power_of_two().clamp(MIN_BUCKETS, MAX_BUCKETS) as u32
}

/// The slot a version is first looked for in (and a first version written to). An update in
/// place keeps its version's slot, so a version can be in either; its header names it.
pub fn slot_of(version: u64) -> u64 {
    version % 2
}

/// The slot a whole build writes while `live` serves from the other.
pub fn other_slot(live: u64) -> u64 {
    1 - live % 2
}

pub(super) fn header_key(service: &KeyService, slot: u64) -> String {
    service.key(&format!("s{slot}.h"))
}

pub(super) fn digest_key(service: &KeyService, slot: u64, bucket: u32) -> String {
    service.key(&format!("s{slot}.d{bucket}"))
}

pub(super) fn id_key(service: &KeyService, slot: u64, bucket: u32) -> String {
    service.key(&format!("s{slot}.i{bucket}"))
}

/// The two indexes of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Index {
    Digest,
    Id,
}

/// The records of `index` staged for `group` by a build's `flush`-th write-out.
fn staged_key(service: &KeyService, slot: u64, index: Index, group: u32, flush: u32) -> String {
    let letter = match index {
        Index::Digest => 'd',
        Index::Id => 'i',
    };
    service.key(&format!("s{slot}.t{letter}{group}.{flush}"))
}

/// The digest prefix of a stored record's digest.
fn entry_prefix(digest: &[u8]) -> u64 {
    <&Digest>::try_from(digest).map_or(0, digest_prefix)
}

/// A staged group's place among both indexes' groups (the digest index's first), and back.
fn staged_place(index: Index, group: u32) -> u32 {
    match index {
        Index::Digest => group,
        Index::Id => GROUPS + group,
    }
}

fn staged_group(place: u32) -> (Index, u32) {
    if place < GROUPS {
        (Index::Digest, place)
    } else {
        (Index::Id, place - GROUPS)
    }
}

/// The staged group of a digest: its leading bits, which also lead its bucket number.
fn digest_group(prefix: u64) -> u32 {
    digest_bucket(prefix, GROUPS)
}

/// The staged group of an id: the low bits of its hash, which also end its bucket number.
fn id_group(id: &[u8]) -> u32 {
    id_bucket(id, GROUPS)
}

/// Digests are evenly spread: their leading bits pick the bucket.
pub(super) fn digest_bucket(prefix: u64, buckets: u32) -> u32 {
    let bits = buckets.trailing_zeros();
    prefix.checked_shr(64 - bits).unwrap_or(0) as u32
}

/// FNV-1a: ids come from the key service, not from requests, so a plain hash spreads them.
pub(super) fn id_bucket(id: &[u8], buckets: u32) -> u32 {
    let hash = id.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    (hash & u64::from(buckets - 1)) as u32
}

/// A digest bucket's record as stored.
pub(super) struct DigestEntry<'a> {
    pub(super) digest: &'a [u8],
    pub(super) profile: u32,
    pub(super) position: u32,
    pub(super) id: &'a [u8],
}

pub(super) fn digest_entries(mut r: Reader<'_>) -> impl Iterator<Item = DigestEntry<'_>> {
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
pub(super) struct IdEntry<'a> {
    pub(super) id: &'a [u8],
    pub(super) prefix: u64,
    pub(super) position: u32,
}

pub(super) fn id_entries(mut r: Reader<'_>) -> impl Iterator<Item = IdEntry<'_>> {
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

/// A staged record: its bucket, what duplicates are found by (digest or id), its position in
/// the document, and its bytes as its bucket stores them.
struct StagedEntry<'a> {
    bucket: u32,
    key: &'a [u8],
    position: u32,
    bytes: &'a [u8],
}

/// The records of a staged value of `index`.
fn staged_entries(
    mut r: Reader<'_>,
    index: Index,
    buckets: u32,
) -> impl Iterator<Item = StagedEntry<'_>> {
    std::iter::from_fn(move || {
        let (bucket, key, position, len) = match index {
            Index::Digest => {
                let e = digest_entries(Reader(r.0)).next()?;
                let bucket = digest_bucket(entry_prefix(e.digest), buckets);
                (bucket, e.digest, e.position, 32 + 4 + 4 + 2 + e.id.len())
            }
            Index::Id => {
                let e = id_entries(Reader(r.0)).next()?;
                let bucket = id_bucket(e.id, buckets);
                (bucket, e.id, e.position, 2 + e.id.len() + 8 + 4)
            }
        };
        Some(StagedEntry {
            bucket,
            key,
            position,
            bytes: r.take(len)?,
        })
    })
}

/// The records of a bucket written by the build tagged `tag` (none when another build wrote it).
pub(super) fn tagged(bytes: &[u8], tag: u64) -> Option<Reader<'_>> {
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

/// One version being written into its slot: staged part by part, then assembled.
#[derive(Debug)]
pub struct SetWriter {
    slot: u64,
    tag: u64,
    buckets: u32,
    pub(super) intake: Intake,
    /// Encoded records not yet staged, per group: of the digest index, then of the id index.
    staging: Vec<Vec<u8>>,
    staging_bytes: usize,
    stage_flush_bytes: usize,
    /// Write-outs of `staging` so far, and which of them staged a value for each group.
    flushes: u32,
    staged_in: Vec<Vec<u32>>,
    /// Groups assembled so far: the digest index's, then the id index's.
    assembled: u32,
    /// The first duplicate of the document found by assembly so far.
    duplicate: Option<Duplicate>,
}

impl SetWriter {
    /// A build of the version to be stored in `slot`, tagged `tag` (unique per build: the
    /// time it started), for a document of `document_bytes`.
    pub fn start(slot: u64, tag: u64) -> SetWriter {
        SetWriter {
            slot,
            tag,
            buckets: 0,
            intake: Intake::default(),
            staging: vec![Vec::new(); 2 * GROUPS as usize],
            staging_bytes: 0,
            stage_flush_bytes: STAGE_FLUSH_BYTES,
            flushes: 0,
            staged_in: vec![Vec::new(); 2 * GROUPS as usize],
            assembled: 0,
            duplicate: None,
        }
    }

    pub fn slot(&self) -> u64 {
        self.slot
    }

    /// What empties this build's slot, staged values included (a build not published).
    pub fn clearing(&self) -> Clearing {
        Clearing {
            slot: self.slot,
            buckets: self.buckets,
            next: 0,
            staged: self.flushes,
        }
    }

    /// Encodes the records added since the last flush into their groups, and writes the groups
    /// out once `STAGE_FLUSH_BYTES` are held.
    pub fn flush(
        &mut self,
        service: &KeyService,
        store: &dyn SharedStore,
    ) -> Result<(), BuildError> {
        for (position, record, profile) in &self.intake.take() {
            let (position, profile) = (*position, *profile);
            let id = record.id.as_bytes();
            let prefix = digest_prefix(&record.digest);
            let group = staged_place(Index::Digest, digest_group(prefix)) as usize;
            if let Some(staged) = self.staging.get_mut(group) {
                let before = staged.len();
                encode_digest_entry(staged, &record.digest, profile, position, id);
                self.staging_bytes += staged.len() - before;
            }
            let group = staged_place(Index::Id, id_group(id)) as usize;
            if let Some(staged) = self.staging.get_mut(group) {
                let before = staged.len();
                encode_id_entry(staged, id, prefix, position);
                self.staging_bytes += staged.len() - before;
            }
        }
        if self.staging_bytes >= self.stage_flush_bytes {
            self.write_staged(service, store)?;
        }
        Ok(())
    }

    /// Writes every group's staged records as one value each.
    fn write_staged(
        &mut self,
        service: &KeyService,
        store: &dyn SharedStore,
    ) -> Result<(), BuildError> {
        if self.staging_bytes == 0 {
            return Ok(());
        }
        let mut value = Vec::new();
        for (n, staged) in (0u32..).zip(self.staging.iter_mut()) {
            if staged.is_empty() {
                continue;
            }
            let (index, group) = staged_group(n);
            value.clear();
            value.extend_from_slice(&self.tag.to_le_bytes());
            value.extend_from_slice(staged);
            staged.clear();
            let key = staged_key(service, self.slot, index, group, self.flushes);
            store.set(&key, &value, 0).map_err(|_| BuildError::Store)?;
            if let Some(flushes) = self.staged_in.get_mut(n as usize) {
                flushes.push(self.flushes);
            }
        }
        self.staging_bytes = 0;
        self.flushes += 1;
        Ok(())
    }

    /// Every part is in: assembles the next groups, up to `RECORDS_PER_STEP` records (each
    /// group's staged values read, its buckets written once, the staged values emptied). True once every group of both indexes is assembled;
    /// then refuses the first duplicate id or digest of the document (its id before its
    /// digest), as `KeySet::from_document` does.
    pub fn assemble_step(
        &mut self,
        service: &KeyService,
        store: &dyn SharedStore,
    ) -> Result<bool, BuildError> {
        self.write_staged(service, store)?;
        self.staging = Vec::new();
        if self.buckets == 0 {
            self.buckets = bucket_count(u64::from(self.intake.records));
        }
        let mut records = 0;
        while self.assembled < 2 * GROUPS && records < RECORDS_PER_STEP {
            let (index, group) = staged_group(self.assembled);
            records += self.assemble_group(service, store, index, group)?;
            self.assembled += 1;
        }
        if self.assembled < 2 * GROUPS {
            return Ok(false);
        }
        match self.duplicate {
            Some((later, field, earlier)) => {
                let what = if field == "id" { "key id" } else { "digest" };
                Err(BuildError::Invalid(ConfigError::new(
                    format!("keys[{later}].{field}"),
                    format!("duplicate {what} (also keys[{earlier}])"),
                )))
            }
            None => Ok(true),
        }
    }

    /// Assembles one group; the number of records it held.
    fn assemble_group(
        &mut self,
        service: &KeyService,
        store: &dyn SharedStore,
        index: Index,
        group: u32,
    ) -> Result<usize, BuildError> {
        let mut values = Vec::new();
        let place = staged_place(index, group) as usize;
        let flushes = self.staged_in.get_mut(place).map(std::mem::take);
        for flush in flushes.unwrap_or_default() {
            let key = staged_key(service, self.slot, index, group, flush);
            if let Some((bytes, _)) = store.get(&key) {
                if tagged(&bytes, self.tag).is_some() {
                    values.push((key, bytes));
                }
            }
        }
        let buckets = self.buckets;
        let entries: Vec<StagedEntry<'_>> = values
            .iter()
            .filter_map(|(_, bytes)| tagged(bytes, self.tag))
            .flat_map(|records| staged_entries(records, index, buckets))
            .collect();
        let sort_key = |n: &u32| {
            entries
                .get(*n as usize)
                .map(|e| (e.bucket, e.key, e.position))
        };
        let order = sorted_indexes(entries.len() as u32, &|a, b| sort_key(a).cmp(&sort_key(b)));
        let sorted: Vec<&StagedEntry<'_>> = order
            .iter()
            .filter_map(|n| entries.get(*n as usize))
            .collect();
        let field = match index {
            Index::Digest => "secret_sha256",
            Index::Id => "id",
        };
        for pair in sorted.windows(2) {
            if let [earlier, later] = pair {
                if earlier.key == later.key {
                    let found = (later.position, field, earlier.position);
                    if self
                        .duplicate
                        .is_none_or(|f| (found.0, found.1) < (f.0, f.1))
                    {
                        self.duplicate = Some(found);
                    }
                }
            }
        }
        let mut value = Vec::new();
        for run in sorted.chunk_by(|a, b| a.bucket == b.bucket) {
            let Some(head) = run.first() else { continue };
            value.clear();
            value.extend_from_slice(&self.tag.to_le_bytes());
            for entry in run {
                value.extend_from_slice(entry.bytes);
            }
            let key = match index {
                Index::Digest => digest_key(service, self.slot, head.bucket),
                Index::Id => id_key(service, self.slot, head.bucket),
            };
            store.set(&key, &value, 0).map_err(|_| BuildError::Store)?;
        }
        for (key, _) in &values {
            store.set(key, &[], 0).map_err(|_| BuildError::Store)?;
        }
        Ok(entries.len())
    }

    /// Where this build writes.
    pub(super) fn layout(&self) -> Layout {
        Layout {
            slot: self.slot,
            tag: self.tag,
            buckets: self.buckets,
        }
    }
}

/// Where a version's buckets are: its slot, the tag of the build that wrote them, their count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    pub(super) slot: u64,
    pub(super) tag: u64,
    pub(super) buckets: u32,
}

/// Writes the header of `version` (its buckets laid out as `layout`, `records` records, the
/// profiles numbered as in `specs`).
pub(super) fn write_header(
    service: &KeyService,
    store: &dyn SharedStore,
    layout: Layout,
    version: u64,
    records: u32,
    specs: &[KeyRecordSpec],
) -> Result<(), BuildError> {
    let profiles = serde_json::to_vec(specs).map_err(|_| BuildError::Store)?;
    let mut header = Vec::with_capacity(32 + profiles.len());
    header.push(FORMAT);
    header.extend_from_slice(&layout.tag.to_le_bytes());
    header.extend_from_slice(&version.to_le_bytes());
    header.extend_from_slice(&layout.buckets.to_le_bytes());
    header.extend_from_slice(&records.to_le_bytes());
    header.extend_from_slice(&profiles);
    store
        .set(&header_key(service, layout.slot), &header, 0)
        .map_err(|_| BuildError::Store)
}

/// A version in shared data as one VM reads it: the slot's header, its profiles decoded once.
#[derive(Debug)]
pub struct SharedSet {
    pub version: u64,
    slot: u64,
    tag: u64,
    buckets: u32,
    records: usize,
    /// Decoded once; longer once an update in place appends profiles (`refresh_profiles`).
    profiles: RefCell<Vec<Arc<KeyProfile>>>,
}

impl SharedSet {
    /// Reads the header of `version`, in whichever slot holds it. `Ok(None)`: neither does (the
    /// meta moved on meanwhile); `Err`: the stored bytes do not decode.
    pub fn load(
        service: &KeyService,
        store: &dyn SharedStore,
        version: u64,
    ) -> Result<Option<SharedSet>, String> {
        let first = slot_of(version);
        for slot in [first, other_slot(first)] {
            if let Some(set) = SharedSet::load_slot(service, store, slot, version)? {
                return Ok(Some(set));
            }
        }
        Ok(None)
    }

    fn load_slot(
        service: &KeyService,
        store: &dyn SharedStore,
        slot: u64,
        version: u64,
    ) -> Result<Option<SharedSet>, String> {
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
            profiles: RefCell::new(profiles),
        }))
    }

    pub fn len(&self) -> usize {
        self.records
    }

    pub(super) fn layout(&self) -> Layout {
        Layout {
            slot: self.slot,
            tag: self.tag,
            buckets: self.buckets,
        }
    }

    /// The profiles, numbered as the records refer to them.
    pub(super) fn profiles(&self) -> Vec<Arc<KeyProfile>> {
        self.profiles.borrow().clone()
    }

    pub(super) fn records(&self) -> u32 {
        self.records as u32
    }

    /// Rereads the header's profiles: an update in place appends the new ones to its version's
    /// header before it writes a record that refers to them, and keeps them in the header of
    /// the version it publishes (this VM may read a record before it reads that version).
    fn refresh_profiles(&self, service: &KeyService, store: &dyn SharedStore) {
        for version in [self.version, self.version + 1] {
            if let Ok(Some(stored)) = SharedSet::load_slot(service, store, self.slot, version) {
                let fresh = stored.profiles.into_inner();
                if stored.tag == self.tag && fresh.len() > self.profiles.borrow().len() {
                    *self.profiles.borrow_mut() = fresh;
                }
                return;
            }
        }
    }

    /// What empties this version's slot once a newer one is announced.
    pub fn clearing(&self) -> Clearing {
        Clearing {
            slot: self.slot,
            buckets: self.buckets,
            next: 0,
            staged: 0,
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
        self.record(service, store, &entry)
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
        self.record(service, store, &entry)
    }

    fn record(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        entry: &DigestEntry<'_>,
    ) -> Option<KeyRecord> {
        let digest = entry.digest.try_into().ok()?;
        let number = entry.profile as usize;
        let known = self.profiles.borrow().get(number).cloned();
        let profile = match known {
            Some(profile) => profile,
            None => {
                self.refresh_profiles(service, store);
                self.profiles.borrow().get(number).cloned()?
            }
        };
        let id = String::from_utf8(entry.id.to_vec()).ok()?;
        KeyRecord::with_checked_profile(id, digest, profile)
    }
}

/// A slot a replaced version used (or an unpublished build wrote), emptied a slice at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clearing {
    pub slot: u64,
    pub buckets: u32,
    pub next: u32,
    /// Staged write-outs an unpublished build left (assembly empties them otherwise).
    pub staged: u32,
}

impl Clearing {
    /// Empties up to `BUCKETS_PER_SLICE` more buckets of both indexes, then the staged values
    /// left behind, the header last. True once the slot is empty.
    pub fn step(&mut self, service: &KeyService, store: &dyn SharedStore) -> bool {
        let total = self
            .buckets
            .saturating_add(self.staged.saturating_mul(GROUPS));
        let end = self.next.saturating_add(BUCKETS_PER_SLICE).min(total);
        for unit in self.next..end {
            if unit < self.buckets {
                let _ = store.set(&digest_key(service, self.slot, unit), &[], 0);
                let _ = store.set(&id_key(service, self.slot, unit), &[], 0);
                continue;
            }
            let staged = unit - self.buckets;
            let (flush, group) = (staged / GROUPS, staged % GROUPS);
            for index in [Index::Digest, Index::Id] {
                let key = staged_key(service, self.slot, index, group, flush);
                // Only what was written: a write would create the absent ones.
                if store.get(&key).is_some_and(|(value, _)| !value.is_empty()) {
                    let _ = store.set(&key, &[], 0);
                }
            }
        }
        self.next = end;
        if end < total {
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
    use crate::core::keysource::store::StoreError;
    use crate::core::keysource::test_host::service;
    use crate::core::memory_store::MemoryStore;
    use serde_json::json;

    fn spec(i: usize) -> KeyRecordSpec {
        serde_json::from_value(json!({"id": format!("k{i}"),
            "secret_sha256": hex::encode(sha256(format!("s{i}").as_bytes())),
            "tenant": format!("t{}", i % 3)}))
        .unwrap()
    }

    /// Stages `specs` for `version` in parts of `part` records, writing the staged records out
    /// every `stage_bytes`.
    fn staged(
        store: &dyn SharedStore,
        specs: &[KeyRecordSpec],
        part: usize,
        version: u64,
        tag: u64,
        stage_bytes: usize,
    ) -> Result<SetWriter, BuildError> {
        let service = service(json!({}));
        let mut writer = SetWriter::start(slot_of(version), tag);
        writer.stage_flush_bytes = stage_bytes;
        for (n, chunk) in specs.chunks(part).enumerate() {
            for (i, spec) in chunk.iter().enumerate() {
                writer
                    .intake
                    .add(n * part + i, spec.clone())
                    .map_err(BuildError::Invalid)?;
            }
            writer.flush(&service, store)?;
        }
        Ok(writer)
    }

    /// Writes `specs` as `version` in parts of `part` records; the build's outcome.
    fn build(
        store: &dyn SharedStore,
        specs: &[KeyRecordSpec],
        part: usize,
        version: u64,
        tag: u64,
    ) -> Result<usize, BuildError> {
        let service = service(json!({}));
        let mut writer = staged(store, specs, part, version, tag, 4096)?;
        while !writer.assemble_step(&service, store)? {}
        writer
            .intake
            .publish(&service, store, writer.layout(), version)
    }

    /// A store that counts the writes of each key.
    #[derive(Default)]
    struct CountingStore {
        inner: MemoryStore,
        writes: std::cell::RefCell<HashMap<String, usize>>,
    }

    impl SharedStore for CountingStore {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
            *self.writes.borrow_mut().entry(key.to_string()).or_default() += 1;
            self.inner.set(key, value, cas)
        }
    }

    /// Every non-empty value of slot `slot` whose key contains `part`.
    fn held(store: &CountingStore, service: &KeyService, slot: u64, part: &str) -> usize {
        let prefix = service.key(&format!("s{slot}.{part}"));
        store
            .writes
            .borrow()
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .filter(|k| store.get(k).is_some_and(|(v, _)| !v.is_empty()))
            .count()
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
            staged: 0,
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
    fn each_bucket_is_written_once_per_build_and_nothing_staged_is_left() {
        let store = CountingStore::default();
        let service = service(json!({}));
        let specs: Vec<_> = (0..3000).map(spec).collect();
        // Parts of 100 records, staged values written out every 4 KB: many write-outs, each
        // bucket fed by several of them.
        assert_eq!(build(&store, &specs, 100, 1, 3), Ok(3000));
        let writes = store.writes.borrow();
        let bucket_writes: Vec<usize> = writes
            .iter()
            .filter(|(k, _)| {
                k.starts_with(&service.key("s1.d")) || k.starts_with(&service.key("s1.i"))
            })
            .map(|(_, n)| *n)
            .collect();
        assert!(bucket_writes.len() > 100);
        assert!(bucket_writes.iter().all(|n| *n == 1), "{bucket_writes:?}");
        let staged_values = writes
            .keys()
            .filter(|k| k.starts_with(&service.key("s1.t")))
            .count();
        assert!(staged_values > 20, "{staged_values}");
        drop(writes);
        assert_eq!(held(&store, &service, 1, "t"), 0);
        let set = loaded(&store.inner, 1);
        let found = set.by_id(&service, &store, "k2999").unwrap();
        assert_eq!(
            found,
            set.by_digest(&service, &store, &sha256(b"s2999")).unwrap()
        );
    }

    #[test]
    fn an_unpublished_build_is_cleared_with_what_it_staged() {
        let store = CountingStore::default();
        let service = service(json!({}));
        let specs: Vec<_> = (0..12_000).map(spec).collect();
        let mut writer = staged(&store, &specs, 1000, 2, 4, 64 * 1024).unwrap();
        // Partly assembled (a step takes about a third of these records), then abandoned:
        // buckets and staged values are both in the slot.
        writer.assemble_step(&service, &store).unwrap();
        assert!(held(&store, &service, 0, "t") > 0);
        assert!(held(&store, &service, 0, "d") > 0);
        let mut clearing = writer.clearing();
        while !clearing.step(&service, &store) {}
        assert_eq!(held(&store, &service, 0, "t"), 0);
        assert_eq!(held(&store, &service, 0, "d"), 0);
        assert_eq!(held(&store, &service, 0, "i"), 0);
    }

    #[test]
    fn the_bucket_count_follows_the_document_size() {
        assert_eq!(bucket_count(0), 256);
        assert_eq!(bucket_count(1_000_000), 1 << 15);
        assert_eq!(bucket_count(100_000), 4096);
        assert_eq!(bucket_count(5_000_000), 1 << 16);
    }
}
