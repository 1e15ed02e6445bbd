//! A validated key set in shared data, parsed once per process. The VM that fetched a document
//! writes its set as fixed-layout binary chunks of `CHUNK_RECORDS` records (sorted by digest,
//! with their slice of the by-id order), plus a header with the distinct profiles; every other
//! VM copies the chunks in a few at a time without parsing JSON or sorting, and keeps serving its
//! current set until the new one is complete.
//!
//! Header: format, version, record count, chunk count, then the profiles as a JSON array of
//! records (id and digest left blank), validated again by the reader like any record.
//! Chunk: format, version, record count, then per record digest (32), profile number (u32), id
//! length (u16) and id; then the chunk's slice of the by-id order (u32 positions).

use std::collections::HashMap;
use std::sync::Arc;

use super::store::Reader;
use crate::core::keyset::{digest_prefix, KeyProfile, KeyRecord, KeyRecordSpec, KeySet};

/// Records per chunk: one chunk is copied in well under a millisecond.
pub const CHUNK_RECORDS: usize = 4096;
const FORMAT: u8 = 1;
const BLANK_DIGEST: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A set's profile as a record without id or digest.
pub(crate) fn profile_spec(p: &KeyProfile) -> KeyRecordSpec {
    p.to_spec("profile".into(), BLANK_DIGEST.into())
}

/// Encodes `set` as `version` for shared data: hands each chunk to `put` as it is made (so only
/// one is held at a time) and returns the header, or `None` when `put` refused a chunk.
pub fn encode(
    set: &KeySet,
    version: u64,
    mut put: impl FnMut(usize, &[u8]) -> bool,
) -> Option<Vec<u8>> {
    let records = set.records();
    let by_digest = set.digest_order();
    // Position of each record (by document number) in digest order.
    let mut position = vec![0u32; records.len()];
    for (at, number) in by_digest.iter().enumerate() {
        if let Some(slot) = position.get_mut(*number as usize) {
            *slot = at as u32;
        }
    }
    let by_id: Vec<u32> = set
        .id_order()
        .iter()
        .map(|number| position.get(*number as usize).copied().unwrap_or(0))
        .collect();
    drop(position);
    let mut profile_numbers: HashMap<*const KeyProfile, u32> = HashMap::new();
    let mut profiles = Vec::new();
    let mut chunks = 0usize;
    for (numbers, by_id) in by_digest
        .chunks(CHUNK_RECORDS)
        .zip(by_id.chunks(CHUNK_RECORDS))
    {
        let mut chunk = Vec::with_capacity(13 + numbers.len() * 64);
        chunk.push(FORMAT);
        chunk.extend_from_slice(&version.to_le_bytes());
        chunk.extend_from_slice(&(numbers.len() as u32).to_le_bytes());
        for record in numbers.iter().filter_map(|n| records.get(*n as usize)) {
            let next = profile_numbers.len() as u32;
            let profile = *profile_numbers
                .entry(Arc::as_ptr(&record.profile))
                .or_insert_with(|| {
                    profiles.push(profile_spec(&record.profile));
                    next
                });
            chunk.extend_from_slice(&record.digest);
            chunk.extend_from_slice(&profile.to_le_bytes());
            chunk.extend_from_slice(&(record.id.len() as u16).to_le_bytes());
            chunk.extend_from_slice(record.id.as_bytes());
        }
        for position in by_id {
            chunk.extend_from_slice(&position.to_le_bytes());
        }
        if !put(chunks, &chunk) {
            return None;
        }
        chunks += 1;
    }
    let mut header = Vec::new();
    header.push(FORMAT);
    header.extend_from_slice(&version.to_le_bytes());
    header.extend_from_slice(&(records.len() as u32).to_le_bytes());
    header.extend_from_slice(&(chunks as u32).to_le_bytes());
    header.extend_from_slice(&serde_json::to_vec(&profiles).ok()?);
    Some(header)
}

