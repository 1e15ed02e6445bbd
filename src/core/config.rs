//! The filter configuration: parsed and validated once at configure time into a `Config`
//! whose indexes and pre-rendered replies make the per-request path cheap.

use std::collections::{HashMap, HashSet};

use serde::de::{Deserializer as _, Error as _, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::codes::{ErrorCode, Language};
use super::config_error::is_header_value;
pub use super::config_error::ConfigError;
use super::credential::{CredentialSource, CredentialSpec, Place, TokenFormat};
use super::json_fields::{self, Fields};
use super::keyset::{KeyRecordSpec, KeySet};
use super::keysource::service::{KeyService, KeyServiceSpec};
use super::limits::{Limits, LimitsSpec};
use super::policy::{
    Policy, PolicySpec, RouteRule, RouteRuleSpec, TenantSelector, TenantSelectorSpec,
};
use super::reply::{BodyFormat, Replies};
use super::request::RequestView;
use super::small_sort::sort_few;

/// Names of the trusted headers keygate sends upstream. Client-sent copies are always removed.
#[derive(Debug, Clone)]
pub struct ScopeHeaders {
    pub key_id: String,
    pub tenant: String,
    pub organizations: String,
    pub environment: String,
    pub product: String,
    pub user: String,
    pub permissions: String,
    /// `api_key`, `session` or `none`: how the request was authenticated.
    pub auth: String,
}

impl Default for ScopeHeaders {
    fn default() -> Self {
        ScopeHeaders {
            key_id: "x-keygate-key-id".into(),
            tenant: "x-keygate-tenant".into(),
            organizations: "x-keygate-organizations".into(),
            environment: "x-keygate-environment".into(),
            product: "x-keygate-product".into(),
            user: "x-keygate-user".into(),
            permissions: "x-keygate-permissions".into(),
            auth: "x-keygate-auth".into(),
        }
    }
}

impl ScopeHeaders {
    pub fn all(&self) -> [&str; 8] {
        [
            &self.key_id,
            &self.tenant,
            &self.organizations,
            &self.environment,
            &self.product,
            &self.user,
            &self.permissions,
            &self.auth,
        ]
    }

    const FIELDS: &'static [&'static str] = &[
        "key_id",
        "tenant",
        "organizations",
        "environment",
        "product",
        "user",
        "permissions",
        "auth",
    ];

    /// `scope_headers`: each name left out keeps its default.
    fn decode(value: &Value, path: &str) -> Result<ScopeHeaders, ConfigError> {
        let fields = Fields::of(value, path, Self::FIELDS)?;
        let mut scope = ScopeHeaders::default();
        let mut slots = [
            &mut scope.key_id,
            &mut scope.tenant,
            &mut scope.organizations,
            &mut scope.environment,
            &mut scope.product,
            &mut scope.user,
            &mut scope.permissions,
            &mut scope.auth,
        ];
        fields.strings_into(Self::FIELDS, &mut slots)?;
        Ok(scope)
    }
}

/// Session precedence: a session verified by Envoy's `jwt_authn` filter wins over any API key.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The session cookie; its presence tells a failed session from no session.
    pub cookie: String,
    /// Dynamic-metadata namespace `jwt_authn` writes to.
    pub metadata_namespace: String,
    /// `payload_in_metadata` of the jwt_authn provider.
    pub payload_key: String,
    /// `failed_status_in_metadata` of the jwt_authn provider.
    pub failure_key: String,
    /// Claim sent upstream as the user.
    pub subject_claim: String,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            cookie: "accessToken".into(),
            metadata_namespace: "envoy.filters.http.jwt_authn".into(),
            payload_key: "session".into(),
            failure_key: "session_failure".into(),
            subject_claim: "sub".into(),
        }
    }
}

impl SessionConfig {
    const FIELDS: &'static [&'static str] = &[
        "cookie",
        "metadata_namespace",
        "payload_key",
        "failure_key",
        "subject_claim",
    ];

    /// `session`: each field left out keeps its default.
    fn decode(value: &Value, path: &str) -> Result<SessionConfig, ConfigError> {
        let fields = Fields::of(value, path, Self::FIELDS)?;
        let mut session = SessionConfig::default();
        let mut slots = [
            &mut session.cookie,
            &mut session.metadata_namespace,
            &mut session.payload_key,
            &mut session.failure_key,
            &mut session.subject_claim,
        ];
        fields.strings_into(Self::FIELDS, &mut slots)?;
        Ok(session)
    }

    pub fn cookie_present(&self, req: &RequestView) -> bool {
        !req.cookie_values(&self.cookie).is_empty()
    }
}

