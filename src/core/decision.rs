//! The decision: headers in → credential → key lookup → policy → allow or deny.

use super::codes::ErrorCode;
use super::config::Config;
use super::credential::{extract_credential, Credential};
use super::digest::digests_equal;
use super::keyset::{KeyRecord, KeySet};
use super::path_guard;
use super::policy::{check_origin, is_cors_preflight, Policy};
use super::request::{RequestView, SessionEvidence};
use super::selectors::check_strict;

/// Who the request was authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal<'a> {
    /// A route without authentication.
    Anonymous,
    /// A session verified by Envoy's jwt_authn filter; API keys were not applied.
    Session { subject: Option<String> },
    ApiKey {
        record: &'a KeyRecord,
        environment: Option<String>,
    },
}

impl Principal<'_> {
    /// How the request was authenticated, as the scope header and the access log name it.
    pub fn auth_kind(&self) -> &'static str {
        match self {
            Principal::Anonymous => "none",
            Principal::Session { .. } => "session",
            Principal::ApiKey { .. } => "api_key",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    Allow {
        principal: Principal<'a>,
        policy: &'a Policy,
    },
    Deny {
        code: ErrorCode,
        /// The key's id when the key was found: safe to log, never the secret.
        key_id: Option<&'a str>,
    },
    /// A CORS preflight on an authenticated route: answered here (204, no CORS grant), never
    /// forwarded. Envoy's `cors` filter before keygate answers preflights from allowed origins.
    Preflight,
}

impl<'a> Decision<'a> {
    fn deny(code: ErrorCode) -> Decision<'a> {
        Decision::Deny { code, key_id: None }
    }
}

/// The policy of the request's route: named by route metadata, else the first matching
/// path rule, else the default.
pub fn policy_for<'a>(config: &'a Config, req: &RequestView) -> Result<&'a Policy, ErrorCode> {
    if let Some(name) = req.route_policy.as_deref() {
        // A route naming a policy this filter does not know is a misconfiguration: fail closed.
        return config.policies.get(name).ok_or(ErrorCode::Forbidden);
    }
    if let Some(rule) = config.routes.iter().find(|r| r.matches(req)) {
        return config
            .policies
            .get(&rule.policy)
            .ok_or(ErrorCode::Forbidden);
    }
    Ok(&config.default_policy)
}

/// What is known once the credential is read: the answer already, or the key to look up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<'a> {
    Decided(Decision<'a>),
    /// A key must be found (inline set, shared key set, or key service) before deciding.
    Lookup {
        credential: Credential,
        policy: &'a Policy,
    },
}

/// Decides with an inline or already loaded key set.
pub fn decide<'a>(config: &'a Config, keys: &'a KeySet, req: &RequestView) -> Decision<'a> {
    match begin(config, req) {
        Step::Decided(decision) => decision,
        Step::Lookup { credential, policy } => {
            decide_for_key(config, policy, &credential, lookup(keys, &credential), req)
        }
    }
}

/// Everything before the key lookup: route policy, anonymous routes, sessions, credential.
pub fn begin<'a>(config: &'a Config, req: &RequestView) -> Step<'a> {
    if let Err(code) = path_guard::check(config, req) {
        return Step::Decided(Decision::deny(code));
    }
    let policy = match policy_for(config, req) {
        Ok(p) => p,
        Err(code) => return Step::Decided(Decision::deny(code)),
    };
    if !policy.auth_required {
        return Step::Decided(Decision::Allow {
            principal: Principal::Anonymous,
            policy,
        });
    }

    if is_cors_preflight(req) {
        return Step::Decided(Decision::Preflight);
    }

    let mut session_failure = None;
    if let Some(session) = &config.session {
        match &req.session {
            SessionEvidence::Verified { subject } => {
                return Step::Decided(Decision::Allow {
                    principal: Principal::Session {
                        subject: subject.clone(),
                    },
                    policy,
                })
            }
            SessionEvidence::Failed { expired } => {
                session_failure = Some(if *expired {
                    ErrorCode::TokenExpired
                } else {
                    ErrorCode::InvalidToken
                });
            }
            SessionEvidence::Absent if session.cookie_present(req) => {
                // A cookie the verifier did not accept and did not explain.
                session_failure = Some(ErrorCode::InvalidToken);
            }
            SessionEvidence::Absent => {}
        }
    }

    match extract_credential(&config.sources, req) {
        Ok(Some(credential)) => Step::Lookup { credential, policy },
        Ok(None) => Step::Decided(Decision::deny(
            session_failure.unwrap_or(ErrorCode::TokenMissing),
        )),
        Err(code) => Step::Decided(Decision::deny(code)),
    }
}

