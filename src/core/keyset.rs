//! The key set: hashed key records, indexed once by id and by digest.
//! The same JSON record format is used inline in the filter config and by the key service.

use std::collections::HashMap;

use serde::Deserialize;

use super::config::ConfigError;
use super::digest::{parse_hex_digest, Digest};
use super::limits::{RateLimit, RateLimitSpec};
use super::time::parse_rfc3339;

/// A time given as RFC 3339 text or as Unix seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TimeSpec {
    Unix(i64),
    Text(String),
}

/// A key record as written in JSON. Holds the digest of the secret, never the secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecordSpec {
    pub id: String,
    /// Hex SHA-256 of the secret: the whole key for opaque keys, the part after `:` for
    /// id:secret keys, the secret header's value for split keys.
    pub secret_sha256: String,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub organizations: Vec<String>,
    #[serde(default)]
    pub environment: Option<String>,
    #[serde(default)]
    pub product: Option<String>,
    #[serde(default)]
    pub permissions: Vec<String>,
    #[serde(default)]
    pub origins: Vec<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// After this time the key answers `API_KEY_EXPIRED`.
    #[serde(default)]
    pub expires_at: Option<TimeSpec>,
    /// After this time the key is simply no longer valid (`INVALID_API_KEY`): the end of a
    /// rotation grace period.
    #[serde(default)]
    pub not_after: Option<TimeSpec>,
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// This key's rate limit (else the config's `limits.rate_limit`, if any).
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// Budget units this key may spend per calendar month (UTC); over it, `BUDGET_EXHAUSTED`.
    #[serde(default)]
    pub monthly_budget: Option<u64>,
    /// Set by the billing side: the key's budget is spent, answer `BUDGET_EXHAUSTED`.
    #[serde(default)]
    pub budget_exhausted: bool,
}

fn default_true() -> bool {
    true
}

/// A validated key record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub digest: Digest,
    pub tenant: Option<String>,
    pub organizations: Vec<String>,
    pub environment: Option<String>,
    pub product: Option<String>,
    pub permissions: Vec<String>,
    pub origins: Vec<String>,
    pub user: Option<String>,
    pub expires_at: Option<i64>,
    pub not_after: Option<i64>,
    pub enabled: bool,
    pub rate_limit: Option<RateLimit>,
    pub monthly_budget: Option<u64>,
    pub budget_exhausted: bool,
}

/// Records plus the two indexes built once when the set is loaded.
#[derive(Debug, Default)]
pub struct KeySet {
    records: Vec<KeyRecord>,
    by_id: HashMap<String, usize>,
    by_digest: HashMap<Digest, usize>,
}

fn parse_time(spec: &TimeSpec, path: &str) -> Result<i64, ConfigError> {
    match spec {
        TimeSpec::Unix(secs) => Ok(*secs),
        TimeSpec::Text(text) => parse_rfc3339(text).ok_or_else(|| {
            ConfigError::new(
                path,
                "expected an RFC 3339 time such as 2027-01-31T00:00:00Z",
            )
        }),
    }
}

