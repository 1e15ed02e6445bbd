//! The `key_service` object of the filter configuration, validated into a `KeyService`: which
//! cluster, which mode (full sync or lookup on miss) and that mode's settings, and the
//! namespace of its shared data. Also what the key service answers to one fetch.

use serde_json::Value;

use super::paths::{is_request_path, PathTemplate, TemplateKind};
use crate::core::config_error::{is_header_value, ConfigError};
use crate::core::digest::sha256;
use crate::core::json_fields::Fields;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SourceMode {
    #[default]
    Full,
    LookupOnMiss,
}

/// What happens to a request whose key cannot be verified because the key service gave no
/// usable answer (no set yet, set too stale, lookup failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnavailable {
    /// 503 `KEYSET_UNAVAILABLE` (fail closed).
    #[default]
    Deny,
    /// Pass the request upstream unauthenticated (`x-keygate-auth: none`, no key scope).
    Allow,
}

/// The `key_service` object of the filter configuration.
#[derive(Debug, Clone)]
pub struct KeyServiceSpec {
    /// The Envoy cluster serving the documents.
    pub cluster: String,
    /// `:authority` of the requests (default: the cluster name).
    pub authority: Option<String>,
    pub mode: SourceMode,
    pub timeout_ms: Option<u64>,
    /// Serve the last good answer at most this long after the last successful fetch (`0`: no
    /// limit).
    pub max_stale_seconds: Option<u64>,
    pub on_unavailable: OnUnavailable,
    /// `full`: the key-set document.
    pub path: Option<String>,
    pub refresh_seconds: Option<u64>,
    /// `lookup_on_miss`: where one key is found by the digest of its secret (opaque keys).
    pub by_digest_path: Option<String>,
    /// `lookup_on_miss`: where one key is found by its id (id:secret and split keys).
    pub by_id_path: Option<String>,
    pub positive_ttl_seconds: Option<u64>,
    pub negative_ttl_seconds: Option<u64>,
    /// Bound of the shared lookup cache for keys found, in entries.
    pub cache_entries: Option<u32>,
    /// Bound of the shared lookup cache for keys not found, in entries: a separate budget, so
    /// unknown keys never evict known ones.
    pub negative_cache_entries: Option<u32>,
    /// Lookups per second per Envoy process (0: no cap); beyond it, uncached keys are answered
    /// `KEYSET_UNAVAILABLE` without a fetch.
    pub max_misses_per_second: Option<u32>,
}

impl KeyServiceSpec {
    const FIELDS: &'static [&'static str] = &[
        "cluster",
        "authority",
        "mode",
        "timeout_ms",
        "max_stale_seconds",
        "on_unavailable",
        "path",
        "refresh_seconds",
        "by_digest_path",
        "by_id_path",
        "positive_ttl_seconds",
        "negative_ttl_seconds",
        "cache_entries",
        "negative_cache_entries",
        "max_misses_per_second",
    ];

    pub fn decode(value: &Value, path: &str) -> Result<KeyServiceSpec, ConfigError> {
        let fields = Fields::of(value, path, Self::FIELDS)?;
        let modes = [
            ("full", SourceMode::Full),
            ("lookup_on_miss", SourceMode::LookupOnMiss),
        ];
        let unavailable = [
            ("deny", OnUnavailable::Deny),
            ("allow", OnUnavailable::Allow),
        ];
        Ok(KeyServiceSpec {
            cluster: fields.required_string("cluster")?,
            authority: fields.string("authority")?,
            mode: fields.variant("mode", &modes)?.unwrap_or_default(),
            timeout_ms: fields.u64("timeout_ms")?,
            max_stale_seconds: fields.u64("max_stale_seconds")?,
            on_unavailable: fields
                .variant("on_unavailable", &unavailable)?
                .unwrap_or_default(),
            path: fields.string("path")?,
            refresh_seconds: fields.u64("refresh_seconds")?,
            by_digest_path: fields.string("by_digest_path")?,
            by_id_path: fields.string("by_id_path")?,
            positive_ttl_seconds: fields.u64("positive_ttl_seconds")?,
            negative_ttl_seconds: fields.u64("negative_ttl_seconds")?,
            cache_entries: fields.u32("cache_entries")?,
            negative_cache_entries: fields.u32("negative_cache_entries")?,
            max_misses_per_second: fields.u32("max_misses_per_second")?,
        })
    }
}

const DEFAULT_TIMEOUT_MS: u64 = 1000;
const MAX_TIMEOUT_MS: u64 = 60_000;
const DEFAULT_REFRESH_SECONDS: u64 = 10;
const MAX_REFRESH_SECONDS: u64 = 86_400;
const DEFAULT_MAX_STALE_SECONDS: u64 = 300;
const MAX_SECONDS: u64 = 366 * 86_400;

