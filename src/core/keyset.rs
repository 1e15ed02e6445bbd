//! The key set: hashed key records, indexed once by id and by digest.
//! The same JSON record format is used inline in the filter config and by the key service.
//!
//! Sets of a million keys live in every VM, so a record holds only what is its own (id and
//! digest) and shares the rest: what a key grants (`KeyProfile`) is held once per distinct
//! value. A record is one 64-byte line with its id inside it, the records are kept in digest
//! order, and the indexes are arrays of record numbers and bucket starts, not hash maps of
//! copies: finding a key by digest reads one bucket start and then the record itself.

use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use serde_json::{Map, Value};

use super::config_error::{is_header_value, ConfigError};
use super::digest::{parse_hex_digest, Digest};
use super::json_fields::{invalid_type, Fields};
use super::rate_limit::{RateLimit, RateLimitSpec};
use super::time::parse_rfc3339;

/// A time given as RFC 3339 text or as Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum TimeSpec {
    Unix(i64),
    Text(String),
}

impl TimeSpec {
    /// Read by hand (see `KeyRecordSpec::decode`): a whole number is Unix seconds, text is
    /// RFC 3339 (checked when the record is).
    fn decode(value: &Value, path: &str) -> Result<TimeSpec, ConfigError> {
        const EXPECTED: &str = "an RFC 3339 time or Unix seconds";
        match value {
            Value::String(text) => Ok(TimeSpec::Text(text.clone())),
            Value::Number(n) if n.is_i64() || n.is_u64() => {
                n.as_i64().map(TimeSpec::Unix).ok_or_else(|| {
                    ConfigError::new(
                        path,
                        format!("invalid value: integer `{n}`, expected {EXPECTED}"),
                    )
                })
            }
            other => Err(invalid_type(path, other, EXPECTED)),
        }
    }
}

/// A key record as written in JSON, the one list of its fields: inline keys, key-service
/// documents, the lookup cache and the shared form of a set read it, and `keygate key new`
/// builds it and writes it with these same serde attributes. Written, a field at its default
/// is left out, the rest come in this order (the README's table). A record keeps its spec
/// (`KeyProfile::fields`), so a new field is one line here; a field that needs a check or a
/// parsed form adds it in `KeyRecord::from_spec_sharing` (and `check_header_safe` when it
/// goes upstream in a header). Holds the digest of the secret, never the secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct KeyRecordSpec {
    pub id: String,
    /// Hex SHA-256 of the secret: the whole key for opaque keys, the part after `:` for
    /// id:secret keys, the secret header's value for split keys.
    pub secret_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub organizations: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// After this time the key answers `API_KEY_EXPIRED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<TimeSpec>,
    /// After this time the key is simply no longer valid (`INVALID_API_KEY`): the end of a
    /// rotation grace period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<TimeSpec>,
    #[serde(default, skip_serializing_if = "Enabled::is_default")]
    pub enabled: Enabled,
    /// This key's rate limit (else the config's `limits.rate_limit`, if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Budget units this key may spend per calendar month (UTC); over it, `BUDGET_EXHAUSTED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_budget: Option<u64>,
    /// Set by the billing side: the key's budget is spent, answer `BUDGET_EXHAUSTED`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub budget_exhausted: bool,
}

/// A record's `enabled`: true unless the record says otherwise. Its own type so that the
/// record's `Default` is the default of every field, as serde reads a record that omits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Enabled(pub bool);

impl Default for Enabled {
    fn default() -> Enabled {
        Enabled(true)
    }
}

impl Enabled {
    fn is_default(&self) -> bool {
        *self == Enabled::default()
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl KeyRecordSpec {
    pub const FIELDS: &'static [&'static str] = &[
        "id",
        "secret_sha256",
        "tenant",
        "organizations",
        "environment",
        "product",
        "permissions",
        "origins",
        "user",
        "expires_at",
        "not_after",
        "enabled",
        "rate_limit",
        "monthly_budget",
        "budget_exhausted",
    ];

    /// Reads a record's fields out of its JSON object with `json_fields`' readers, not serde's
    /// derive: the derive's per-field visitors cost keygate.wasm several KB. Unknown fields
    /// are refused; `null` counts as left out.
    pub fn decode(value: &Value, path: &str) -> Result<KeyRecordSpec, ConfigError> {
        let fields = Fields::of(value, path, Self::FIELDS)?;
        Ok(KeyRecordSpec {
            id: fields.required_string("id")?,
            secret_sha256: fields.required_string("secret_sha256")?,
            tenant: fields.string("tenant")?,
            organizations: fields.strings("organizations")?,
            environment: fields.string("environment")?,
            product: fields.string("product")?,
            permissions: fields.strings("permissions")?,
            origins: fields.strings("origins")?,
            user: fields.string("user")?,
            expires_at: fields.decoded("expires_at", TimeSpec::decode)?,
            not_after: fields.decoded("not_after", TimeSpec::decode)?,
            enabled: Enabled(fields.bool("enabled")?.unwrap_or(true)),
            rate_limit: fields.decoded("rate_limit", RateLimitSpec::decode)?,
            monthly_budget: fields.u64("monthly_budget")?,
            budget_exhausted: fields.bool("budget_exhausted")?.unwrap_or(false),
        })
    }
}

/// Every reader of records (inline keys, key-service documents, the lookup cache, a stored
/// set's profiles) goes through `decode`. The object is collected first so that a field given
/// twice is refused, as serde's derive refused it, instead of the last copy winning.
impl<'de> Deserialize<'de> for KeyRecordSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<KeyRecordSpec, D::Error> {
        let object = deserializer.deserialize_map(RecordObjectVisitor)?;
        KeyRecordSpec::decode(&Value::Object(object), "").map_err(|e| {
            if e.path.is_empty() {
                D::Error::custom(e.message)
            } else {
                D::Error::custom(e)
            }
        })
    }
}

