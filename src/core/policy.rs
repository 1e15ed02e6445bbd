//! Route policy and the checks that follow authentication: forbidden methods, API-key-free
//! routes, permissions, origins and tenant scope.

use std::collections::HashMap;

use serde_json::Value;

use super::codes::ErrorCode;
use super::config_error::ConfigError;
use super::json_fields::{self, Fields};
use super::keyset::KeyRecord;
use super::method_override::requests_method;
use super::request::RequestView;
use super::small_sort::sort_few;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    #[default]
    Required,
    /// No authentication at all (health checks). Scope headers are still scrubbed.
    None,
}

#[derive(Debug, Clone, Default)]
pub struct PolicySpec {
    pub auth: AuthMode,
    /// Refuse API keys on this route with this code (e.g. `WEB_SESSION_REQUIRED`).
    pub deny_api_keys: Option<ErrorCode>,
    /// Methods API keys may not use here, each with its code (`{"DELETE": "API_KEY_DELETE_FORBIDDEN"}`).
    pub deny_methods: HashMap<String, ErrorCode>,
    /// Every one of these must be among the key's permissions, or `FORBIDDEN`.
    pub required_permissions: Vec<String>,
    /// Budget units one request spends (default 1).
    pub cost: Option<u64>,
}

impl PolicySpec {
    const FIELDS: &'static [&'static str] = &[
        "auth",
        "deny_api_keys",
        "deny_methods",
        "required_permissions",
        "cost",
    ];

    pub fn decode(value: &Value, path: &str) -> Result<PolicySpec, ConfigError> {
        let fields = Fields::of(value, path, Self::FIELDS)?;
        let codes: Vec<(&str, ErrorCode)> =
            ErrorCode::ALL.iter().map(|c| (c.as_str(), *c)).collect();
        let mut deny_methods = HashMap::new();
        if let Some(map) = fields.object("deny_methods")? {
            let methods_path = fields.path_of("deny_methods");
            for (method, code) in map {
                let code =
                    json_fields::variant(code, &json_fields::join(&methods_path, method), &codes)?;
                deny_methods.insert(method.clone(), code);
            }
        }
        Ok(PolicySpec {
            auth: fields
                .variant(
                    "auth",
                    &[("required", AuthMode::Required), ("none", AuthMode::None)],
                )?
                .unwrap_or_default(),
            deny_api_keys: fields.variant("deny_api_keys", &codes)?,
            deny_methods,
            required_permissions: fields.strings("required_permissions")?,
            cost: fields.u64("cost")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub auth_required: bool,
    pub deny_api_keys: Option<ErrorCode>,
    pub deny_methods: Vec<(String, ErrorCode)>,
    pub required_permissions: Vec<String>,
    pub cost: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            auth_required: true,
            deny_api_keys: None,
            deny_methods: Vec::new(),
            required_permissions: Vec::new(),
            cost: 1,
        }
    }
}