/// The configuration as written, each field at its default until the document sets it.
#[derive(Debug)]
struct ConfigSpec {
    name: Option<String>,
    credentials: Vec<CredentialSpec>,
    keys: Vec<KeyRecordSpec>,
    /// Keys must belong to this product (MakePay's appSlug); others are `INVALID_API_KEY`.
    product: Option<String>,
    require_user: bool,
    language: Language,
    body: BodyFormat,
    messages: HashMap<String, String>,
    www_authenticate: Option<String>,
    strip_credentials: bool,
    scope_headers: ScopeHeaders,
    session: Option<SessionConfig>,
    policies: HashMap<String, PolicySpec>,
    routes: Vec<RouteRuleSpec>,
    default_policy: PolicySpec,
    tenant_selectors: Vec<TenantSelectorSpec>,
    /// Read selectors in every spelling an upstream framework may read (see `selectors`).
    strict_selectors: bool,
    /// Clear Envoy's route cache after setting the environment header, so routes can send test
    /// keys to a sandbox cluster.
    route_by_environment: bool,
    /// Rate-limit and budget defaults, headers and the shared counter table.
    limits: Option<LimitsSpec>,
    /// Keys from a key service instead of `keys` (full document or lookup on miss).
    key_service: Option<KeyServiceSpec>,
    /// Refuse dot segments and encoded slashes in the path (`path_guard`); off only behind an
    /// Envoy that normalizes paths, and at the risk the README names.
    reject_ambiguous_paths: bool,
    /// Publish each decision for Envoy's access log (docs/access-logs.md). Off saves the
    /// per-request call that publishes it, for a filter whose Envoy logs no `wasm.keygate`.
    access_log: bool,
}

impl Default for ConfigSpec {
    fn default() -> Self {
        ConfigSpec {
            name: None,
            credentials: Vec::new(),
            keys: Vec::new(),
            product: None,
            require_user: false,
            language: Language::default(),
            body: BodyFormat::default(),
            messages: HashMap::new(),
            www_authenticate: None,
            strip_credentials: true,
            scope_headers: ScopeHeaders::default(),
            session: None,
            policies: HashMap::new(),
            routes: Vec::new(),
            default_policy: PolicySpec::default(),
            tenant_selectors: Vec::new(),
            strict_selectors: true,
            route_by_environment: false,
            limits: None,
            key_service: None,
            reject_ambiguous_paths: true,
            access_log: true,
        }
    }
}

impl ConfigSpec {
    /// Every top-level field, in the README's order.
    const FIELDS: &'static [&'static str] = &[
        "name",
        "credentials",
        "keys",
        "product",
        "require_user",
        "language",
        "body",
        "messages",
        "www_authenticate",
        "strip_credentials",
        "scope_headers",
        "session",
        "policies",
        "routes",
        "default_policy",
        "tenant_selectors",
        "strict_selectors",
        "route_by_environment",
        "limits",
        "key_service",
        "reject_ambiguous_paths",
        "access_log",
    ];

    /// Sets top-level field `name` (any but `keys`) from `fields`, the document read so far.
    fn read(&mut self, name: &str, fields: &Fields) -> Result<(), ConfigError> {
        let path = name;
        match name {
            "name" => self.name = fields.string(name)?,
            "credentials" => self.credentials = list(fields, name, CredentialSpec::decode)?,
            "product" => self.product = fields.string(name)?,
            "require_user" => self.require_user = fields.bool(name)?.unwrap_or(false),
            "language" => {
                self.language = fields.variant(name, Language::NAMES)?.unwrap_or_default()
            }
            "body" => self.body = fields.variant(name, BodyFormat::NAMES)?.unwrap_or_default(),
            "messages" => {
                self.messages = HashMap::new();
                for (code, text) in fields.object(name)?.into_iter().flatten() {
                    let text = json_fields::string(text, &json_fields::join(path, code))?;
                    self.messages.insert(code.clone(), text);
                }
            }
            "www_authenticate" => self.www_authenticate = fields.string(name)?,
            "strip_credentials" => self.strip_credentials = fields.bool(name)?.unwrap_or(true),
            "scope_headers" => {
                self.scope_headers = match fields.get(name) {
                    Some(v) => ScopeHeaders::decode(v, path)?,
                    None => ScopeHeaders::default(),
                }
            }
            "session" => {
                self.session = fields
                    .get(name)
                    .map(|v| SessionConfig::decode(v, path))
                    .transpose()?
            }
            "policies" => {
                self.policies = HashMap::new();
                for (policy, v) in fields.object(name)?.into_iter().flatten() {
                    let spec = PolicySpec::decode(v, &json_fields::join(path, policy))?;
                    self.policies.insert(policy.clone(), spec);
                }
            }
            "routes" => self.routes = list(fields, name, RouteRuleSpec::decode)?,
            "default_policy" => {
                self.default_policy = match fields.get(name) {
                    Some(v) => PolicySpec::decode(v, path)?,
                    None => PolicySpec::default(),
                }
            }
            "tenant_selectors" => {
                self.tenant_selectors = list(fields, name, TenantSelectorSpec::decode)?
            }
            "strict_selectors" => self.strict_selectors = fields.bool(name)?.unwrap_or(true),
            "route_by_environment" => {
                self.route_by_environment = fields.bool(name)?.unwrap_or(false)
            }
            "limits" => {
                self.limits = fields
                    .get(name)
                    .map(|v| LimitsSpec::decode(v, path))
                    .transpose()?
            }
            "key_service" => {
                self.key_service = fields
                    .get(name)
                    .map(|v| KeyServiceSpec::decode(v, path))
                    .transpose()?
            }
            "reject_ambiguous_paths" => {
                self.reject_ambiguous_paths = fields.bool(name)?.unwrap_or(true)
            }
            "access_log" => self.access_log = fields.bool(name)?.unwrap_or(true),
            _ => {}
        }
        Ok(())
    }
}

