//! What a decision does to the request, worked out once for both hosts: the limits of an
//! allowed key (which may still refuse it), the access-log entry, the rate headers for the
//! response, and whether a form body is still to check. A host only carries the settlement
//! out (its reply, header edits and filter state), so the in-memory test host runs all of it.

use super::access_log::AccessLogEntry;
use super::codes::ErrorCode;
use super::config::Config;
use super::decision::{Decision, Principal};
use super::keysource::host::Clock;
use super::keysource::store::SharedStore;
use super::limits::{apply_limits, limits_apply_to, LimitDenial};
use super::request::RequestView;
use super::selectors::form_body_kind;

#[derive(Debug)]
pub enum Settlement<'a> {
    /// Answer locally with the code's reply.
    Deny {
        code: ErrorCode,
        key_id: Option<&'a str>,
    },
    /// A found key refused by its rate limit or budget.
    Limited {
        principal: Principal<'a>,
        denial: LimitDenial,
    },
    /// Answer the CORS preflight locally.
    Preflight,
    /// Let the request go on with `principal`'s scope headers (`upstream::upstream_edits`).
    Forward {
        principal: Principal<'a>,
        /// `RateLimit-*` headers for the response, when the config asks for them.
        response_headers: Vec<(&'static str, String)>,
        /// The request's form body must be checked against the key's tenant before it goes on.
        check_form_body: bool,
    },
}

impl<'a> Settlement<'a> {
    /// The code of a local refusal, with the per-request headers that go with it
    /// (`Retry-After`, `RateLimit-*`); `None` for a preflight or a forwarded request.
    pub fn refusal(&self) -> Option<(ErrorCode, Vec<(&'static str, String)>)> {
        match self {
            Settlement::Deny { code, .. } => Some((*code, Vec::new())),
            Settlement::Limited { denial, .. } => Some((denial.code, denial.headers())),
            Settlement::Preflight | Settlement::Forward { .. } => None,
        }
    }

    /// The access-log entry for this request.
    pub fn access_log_entry(&self) -> AccessLogEntry<'_> {
        match self {
            Settlement::Deny { code, key_id } => AccessLogEntry::denied(Some(*code), *key_id),
            Settlement::Limited { principal, denial } => {
                AccessLogEntry::limited(principal, denial.code)
            }
            Settlement::Preflight => AccessLogEntry::allowed(&Principal::Anonymous),
            Settlement::Forward { principal, .. } => AccessLogEntry::allowed(principal),
        }
    }
}

/// Settles `decision` for `req`. The clock is read only when the key's limits apply; limits are
/// counted in `store` (Envoy's shared data in wasm, the process-wide table natively).
pub fn settle<'a>(
    config: &Config,
    req: &RequestView,
    decision: Decision<'a>,
    store: &dyn SharedStore,
    clock: &dyn Clock,
) -> Settlement<'a> {
    let (principal, policy) = match decision {
        Decision::Deny { code, key_id } => return Settlement::Deny { code, key_id },
        Decision::Preflight => return Settlement::Preflight,
        Decision::Allow { principal, policy } => (principal, policy),
    };
    let mut response_headers = Vec::new();
    let mut check_form_body = false;
    if let Principal::ApiKey { record, .. } = &principal {
        if limits_apply_to(&config.limits, record) {
            match apply_limits(&config.limits, record, policy, store, clock.now_ms()) {
                Err(denial) => return Settlement::Limited { principal, denial },
                Ok(info) if config.limits.response_headers => {
                    response_headers = info.rate.map(|r| r.headers()).unwrap_or_default();
                }
                Ok(_) => {}
            }
        }
        check_form_body = form_body_kind(config, req).is_some();
    }
    Settlement::Forward {
        principal,
        response_headers,
        check_form_body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keyset::KeySet;
    use crate::core::limits::ensure_slots;
    use crate::core::memory_store::MemoryStore;
    use crate::core::policy::Policy;
    use crate::core::test_support::request_with;
    use sha2::{Digest as _, Sha256};

    const NOW_MS: i64 = 1_900_000_000_000;

    struct FixedClock;

    impl Clock for FixedClock {
        fn now_ms(&self) -> i64 {
            NOW_MS
        }
    }

    fn setup(limits: serde_json::Value) -> (Config, KeySet, MemoryStore) {
        let cfg = serde_json::json!({
            "name": "t",
            "credentials": [{"in": "header"}],
            "limits": limits,
            "keys": [{
                "id": "a",
                "secret_sha256": hex::encode(Sha256::digest(b"a")),
                "tenant": "acme",
                "rate_limit": {"requests": 1, "per_seconds": 60},
            }],
        });
        let (config, keys) = Config::parse(cfg.to_string().as_bytes()).unwrap();
        let store = MemoryStore::new();
        ensure_slots(&config.limits, &store);
        (config, keys, store)
    }

    fn allow<'a>(keys: &'a KeySet, policy: &'a Policy) -> Decision<'a> {
        Decision::Allow {
            principal: Principal::ApiKey {
                record: keys.by_id("a").unwrap(),
                environment: None,
            },
            policy,
        }
    }

    #[test]
    fn a_key_within_its_limit_goes_on_with_rate_headers_when_asked_for() {
        let (config, keys, store) = setup(serde_json::json!({"response_headers": true}));
        let policy = Policy::default();
        let req = request_with::<&str>(&[]);
        let settlement = settle(&config, &req, allow(&keys, &policy), &store, &FixedClock);
        assert!(settlement.refusal().is_none());
        assert_eq!(settlement.access_log_entry().tenant, Some("acme"));
        let Settlement::Forward {
            response_headers,
            check_form_body,
            ..
        } = settlement
        else {
            panic!("not forwarded: {settlement:?}");
        };
        assert!(response_headers.contains(&("ratelimit-remaining", "0".to_string())));
        assert!(!check_form_body, "a GET has no form body to check");
    }

    #[test]
    fn a_key_over_its_limit_is_refused_with_retry_after_and_logged_as_the_key() {
        let (config, keys, store) = setup(serde_json::json!({}));
        let policy = Policy::default();
        let req = request_with::<&str>(&[]);
        let first = settle(&config, &req, allow(&keys, &policy), &store, &FixedClock);
        assert!(matches!(first, Settlement::Forward { .. }), "{first:?}");
        let second = settle(&config, &req, allow(&keys, &policy), &store, &FixedClock);
        let (code, headers) = second.refusal().unwrap();
        assert_eq!(code, ErrorCode::RateLimitExceeded);
        assert!(headers.iter().any(|(name, _)| *name == "retry-after"));
        let entry = second.access_log_entry();
        assert_eq!((entry.key_id, entry.code), (Some("a"), Some(code)));
    }

    #[test]
    fn a_denial_and_a_preflight_are_answered_locally_without_counting_limits() {
        let (config, _keys, store) = setup(serde_json::json!({}));
        let req = request_with::<&str>(&[]);
        let deny = Decision::Deny {
            code: ErrorCode::InvalidApiKey,
            key_id: None,
        };
        let denied = settle(&config, &req, deny, &store, &FixedClock);
        assert_eq!(
            denied.refusal(),
            Some((ErrorCode::InvalidApiKey, Vec::new()))
        );
        assert_eq!(
            denied.access_log_entry().code,
            Some(ErrorCode::InvalidApiKey)
        );
        let preflight = settle(&config, &req, Decision::Preflight, &store, &FixedClock);
        assert!(preflight.refusal().is_none());
        assert!(matches!(preflight, Settlement::Preflight));
        assert_eq!(preflight.access_log_entry().code, None);
    }
}
