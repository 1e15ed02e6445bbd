//! The key set: hashed key records, indexed once by id and by digest.
//! The same JSON record format is used inline in the filter config and by the key service.
//!
//! Sets of a million keys live in every VM, so a record holds only what is its own (id and
//! digest) and shares the rest: what a key grants (`KeyProfile`) is held once per distinct
//! value, and the two indexes are sorted arrays of record numbers, not hash maps of copies.

use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::config_error::{is_header_value, ConfigError};
use super::digest::{parse_hex_digest, Digest};
use super::rate_limit::{RateLimit, RateLimitSpec};
use super::time::parse_rfc3339;

/// A time given as RFC 3339 text or as Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum TimeSpec {
    Unix(i64),
    Text(String),
}

/// Read by hand rather than derived `untagged`: serde reads an untagged enum by buffering the
/// value in its generic `Content` form first, and that code cost the wasm module about 3 KB.
impl<'de> Deserialize<'de> for TimeSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<TimeSpec, D::Error> {
        deserializer.deserialize_any(TimeSpecVisitor)
    }
}

struct TimeSpecVisitor;

impl<'de> Visitor<'de> for TimeSpecVisitor {
    type Value = TimeSpec;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an RFC 3339 time or Unix seconds")
    }

    fn visit_i64<E: serde::de::Error>(self, seconds: i64) -> Result<TimeSpec, E> {
        Ok(TimeSpec::Unix(seconds))
    }

    fn visit_u64<E: serde::de::Error>(self, seconds: u64) -> Result<TimeSpec, E> {
        i64::try_from(seconds)
            .map(TimeSpec::Unix)
            .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(seconds), &self))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<TimeSpec, E> {
        Ok(TimeSpec::Text(text.to_string()))
    }

    fn visit_string<E: serde::de::Error>(self, text: String) -> Result<TimeSpec, E> {
        Ok(TimeSpec::Text(text))
    }
}

/// A key record as written in JSON, the one list of its fields: inline keys, key-service
/// documents, the lookup cache and the shared form of a set read it, and `keygate key new`
/// builds it and writes it with these same serde attributes. Written, a field at its default
/// is left out, the rest come in this order (the README's table). A record keeps its spec
/// (`KeyProfile::fields`), so a new field is one line here; a field that needs a check or a
/// parsed form adds it in `KeyRecord::from_spec_sharing` (and `check_header_safe` when it
/// goes upstream in a header). Holds the digest of the secret, never the secret.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
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

/// A validated key record: its own id and digest, and what it grants, shared with every other
/// record of the set that grants the same. Reads of `record.tenant` and the like go through
/// `Deref` to the profile, so the record reads as one flat struct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub digest: Digest,
    pub profile: Arc<KeyProfile>,
    checked: Checked,
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

/// Records in document order plus the two indexes built once when the set is loaded: record
/// numbers sorted by id (searched by bisection) and by digest, with the digests' first 8 bytes
/// alongside in one flat array: SHA-256 digests are spread evenly, so interpolation finds one
/// in a few probes of that array instead of twenty through the records.
#[derive(Debug, Default)]
pub struct KeySet {
    records: Vec<KeyRecord>,
    by_id: Vec<u32>,
    by_digest: Vec<u32>,
    digest_prefixes: Vec<u64>,
}

pub(crate) fn digest_prefix(digest: &Digest) -> u64 {
    let mut head = [0u8; 8];
    head.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
    u64::from_be_bytes(head)
}

/// The first position in `sorted` whose value is not below `key`: interpolation while it
/// narrows the range quickly (evenly spread values), bisection for what remains.
fn lower_bound(sorted: &[u64], key: u64) -> usize {
    let (mut lo, mut hi) = (0usize, sorted.len());
    for _ in 0..8 {
        if hi - lo <= 16 {
            break;
        }
        let (Some(&first), Some(&last)) = (sorted.get(lo), sorted.get(hi - 1)) else {
            break;
        };
        if key <= first {
            return lo;
        }
        if key > last {
            return hi;
        }
        let offset = u128::from(key - first) * (hi - 1 - lo) as u128 / u128::from(last - first);
        let guess = lo + offset as usize;
        match sorted.get(guess) {
            Some(&value) if value < key => lo = guess + 1,
            _ => hi = guess,
        }
    }
    lo + sorted
        .get(lo..hi)
        .map_or(0, |rest| rest.partition_point(|value| *value < key))
}