/// Everything after the lookup, the same for every key source: the secret's digest must match
/// (constant time), then the key's own checks, the route policy, origin and tenant scope.
pub fn decide_for_key<'a>(
    config: &'a Config,
    policy: &'a Policy,
    credential: &Credential,
    candidate: Option<&'a KeyRecord>,
    req: &RequestView,
) -> Decision<'a> {
    let record = match candidate.filter(|r| digests_equal(&r.digest, credential.digest())) {
        Some(r) => r,
        None => return Decision::deny(ErrorCode::InvalidApiKey),
    };
    let deny = |code| Decision::Deny {
        code,
        key_id: Some(record.id.as_str()),
    };
    if let Err(code) = check_key(config, record, credential, req.now) {
        return deny(code);
    }
    let environment = record
        .fields
        .environment
        .clone()
        .or_else(|| credential.environment().map(str::to_string));
    if let Err(code) = policy.check_api_key(req, record) {
        return deny(code);
    }
    if let Err(code) = check_origin(req, record) {
        return deny(code);
    }
    let selectors = if config.strict_selectors {
        check_strict(config, req, record)
    } else {
        config
            .tenant_selectors
            .iter()
            .try_for_each(|selector| selector.check(req, record))
    };
    if let Err(code) = selectors {
        return deny(code);
    }
    Decision::Allow {
        principal: Principal::ApiKey {
            record,
            environment,
        },
        policy,
    }
}

/// Whether a request's time matters, so a host reads its clock for each one: keys come from a
/// key service (any record may have a validity window), or an inline key has one.
pub fn reads_clock(config: &Config, keys: &KeySet) -> bool {
    config.key_service.is_some()
        || keys
            .records()
            .iter()
            .any(|r| r.fields.expires_at.is_some() || r.fields.not_after.is_some())
}

/// Opaque keys are found by digest; id:secret keys by id (`decide_for_key` then compares the
/// digests in constant time).
pub fn lookup<'a>(keys: &'a KeySet, credential: &Credential) -> Option<&'a KeyRecord> {
    match credential {
        Credential::Opaque { digest, .. } => keys.by_digest(digest),
        Credential::Pair { id, .. } => keys.by_id(id),
    }
}