/// A list field whose items `decode` reads, each at its path (`credentials[0]`).
fn list<T>(
    fields: &Fields,
    name: &str,
    decode: fn(&Value, &str) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    let path = fields.path_of(name);
    fields
        .array(name)?
        .iter()
        .enumerate()
        .map(|(i, item)| decode(item, &format!("{path}[{i}]")))
        .collect()
}

/// Reads the document's top-level object as it streams by: `keys` straight into key records
/// (the same serde code that reads key-set documents, fast for large inline sets), every other
/// field as a `Value` decoded at once, so a refusal carries the line and column where that field
/// ends, as serde's own refusals do.
struct ConfigVisitor;

impl<'de> Visitor<'de> for ConfigVisitor {
    type Value = ConfigSpec;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("struct ConfigSpec")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ConfigSpec, A::Error> {
        let mut spec = ConfigSpec::default();
        let mut read = Value::Object(Map::new());
        let mut keys_seen = false;
        while let Some(name) = map.next_key::<String>()? {
            let Some(field) = ConfigSpec::FIELDS.iter().find(|f| **f == name) else {
                return Err(A::Error::unknown_field(&name, ConfigSpec::FIELDS));
            };
            let seen = read.get(*field).is_some() || (*field == "keys" && keys_seen);
            if seen {
                return Err(A::Error::duplicate_field(field));
            }
            if *field == "keys" {
                spec.keys = map.next_value()?;
                keys_seen = true;
                continue;
            }
            let value: Value = map.next_value()?;
            if let Value::Object(fields) = &mut read {
                fields.insert(name, value);
            }
            let fields = Fields::of(&read, "", ConfigSpec::FIELDS).map_err(A::Error::custom)?;
            spec.read(field, &fields).map_err(A::Error::custom)?;
        }
        if read.get("credentials").is_none() {
            return Err(A::Error::missing_field("credentials"));
        }
        Ok(spec)
    }
}

/// The validated configuration of one filter instance.
#[derive(Debug)]
pub struct Config {
    pub name: String,
    pub sources: Vec<CredentialSource>,
    pub product: Option<String>,
    pub require_user: bool,
    pub replies: Replies,
    pub strip_credentials: bool,
    pub scope: ScopeHeaders,
    pub session: Option<SessionConfig>,
    pub policies: HashMap<String, Policy>,
    pub routes: Vec<RouteRule>,
    pub default_policy: Policy,
    pub tenant_selectors: Vec<TenantSelector>,
    pub strict_selectors: bool,
    pub route_by_environment: bool,
    /// Every header name keygate removes from a request it passes upstream.
    pub headers_to_strip: Vec<String>,
    pub limits: Limits,
    /// Where keys come from when they are not inline.
    pub key_service: Option<KeyService>,
    pub reject_ambiguous_paths: bool,
    /// Whether each decision is published for the access log.
    pub access_log: bool,
}

