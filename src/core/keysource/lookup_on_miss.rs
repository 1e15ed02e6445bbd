//! Lookup on miss: for key sets too big to fetch whole, keygate asks the key service for the one
//! key a request presents, and remembers the answer in a bounded cache in shared data.
//!
//! **Where a key is found.** Path templates name static files: opaque keys by the hex SHA-256 of
//! the whole key (`/keys/by-digest/{digest}.json`), id:secret and split keys by id
//! (`/keys/by-id/{id}.json`). `{digest:N}` is the first N hex characters of the digest, for
//! sharded layouts: `/keys/by-digest/{digest:2}/{digest}.json` (one small file per key, 256
//! directories), or `/keys/shards/{digest:3}.json` (4096 files, each a key-set document with the
//! keys whose digest starts that way). A file holds one key record, or a key-set document
//! `{"keys": [...]}` in which keygate picks the record with the key's digest (or id). 404 (or
//! 410), or no such record in the document, means the key does not exist.
//!
//! **The cache.** Positive answers are kept `positive_ttl_seconds`, negative ones
//! `negative_ttl_seconds`, each kind in its own fixed table of slots (`<namespace>.cache.<i>` for
//! keys found, `<namespace>.neg.<i>` for keys not found), each slot holding up to `WAYS` entries:
//! a key's slot is chosen by a hash of the key, a full slot drops its oldest entry. The tables
//! have separate budgets (`cache_entries`, `negative_cache_entries`), so a flood of unknown keys
//! only ever evicts other unknown keys, never a key that exists. Envoy's shared data (which a
//! module cannot delete from) never holds more than `(cache_entries + negative_cache_entries) /
//! WAYS` keys for the cache.
//!
//! **The miss cap.** At most `max_misses_per_second` lookups per second leave the process (a
//! counter in shared data, one per second): beyond it, a key with no cached answer is not
//! fetched but answered `KEYSET_UNAVAILABLE`, so random keys cannot turn into a flood of fetches
//! (their CRC-32 checksum stops typos, not an attacker, who can compute it).
//! Every worker of the process shares the table: a key looked up on one worker is a hit on all.
//! An expired answer is still served, up to `max_stale_seconds` past its TTL, when a fresh lookup
//! fails.

use serde_json::Value;

use super::paths::{LookupKey, Tag, TAG_LEN};
use super::service::{KeyService, KeyServiceMode, LookupPolicy, WAYS};
use super::store::{cas_update, Change, Reader, SharedStore};
use crate::core::keyset::{KeyRecord, KeyRecordSpec};

/// Records bigger than this are answered but not cached, so a slot stays small.
const MAX_CACHED_RECORD_BYTES: usize = 4096;
const FORMAT: u8 = 1;
/// What the key service said about one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Found(Box<KeyRecord>),
    NotFound,
}

impl Answer {
    pub fn record(&self) -> Option<&KeyRecord> {
        match self {
            Answer::Found(r) => Some(r.as_ref()),
            Answer::NotFound => None,
        }
    }
}

/// A validated answer plus the record's JSON as it will be cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub answer: Answer,
    record_json: Vec<u8>,
}

/// What the cache holds for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    /// Within its TTL: decide with it, no call.
    Fresh(Answer),
    /// Past its TTL but within `max_stale_seconds`: look up again, fall back to it on failure.
    Stale(Answer),
    Miss,
}

/// Why the key service's answer was not usable: the lookup failed and nothing is cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerError {
    /// The call got no response: the connection failed or timed out.
    NoAnswer,
    /// A status other than 200, 404 or 410.
    Status(u32),
    InvalidJson(String),
    /// A `{"keys": …}` document with fields besides `serial` and `keys`.
    ExtraDocumentFields,
    KeysNotAList,
    /// Neither a record nor a key-set document.
    NotARecord,
    /// The record fails the checks every record passes (its message says which).
    InvalidRecord(String),
}