/// The validated key service.
#[derive(Debug, Clone)]
pub struct KeyService {
    pub cluster: String,
    pub authority: String,
    pub timeout_ms: u64,
    /// `None`: an old answer is served for as long as the service fails.
    pub max_stale_ms: Option<i64>,
    pub on_unavailable: OnUnavailable,
    pub mode: KeyServiceMode,
    /// Prefix of every shared-data key this source uses.
    pub namespace: String,
}

#[derive(Debug, Clone)]
pub enum KeyServiceMode {
    Full(FullSync),
    Lookup(LookupPolicy),
}

/// `full` mode: the document and how often to fetch it.
#[derive(Debug, Clone)]
pub struct FullSync {
    pub path: String,
    pub refresh_ms: i64,
}

impl KeyService {
    /// `opaque_keys` / `pair_keys`: whether the enabled credential schemes produce keys found by
    /// digest / by id, so lookup mode can insist on the paths it will need.
    pub fn from_spec(
        spec: KeyServiceSpec,
        name: &str,
        opaque_keys: bool,
        pair_keys: bool,
    ) -> Result<KeyService, ConfigError> {
        let at = |field: &str| format!("key_service.{field}");
        if spec.cluster.is_empty() || !spec.cluster.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                at("cluster"),
                "must name an Envoy cluster (printable ASCII, no spaces)",
            ));
        }
        let authority = spec.authority.unwrap_or_else(|| spec.cluster.clone());
        if authority.is_empty() || !authority.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                at("authority"),
                "must be a host name (printable ASCII, no spaces)",
            ));
        }
        let timeout_ms = spec.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
        if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
            return Err(ConfigError::new(
                at("timeout_ms"),
                format!("must be between 1 and {MAX_TIMEOUT_MS}"),
            ));
        }
        let max_stale = spec.max_stale_seconds.unwrap_or(DEFAULT_MAX_STALE_SECONDS);
        if max_stale > MAX_SECONDS {
            return Err(ConfigError::new(
                at("max_stale_seconds"),
                format!("must be at most {MAX_SECONDS} (0: no limit)"),
            ));
        }
        let max_stale_ms = (max_stale > 0).then_some(max_stale as i64 * 1000);

        let (mode, identity) = match spec.mode {
            SourceMode::Full => {
                for (field, present) in [
                    ("by_digest_path", spec.by_digest_path.is_some()),
                    ("by_id_path", spec.by_id_path.is_some()),
                    ("positive_ttl_seconds", spec.positive_ttl_seconds.is_some()),
                    ("negative_ttl_seconds", spec.negative_ttl_seconds.is_some()),
                    ("cache_entries", spec.cache_entries.is_some()),
                    (
                        "negative_cache_entries",
                        spec.negative_cache_entries.is_some(),
                    ),
                    (
                        "max_misses_per_second",
                        spec.max_misses_per_second.is_some(),
                    ),
                ] {
                    if present {
                        return Err(ConfigError::new(
                            at(field),
                            "only for \"mode\": \"lookup_on_miss\"",
                        ));
                    }
                }
                let path = spec.path.unwrap_or_else(|| "/keys.json".to_string());
                if !is_request_path(&path) {
                    return Err(ConfigError::new(
                        at("path"),
                        "must start with '/' and be printable ASCII without spaces",
                    ));
                }
                let refresh = spec.refresh_seconds.unwrap_or(DEFAULT_REFRESH_SECONDS);
                if refresh == 0 || refresh > MAX_REFRESH_SECONDS {
                    return Err(ConfigError::new(
                        at("refresh_seconds"),
                        format!("must be between 1 and {MAX_REFRESH_SECONDS}"),
                    ));
                }
                let identity = format!("full\0{path}");
                (
                    KeyServiceMode::Full(FullSync {
                        path,
                        refresh_ms: refresh as i64 * 1000,
                    }),
                    identity,
                )
            }
            SourceMode::LookupOnMiss => {
                for (field, present) in [
                    ("path", spec.path.is_some()),
                    ("refresh_seconds", spec.refresh_seconds.is_some()),
                ] {
                    if present {
                        return Err(ConfigError::new(at(field), "only for \"mode\": \"full\""));
                    }
                }
                let template = |field: &str, text: Option<String>, kind, needed: bool| match text {
                    Some(t) => PathTemplate::parse(&t, kind)
                        .map(Some)
                        .map_err(|why| ConfigError::new(at(field), why.to_string())),
                    None if needed => Err(ConfigError::new(
                        at(field),
                        "required: an enabled credential scheme looks keys up this way",
                    )),
                    None => Ok(None),
                };
                let by_digest = template(
                    "by_digest_path",
                    spec.by_digest_path,
                    TemplateKind::Digest,
                    opaque_keys,
                )?;
                let by_id = template("by_id_path", spec.by_id_path, TemplateKind::Id, pair_keys)?;
                let policy = LookupPolicy::new(
                    by_digest,
                    by_id,
                    spec.positive_ttl_seconds,
                    spec.negative_ttl_seconds,
                    CacheBudgets {
                        cache_entries: spec.cache_entries,
                        negative_cache_entries: spec.negative_cache_entries,
                        max_misses_per_second: spec.max_misses_per_second,
                    },
                )
                .map_err(|why| ConfigError::new(at(why.field), why.message))?;
                let identity = format!("lookup\0{}", policy.identity());
                (KeyServiceMode::Lookup(policy), identity)
            }
        };
        if !is_header_value(name) {
            return Err(ConfigError::new("name", "must be printable ASCII"));
        }
        let tag = sha256(format!("{}\0{authority}\0{identity}", spec.cluster).as_bytes());
        let namespace = format!(
            "keygate.keys.{name}.{}",
            hex::encode(tag.get(..4).unwrap_or_default())
        );
        Ok(KeyService {
            cluster: spec.cluster,
            authority,
            timeout_ms,
            max_stale_ms,
            on_unavailable: spec.on_unavailable,
            mode,
            namespace,
        })
    }

    /// Request headers of a GET on the key service.
    pub fn request_headers(&self, path: &str, etag: Option<&str>) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (":method", "GET".to_string()),
            (":path", path.to_string()),
            (":authority", self.authority.clone()),
            ("accept", "application/json".to_string()),
        ];
        if let Some(etag) = etag {
            headers.push(("if-none-match", etag.to_string()));
        }
        headers
    }

    /// The shared-data key of `what` in this service's namespace.
    pub(crate) fn key(&self, what: &str) -> String {
        format!("{}.{what}", self.namespace)
    }
}