struct RecordObjectVisitor;

impl<'de> Visitor<'de> for RecordObjectVisitor {
    type Value = Map<String, Value>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a key record object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut object = Map::new();
        while let Some(name) = access.next_key::<String>()? {
            if object.contains_key(&name) {
                return Err(A::Error::custom(format!("duplicate field `{name}`")));
            }
            let value = access.next_value::<Value>()?;
            object.insert(name, value);
        }
        Ok(object)
    }
}

/// A validated key record: its own id and digest, and what it grants, shared with every other
/// record of the set that grants the same. Reads of `record.tenant` and the like go through
/// `Deref` to the profile, so the record reads as one flat struct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: KeyId,
    pub digest: Digest,
    pub profile: Arc<KeyProfile>,
    checked: Checked,
}

/// The longest id a record holds inside itself; a longer one goes to the heap.
const INLINE_ID_BYTES: usize = 22;

/// A record's id (checked: the `is_id_byte` alphabet, so ASCII). Ids up to 22 bytes, the
/// usual case, sit inside the record: reading the id of a record just found costs no second
/// memory access, and a set holds no string allocation per key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyId(IdBytes);

#[derive(Clone, PartialEq, Eq, Hash)]
enum IdBytes {
    Inline {
        len: u8,
        bytes: [u8; INLINE_ID_BYTES],
    },
    Heap(Box<str>),
}

impl From<String> for KeyId {
    fn from(id: String) -> KeyId {
        let mut bytes = [0u8; INLINE_ID_BYTES];
        match (bytes.get_mut(..id.len()), u8::try_from(id.len())) {
            (Some(head), Ok(len)) => {
                head.copy_from_slice(id.as_bytes());
                KeyId(IdBytes::Inline { len, bytes })
            }
            _ => KeyId(IdBytes::Heap(id.into_boxed_str())),
        }
    }
}

impl KeyId {
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Inline bytes were copied whole from a `str`, so they are UTF-8.
            IdBytes::Inline { len, bytes } => bytes
                .get(..usize::from(*len))
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or_default(),
            IdBytes::Heap(id) => id,
        }
    }
}

impl Deref for KeyId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for KeyId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for KeyId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for KeyId {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

/// A private field of `KeyRecord` and `KeyProfile`: only this module's constructors, which
/// validate what they build, can make one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Checked;

impl Deref for KeyRecord {
    type Target = KeyProfile;

    fn deref(&self) -> &KeyProfile {
        &self.profile
    }
}

/// Everything a record says but its id and digest: the record's own spec, checked and
/// normalized so that records granting the same hold equal profiles (and share one), plus the
/// parsed form of the fields that need one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyProfile {
    /// The record as read, with `id` and `secret_sha256` left empty (they are the record's
    /// own), times as Unix seconds, origins lowercased without a trailing `/`.
    pub fields: KeyRecordSpec,
    checked: Checked,
}

/// The parsed forms are read off the normalized fields rather than kept beside them: a set
/// whose keys each grant something different holds one profile per key, and each copy kept
/// would cost every such key its size.
impl KeyProfile {
    /// `fields.expires_at` in Unix seconds.
    pub fn expires_at(&self) -> Option<i64> {
        unix_seconds(&self.fields.expires_at)
    }

    /// `fields.not_after` in Unix seconds.
    pub fn not_after(&self) -> Option<i64> {
        unix_seconds(&self.fields.not_after)
    }

    pub fn enabled(&self) -> bool {
        self.fields.enabled.0
    }

    /// `fields.rate_limit`, checked by `KeyRecord::from_spec`.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        self.fields.rate_limit.as_ref().map(RateLimit::from_checked)
    }

    /// The profile as a record's JSON under `id` and `secret_sha256`: what
    /// `KeyRecord::from_spec` reads back into an equal profile.
    pub fn to_spec(&self, id: String, secret_sha256: String) -> KeyRecordSpec {
        KeyRecordSpec {
            id,
            secret_sha256,
            ..self.fields.clone()
        }
    }
}

/// Records in digest order, and the indexes built once when the set is loaded. SHA-256
/// digests are spread evenly, so their first bits say where a record sits: `digest_buckets`
/// maps them to a short run of records (about four). Ids are found the same way through a
/// hash of the id: `by_id` lists record numbers in id-hash order, `id_buckets` maps a hash to
/// a run of it.
#[derive(Debug, Default)]
pub struct KeySet {
    records: Vec<KeyRecord>,
    digest_buckets: HashBuckets,
    by_id: Vec<u32>,
    id_buckets: HashBuckets,
}

pub(crate) fn digest_prefix(digest: &Digest) -> u64 {
    let mut head = [0u8; 8];
    head.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
    u64::from_be_bytes(head)
}