impl Config {
    /// Parses the plugin configuration JSON into a config and its inline key set.
    pub fn parse(bytes: &[u8]) -> Result<(Config, KeySet), ConfigError> {
        let mut parser = serde_json::Deserializer::from_slice(bytes);
        let spec = parser
            .deserialize_map(ConfigVisitor)
            .and_then(|spec| parser.end().map(|()| spec))
            .map_err(ConfigError::from_json)?;
        Config::from_spec(spec)
    }

    fn from_spec(spec: ConfigSpec) -> Result<(Config, KeySet), ConfigError> {
        if spec.credentials.is_empty() {
            return Err(ConfigError::new(
                "credentials",
                "enable at least one credential scheme",
            ));
        }
        let mut sources = Vec::with_capacity(spec.credentials.len());
        let mut places: HashMap<String, usize> = HashMap::new();
        for (i, c) in spec.credentials.into_iter().enumerate() {
            let source = CredentialSource::from_spec(c, &format!("credentials[{i}]"))?;
            for place in source.place_key() {
                if let Some(first) = places.insert(place.clone(), i) {
                    return Err(ConfigError::new(
                        format!("credentials[{i}]"),
                        format!("{place} is already read by credentials[{first}]"),
                    ));
                }
            }
            sources.push(source);
        }

        let mut messages = HashMap::new();
        for (name, text) in spec.messages {
            let code = ErrorCode::from_name(&name).ok_or_else(|| {
                ConfigError::new(format!("messages.{name}"), "unknown error code")
            })?;
            messages.insert(code, text);
        }
        let www_authenticate = spec
            .www_authenticate
            .unwrap_or_else(|| "ApiKey realm=\"keygate\"".to_string());
        if !is_header_value(&www_authenticate) {
            return Err(ConfigError::new(
                "www_authenticate",
                "must be printable ASCII",
            ));
        }
        let replies = Replies::render(spec.language, spec.body, &messages, &www_authenticate)
            .map_err(|err| {
                ConfigError::new(format!("messages.{}", err.code().as_str()), err.to_string())
            })?;

        let scope = spec.scope_headers;
        let mut seen = HashSet::new();
        for name in scope.all() {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(ConfigError::new(
                    "scope_headers",
                    format!("'{name}' is not a lower-case header name"),
                ));
            }
            if !seen.insert(name) {
                return Err(ConfigError::new(
                    "scope_headers",
                    format!("'{name}' is used twice"),
                ));
            }
        }