/// The answer of the key service to one fetch. `status` is `None` when there was no answer
/// (connection refused, reset, or timeout).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchResponse {
    pub status: Option<u32>,
    pub etag: Option<String>,
    /// `content-range` of a part (`docparts`).
    pub content_range: Option<String>,
    pub body: Vec<u8>,
}

/// Entries per slot of the lookup cache.
pub const WAYS: usize = 4;
const DEFAULT_CACHE_ENTRIES: u32 = 16_384;
const DEFAULT_NEGATIVE_CACHE_ENTRIES: u32 = 4_096;
const DEFAULT_MAX_MISSES_PER_SECOND: u32 = 500;
const MAX_CACHE_ENTRIES: u32 = 1 << 22;
const DEFAULT_POSITIVE_TTL_SECONDS: u64 = 60;
const DEFAULT_NEGATIVE_TTL_SECONDS: u64 = 10;
const MAX_TTL_SECONDS: u64 = 86_400;

/// The lookup-on-miss settings.
#[derive(Debug, Clone)]
pub struct LookupPolicy {
    pub by_digest: Option<PathTemplate>,
    pub by_id: Option<PathTemplate>,
    pub positive_ttl_ms: i64,
    pub negative_ttl_ms: i64,
    /// Slots of the table of keys found.
    pub slots: u32,
    /// Slots of the table of keys not found.
    pub negative_slots: u32,
    /// Lookups per second per process; 0: no cap.
    pub max_misses_per_second: u32,
}

/// The cache budgets of `key_service` (lookup mode), as written in the filter config.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheBudgets {
    pub cache_entries: Option<u32>,
    pub negative_cache_entries: Option<u32>,
    pub max_misses_per_second: Option<u32>,
}

/// A `key_service` setting out of range: the field and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