/// A 64-bit hash of a key id (FNV-1a, then a finalizer that spreads it into the top bits,
/// which pick the bucket). Not keyed: ids come from the operator's own key set.
fn id_hash(id: &str) -> u64 {
    let mut hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// About 2^2 entries a bucket: the starts of a 1M set take 1 MB, not 4, and stay in the
/// CPU's cache more often, while the first probe into a run of about four lands on the entry
/// most of the time (`HashBuckets::find`). Measured against one entry a bucket: 654-702 vs
/// 723 ns at 1M keys in bench_core, 70 vs 76 bytes a key.
const ENTRIES_PER_BUCKET_LOG2: u32 = 2;

/// Where the entries of a list sorted by a 64-bit hash start, per value of the hash's top
/// bits: the entries whose hash begins with `b` are `starts[b]..starts[b + 1]`, a run of
/// about `2^ENTRIES_PER_BUCKET_LOG2` entries (a power of two of buckets). A lookup reads two
/// neighbouring starts, then the entry the hash's next bits point at: no search through the
/// list.
#[derive(Debug, Default)]
struct HashBuckets {
    /// 64 minus the number of top bits that pick a bucket.
    shift: u32,
    starts: Vec<u32>,
}

impl HashBuckets {
    /// The buckets of `count` entries whose hashes, in the list's order, are `hashes`.
    fn new(count: usize, hashes: impl Iterator<Item = u64>) -> HashBuckets {
        let bits = count
            .next_power_of_two()
            .trailing_zeros()
            .saturating_sub(ENTRIES_PER_BUCKET_LOG2)
            .max(1);
        let shift = 64 - bits;
        let mut starts = vec![0u32; (1usize << bits) + 1];
        for hash in hashes {
            let after = (hash >> shift) as usize + 1;
            if let Some(start) = starts.get_mut(after) {
                *start += 1;
            }
        }
        let mut total = 0u32;
        for start in starts.iter_mut() {
            total += *start;
            *start = total;
        }
        HashBuckets { shift, starts }
    }

    /// The position of the entry `probe` says is the one sought (`Equal`), searching the run
    /// of `hash`'s bucket. `probe(k)` compares entry k to the one sought, in the list's order
    /// (hash first), so a run that many hashes share is bisected, not scanned.
    fn find(
        &self,
        hash: u64,
        probe: impl Fn(usize) -> Option<std::cmp::Ordering>,
    ) -> Option<usize> {
        let bucket = hash.checked_shr(self.shift).unwrap_or(0) as usize;
        let (&start, &end) = (self.starts.get(bucket)?, self.starts.get(bucket + 1)?);
        let (mut lo, mut hi) = (start as usize, end as usize);
        // The first probe where the hash's next bits say the entry sits in its run (the
        // hashes are spread evenly), so it is most often the entry itself: one record read.
        let within = hash.checked_shl(64 - self.shift).unwrap_or(0) >> 56;
        let mut mid = lo + (((hi - lo) as u64 * within) >> 8) as usize;
        while lo < hi {
            match probe(mid)? {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
            mid = lo + (hi - lo) / 2;
        }
        None
    }
}

/// The indexes `0..count` in `order`. One sort instantiation for every order, through a `dyn`
/// comparator: the standard sort inlined with each comparator was 89 KB of keygate.wasm
/// (its small-sort networks repeat the comparator dozens of times), for a sort that runs only
/// when a key set is built.
pub(crate) fn sorted_indexes(
    count: u32,
    order: &dyn Fn(&u32, &u32) -> std::cmp::Ordering,
) -> Vec<u32> {
    let mut indexes: Vec<u32> = (0..count).collect();
    indexes.sort_unstable_by(|a, b| order(a, b));
    indexes
}

/// Puts `items` in the order `order` lists their positions (`order[k]` is the position of
/// the item that goes to k), in place: each cycle of the permutation is followed by swaps,
/// so a set of a million records is not sorted (or held) a second time. Leaves `order` as
/// the identity.
fn permute<T>(items: &mut [T], order: &mut [u32]) {
    for start in 0..order.len() {
        let mut at = start;
        while let Some(slot) = order.get_mut(at) {
            let from = *slot as usize;
            *slot = at as u32;
            if from == start || from >= items.len() {
                break;
            }
            items.swap(at, from);
            at = from;
        }
    }
}

/// The time in Unix seconds, written back as such (an RFC 3339 text and its Unix seconds make
/// equal profiles).
/// A normalized time (`normalize_time` left only Unix seconds).
fn unix_seconds(time: &Option<TimeSpec>) -> Option<i64> {
    match time {
        Some(TimeSpec::Unix(secs)) => Some(*secs),
        Some(TimeSpec::Text(_)) | None => None,
    }
}

fn normalize_time(time: &mut Option<TimeSpec>, path: &str) -> Result<(), ConfigError> {
    let secs = match time {
        None => return Ok(()),
        Some(TimeSpec::Unix(secs)) => *secs,
        Some(TimeSpec::Text(text)) => parse_rfc3339(text).ok_or_else(|| {
            ConfigError::new(
                path,
                "expected an RFC 3339 time such as 2027-01-31T00:00:00Z",
            )
        })?,
    };
    *time = Some(TimeSpec::Unix(secs));
    Ok(())
}

impl KeyRecord {
    /// A record from its JSON form. Every check a record must pass (id alphabet, digest,
    /// times, origins, rate limit, header-safe fields) is made here, whoever read the record:
    /// inline keys, key-set documents, lookups and the lookup cache.
    pub fn from_spec(spec: KeyRecordSpec, path: &str) -> Result<KeyRecord, ConfigError> {
        KeyRecord::from_spec_sharing(spec, path, &mut HashSet::new())
    }

    /// A record of a set in shared data (`setbuckets`), whose profile was made by `from_spec`
    /// when the header was read: only its id is left to check.
    pub(crate) fn with_checked_profile(
        id: String,
        digest: Digest,
        profile: Arc<KeyProfile>,
    ) -> Option<KeyRecord> {
        is_valid_id(&id).then(|| KeyRecord {
            id: KeyId::from(id),
            digest,
            profile,
            checked: Checked,
        })
    }

    /// Validates `spec`, taking its profile from `profiles` when an equal one is there.
    pub(crate) fn from_spec_sharing(
        mut spec: KeyRecordSpec,
        path: &str,
        profiles: &mut HashSet<Arc<KeyProfile>>,
    ) -> Result<KeyRecord, ConfigError> {
        let id = std::mem::take(&mut spec.id);
        if !is_valid_id(&id) {
            return Err(ConfigError::new(
                format!("{path}.id"),
                "must be non-empty and use only letters, digits, '_', '-' and '.'",
            ));
        }
        let digest =
            parse_hex_digest(&std::mem::take(&mut spec.secret_sha256)).ok_or_else(|| {
                ConfigError::new(
                    format!("{path}.secret_sha256"),
                    "expected 64 hex characters (the SHA-256 of the secret)",
                )
            })?;
        normalize_time(&mut spec.expires_at, &format!("{path}.expires_at"))?;
        normalize_time(&mut spec.not_after, &format!("{path}.not_after"))?;
        for (i, origin) in spec.origins.iter_mut().enumerate() {
            if !(origin.starts_with("https://") || origin.starts_with("http://")) {
                return Err(ConfigError::new(
                    format!("{path}.origins[{i}]"),
                    "expected an origin such as https://merchant.example",
                ));
            }
            origin.truncate(origin.trim_end_matches('/').len());
            origin.make_ascii_lowercase();
        }
        if let Some(rate_limit) = &spec.rate_limit {
            RateLimit::from_spec(rate_limit, &format!("{path}.rate_limit"))?;
        }
        let profile = KeyProfile {
            fields: spec,
            checked: Checked,
        };
        // A profile found in `profiles` was checked when it went in.
        let profile = match profiles.get(&profile) {
            Some(shared) => Arc::clone(shared),
            None => {
                check_header_safe(&profile.fields, path)?;
                let shared = Arc::new(profile);
                profiles.insert(Arc::clone(&shared));
                shared
            }
        };
        Ok(KeyRecord {
            id: KeyId::from(id),
            digest,
            profile,
            checked: Checked,
        })
    }
}

/// Collects validated records one at a time (a document's specs are never all held at once),
/// then builds the indexes.
struct Builder<'p> {
    path: &'p str,
    records: Vec<KeyRecord>,
    profiles: HashSet<Arc<KeyProfile>>,
    /// The first invalid record, kept while the parser unwinds.
    error: Option<ConfigError>,
}

impl<'p> Builder<'p> {
    fn new(path: &'p str, capacity: usize) -> Builder<'p> {
        Builder {
            path,
            records: Vec::with_capacity(capacity),
            profiles: HashSet::new(),
            error: None,
        }
    }

    fn push(&mut self, spec: KeyRecordSpec) -> Result<(), ConfigError> {
        let at = format!("{}[{}]", self.path, self.records.len());
        let record = KeyRecord::from_spec_sharing(spec, &at, &mut self.profiles)?;
        self.records.push(record);
        Ok(())
    }

    fn finish(self) -> Result<KeySet, ConfigError> {
        let path = self.path;
        let mut records = self.records;
        records.shrink_to_fit();
        let count = u32::try_from(records.len())
            .map_err(|_| ConfigError::new(path, "too many keys for one set"))?;
        let id_of = |i: &u32| records.get(*i as usize).map(|r| r.id.as_str());
        let digest_of = |i: &u32| records.get(*i as usize).map(|r| &r.digest);
        // Each comparison reads two small flat arrays, not two records spread over the
        // set, until the first 8 bytes of the digests (or the id hashes) are equal.
        let prefixes: Vec<u64> = records.iter().map(|r| digest_prefix(&r.digest)).collect();
        let prefix_of = |i: &u32| prefixes.get(*i as usize);
        let mut by_digest = sorted_indexes(count, &|a, b| {
            (prefix_of(a).cmp(&prefix_of(b)))
                .then_with(|| digest_of(a).cmp(&digest_of(b)))
                .then(a.cmp(b))
        });
        drop(prefixes);
        let id_hashes: Vec<u64> = records.iter().map(|r| id_hash(&r.id)).collect();
        let id_hash_of = |i: &u32| id_hashes.get(*i as usize);
        let mut by_id = sorted_indexes(count, &|a, b| {
            (id_hash_of(a).cmp(&id_hash_of(b)))
                .then_with(|| id_of(a).cmp(&id_of(b)))
                .then(a.cmp(b))
        });
        // Equal keys sort next to each other, in document order; report the duplicate that
        // comes first in the document, its id before its digest, as a one-pass check would.
        let first_duplicate = |index: &[u32], same: &dyn Fn(&u32, &u32) -> bool| {
            index
                .windows(2)
                .filter_map(|pair| match pair {
                    [earlier, later] if same(earlier, later) => Some((*later, *earlier)),
                    _ => None,
                })
                .min()
        };
        let id_duplicate = first_duplicate(&by_id, &|a, b| id_of(a) == id_of(b));
        let digest_duplicate = first_duplicate(&by_digest, &|a, b| digest_of(a) == digest_of(b));
        let duplicate = match (id_duplicate, digest_duplicate) {
            (Some(id), Some(digest)) if digest.0 < id.0 => {
                Some(("secret_sha256", "digest", digest))
            }
            (Some(id), _) => Some(("id", "key id", id)),
            (None, Some(digest)) => Some(("secret_sha256", "digest", digest)),
            (None, None) => None,
        };
        if let Some((field, what, (later, earlier))) = duplicate {
            return Err(ConfigError::new(
                format!("{path}[{later}].{field}"),
                format!("duplicate {what} (also {path}[{earlier}])"),
            ));
        }
        let id_buckets = HashBuckets::new(
            by_id.len(),
            by_id.iter().filter_map(|i| id_hash_of(i).copied()),
        );
        drop(id_hashes);
        // The records move to digest order; `by_id` follows them to their new numbers.
        let mut new_number = vec![0u32; records.len()];
        for (number, old) in (0u32..).zip(&by_digest) {
            if let Some(slot) = new_number.get_mut(*old as usize) {
                *slot = number;
            }
        }
        for number in by_id.iter_mut() {
            *number = new_number.get(*number as usize).copied().unwrap_or(0);
        }
        drop(new_number);
        permute(&mut records, &mut by_digest);
        drop(by_digest);
        let digest_buckets = HashBuckets::new(
            records.len(),
            records.iter().map(|r| digest_prefix(&r.digest)),
        );
        Ok(KeySet {
            records,
            digest_buckets,
            by_id,
            id_buckets,
        })
    }
}

/// The `keys` array of a document, fed to the builder record by record.
struct KeysSeed<'b, 'p>(&'b mut Builder<'p>);

impl<'de> DeserializeSeed<'de> for KeysSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for KeysSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of key records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(spec) = seq.next_element::<KeyRecordSpec>()? {
            if let Err(error) = self.0.push(spec) {
                self.0.error = Some(error);
                return Err(A::Error::custom("invalid key record"));
            }
        }
        Ok(())
    }
}