        let mut policies = HashMap::with_capacity(spec.policies.len());
        for (name, p) in spec.policies {
            let policy = Policy::from_spec(p, &format!("policies.{name}"))?;
            policies.insert(name, policy);
        }
        let mut routes = Vec::with_capacity(spec.routes.len());
        for (i, r) in spec.routes.into_iter().enumerate() {
            if !policies.contains_key(&r.policy) {
                return Err(ConfigError::new(
                    format!("routes[{i}].policy"),
                    format!("no policy named '{}' in policies", r.policy),
                ));
            }
            if !r.path_prefix.starts_with('/') {
                return Err(ConfigError::new(
                    format!("routes[{i}].path_prefix"),
                    "must start with '/'",
                ));
            }
            routes.push(RouteRule {
                path_prefix: r.path_prefix,
                methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                policy: r.policy,
            });
        }
        let default_policy = Policy::from_spec(spec.default_policy, "default_policy")?;
        let tenant_selectors = spec
            .tenant_selectors
            .into_iter()
            .enumerate()
            .map(|(i, s)| TenantSelector::from_spec(s, &format!("tenant_selectors[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;

        let keys = KeySet::from_specs(spec.keys, "keys")?;

        let mut headers_to_strip: Vec<String> = scope.all().iter().map(|s| s.to_string()).collect();
        if spec.strip_credentials {
            for source in &sources {
                headers_to_strip.extend(source.header_names().iter().map(|s| s.to_string()));
            }
        }
        sort_few(&mut headers_to_strip);
        headers_to_strip.dedup();

        let name = spec.name.unwrap_or_else(|| "keygate".to_string());
        let key_service = match spec.key_service {
            Some(_) if !keys.is_empty() => {
                return Err(ConfigError::new(
                    "keys",
                    "inline keys cannot be combined with key_service",
                ))
            }
            Some(service) => {
                let opaque = sources.iter().any(finds_keys_by_digest);
                let pairs = sources.iter().any(|s| !finds_keys_by_digest(s));
                Some(KeyService::from_spec(service, &name, opaque, pairs)?)
            }
            None => None,
        };
        // Fetched records may carry their own limits: keep the shared table ready for them.
        let keys_are_limited = keys.has_limits() || key_service.is_some();
        let limits = Limits::from_spec(spec.limits, &name, keys_are_limited)?
            .scoped(key_service.as_ref().map(|s| s.namespace.as_str()));
        let config = Config {
            name,
            sources,
            product: spec.product,
            require_user: spec.require_user,
            replies,
            strip_credentials: spec.strip_credentials,
            scope,
            session: spec.session,
            policies,
            routes,
            default_policy,
            tenant_selectors,
            strict_selectors: spec.strict_selectors,
            route_by_environment: spec.route_by_environment,
            headers_to_strip,
            limits,
            key_service,
            reject_ambiguous_paths: spec.reject_ambiguous_paths,
            access_log: spec.access_log,
        };
        Ok((config, keys))
    }

    /// Whether the adapter needs to read route metadata for this config.
    pub fn uses_route_policies(&self) -> bool {
        !self.policies.is_empty()
    }
}

/// Opaque keys are found by the digest of the whole key; id:secret and split keys by id.
fn finds_keys_by_digest(source: &CredentialSource) -> bool {
    source.format == TokenFormat::Opaque && !matches!(source.place, Place::HeaderPair { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<(Config, KeySet), ConfigError> {
        Config::parse(json.to_string().as_bytes())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let (config, keys) = parse(serde_json::json!({"credentials": [{"in": "header"}]})).unwrap();
        assert!(keys.is_empty());
        assert!(config.strip_credentials);
        assert!(config.headers_to_strip.contains(&"x-api-key".to_string()));
        assert!(config
            .headers_to_strip
            .contains(&"x-keygate-tenant".to_string()));
    }

    #[test]
    fn the_access_log_is_published_unless_turned_off() {
        let on = parse(serde_json::json!({"credentials": [{"in": "header"}]}));
        assert!(on.unwrap().0.access_log);
        let off =
            parse(serde_json::json!({"credentials": [{"in": "header"}], "access_log": false}));
        assert!(!off.unwrap().0.access_log);
        let err = parse(serde_json::json!({"credentials": [{"in": "header"}], "access_log": "no"}))
            .unwrap_err();
        // Type errors name the place in the document, like every other boolean option's.
        assert!(err.message.contains("expected a boolean"), "{err}");
    }

    #[test]
    fn unknown_top_level_field_is_named() {
        let err =
            parse(serde_json::json!({"credentials": [{"in": "header"}], "kyes": []})).unwrap_err();
        assert!(err.message.contains("unknown field `kyes`"), "{err}");
    }

    #[test]
    fn two_sources_on_one_header_are_refused() {
        let err = parse(serde_json::json!({"credentials": [
            {"in": "header"}, {"in": "header", "name": "X-API-KEY", "format": "id_secret"}]}))
        .unwrap_err();
        assert_eq!(err.path, "credentials[1]");
    }

    #[test]
    fn route_naming_an_unknown_policy_is_refused() {
        let err = parse(serde_json::json!({"credentials": [{"in": "header"}],
            "routes": [{"path_prefix": "/x", "policy": "nope"}]}))
        .unwrap_err();
        assert_eq!(err.path, "routes[0].policy");
    }

    #[test]
    fn a_query_selector_named_outside_ascii_is_refused() {
        let err = parse(serde_json::json!({"credentials": [{"in": "header"}],
            "tenant_selectors": [{"query": "organizaci\u{f3}n", "scope": "tenant"}]}))
        .unwrap_err();
        assert_eq!(err.path, "tenant_selectors[0].query");
        assert_eq!(err.message, "must be ASCII");
    }

    #[test]
    fn message_override_for_unknown_code_is_refused() {
        let err = parse(serde_json::json!({"credentials": [{"in": "header"}],
            "messages": {"NOT_A_CODE": "x"}}))
        .unwrap_err();
        assert_eq!(err.path, "messages.NOT_A_CODE");
    }

    #[test]
    fn record_field_with_newline_is_refused() {
        let err = parse(serde_json::json!({"credentials": [{"in": "header"}],
            "keys": [{"id": "a", "secret_sha256": "00".repeat(32), "tenant": "a\r\nx-evil: 1"}]}))
        .unwrap_err();
        assert_eq!(err.path, "keys[0].tenant");
    }

    #[test]
    fn no_credential_scheme_is_refused() {
        let err = parse(serde_json::json!({"credentials": []})).unwrap_err();
        assert_eq!(err.path, "credentials");
    }
}