/// The key itself must be usable: enabled, in its validity window, of the right environment and
/// product, and resolvable to a user where one is required.
fn check_key(
    config: &Config,
    record: &KeyRecord,
    credential: &Credential,
    now: i64,
) -> Result<(), ErrorCode> {
    if !record.enabled() {
        return Err(ErrorCode::InvalidApiKey);
    }
    if record.not_after().is_some_and(|t| now >= t) {
        return Err(ErrorCode::InvalidApiKey);
    }
    if let (Some(presented), Some(recorded)) =
        (credential.environment(), &record.fields.environment)
    {
        if presented != recorded {
            return Err(ErrorCode::InvalidApiKey);
        }
    }
    if let Some(product) = &config.product {
        if record.fields.product.as_ref() != Some(product) {
            return Err(ErrorCode::InvalidApiKey);
        }
    }
    if record.expires_at().is_some_and(|t| now >= t) {
        return Err(ErrorCode::ApiKeyExpired);
    }
    if config.require_user && record.fields.user.is_none() {
        return Err(ErrorCode::ApiKeyNoUser);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::digest::sha256;
    use crate::core::test_support::{deny_code, merged, RequestBuilder};

    const NOW: i64 = 1_800_000_000;

    fn setup(extra: serde_json::Value) -> (Config, KeySet) {
        let cfg = serde_json::json!({
            "credentials": [
                {"in": "header", "prefixes": [
                    {"prefix": "caibo_test_sk_", "environment": "test"},
                    {"prefix": "caibo_live_sk_", "environment": "live"}, "cmp_"]},
                {"in": "bearer", "format": "id_secret", "prefixes": ["abk_"]}
            ],
            "session": {},
            "policies": {
                "session-only": {"deny_api_keys": "WEB_SESSION_REQUIRED"},
                "health": {"auth": "none"},
                "reports": {"required_permissions": ["reports:read"]}
            },
            "default_policy": {"deny_methods": {"DELETE": "API_KEY_DELETE_FORBIDDEN"}},
            "tenant_selectors": [{"query": "organizationId", "scope": "organizations"},
                                 {"query": "companyId", "scope": "tenant"}],
            "keys": [
                {"id": "k1", "secret_sha256": hex::encode(sha256(b"cmp_one")), "tenant": "c1",
                 "organizations": ["o1", "o2"], "user": "u1"},
                {"id": "abk_2", "secret_sha256": hex::encode(sha256(b"c2VjcmV0")), "tenant": "c2",
                 "permissions": ["reports:read"]},
                {"id": "old", "secret_sha256": hex::encode(sha256(b"cmp_old")), "not_after": NOW - 1},
                {"id": "exp", "secret_sha256": hex::encode(sha256(b"cmp_exp")), "expires_at": NOW},
                {"id": "t1", "secret_sha256": hex::encode(sha256(b"caibo_test_sk_1")), "environment": "live"},
                {"id": "t2", "secret_sha256": hex::encode(sha256(b"caibo_test_sk_2"))}
            ]
        });
        Config::parse(merged(cfg, extra).to_string().as_bytes()).unwrap()
    }

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestView {
        RequestBuilder::to(method, path)
            .headers(headers)
            .now(NOW)
            .build()
    }

    #[test]
    fn the_clock_is_read_only_when_a_key_has_a_validity_window_or_keys_come_from_a_service() {
        let (with_windows, keys) = setup(serde_json::json!({}));
        assert!(reads_clock(&with_windows, &keys));
        let plain = serde_json::json!({"credentials": [{"in": "header"}],
            "keys": [{"id": "k1", "secret_sha256": hex::encode(sha256(b"k"))}]});
        let (config, keys) = Config::parse(plain.to_string().as_bytes()).unwrap();
        assert!(!reads_clock(&config, &keys));
        let remote = serde_json::json!({"credentials": [{"in": "header"}],
            "key_service": {"cluster": "keys", "path": "/keys.json"}});
        let (config, keys) = Config::parse(remote.to_string().as_bytes()).unwrap();
        assert!(keys.is_empty() && reads_clock(&config, &keys));
    }

    #[test]
    fn valid_key_is_allowed_as_its_record() {
        let (c, k) = setup(serde_json::json!({}));
        match decide(&c, &k, &req("GET", "/x", &[("x-api-key", "cmp_one")])) {
            Decision::Allow {
                principal: Principal::ApiKey { record, .. },
                ..
            } => assert_eq!(record.id, "k1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn verified_session_wins_over_a_wrong_key() {
        let (c, k) = setup(serde_json::json!({}));
        let mut r = req(
            "GET",
            "/x",
            &[("x-api-key", "cmp_wrong"), ("cookie", "accessToken=t")],
        );
        r.session = SessionEvidence::Verified {
            subject: Some("u9".into()),
        };
        assert!(matches!(
            decide(&c, &k, &r),
            Decision::Allow {
                principal: Principal::Session { .. },
                ..
            }
        ));
    }

    #[test]
    fn failed_session_without_key_reports_the_session_error() {
        let (c, k) = setup(serde_json::json!({}));
        let mut r = req("GET", "/x", &[("cookie", "accessToken=t")]);
        r.session = SessionEvidence::Failed { expired: true };
        assert_eq!(deny_code(decide(&c, &k, &r)), Some(ErrorCode::TokenExpired));
        r.session = SessionEvidence::Failed { expired: false };
        assert_eq!(deny_code(decide(&c, &k, &r)), Some(ErrorCode::InvalidToken));
        r.session = SessionEvidence::Absent;
        assert_eq!(deny_code(decide(&c, &k, &r)), Some(ErrorCode::InvalidToken));
        let none = req("GET", "/x", &[]);
        assert_eq!(
            deny_code(decide(&c, &k, &none)),
            Some(ErrorCode::TokenMissing)
        );
    }

    #[test]
    fn failed_session_with_a_valid_key_uses_the_key() {
        let (c, k) = setup(serde_json::json!({}));
        let mut r = req(
            "GET",
            "/x",
            &[("x-api-key", "cmp_one"), ("cookie", "accessToken=t")],
        );
        r.session = SessionEvidence::Failed { expired: true };
        assert_eq!(deny_code(decide(&c, &k, &r)), None);
    }

    #[test]
    fn route_policies_refuse_api_keys_and_methods() {
        let (c, k) = setup(serde_json::json!({}));
        let mut r = req("GET", "/company/switch", &[("x-api-key", "cmp_one")]);
        r.route_policy = Some("session-only".into());
        assert_eq!(
            deny_code(decide(&c, &k, &r)),
            Some(ErrorCode::WebSessionRequired)
        );
        let del = req("DELETE", "/products/1", &[("x-api-key", "cmp_one")]);
        assert_eq!(
            deny_code(decide(&c, &k, &del)),
            Some(ErrorCode::ApiKeyDeleteForbidden)
        );
        let mut health = req("GET", "/health", &[]);
        health.route_policy = Some("health".into());
        assert_eq!(deny_code(decide(&c, &k, &health)), None);
        let mut unknown = req("GET", "/x", &[("x-api-key", "cmp_one")]);
        unknown.route_policy = Some("typo".into());
        assert_eq!(
            deny_code(decide(&c, &k, &unknown)),
            Some(ErrorCode::Forbidden)
        );
    }

    #[test]
    fn permissions_are_required_per_route() {
        let (c, k) = setup(serde_json::json!({}));
        let mut r = req("GET", "/reports", &[("x-api-key", "cmp_one")]);
        r.route_policy = Some("reports".into());
        assert_eq!(deny_code(decide(&c, &k, &r)), Some(ErrorCode::Forbidden));
        let mut ok = req(
            "GET",
            "/reports",
            &[("authorization", "Bearer abk_2:c2VjcmV0")],
        );
        ok.route_policy = Some("reports".into());
        assert_eq!(deny_code(decide(&c, &k, &ok)), None);
    }

    #[test]
    fn tenant_selectors_must_stay_in_the_keys_scope() {
        let (c, k) = setup(serde_json::json!({}));
        let key = [("x-api-key", "cmp_one")];
        assert_eq!(
            deny_code(decide(&c, &k, &req("GET", "/p?organizationId=o2", &key))),
            None
        );
        assert_eq!(
            deny_code(decide(&c, &k, &req("GET", "/p?organizationId=o3", &key))),
            Some(ErrorCode::TenantForbidden)
        );
        assert_eq!(
            deny_code(decide(
                &c,
                &k,
                &req("GET", "/p?organizationId=o1&organizationId=o3", &key)
            )),
            Some(ErrorCode::TenantForbidden)
        );
        assert_eq!(
            deny_code(decide(&c, &k, &req("GET", "/p?companyId=c1", &key))),
            None
        );
        assert_eq!(
            deny_code(decide(&c, &k, &req("GET", "/p?companyId=c2", &key))),
            Some(ErrorCode::TenantForbidden)
        );
    }

    #[test]
    fn key_validity_window_and_environment() {
        let (c, k) = setup(serde_json::json!({}));
        let get = |key: &str| deny_code(decide(&c, &k, &req("GET", "/", &[("x-api-key", key)])));
        assert_eq!(get("cmp_old"), Some(ErrorCode::InvalidApiKey));
        assert_eq!(get("cmp_exp"), Some(ErrorCode::ApiKeyExpired));
        assert_eq!(get("caibo_test_sk_1"), Some(ErrorCode::InvalidApiKey));
        assert_eq!(get("caibo_test_sk_2"), None);
    }

    #[test]
    fn product_scope_and_required_user() {
        let (c, k) = setup(serde_json::json!({"product": "makepay"}));
        let r = req("GET", "/", &[("x-api-key", "cmp_one")]);
        assert_eq!(
            deny_code(decide(&c, &k, &r)),
            Some(ErrorCode::InvalidApiKey)
        );
        let (c, k) = setup(serde_json::json!({"require_user": true}));
        let r = req("GET", "/", &[("authorization", "Bearer abk_2:c2VjcmV0")]);
        assert_eq!(deny_code(decide(&c, &k, &r)), Some(ErrorCode::ApiKeyNoUser));
    }

    #[test]
    fn cors_preflight_is_answered_here_and_never_forwarded() {
        let (c, k) = setup(serde_json::json!({}));
        let preflight = [
            ("origin", "https://a.example"),
            ("access-control-request-method", "DELETE"),
            ("content-type", "application/json"),
        ];
        let r = req("OPTIONS", "/x", &preflight);
        assert_eq!(decide(&c, &k, &r), Decision::Preflight);
        // A public route has nothing to protect: it is an ordinary anonymous request there.
        let mut public = req("OPTIONS", "/health", &preflight);
        public.route_policy = Some("health".into());
        assert!(matches!(
            decide(&c, &k, &public),
            Decision::Allow {
                principal: Principal::Anonymous,
                ..
            }
        ));
    }

    #[test]
    fn out_of_scope_selector_spellings_are_refused_unless_strictness_is_off() {
        let key = [("x-api-key", "cmp_one")];
        let (c, k) = setup(serde_json::json!({}));
        let spelled = req("GET", "/p?organizationId[]=o3", &key);
        assert_eq!(
            deny_code(decide(&c, &k, &spelled)),
            Some(ErrorCode::TenantForbidden)
        );
        let (c, k) = setup(serde_json::json!({"strict_selectors": false}));
        assert_eq!(deny_code(decide(&c, &k, &spelled)), None);
    }
}