impl LookupPolicy {
    /// Errors name the offending field of `key_service`.
    pub fn new(
        by_digest: Option<PathTemplate>,
        by_id: Option<PathTemplate>,
        positive_ttl_seconds: Option<u64>,
        negative_ttl_seconds: Option<u64>,
        budgets: CacheBudgets,
    ) -> Result<LookupPolicy, FieldError> {
        let positive = positive_ttl_seconds.unwrap_or(DEFAULT_POSITIVE_TTL_SECONDS);
        if positive == 0 || positive > MAX_TTL_SECONDS {
            return Err(FieldError {
                field: "positive_ttl_seconds",
                message: format!("must be between 1 and {MAX_TTL_SECONDS}"),
            });
        }
        let negative = negative_ttl_seconds.unwrap_or(DEFAULT_NEGATIVE_TTL_SECONDS);
        if negative > MAX_TTL_SECONDS {
            return Err(FieldError {
                field: "negative_ttl_seconds",
                message: format!(
                    "must be at most {MAX_TTL_SECONDS} (0: do not cache unknown keys)"
                ),
            });
        }
        let slots = |field: &'static str, entries: Option<u32>, default: u32| {
            let entries = entries.unwrap_or(default);
            if (WAYS as u32..=MAX_CACHE_ENTRIES).contains(&entries) {
                Ok(entries.div_ceil(WAYS as u32))
            } else {
                Err(FieldError {
                    field,
                    message: format!("must be between {WAYS} and {MAX_CACHE_ENTRIES}"),
                })
            }
        };
        Ok(LookupPolicy {
            by_digest,
            by_id,
            positive_ttl_ms: positive as i64 * 1000,
            negative_ttl_ms: negative as i64 * 1000,
            slots: slots(
                "cache_entries",
                budgets.cache_entries,
                DEFAULT_CACHE_ENTRIES,
            )?,
            negative_slots: slots(
                "negative_cache_entries",
                budgets.negative_cache_entries,
                DEFAULT_NEGATIVE_CACHE_ENTRIES,
            )?,
            max_misses_per_second: budgets
                .max_misses_per_second
                .unwrap_or(DEFAULT_MAX_MISSES_PER_SECOND),
        })
    }

    /// What distinguishes one key store from another (for the shared-data namespace).
    pub fn identity(&self) -> String {
        let text = |t: &Option<PathTemplate>| t.as_ref().map_or("", PathTemplate::text).to_string();
        format!("{}\0{}", text(&self.by_digest), text(&self.by_id))
    }

    /// The most answers the cache holds: keys found, keys not found.
    pub fn capacity(&self) -> (usize, usize) {
        (
            self.slots as usize * WAYS,
            self.negative_slots as usize * WAYS,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::test_support::merged;

    fn spec_error(extra: serde_json::Value) -> ConfigError {
        let spec = serde_json::json!({"cluster": "keyservice"});
        let spec = KeyServiceSpec::decode(&merged(spec, extra), "key_service").unwrap();
        KeyService::from_spec(spec, "t", true, true).unwrap_err()
    }

    #[test]
    fn invalid_settings_are_refused_with_their_path() {
        let cases = [
            (serde_json::json!({"cluster": ""}), "key_service.cluster"),
            (serde_json::json!({"path": "keys.json"}), "key_service.path"),
            (
                serde_json::json!({"refresh_seconds": 0}),
                "key_service.refresh_seconds",
            ),
            (
                serde_json::json!({"timeout_ms": 0}),
                "key_service.timeout_ms",
            ),
            (
                serde_json::json!({"by_id_path": "/k/{id}"}),
                "key_service.by_id_path",
            ),
            (
                serde_json::json!({"mode": "lookup_on_miss", "path": "/k.json"}),
                "key_service.path",
            ),
            (
                serde_json::json!({"mode": "lookup_on_miss", "by_id_path": "/k/{id}"}),
                "key_service.by_digest_path",
            ),
        ];
        for (extra, path) in cases {
            assert_eq!(spec_error(extra.clone()).path, path, "{extra}");
        }
    }

    fn filter_config(extra: serde_json::Value) -> Result<crate::core::config::Config, ConfigError> {
        let cfg = serde_json::json!({
            "credentials": [{"in": "header", "prefixes": ["ks_"]},
                            {"in": "bearer", "format": "id_secret"}],
            "key_service": {"cluster": "keyservice"}});
        crate::core::config::Config::parse(merged(cfg, extra).to_string().as_bytes())
            .map(|(c, _)| c)
    }

    #[test]
    fn the_filter_config_takes_a_key_service_instead_of_inline_keys() {
        let config = filter_config(serde_json::json!({})).unwrap();
        assert!(config.key_service.is_some());
        // Fetched records may carry limits: the shared counter table is prepared.
        assert!(config.limits.enabled);
        let err = filter_config(serde_json::json!({"keys": [
            {"id": "a", "secret_sha256": "00".repeat(32)}]}))
        .unwrap_err();
        assert_eq!(err.path, "keys");
        let err = filter_config(serde_json::json!({"key_service": {"cluster": "k",
            "mode": "lookup_on_miss", "by_digest_path": "/d/{digest}.json"}}))
        .unwrap_err();
        assert_eq!(err.path, "key_service.by_id_path");
        let err = filter_config(serde_json::json!({"key_service": {"cluster": "k",
            "refersh_seconds": 5}}))
        .unwrap_err();
        assert!(
            err.message.contains("unknown field `refersh_seconds`"),
            "{err}"
        );
    }

    #[test]
    fn namespaces_differ_per_document() {
        let service = |path: &str| {
            let spec = serde_json::json!({"cluster": "keyservice", "path": path});
            let spec = KeyServiceSpec::decode(&spec, "key_service").unwrap();
            KeyService::from_spec(spec, "test", true, true).unwrap()
        };
        let (a, b) = (service("/a.json"), service("/b.json"));
        assert_ne!(a.namespace, b.namespace);
        assert!(a.namespace.starts_with("keygate.keys.test."));
    }
}