/// The profiles of a stored set (`profile_spec`s as a JSON array), validated again like any record.
pub(crate) fn decode_profiles(bytes: &[u8]) -> Result<Vec<Arc<KeyProfile>>, String> {
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

/// A set being copied in from shared data, chunk by chunk.
#[derive(Debug)]
pub struct Loading {
    pub version: u64,
    pub chunks: u32,
    pub next_chunk: u32,
    total: u32,
    profiles: Vec<Arc<KeyProfile>>,
    records: Vec<KeyRecord>,
    by_id: Vec<u32>,
    /// The records' digest prefixes, built as chunks come in, so `finish` has no pass over a
    /// million records left to do in one go.
    digest_prefixes: Vec<u64>,
}

/// Why a stored set cannot be loaded.
#[derive(Debug, PartialEq, Eq)]
pub enum LoadError {
    /// A newer version is being written over this one: start again with it.
    Superseded,
    /// The stored bytes do not decode (another keygate version wrote them, or they are damaged).
    Invalid(String),
}

impl Loading {
    /// Starts from a header.
    pub fn start(header: &[u8]) -> Result<Loading, LoadError> {
        let invalid = |why: &str| LoadError::Invalid(format!("stored key-set header: {why}"));
        let mut r = Reader(header);
        if r.u8() != Some(FORMAT) {
            return Err(invalid("unknown format"));
        }
        let (Some(version), Some(total), Some(chunks)) = (r.u64(), r.u32(), r.u32()) else {
            return Err(invalid("truncated"));
        };
        let profiles = decode_profiles(r.rest()).map_err(|e| invalid(&e))?;
        Ok(Loading {
            version,
            chunks,
            next_chunk: 0,
            total,
            profiles,
            records: Vec::with_capacity(total as usize),
            by_id: Vec::with_capacity(total as usize),
            digest_prefixes: Vec::with_capacity(total as usize),
        })
    }

    pub fn is_complete(&self) -> bool {
        self.next_chunk >= self.chunks
    }

    /// Copies in the next chunk.
    pub fn add_chunk(&mut self, chunk: &[u8]) -> Result<(), LoadError> {
        let at = self.next_chunk;
        let invalid = |why: &str| LoadError::Invalid(format!("stored key-set chunk {at}: {why}"));
        let mut r = Reader(chunk);
        if r.u8() != Some(FORMAT) {
            return Err(invalid("unknown format"));
        }
        if r.u64() != Some(self.version) {
            return Err(LoadError::Superseded);
        }
        let count = r.u32().ok_or_else(|| invalid("truncated"))?;
        for _ in 0..count {
            let record = (|| {
                let digest = r.take(32)?.try_into().ok()?;
                let profile = Arc::clone(self.profiles.get(r.u32()? as usize)?);
                let id_len = usize::from(r.u16()?);
                let id = String::from_utf8(r.take(id_len)?.to_vec()).ok()?;
                KeyRecord::with_checked_profile(id, digest, profile)
            })()
            .ok_or_else(|| invalid("bad record"))?;
            let prefix = digest_prefix(&record.digest);
            if self
                .digest_prefixes
                .last()
                .is_some_and(|last| *last > prefix)
            {
                return Err(invalid("records not in digest order"));
            }
            self.digest_prefixes.push(prefix);
            self.records.push(record);
        }
        for _ in 0..count {
            let position = r.u32().ok_or_else(|| invalid("truncated"))?;
            self.by_id.push(position);
        }
        self.next_chunk += 1;
        Ok(())
    }

    /// The loaded set, once every chunk is in.
    pub fn finish(self) -> Result<KeySet, LoadError> {
        if self.records.len() != self.total as usize {
            return Err(LoadError::Invalid(format!(
                "stored key set has {} records, its header says {}",
                self.records.len(),
                self.total
            )));
        }
        KeySet::from_digest_order(self.records, self.by_id, self.digest_prefixes).ok_or_else(|| {
            LoadError::Invalid("stored key set: its orders do not fit its records".to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::digest::sha256;
    use serde_json::{json, Value};

    fn set(count: usize) -> KeySet {
        let keys: Vec<Value> = (0..count)
            .map(|i| {
                let mut r = json!({"id": format!("k{i}"),
                    "secret_sha256": hex::encode(sha256(format!("s{i}").as_bytes())),
                    "tenant": format!("t{}", i % 3)});
                if i % 5 == 0 {
                    r["rate_limit"] = json!({"requests": 10, "per_seconds": 60, "burst": 2});
                    r["permissions"] = json!(["read", "write"]);
                    r["expires_at"] = json!(1_900_000_000);
                    r["enabled"] = json!(false);
                }
                r
            })
            .collect();
        KeySet::from_json(json!({ "keys": keys }).to_string().as_bytes()).unwrap()
    }

    struct Encoded {
        header: Vec<u8>,
        chunks: Vec<Vec<u8>>,
    }

    fn encoded(set: &KeySet, version: u64) -> Encoded {
        let mut chunks = Vec::new();
        let header = encode(set, version, |i, chunk| {
            assert_eq!(i, chunks.len());
            chunks.push(chunk.to_vec());
            true
        })
        .unwrap();
        Encoded { header, chunks }
    }

    fn round_trip(original: &KeySet) -> KeySet {
        let encoded = encoded(original, 7);
        let mut loading = Loading::start(&encoded.header).unwrap();
        assert_eq!(loading.version, 7);
        for chunk in &encoded.chunks {
            assert!(!loading.is_complete());
            loading.add_chunk(chunk).unwrap();
        }
        assert!(loading.is_complete());
        loading.finish().unwrap()
    }

    #[test]
    fn every_record_survives_the_shared_form_and_is_found_by_id_and_digest() {
        let original = set(CHUNK_RECORDS * 2 + 5);
        let copy = round_trip(&original);
        assert_eq!(copy.len(), original.len());
        for record in original.records() {
            assert_eq!(copy.by_digest(&record.digest), Some(record));
            assert_eq!(copy.by_id(&record.id), Some(record));
        }
        assert!(copy.by_id("nope").is_none());
        assert!(copy.has_limits());
    }

    #[test]
    fn an_empty_set_round_trips() {
        assert!(round_trip(&KeySet::default()).is_empty());
    }

    #[test]
    fn a_chunk_of_another_version_means_start_again() {
        let first = encoded(&set(10), 1);
        let second = encoded(&set(10), 2);
        let mut loading = Loading::start(&first.header).unwrap();
        assert_eq!(
            loading.add_chunk(&second.chunks[0]),
            Err(LoadError::Superseded)
        );
    }

    #[test]
    fn records_out_of_digest_order_are_refused_as_the_chunk_comes_in() {
        let encoded = encoded(&set(CHUNK_RECORDS * 2), 1);
        let mut loading = Loading::start(&encoded.header).unwrap();
        loading.add_chunk(&encoded.chunks[1]).unwrap();
        assert!(matches!(
            loading.add_chunk(&encoded.chunks[0]),
            Err(LoadError::Invalid(why)) if why.contains("not in digest order")
        ));
    }

    #[test]
    fn a_stored_record_whose_id_is_not_header_safe_is_refused() {
        let encoded = encoded(&set(1), 1);
        let mut chunk = encoded.chunks[0].clone();
        // The one record's id: its length (u16) then "k0".
        let at = chunk
            .windows(4)
            .position(|w| w == [2, 0, b'k', b'0'])
            .unwrap();
        chunk[at + 3] = b'\n';
        let mut loading = Loading::start(&encoded.header).unwrap();
        assert!(matches!(
            loading.add_chunk(&chunk),
            Err(LoadError::Invalid(_))
        ));
        assert!(loading.add_chunk(&encoded.chunks[0]).is_ok());
    }

    #[test]
    fn damaged_bytes_are_refused_not_panicked_on() {
        let encoded = encoded(&set(10), 1);
        assert!(Loading::start(&encoded.header[..5]).is_err());
        let mut loading = Loading::start(&encoded.header).unwrap();
        let chunk = &encoded.chunks[0];
        assert!(matches!(
            loading.add_chunk(&chunk[..chunk.len() - 3]),
            Err(LoadError::Invalid(_))
        ));
    }
}