/// The indexes `0..count` in `order`. One sort instantiation for every order, through a `dyn`
/// comparator: the standard sort inlined with each comparator was 89 KB of keygate.wasm
/// (its small-sort networks repeat the comparator dozens of times), for a sort that runs only
/// when a key set is built.
fn sorted_indexes(count: u32, order: &dyn Fn(&u32, &u32) -> std::cmp::Ordering) -> Vec<u32> {
    let mut indexes: Vec<u32> = (0..count).collect();
    indexes.sort_unstable_by(|a, b| order(a, b));
    indexes
}

fn prefixes_in_order(records: &[KeyRecord], by_digest: &[u32]) -> Vec<u64> {
    by_digest
        .iter()
        .map(|i| {
            records
                .get(*i as usize)
                .map_or(0, |r| digest_prefix(&r.digest))
        })
        .collect()
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
        is_valid_id(&id).then_some(KeyRecord {
            id,
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
            id,
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
        let by_id = sorted_indexes(count, &|a, b| id_of(a).cmp(&id_of(b)).then(a.cmp(b)));
        let by_digest = sorted_indexes(count, &|a, b| {
            digest_of(a).cmp(&digest_of(b)).then(a.cmp(b))
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
        let digest_prefixes = prefixes_in_order(&records, &by_digest);
        Ok(KeySet {
            records,
            by_id,
            by_digest,
            digest_prefixes,
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

    fn record(&self, number: u32) -> Option<&KeyRecord> {
        self.records.get(number as usize)
    }

    pub fn by_id(&self, id: &str) -> Option<&KeyRecord> {
        let at = self
            .by_id
            .binary_search_by(|i| self.record(*i).map(|r| r.id.as_str()).cmp(&Some(id)))
            .ok()?;
        self.by_id.get(at).and_then(|i| self.record(*i))
    }

    pub fn by_digest(&self, digest: &Digest) -> Option<&KeyRecord> {
        let prefix = digest_prefix(digest);
        let at = lower_bound(&self.digest_prefixes, prefix);
        // Digests that share their first 8 bytes sit next to each other.
        self.digest_prefixes
            .get(at..)?
            .iter()
            .take_while(|p| **p == prefix)
            .zip(self.by_digest.get(at..)?)
            .filter_map(|(_, i)| self.record(*i))
            .find(|r| r.digest == *digest)
    }

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

    #[test]
    fn lower_bound_agrees_with_bisection_on_even_and_lumpy_values() {
        let even: Vec<u64> = (0..5000u64).map(|i| i * (u64::MAX / 5000)).collect();
        let lumpy: Vec<u64> = (0..5000u64)
            .map(|i| (i / 7) * (i % 3) * 1_000_003)
            .collect();
        for values in [even, {
            let mut v = lumpy;
            v.sort_unstable();
            v
        }] {
            for key in values
                .iter()
                .flat_map(|v| [v.saturating_sub(1), *v, v.saturating_add(1)])
            {
                assert_eq!(
                    lower_bound(&values, key),
                    values.partition_point(|v| *v < key),
                    "{key}"
                );
            }
            assert_eq!(
                lower_bound(&values, u64::MAX),
                values.partition_point(|v| *v < u64::MAX)
            );
        }
        assert_eq!(lower_bound(&[], 5), 0);
    }

    #[test]
    fn digests_sharing_their_first_bytes_are_told_apart() {
        let mut set = load(serde_json::json!([spec("a", "s1"), spec("b", "s2")])).unwrap();
        // Force a shared 8-byte prefix: both entries of the flat array say the same.
        let shared = set.digest_prefixes.first().copied().unwrap();
        set.digest_prefixes.iter_mut().for_each(|p| *p = shared);
        let wanted = set.records()[1].digest;
        let mut probe = wanted;
        probe[..8].copy_from_slice(&shared.to_be_bytes());
        set.records[1].digest = probe;
        assert_eq!(set.by_digest(&probe).map(|r| r.id.as_str()), Some("b"));
        assert!(set.by_digest(&sha256(b"nope")).is_none());
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
            .to_spec(record.id.clone(), spec.secret_sha256.clone());
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
        let written = serde_json::to_value(a.profile.to_spec(a.id.clone(), "d".into())).unwrap();
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
}
