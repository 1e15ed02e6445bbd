//! The decision: headers in → credential → key lookup → policy → allow or deny.

use super::codes::ErrorCode;
use super::config::Config;
use super::credential::{extract_credential, Credential};
use super::digest::digests_equal;
use super::keyset::{KeyRecord, KeySet};
use super::policy::{check_origin, is_cors_preflight, Policy};
use super::request::{RequestView, SessionEvidence};

/// Who the request was authenticated as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal<'a> {
    /// A route without authentication, or a CORS preflight.
    Anonymous,
    /// A session verified by Envoy's jwt_authn filter; API keys were not applied.
    Session { subject: Option<String> },
    ApiKey {
        record: &'a KeyRecord,
        environment: Option<String>,
    },
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

pub fn decide<'a>(config: &'a Config, keys: &'a KeySet, req: &RequestView) -> Decision<'a> {
    let policy = match policy_for(config, req) {
        Ok(p) => p,
        Err(code) => return Decision::deny(code),
    };
    if !policy.auth_required || is_cors_preflight(req) {
        return Decision::Allow {
            principal: Principal::Anonymous,
            policy,
        };
    }

    let mut session_failure = None;
    if let Some(session) = &config.session {
        match &req.session {
            SessionEvidence::Verified { subject } => {
                return Decision::Allow {
                    principal: Principal::Session {
                        subject: subject.clone(),
                    },
                    policy,
                }
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

    let credential = match extract_credential(&config.sources, req) {
        Ok(Some(c)) => c,
        Ok(None) => return Decision::deny(session_failure.unwrap_or(ErrorCode::TokenMissing)),
        Err(code) => return Decision::deny(code),
    };

    let record = match lookup(keys, &credential) {
        Some(r) => r,
        None => return Decision::deny(ErrorCode::InvalidApiKey),
    };
    let deny = |code| Decision::Deny {
        code,
        key_id: Some(record.id.as_str()),
    };
    if let Err(code) = check_key(config, record, &credential, req.now) {
        return deny(code);
    }
    let environment = record
        .environment
        .clone()
        .or_else(|| credential.environment().map(str::to_string));
    if let Err(code) = policy.check_api_key(req, record) {
        return deny(code);
    }
    if let Err(code) = check_origin(req, record) {
        return deny(code);
    }
    for selector in &config.tenant_selectors {
        if let Err(code) = selector.check(req, record) {
            return deny(code);
        }
    }
    Decision::Allow {
        principal: Principal::ApiKey {
            record,
            environment,
        },
        policy,
    }
}

/// Opaque keys are found by digest; id:secret keys by id, then the digests are compared in
/// constant time.
fn lookup<'a>(keys: &'a KeySet, credential: &Credential) -> Option<&'a KeyRecord> {
    match credential {
        Credential::Opaque { digest, .. } => keys
            .by_digest(digest)
            .filter(|r| digests_equal(&r.digest, digest)),
        Credential::Pair {
            id, secret_digest, ..
        } => keys
            .by_id(id)
            .filter(|r| digests_equal(&r.digest, secret_digest)),
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
    if !record.enabled {
        return Err(ErrorCode::InvalidApiKey);
    }
    if record.not_after.is_some_and(|t| now >= t) {
        return Err(ErrorCode::InvalidApiKey);
    }
    if let (Some(presented), Some(recorded)) = (credential.environment(), &record.environment) {
        if presented != recorded {
            return Err(ErrorCode::InvalidApiKey);
        }
    }
    if let Some(product) = &config.product {
        if record.product.as_ref() != Some(product) {
            return Err(ErrorCode::InvalidApiKey);
        }
    }
    if record.expires_at.is_some_and(|t| now >= t) {
        return Err(ErrorCode::ApiKeyExpired);
    }
    if config.require_user && record.user.is_none() {
        return Err(ErrorCode::ApiKeyNoUser);
    }
    Ok(())
}