impl Policy {
    pub fn from_spec(spec: PolicySpec, path: &str) -> Result<Policy, ConfigError> {
        let mut deny_methods: Vec<(String, ErrorCode)> = spec
            .deny_methods
            .into_iter()
            .map(|(m, c)| (m.to_ascii_uppercase(), c))
            .collect();
        sort_few(&mut deny_methods);
        for (method, _) in &deny_methods {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(ConfigError::new(
                    format!("{path}.deny_methods.{method}"),
                    "expected an HTTP method name such as DELETE",
                ));
            }
        }
        Ok(Policy {
            auth_required: spec.auth == AuthMode::Required,
            deny_api_keys: spec.deny_api_keys,
            deny_methods,
            required_permissions: spec.required_permissions,
            cost: spec.cost.unwrap_or(1),
        })
    }

    /// Checks that apply only to requests authenticated by an API key.
    pub fn check_api_key(&self, req: &RequestView, record: &KeyRecord) -> Result<(), ErrorCode> {
        if let Some(code) = self.deny_api_keys {
            return Err(code);
        }
        if let Some((_, code)) = self
            .deny_methods
            .iter()
            .find(|(m, _)| requests_method(req, m))
        {
            return Err(*code);
        }
        if !self
            .required_permissions
            .iter()
            .all(|p| record.fields.permissions.iter().any(|held| held == p))
        {
            return Err(ErrorCode::Forbidden);
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct RouteRuleSpec {
    pub path_prefix: String,
    pub methods: Vec<String>,
    pub policy: String,
}

impl RouteRuleSpec {
    pub fn decode(value: &Value, path: &str) -> Result<RouteRuleSpec, ConfigError> {
        let fields = Fields::of(value, path, &["path_prefix", "methods", "policy"])?;
        Ok(RouteRuleSpec {
            path_prefix: fields.required_string("path_prefix")?,
            methods: fields.strings("methods")?,
            policy: fields.required_string("policy")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct RouteRule {
    pub path_prefix: String,
    pub methods: Vec<String>,
    pub policy: String,
}

impl RouteRule {
    pub fn matches(&self, req: &RequestView) -> bool {
        req.path().starts_with(self.path_prefix.as_str())
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == req.method()))
    }
}

/// Which part of the key's scope a client-sent tenant selector is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantScope {
    Tenant,
    Organizations,
}

#[derive(Debug, Clone)]
pub struct TenantSelectorSpec {
    pub query: Option<String>,
    pub header: Option<String>,
    pub scope: TenantScope,
}

impl TenantSelectorSpec {
    pub fn decode(value: &Value, path: &str) -> Result<TenantSelectorSpec, ConfigError> {
        let fields = Fields::of(value, path, &["query", "header", "scope"])?;
        let scopes = [
            ("tenant", TenantScope::Tenant),
            ("organizations", TenantScope::Organizations),
        ];
        Ok(TenantSelectorSpec {
            query: fields.string("query")?,
            header: fields.string("header")?,
            scope: fields
                .variant("scope", &scopes)?
                .ok_or_else(|| fields.missing("scope"))?,
        })
    }
}

#[derive(Debug, Clone)]
pub enum SelectorPlace {
    Query(String),
    Header(String),
}

/// A place where a client may name a tenant; the named tenant must lie inside the key's scope.
#[derive(Debug, Clone)]
pub struct TenantSelector {
    pub place: SelectorPlace,
    pub scope: TenantScope,
}

impl TenantSelector {
    pub fn from_spec(spec: TenantSelectorSpec, path: &str) -> Result<TenantSelector, ConfigError> {
        let place = match (spec.query, spec.header) {
            // Parameter names are matched by an ASCII case fold (`selectors::canonical_param_name`).
            (Some(q), None) if !q.is_ascii() => {
                return Err(ConfigError::new(format!("{path}.query"), "must be ASCII"))
            }
            (Some(q), None) if !q.is_empty() => SelectorPlace::Query(q),
            (None, Some(h)) if !h.is_empty() => SelectorPlace::Header(h.to_ascii_lowercase()),
            _ => {
                return Err(ConfigError::new(
                    path,
                    "give exactly one of \"query\" or \"header\"",
                ))
            }
        };
        Ok(TenantSelector {
            place,
            scope: spec.scope,
        })
    }

    pub fn check(&self, req: &RequestView, record: &KeyRecord) -> Result<(), ErrorCode> {
        let allowed = |value: &str| match self.scope {
            TenantScope::Tenant => record.fields.tenant.as_deref() == Some(value),
            TenantScope::Organizations => record.fields.organizations.iter().any(|o| o == value),
        };
        let in_scope = match &self.place {
            SelectorPlace::Query(param) => req
                .query_values(param)
                .iter()
                .all(|v| v.as_deref().is_some_and(allowed)),
            SelectorPlace::Header(name) => req.header_values(name).all(|v| {
                std::str::from_utf8(v)
                    .ok()
                    .is_some_and(|s| s.split(',').all(|part| allowed(part.trim())))
            }),
        };
        if in_scope {
            Ok(())
        } else {
            Err(ErrorCode::TenantForbidden)
        }
    }
}

/// A key with allowed origins refuses a browser request from any other origin. Requests with no
/// `Origin` header (server-to-server) are not affected.
pub fn check_origin(req: &RequestView, record: &KeyRecord) -> Result<(), ErrorCode> {
    if record.fields.origins.is_empty() {
        return Ok(());
    }
    let mut origins = req.header_values("origin").peekable();
    if origins.peek().is_none() {
        return Ok(());
    }
    let all_allowed = origins.all(|o| {
        std::str::from_utf8(o).ok().is_some_and(|o| {
            let o = o.trim().trim_end_matches('/').to_ascii_lowercase();
            record.fields.origins.contains(&o)
        })
    });
    if all_allowed {
        Ok(())
    } else {
        Err(ErrorCode::OriginNotAllowed)
    }
}

/// A CORS preflight carries no credentials by design, so it cannot be authenticated: on a route
/// that needs authentication keygate answers it itself (`Decision::Preflight`).
pub fn is_cors_preflight(req: &RequestView) -> bool {
    req.header_values(":method").next() == Some(b"OPTIONS".as_slice())
        && req.has_header("origin")
        && req.has_header("access-control-request-method")
}