impl KeyRecord {
    pub fn from_spec(spec: KeyRecordSpec, path: &str) -> Result<KeyRecord, ConfigError> {
        if spec.id.is_empty() || !spec.id.bytes().all(is_id_byte) {
            return Err(ConfigError::new(
                format!("{path}.id"),
                "must be non-empty and use only letters, digits, '_', '-' and '.'",
            ));
        }
        let digest = parse_hex_digest(&spec.secret_sha256).ok_or_else(|| {
            ConfigError::new(
                format!("{path}.secret_sha256"),
                "expected 64 hex characters (the SHA-256 of the secret)",
            )
        })?;
        let expires_at = spec
            .expires_at
            .as_ref()
            .map(|t| parse_time(t, &format!("{path}.expires_at")))
            .transpose()?;
        let not_after = spec
            .not_after
            .as_ref()
            .map(|t| parse_time(t, &format!("{path}.not_after")))
            .transpose()?;
        for (i, origin) in spec.origins.iter().enumerate() {
            if !(origin.starts_with("https://") || origin.starts_with("http://")) {
                return Err(ConfigError::new(
                    format!("{path}.origins[{i}]"),
                    "expected an origin such as https://merchant.example",
                ));
            }
        }
        let rate_limit = spec
            .rate_limit
            .as_ref()
            .map(|r| RateLimit::from_spec(r, &format!("{path}.rate_limit")))
            .transpose()?;
        Ok(KeyRecord {
            id: spec.id,
            digest,
            tenant: spec.tenant,
            organizations: spec.organizations,
            environment: spec.environment,
            product: spec.product,
            permissions: spec.permissions,
            origins: spec
                .origins
                .into_iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            user: spec.user,
            expires_at,
            not_after,
            enabled: spec.enabled,
            rate_limit,
            monthly_budget: spec.monthly_budget,
            budget_exhausted: spec.budget_exhausted,
        })
    }
}

/// Key ids are public labels; they travel in headers and logs, so keep them to a safe alphabet.
pub fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

impl KeySet {
    /// Validates every record and builds the indexes. `path` prefixes error locations
    /// (e.g. `keys` gives `keys[3].secret_sha256`).
    pub fn from_specs(specs: Vec<KeyRecordSpec>, path: &str) -> Result<KeySet, ConfigError> {
        let mut set = KeySet {
            records: Vec::with_capacity(specs.len()),
            by_id: HashMap::with_capacity(specs.len()),
            by_digest: HashMap::with_capacity(specs.len()),
        };
        for (i, spec) in specs.into_iter().enumerate() {
            let at = format!("{path}[{i}]");
            let record = KeyRecord::from_spec(spec, &at)?;
            if let Some(first) = set.by_id.insert(record.id.clone(), i) {
                return Err(ConfigError::new(
                    format!("{at}.id"),
                    format!("duplicate key id (also {path}[{first}])"),
                ));
            }
            if let Some(first) = set.by_digest.insert(record.digest, i) {
                return Err(ConfigError::new(
                    format!("{at}.secret_sha256"),
                    format!("duplicate digest (also {path}[{first}])"),
                ));
            }
            set.records.push(record);
        }
        Ok(set)
    }

    /// Parses a key-set document: `{"keys": [ ...records ]}`.
    pub fn from_json(bytes: &[u8]) -> Result<KeySet, ConfigError> {
        KeySet::from_document(bytes).map(|(keys, _)| keys)
    }

    /// A key-set document `{"serial": N, "keys": [...]}` and its serial, if it has one.
    pub fn from_document(bytes: &[u8]) -> Result<(KeySet, Option<u64>), ConfigError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Document {
            #[serde(default)]
            serial: Option<u64>,
            keys: Vec<KeyRecordSpec>,
        }
        let doc: Document = serde_json::from_slice(bytes).map_err(ConfigError::from_json)?;
        Ok((KeySet::from_specs(doc.keys, "keys")?, doc.serial))
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn by_id(&self, id: &str) -> Option<&KeyRecord> {
        self.by_id.get(id).and_then(|i| self.records.get(*i))
    }

    pub fn by_digest(&self, digest: &Digest) -> Option<&KeyRecord> {
        self.by_digest
            .get(digest)
            .and_then(|i| self.records.get(*i))
    }

    pub fn records(&self) -> &[KeyRecord] {
        &self.records
    }

    /// Whether any record carries its own rate limit or monthly budget.
    pub fn has_limits(&self) -> bool {
        self.records
            .iter()
            .any(|r| r.rate_limit.is_some() || r.monthly_budget.is_some())
    }
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
    fn unknown_field_is_refused_and_named() {
        let mut r = spec("a", "s");
        r["secret"] = serde_json::json!("plaintext");
        let err = load(serde_json::json!([r])).unwrap_err();
        assert!(err.to_string().contains("unknown field `secret`"), "{err}");
    }
}