/// A whole document, `{"serial": N, "keys": [...]}`; yields its serial.
struct DocumentSeed<'b, 'p>(&'b mut Builder<'p>);

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_, '_> {
    type Value = Option<u64>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<u64>, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocumentSeed<'_, '_> {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key-set document {\"serial\": N, \"keys\": [...]}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<u64>, A::Error> {
        const FIELDS: &[&str] = &["serial", "keys"];
        let (mut serial, mut keys_seen) = (None, false);
        while let Some(field) = map.next_key::<String>()? {
            match field.as_str() {
                "serial" if serial.is_some() => return Err(A::Error::duplicate_field("serial")),
                "serial" => serial = Some(map.next_value::<Option<u64>>()?),
                "keys" if keys_seen => return Err(A::Error::duplicate_field("keys")),
                "keys" => {
                    map.next_value_seed(KeysSeed(&mut *self.0))?;
                    keys_seen = true;
                }
                other => return Err(A::Error::unknown_field(other, FIELDS)),
            }
        }
        if !keys_seen {
            return Err(A::Error::missing_field("keys"));
        }
        Ok(serial.flatten())
    }
}

/// Key ids are public labels; they travel in headers and logs, so keep them to a safe alphabet.
pub fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(is_id_byte)
}

impl KeySet {
    /// Validates every record and builds the indexes. `path` prefixes error locations
    /// (e.g. `keys` gives `keys[3].secret_sha256`).
    pub fn from_specs(specs: Vec<KeyRecordSpec>, path: &str) -> Result<KeySet, ConfigError> {
        let mut builder = Builder::new(path, specs.len());
        for spec in specs {
            builder.push(spec)?;
        }
        builder.finish()
    }