impl std::fmt::Display for AnswerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnswerError::NoAnswer => f.write_str("no answer (connection failure or timeout)"),
            AnswerError::Status(status) => write!(f, "status {status}"),
            AnswerError::InvalidJson(why) => write!(f, "invalid JSON: {why}"),
            AnswerError::ExtraDocumentFields => {
                f.write_str("a key-set document has only \"serial\" and \"keys\"")
            }
            AnswerError::KeysNotAList => f.write_str("\"keys\" must be a list"),
            AnswerError::NotARecord => f.write_str("expected a key record or {\"keys\": [...]}"),
            AnswerError::InvalidRecord(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for AnswerError {}

/// Validates the key service's answer for `key`. `Err` is a failed lookup (nothing cached).
pub fn parse_answer(
    status: Option<u32>,
    body: &[u8],
    key: &LookupKey,
) -> Result<Fetched, AnswerError> {
    let not_found = Fetched {
        answer: Answer::NotFound,
        record_json: Vec::new(),
    };
    match status {
        None => Err(AnswerError::NoAnswer),
        Some(404 | 410) => Ok(not_found),
        Some(200) => {
            let value: Value = serde_json::from_slice(body)
                .map_err(|e| AnswerError::InvalidJson(e.to_string()))?;
            let candidates: Vec<&Value> = match &value {
                Value::Object(map) if map.contains_key("keys") => {
                    if map.len() != 1 + usize::from(map.contains_key("serial")) {
                        return Err(AnswerError::ExtraDocumentFields);
                    }
                    map.get("keys")
                        .and_then(Value::as_array)
                        .ok_or(AnswerError::KeysNotAList)?
                        .iter()
                        .collect()
                }
                Value::Object(_) => vec![&value],
                _ => return Err(AnswerError::NotARecord),
            };
            let Some(candidate) = candidates.into_iter().find(|c| key.matches(c)) else {
                return Ok(not_found);
            };
            let record_json = serde_json::to_vec(candidate)
                .map_err(|e| AnswerError::InvalidRecord(e.to_string()))?;
            let record = validate_record(&record_json)?;
            Ok(Fetched {
                answer: Answer::Found(Box::new(record)),
                record_json,
            })
        }
        Some(other) => Err(AnswerError::Status(other)),
    }
}

/// The same checks as inline keys and key-set documents (the record's constructor makes them).
/// Read from the record's bytes, not from its `Value`: the byte reader is the one documents
/// use, and a second (`Value`) instantiation of the record's serde code cost the module ~13 KB.
fn validate_record(record_json: &[u8]) -> Result<KeyRecord, AnswerError> {
    let spec: KeyRecordSpec = serde_json::from_slice(record_json).map_err(|e| {
        // The position is in the re-encoded record, not in the service's answer: leave it out.
        let text = e.to_string();
        let position = format!(" at line {} column {}", e.line(), e.column());
        let text = text.strip_suffix(&position).unwrap_or(&text);
        AnswerError::InvalidRecord(format!("invalid key record: {text}"))
    })?;
    KeyRecord::from_spec(spec, "record").map_err(|e| AnswerError::InvalidRecord(e.to_string()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    tag: Tag,
    fetched_ms: i64,
    found: bool,
    record_json: Vec<u8>,
}

fn decode(bytes: &[u8]) -> Vec<Entry> {
    let mut r = Reader(bytes);
    let mut entries = Vec::new();
    if r.u8() != Some(FORMAT) {
        return entries;
    }
    loop {
        let entry = (|| {
            let tag: Tag = r.take(TAG_LEN)?.try_into().ok()?;
            let fetched_ms = r.i64()?;
            let found = r.u8()? == 1;
            let len = r.u32()? as usize;
            let record_json = r.take(len)?.to_vec();
            Some(Entry {
                tag,
                fetched_ms,
                found,
                record_json,
            })
        })();
        match entry {
            Some(e) => entries.push(e),
            None => return entries,
        }
    }
}

fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = vec![FORMAT];
    for e in entries {
        out.extend_from_slice(&e.tag);
        out.extend_from_slice(&e.fetched_ms.to_le_bytes());
        out.push(u8::from(e.found));
        out.extend_from_slice(&(e.record_json.len() as u32).to_le_bytes());
        out.extend_from_slice(&e.record_json);
    }
    out
}

/// Attempts at a contended slot before the answer is simply not cached.
const CAS_RETRIES: usize = 8;

/// The shared lookup cache of one key service.
pub struct KeyCache<'a> {
    service: &'a KeyService,
    policy: &'a LookupPolicy,
}

impl<'a> KeyCache<'a> {
    pub fn of(service: &'a KeyService) -> Option<KeyCache<'a>> {
        match &service.mode {
            KeyServiceMode::Lookup(policy) => Some(KeyCache { service, policy }),
            KeyServiceMode::Full(_) => None,
        }
    }

    /// The GET that looks `key` up, or `None` if no path is configured for this kind of key
    /// (configuration validation requires the paths the enabled schemes need).
    pub fn request_headers(&self, key: &LookupKey) -> Option<Vec<(&'static str, String)>> {
        let template = match key {
            LookupKey::Digest(_) => self.policy.by_digest.as_ref(),
            LookupKey::Id(_) => self.policy.by_id.as_ref(),
        }?;
        Some(self.service.request_headers(&template.render(key), None))
    }

    fn slot_name(&self, tag: &Tag, found: bool) -> String {
        let mut head = [0u8; 8];
        for (h, t) in head.iter_mut().zip(tag.iter()) {
            *h = *t;
        }
        let (table, slots) = if found {
            ("cache", self.policy.slots)
        } else {
            ("neg", self.policy.negative_slots)
        };
        let index = u64::from_le_bytes(head) % u64::from(slots);
        format!("{}.{table}.{index}", self.service.namespace)
    }

    /// Counts one lookup against this second's cap; false when the cap is reached (the key is
    /// then answered without a fetch). A store that stays contended admits the lookup.
    pub fn admit_miss(&self, store: &dyn SharedStore, now_ms: i64) -> bool {
        let cap = self.policy.max_misses_per_second;
        if cap == 0 {
            return true;
        }
        let name = format!("{}.misses", self.service.namespace);
        let second = now_ms.div_euclid(1000);
        let admitted = cas_update(store, &name, CAS_RETRIES, |bytes| {
            let mut r = Reader(bytes.unwrap_or_default());
            let counted = match (r.u8(), r.i64(), r.u32()) {
                (Some(FORMAT), Some(at), Some(count)) if at == second => count,
                _ => 0,
            };
            if counted >= cap {
                return Change::Keep(false);
            }
            let mut value = vec![FORMAT];
            value.extend_from_slice(&second.to_le_bytes());
            value.extend_from_slice(&(counted + 1).to_le_bytes());
            Change::Write(value, true)
        });
        admitted.unwrap_or(true)
    }

    fn ttl_ms(&self, found: bool) -> i64 {
        if found {
            self.policy.positive_ttl_ms
        } else {
            self.policy.negative_ttl_ms
        }
    }

    /// An entry that can no longer be served even as a fallback.
    fn is_dead(&self, e: &Entry, now_ms: i64) -> bool {
        let age = now_ms.saturating_sub(e.fetched_ms);
        let limit = self.ttl_ms(e.found);
        match self.service.max_stale_ms {
            Some(stale) => age >= limit.saturating_add(stale),
            None => false,
        }
    }

    fn entry(&self, store: &dyn SharedStore, tag: &Tag, found: bool) -> Option<Entry> {
        let (bytes, _) = store.get(&self.slot_name(tag, found))?;
        decode(&bytes).into_iter().find(|e| e.tag == *tag)
    }

    pub fn get(&self, store: &dyn SharedStore, key: &LookupKey, now_ms: i64) -> Cached {
        let tag = key.tag(&self.service.namespace);
        let Some(entry) = self
            .entry(store, &tag, true)
            .or_else(|| self.entry(store, &tag, false))
        else {
            return Cached::Miss;
        };
        if self.is_dead(&entry, now_ms) {
            return Cached::Miss;
        }
        let answer = if entry.found {
            // Checked again as it is read, like every record (`KeyRecord::from_spec`): one
            // that no longer passes is a miss.
            let Some(record) = serde_json::from_slice::<KeyRecordSpec>(&entry.record_json)
                .ok()
                .and_then(|spec| KeyRecord::from_spec(spec, "cache").ok())
            else {
                return Cached::Miss;
            };
            Answer::Found(Box::new(record))
        } else {
            Answer::NotFound
        };
        if now_ms.saturating_sub(entry.fetched_ms) < self.ttl_ms(entry.found) {
            Cached::Fresh(answer)
        } else {
            Cached::Stale(answer)
        }
    }

    /// Drops `tag` from one table, if it is there.
    fn forget(&self, store: &dyn SharedStore, tag: &Tag, found: bool) {
        let name = self.slot_name(tag, found);
        let _ = cas_update(store, &name, CAS_RETRIES, |bytes| {
            let Some(bytes) = bytes else {
                return Change::Keep(());
            };
            let mut entries = decode(bytes);
            let before = entries.len();
            entries.retain(|e| e.tag != *tag);
            if entries.len() == before {
                return Change::Keep(());
            }
            Change::Write(encode(&entries), ())
        });
    }

    /// Remembers an answer. False when it was not stored (not cacheable, or the slot stayed
    /// contended): the next request for the key looks it up again, nothing worse.
    pub fn put(
        &self,
        store: &dyn SharedStore,
        key: &LookupKey,
        fetched: &Fetched,
        now_ms: i64,
    ) -> bool {
        let found = matches!(fetched.answer, Answer::Found(_));
        if (!found && self.policy.negative_ttl_ms == 0)
            || fetched.record_json.len() > MAX_CACHED_RECORD_BYTES
        {
            return false;
        }
        let tag = key.tag(&self.service.namespace);
        if !found {
            // A key found before and gone now: its old record must not be served any more.
            self.forget(store, &tag, true);
        }
        let name = self.slot_name(&tag, found);
        let stored = cas_update(store, &name, CAS_RETRIES, |bytes| {
            let mut entries = decode(bytes.unwrap_or_default());
            entries.retain(|e| e.tag != tag && !self.is_dead(e, now_ms));
            while entries.len() >= WAYS {
                let oldest = entries
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| e.fetched_ms)
                    .map(|(i, _)| i);
                match oldest {
                    Some(i) => {
                        entries.remove(i);
                    }
                    None => break,
                }
            }
            entries.push(Entry {
                tag,
                fetched_ms: now_ms,
                found,
                record_json: fetched.record_json.clone(),
            });
            Change::Write(encode(&entries), ())
        });
        stored.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::digest::sha256;
    use crate::core::keysource::test_host;
    use crate::core::memory_store::MemoryStore;
    use crate::core::test_support::{deny_code, merged, RequestBuilder};

    /// A lookup-mode service with `extra` settings.
    fn service(extra: serde_json::Value) -> KeyService {
        let settings = serde_json::json!({"mode": "lookup_on_miss",
            "by_digest_path": "/keys/by-digest/{digest:2}/{digest}.json",
            "by_id_path": "/keys/by-id/{id}.json",
            "positive_ttl_seconds": 60, "negative_ttl_seconds": 10, "max_stale_seconds": 30});
        test_host::service(merged(settings, extra))
    }

    fn record(id: &str, secret: &str) -> Value {
        serde_json::json!({"id": id, "secret_sha256": hex::encode(sha256(secret.as_bytes())),
                           "tenant": "acme"})
    }

    fn found(key: &LookupKey, body: &Value) -> Fetched {
        parse_answer(Some(200), body.to_string().as_bytes(), key).unwrap()
    }

    #[test]
    fn paths_are_rendered_from_templates() {
        let svc = service(serde_json::json!({}));
        let cache = KeyCache::of(&svc).unwrap();
        let d = sha256(b"cmp_x");
        let hex_d = hex::encode(d);
        let headers = cache.request_headers(&LookupKey::Digest(d)).unwrap();
        let path = format!("/keys/by-digest/{}/{hex_d}.json", &hex_d[..2]);
        assert!(headers.contains(&(":path", path)), "{headers:?}");
        let headers = cache
            .request_headers(&LookupKey::Id("abk_7".into()))
            .unwrap();
        assert!(headers.contains(&(":path", "/keys/by-id/abk_7.json".to_string())));
    }

    #[test]
    fn answers_single_records_documents_and_404() {
        let d = sha256(b"cmp_a");
        let key = LookupKey::Digest(d);
        let single = found(&key, &record("a", "cmp_a"));
        assert_eq!(single.answer.record().map(|r| r.id.as_str()), Some("a"));
        let shard = serde_json::json!({"keys": [record("b", "cmp_b"), record("a", "cmp_a")]});
        assert_eq!(found(&key, &shard).answer.record().unwrap().id, "a");
        let other = serde_json::json!({"keys": [record("b", "cmp_b")]});
        assert_eq!(found(&key, &other).answer, Answer::NotFound);
        assert_eq!(
            parse_answer(Some(404), b"<html>", &key).unwrap().answer,
            Answer::NotFound
        );
        let by_id = LookupKey::Id("b".into());
        assert_eq!(found(&by_id, &shard).answer.record().unwrap().id, "b");
    }

    #[test]
    fn failures_and_invalid_records_are_errors_not_answers() {
        let key = LookupKey::Id("a".into());
        assert!(parse_answer(None, b"", &key).is_err());
        assert!(parse_answer(Some(503), b"", &key).is_err());
        assert!(parse_answer(Some(200), b"{\"id\": \"a\", ", &key).is_err());
        let mut bad = record("a", "s");
        bad["tenant"] = serde_json::json!("x\r\ny: z");
        assert!(parse_answer(Some(200), bad.to_string().as_bytes(), &key).is_err());
        let mut unknown = record("a", "s");
        unknown["secret"] = serde_json::json!("plaintext");
        assert!(parse_answer(Some(200), unknown.to_string().as_bytes(), &key).is_err());
    }

    #[test]
    fn a_failed_answer_says_why_in_the_log_line_words() {
        let key = LookupKey::Id("a".into());
        let why = |status, body: &str| {
            parse_answer(status, body.as_bytes(), &key)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(why(None, ""), "no answer (connection failure or timeout)");
        assert_eq!(why(Some(503), ""), "status 503");
        assert!(why(Some(200), "{").starts_with("invalid JSON: "));
        assert_eq!(
            why(Some(200), r#"{"keys": [], "extra": 1}"#),
            "a key-set document has only \"serial\" and \"keys\""
        );
        assert_eq!(why(Some(200), r#"{"keys": 1}"#), "\"keys\" must be a list");
        assert_eq!(
            why(Some(200), "[]"),
            "expected a key record or {\"keys\": [...]}"
        );
        let plaintext = serde_json::json!({"id": "a", "secret": "plaintext"});
        let refused = why(Some(200), &plaintext.to_string());
        assert!(
            refused.starts_with("invalid key record: unknown field `secret`"),
            "{refused}"
        );
        // The record is re-encoded before it is read: a position in it would point nowhere.
        assert!(!refused.contains(" at line "), "{refused}");
    }

    #[test]
    fn answers_are_fresh_then_stale_then_gone() {
        let svc = service(serde_json::json!({}));
        let cache = KeyCache::of(&svc).unwrap();
        let store = MemoryStore::new();
        let key = LookupKey::Id("a".into());
        assert_eq!(cache.get(&store, &key, 0), Cached::Miss);
        assert!(cache.put(&store, &key, &found(&key, &record("a", "s")), 1_000));
        assert!(matches!(
            cache.get(&store, &key, 60_999),
            Cached::Fresh(Answer::Found(_))
        ));
        assert!(matches!(
            cache.get(&store, &key, 61_000),
            Cached::Stale(Answer::Found(_))
        ));
        assert_eq!(cache.get(&store, &key, 91_000), Cached::Miss);

        let unknown = LookupKey::Id("zz".into());
        let nothing = parse_answer(Some(404), b"", &unknown).unwrap();
        assert!(cache.put(&store, &unknown, &nothing, 1_000));
        assert_eq!(
            cache.get(&store, &unknown, 10_999),
            Cached::Fresh(Answer::NotFound)
        );
        assert_eq!(
            cache.get(&store, &unknown, 11_000),
            Cached::Stale(Answer::NotFound)
        );
    }

    #[test]
    fn the_cache_never_holds_more_than_its_bound() {
        let svc = service(serde_json::json!({"cache_entries": 64}));
        let cache = KeyCache::of(&svc).unwrap();
        let store = MemoryStore::new();
        for i in 0..5_000 {
            let key = LookupKey::Id(format!("k{i}"));
            let body = record(&format!("k{i}"), &format!("s{i}"));
            cache.put(&store, &key, &found(&key, &body), i);
        }
        assert_eq!(store.len(), 16, "64 entries in 16 slots of {WAYS}");
        let cached: usize = (0..16)
            .filter_map(|i| store.get(&format!("{}.cache.{i}", svc.namespace)))
            .map(|(bytes, _)| decode(&bytes).len())
            .sum();
        assert!(cached <= 64, "{cached}");
        // The most recent key is there; the first ones were dropped.
        let last = LookupKey::Id("k4999".into());
        assert!(matches!(cache.get(&store, &last, 5_000), Cached::Fresh(_)));
        let first = LookupKey::Id("k0".into());
        assert_eq!(cache.get(&store, &first, 5_000), Cached::Miss);
    }

    #[test]
    fn a_flood_of_unknown_keys_never_evicts_a_known_one() {
        let svc = service(serde_json::json!({"cache_entries": 64, "negative_cache_entries": 64}));
        let cache = KeyCache::of(&svc).unwrap();
        let store = MemoryStore::new();
        let good = LookupKey::Id("good".into());
        cache.put(&store, &good, &found(&good, &record("good", "s")), 0);
        for i in 0..20_000 {
            let unknown = LookupKey::Id(format!("random-{i}"));
            let nothing = parse_answer(Some(404), b"", &unknown).unwrap();
            cache.put(&store, &unknown, &nothing, i);
        }
        assert!(matches!(
            cache.get(&store, &good, 20_000),
            Cached::Fresh(Answer::Found(_))
        ));
        assert_eq!(cache.policy.capacity(), (64, 64));
    }

    #[test]
    fn a_key_gone_from_the_service_is_no_longer_served_from_the_cache() {
        let svc = service(serde_json::json!({}));
        let cache = KeyCache::of(&svc).unwrap();
        let store = MemoryStore::new();
        let key = LookupKey::Id("k".into());
        cache.put(&store, &key, &found(&key, &record("k", "s")), 0);
        let gone = parse_answer(Some(404), b"", &key).unwrap();
        cache.put(&store, &key, &gone, 61_000);
        assert_eq!(
            cache.get(&store, &key, 61_001),
            Cached::Fresh(Answer::NotFound)
        );
    }

    #[test]
    fn lookups_beyond_the_cap_per_second_are_not_admitted() {
        let svc = service(serde_json::json!({"max_misses_per_second": 3}));
        let cache = KeyCache::of(&svc).unwrap();
        let store = MemoryStore::new();
        let admitted: Vec<bool> = (0..5)
            .map(|i| cache.admit_miss(&store, 7_000 + i))
            .collect();
        assert_eq!(admitted, [true, true, true, false, false]);
        assert!(
            cache.admit_miss(&store, 8_000),
            "a new second starts a new count"
        );
        let uncapped = service(serde_json::json!({"max_misses_per_second": 0}));
        let cache = KeyCache::of(&uncapped).unwrap();
        assert!((0..1_000).all(|i| cache.admit_miss(&store, i)));
    }

    #[test]
    fn no_negative_caching_with_a_zero_ttl() {
        let svc = service(serde_json::json!({"negative_ttl_seconds": 0}));
        let cache = KeyCache::of(&svc).unwrap();
        let store = MemoryStore::new();
        let key = LookupKey::Id("zz".into());
        let nothing = parse_answer(Some(404), b"", &key).unwrap();
        assert!(!cache.put(&store, &key, &nothing, 0));
        assert_eq!(cache.get(&store, &key, 1), Cached::Miss);
    }

    #[test]
    fn a_looked_up_record_goes_through_the_same_checks_as_inline_keys() {
        use crate::core::codes::ErrorCode;
        use crate::core::config::Config;
        use crate::core::decision::{begin, decide_for_key, Step};
        let (config, _) = Config::parse(
            serde_json::json!({"credentials": [{"in": "header", "prefixes": ["kl_"]}],
                "require_user": true,
                "key_service": {"cluster": "k", "mode": "lookup_on_miss",
                                "by_digest_path": "/d/{digest}.json"}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let decide_with = |secret: &str, mut body: Value| {
            body["secret_sha256"] = serde_json::json!(hex::encode(sha256(b"kl_key")));
            let req = RequestBuilder::to("GET", "/")
                .header("x-api-key", secret)
                .now(2_000_000_000)
                .build();
            let Step::Lookup { credential, policy } = begin(&config, &req) else {
                panic!("expected a lookup")
            };
            let key = LookupKey::of(&credential);
            let fetched = parse_answer(Some(200), body.to_string().as_bytes(), &key).unwrap();
            deny_code(decide_for_key(
                &config,
                policy,
                &credential,
                fetched.answer.record(),
                &req,
            ))
        };
        let good = serde_json::json!({"id": "a", "user": "u"});
        assert_eq!(decide_with("kl_key", good.clone()), None);
        let mut expired = good.clone();
        expired["expires_at"] = serde_json::json!(1_999_999_999);
        assert_eq!(
            decide_with("kl_key", expired),
            Some(ErrorCode::ApiKeyExpired)
        );
        let mut disabled = good.clone();
        disabled["enabled"] = serde_json::json!(false);
        assert_eq!(
            decide_with("kl_key", disabled),
            Some(ErrorCode::InvalidApiKey)
        );
        let no_user = serde_json::json!({"id": "a"});
        assert_eq!(
            decide_with("kl_key", no_user),
            Some(ErrorCode::ApiKeyNoUser)
        );
        // Another key's digest: the answer is "not found" for this key.
        assert_eq!(
            decide_with("kl_other", good),
            Some(ErrorCode::InvalidApiKey)
        );
    }

    #[test]
    fn a_cached_record_with_a_header_unsafe_field_is_a_miss() {
        let svc = service(serde_json::json!({}));
        let cache = KeyCache::of(&svc).unwrap();
        let store = MemoryStore::new();
        let key = LookupKey::Id("a".into());
        assert!(cache.put(&store, &key, &found(&key, &record("a", "s")), 0));
        assert!(matches!(cache.get(&store, &key, 1), Cached::Fresh(_)));
        // Written straight into the slot, past the checks `put`'s caller made.
        let tag = key.tag(&svc.namespace);
        let name = cache.slot_name(&tag, true);
        for (field, value) in [
            ("tenant", serde_json::json!("acme\r\nx-keygate-user: admin")),
            ("permissions", serde_json::json!(["read,admin"])),
        ] {
            let mut unsafe_record = record("a", "s");
            unsafe_record[field] = value;
            let entry = Entry {
                tag,
                fetched_ms: 0,
                found: true,
                record_json: unsafe_record.to_string().into_bytes(),
            };
            store.set(&name, &encode(&[entry]), 0).unwrap();
            assert_eq!(cache.get(&store, &key, 1), Cached::Miss, "{field}");
        }
    }

    #[test]
    fn slot_garbage_is_a_miss() {
        let svc = service(serde_json::json!({}));
        let cache = KeyCache::of(&svc).unwrap();
        let store = MemoryStore::new();
        let key = LookupKey::Id("a".into());
        cache.put(&store, &key, &found(&key, &record("a", "s")), 0);
        let name = cache.slot_name(&key.tag(&svc.namespace), true);
        let (bytes, _) = store.get(&name).unwrap();
        for cut in 0..bytes.len() {
            store.set(&name, bytes.get(..cut).unwrap(), 0).unwrap();
            assert_ne!(
                cache.get(&store, &key, 1),
                Cached::Fresh(Answer::NotFound),
                "{cut}"
            );
        }
    }
}