    /// Parses a key-set document: `{"keys": [ ...records ]}`.
    pub fn from_json(bytes: &[u8]) -> Result<KeySet, ConfigError> {
        KeySet::from_document(bytes).map(|(keys, _)| keys)
    }

    /// A key-set document `{"serial": N, "keys": [...]}` and its serial, if it has one.
    pub fn from_document(bytes: &[u8]) -> Result<(KeySet, Option<u64>), ConfigError> {
        let mut builder = Builder::new("keys", 0);
        let mut parser = serde_json::Deserializer::from_slice(bytes);
        let parsed = DocumentSeed(&mut builder)
            .deserialize(&mut parser)
            .and_then(|serial| parser.end().map(|()| serial));
        match parsed {
            Ok(serial) => Ok((builder.finish()?, serial)),
            Err(error) => Err(builder
                .error
                .take()
                .unwrap_or_else(|| ConfigError::from_json(error))),
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn by_id(&self, id: &str) -> Option<&KeyRecord> {
        let hash = id_hash(id);
        let record_at = |k: usize| {
            self.by_id
                .get(k)
                .and_then(|number| self.records.get(*number as usize))
        };
        let at = self.id_buckets.find(hash, |k| {
            record_at(k).map(|r| (id_hash(&r.id), r.id.as_str()).cmp(&(hash, id)))
        })?;
        record_at(at)
    }

    pub fn by_digest(&self, digest: &Digest) -> Option<&KeyRecord> {
        let at = self.digest_buckets.find(digest_prefix(digest), |k| {
            self.records.get(k).map(|r| r.digest.cmp(digest))
        })?;
        self.records.get(at)
    }

    /// The records, in digest order.
    pub fn records(&self) -> &[KeyRecord] {
        &self.records
    }

    /// Whether any record carries its own rate limit or monthly budget.
    pub fn has_limits(&self) -> bool {
        self.records
            .iter()
            .any(|r| r.fields.rate_limit.is_some() || r.fields.monthly_budget.is_some())
    }
}

/// Record fields travel upstream in headers: refuse values that could not be sent safely.
/// Part of every record's validation (`KeyRecord::from_spec`), so no reader can skip it.
fn check_header_safe(profile: &KeyRecordSpec, path: &str) -> Result<(), ConfigError> {
    let singles = [
        ("tenant", &profile.tenant),
        ("environment", &profile.environment),
        ("product", &profile.product),
        ("user", &profile.user),
    ];
    for (field, value) in singles {
        if let Some(v) = value {
            if !is_header_value(v) {
                return Err(ConfigError::new(
                    format!("{path}.{field}"),
                    "must be printable ASCII",
                ));
            }
        }
    }
    let lists = [
        ("organizations", &profile.organizations),
        ("permissions", &profile.permissions),
    ];
    for (field, values) in lists {
        for (j, v) in values.iter().enumerate() {
            if v.is_empty() || !is_header_value(v) || v.contains(',') {
                return Err(ConfigError::new(
                    format!("{path}.{field}[{j}]"),
                    "must be non-empty printable ASCII without ','",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::digest::sha256;

    fn spec(id: &str, secret: &str) -> serde_json::Value {
        serde_json::json!({"id": id, "secret_sha256": hex::encode(sha256(secret.as_bytes()))})
    }

    fn load(records: serde_json::Value) -> Result<KeySet, ConfigError> {
        KeySet::from_json(
            serde_json::json!({ "keys": records })
                .to_string()
                .as_bytes(),
        )
    }

    #[test]
    fn records_are_found_by_id_and_by_digest() {
        let set = load(serde_json::json!([spec("a", "s1"), spec("b", "s2")])).unwrap();
        assert_eq!(set.by_id("b").map(|r| r.id.as_str()), Some("b"));
        assert_eq!(
            set.by_digest(&sha256(b"s1")).map(|r| r.id.as_str()),
            Some("a")
        );
        assert!(set.by_digest(&sha256(b"nope")).is_none());
    }

    /// A record whose digest is `digest` as written, not the hash of a secret.
    fn with_digest(id: &str, digest: &Digest) -> serde_json::Value {
        serde_json::json!({"id": id, "secret_sha256": hex::encode(digest)})
    }

    #[test]
    fn every_record_of_a_large_set_is_found_by_id_and_by_digest_and_strangers_are_not() {
        let records: Vec<_> = (0..5000)
            .map(|i| spec(&format!("k{i}"), &format!("s{i}")))
            .collect();
        let set = load(serde_json::Value::Array(records)).unwrap();
        for i in 0..5000 {
            let by_digest = set.by_digest(&sha256(format!("s{i}").as_bytes())).unwrap();
            assert_eq!(by_digest.id, format!("k{i}"));
            let by_id = set.by_id(&format!("k{i}")).unwrap();
            assert_eq!(by_id.digest, sha256(format!("s{i}").as_bytes()));
        }
        for i in 5000..6000 {
            assert!(set.by_digest(&sha256(format!("s{i}").as_bytes())).is_none());
            assert!(set.by_id(&format!("k{i}")).is_none());
        }
        assert!(set.by_id("").is_none());
    }

    #[test]
    fn records_are_held_in_digest_order() {
        let set = load(serde_json::json!([
            spec("a", "s1"),
            spec("b", "s2"),
            spec("c", "s3")
        ]))
        .unwrap();
        let digests: Vec<_> = set.records().iter().map(|r| r.digest).collect();
        let mut sorted = digests.clone();
        sorted.sort_unstable();
        assert_eq!(digests, sorted);
    }

    #[test]
    fn digests_that_share_their_bucket_or_all_but_the_last_byte_are_told_apart() {
        // Twenty digests in one bucket (equal first 8 bytes), differing only at the end,
        // plus ordinary ones around them.
        let mut shared = sha256(b"shared");
        let mut records = Vec::new();
        for last in 0..20u8 {
            shared[31] = last * 3;
            records.push(with_digest(&format!("c{last}"), &shared));
        }
        records.extend((0..50).map(|i| spec(&format!("k{i}"), &format!("s{i}"))));
        let set = load(serde_json::Value::Array(records)).unwrap();
        for last in 0..20u8 {
            shared[31] = last * 3;
            assert_eq!(set.by_digest(&shared).unwrap().id, format!("c{last}"));
            shared[31] = last * 3 + 1;
            assert!(set.by_digest(&shared).is_none());
        }
        for i in 0..50 {
            let found = set.by_digest(&sha256(format!("s{i}").as_bytes()));
            assert_eq!(found.unwrap().id, format!("k{i}"));
        }
    }

    #[test]
    fn digests_at_the_ends_of_the_range_are_found() {
        let (low, high) = ([0u8; 32], [0xffu8; 32]);
        let set = load(serde_json::json!([
            with_digest("high", &high),
            with_digest("low", &low)
        ]))
        .unwrap();
        assert_eq!(set.by_digest(&low).unwrap().id, "low");
        assert_eq!(set.by_digest(&high).unwrap().id, "high");
        assert!(set.by_digest(&[0x80u8; 32]).is_none());
    }

    #[test]
    fn a_bucket_shared_by_many_hashes_is_bisected_to_the_one_sought() {
        // Entries sorted by (hash, value); all hashes fall in bucket 0 of 8.
        let entries: Vec<(u64, u32)> = (0..100u32).map(|v| (u64::from(v / 10), v)).collect();
        let buckets = HashBuckets::new(entries.len(), entries.iter().map(|e| e.0));
        for wanted in &entries {
            let at = buckets.find(wanted.0, |k| entries.get(k).map(|e| e.cmp(wanted)));
            assert_eq!(at.and_then(|k| entries.get(k)), Some(wanted));
        }
        let stranger = (3, 1000);
        assert_eq!(
            buckets.find(stranger.0, |k| entries.get(k).map(|e| e.cmp(&stranger))),
            None
        );
    }

    #[test]
    fn an_empty_set_finds_nothing() {
        let set = load(serde_json::json!([])).unwrap();
        assert!(set.by_digest(&sha256(b"s")).is_none());
        assert!(set.by_id("a").is_none());
    }

    #[test]
    fn short_ids_sit_in_the_record_and_long_ones_read_back_whole() {
        assert_eq!(std::mem::size_of::<KeyRecord>(), 64);
        let long = "l".repeat(INLINE_ID_BYTES + 1);
        let edge = "e".repeat(INLINE_ID_BYTES);
        let set = load(serde_json::json!([
            spec(&long, "s1"),
            spec(&edge, "s2"),
            spec("a", "s3")
        ]))
        .unwrap();
        for (id, secret) in [(&long, "s1"), (&edge, "s2"), (&"a".to_string(), "s3")] {
            let record = set.by_id(id).unwrap();
            assert_eq!(record.id.as_str(), id);
            assert_eq!(record.digest, sha256(secret.as_bytes()));
        }
        assert!(matches!(
            set.by_id(&edge).unwrap().id.0,
            IdBytes::Inline { .. }
        ));
        assert!(matches!(set.by_id(&long).unwrap().id.0, IdBytes::Heap(_)));
    }

    #[test]
    fn permute_puts_items_where_the_order_says() {
        let mut items = vec!['a', 'b', 'c', 'd', 'e', 'f'];
        let mut order = vec![3, 0, 4, 1, 2, 5];
        permute(&mut items, &mut order);
        assert_eq!(items, ['d', 'a', 'e', 'b', 'c', 'f']);
        assert_eq!(order, [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn duplicate_id_is_refused_with_its_path() {
        let err = load(serde_json::json!([spec("a", "s1"), spec("a", "s2")])).unwrap_err();
        assert_eq!(err.path, "keys[1].id");
    }

    #[test]
    fn duplicate_digest_is_refused_with_its_path() {
        let err = load(serde_json::json!([spec("a", "s1"), spec("b", "s1")])).unwrap_err();
        assert_eq!(err.path, "keys[1].secret_sha256");
    }

    #[test]
    fn short_digest_is_refused() {
        let err = load(serde_json::json!([{"id": "a", "secret_sha256": "abcd"}])).unwrap_err();
        assert_eq!(err.path, "keys[0].secret_sha256");
    }

    #[test]
    fn bad_time_is_refused() {
        let mut r = spec("a", "s");
        r["expires_at"] = serde_json::json!("next tuesday");
        let err = load(serde_json::json!([r])).unwrap_err();
        assert_eq!(err.path, "keys[0].expires_at");
    }

    #[test]
    fn a_time_that_is_neither_text_nor_whole_seconds_is_refused() {
        for bad in [
            serde_json::json!(1.5),
            serde_json::json!(u64::MAX),
            serde_json::json!(true),
        ] {
            let mut r = spec("a", "s");
            r["not_after"] = bad.clone();
            // A value of the wrong JSON type is serde's error: placed by line and column.
            let err = load(serde_json::json!([r])).unwrap_err();
            assert!(
                err.path.starts_with("line 1 column "),
                "{bad}: {}",
                err.path
            );
            assert!(
                err.message.contains("an RFC 3339 time or Unix seconds"),
                "{bad}: {}",
                err.message
            );
        }
        let mut negative = spec("a", "s");
        negative["not_after"] = serde_json::json!(-5);
        let set = load(serde_json::json!([negative])).unwrap();
        assert_eq!(set.by_id("a").unwrap().not_after(), Some(-5));
    }

    #[test]
    fn header_unsafe_fields_are_refused_by_the_record_constructor() {
        let cases = [
            (
                "tenant",
                serde_json::json!("a\r\nx-evil: 1"),
                "record.tenant",
            ),
            ("user", serde_json::json!("ü"), "record.user"),
            (
                "organizations",
                serde_json::json!(["o1", ""]),
                "record.organizations[1]",
            ),
            (
                "permissions",
                serde_json::json!(["read,write"]),
                "record.permissions[0]",
            ),
        ];
        for (field, value, path) in cases {
            let mut r = spec("a", "s");
            r[field] = value;
            let parsed: KeyRecordSpec = serde_json::from_value(r).unwrap();
            let err = KeyRecord::from_spec(parsed, "record").unwrap_err();
            assert_eq!(err.path, path);
        }
        // In a document, the path names the record (its profile differs from the one before).
        let mut bad = spec("b", "s2");
        bad["tenant"] = serde_json::json!("t\n");
        let mut good = spec("a", "s1");
        good["tenant"] = serde_json::json!("t");
        let err = load(serde_json::json!([good, bad])).unwrap_err();
        assert_eq!(err.path, "keys[1].tenant");
    }

    #[test]
    fn a_record_with_every_field_set_is_written_back_exactly_as_read() {
        // Every field is named here, without `..`: a new field does not compile until this
        // test sets it, and then fails if the record does not keep it.
        let spec = KeyRecordSpec {
            id: "a".into(),
            secret_sha256: hex::encode(sha256(b"s")),
            tenant: Some("acme".into()),
            organizations: vec!["o1".into(), "o2".into()],
            environment: Some("live".into()),
            product: Some("p".into()),
            permissions: vec!["read".into()],
            origins: vec!["https://shop.example".into()],
            user: Some("u1".into()),
            expires_at: Some(TimeSpec::Unix(1_893_456_000)),
            not_after: Some(TimeSpec::Unix(1_900_000_000)),
            enabled: Enabled(false),
            rate_limit: Some(RateLimitSpec {
                requests: 5,
                per_seconds: 60,
                burst: 2,
            }),
            monthly_budget: Some(100),
            budget_exhausted: true,
        };
        let text = serde_json::to_string(&spec).unwrap();
        let record = KeyRecord::from_spec(serde_json::from_str(&text).unwrap(), "r").unwrap();
        let written = record
            .profile
            .to_spec(record.id.to_string(), spec.secret_sha256.clone());
        assert_eq!(written, spec);
        assert_eq!(serde_json::to_string(&written).unwrap(), text);
        assert_eq!(
            (record.expires_at(), record.not_after(), record.enabled()),
            (Some(1_893_456_000), Some(1_900_000_000), false)
        );
        assert_eq!(record.rate_limit().map(|r| r.capacity()), Some(7));
    }

    #[test]
    fn times_and_origins_are_normalized_so_equal_grants_share_one_profile() {
        let mut as_text = spec("a", "s1");
        as_text["expires_at"] = serde_json::json!("2030-01-01T00:00:00Z");
        as_text["origins"] = serde_json::json!(["https://Shop.example/"]);
        let mut as_written = spec("b", "s2");
        as_written["expires_at"] = serde_json::json!(1_893_456_000);
        as_written["origins"] = serde_json::json!(["https://shop.example"]);
        let set = load(serde_json::json!([as_text, as_written])).unwrap();
        let (a, b) = (set.by_id("a").unwrap(), set.by_id("b").unwrap());
        assert!(Arc::ptr_eq(&a.profile, &b.profile));
        assert_eq!(a.expires_at(), Some(1_893_456_000));
        assert_eq!(a.fields.origins, ["https://shop.example"]);
        let written =
            serde_json::to_value(a.profile.to_spec(a.id.to_string(), "d".into())).unwrap();
        assert_eq!(written["expires_at"], 1_893_456_000);
        assert_eq!(
            written["origins"],
            serde_json::json!(["https://shop.example"])
        );
    }

    #[test]
    fn unknown_field_is_refused_and_named() {
        let mut r = spec("a", "s");
        r["secret"] = serde_json::json!("plaintext");
        let err = load(serde_json::json!([r])).unwrap_err();
        assert!(err.to_string().contains("unknown field `secret`"), "{err}");
    }

    #[test]
    fn a_field_given_twice_in_a_record_is_refused_not_last_wins() {
        let digest = spec("a", "s")["secret_sha256"].clone();
        let text = format!(
            r#"{{"keys":[{{"id":"a","secret_sha256":{digest},"tenant":"t1","tenant":"t2"}}]}}"#
        );
        let err = KeySet::from_json(text.as_bytes()).unwrap_err();
        assert!(
            err.to_string().contains("duplicate field `tenant`"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_rate_limit_in_a_record_names_its_field() {
        let mut r = spec("a", "s");
        r["rate_limit"] = serde_json::json!({"requests": 5});
        let err = load(serde_json::json!([r])).unwrap_err();
        assert!(
            err.to_string()
                .contains("rate_limit: missing field `per_seconds`"),
            "{err}"
        );
    }
}
