//! The edits that turn the client's request into the one the upstream sees: the trusted scope
//! headers set, credentials and client-sent copies of scope headers removed.

use std::borrow::Cow;

use super::config::Config;
use super::config_error::is_header_value;
use super::credential::Place;
use super::decision::Principal;
use super::request::{percent_decode, trim_ascii, RequestView};
use super::selectors::underscore_aliases;

/// The changes made to a request before it goes upstream. Names and values borrow from the
/// config and the key record; only joined lists and rewritten `:path`/`cookie` are built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamEdits<'a> {
    /// Headers to delete: credentials and client-sent copies of scope headers, in any spelling
    /// an upstream may read as theirs (`x_keygate_user`).
    pub remove: Vec<Cow<'a, str>>,
    /// Headers to set (replacing any client-sent value).
    pub set: Vec<(&'a str, Cow<'a, str>)>,
    /// Set when a routing-relevant header changed and Envoy must pick the route again.
    pub clear_route_cache: bool,
}

/// Builds the trusted scope headers for an allowed request and scrubs everything that must not
/// reach the upstream.
pub fn upstream_edits<'a>(
    config: &'a Config,
    req: &RequestView,
    principal: &'a Principal<'a>,
) -> UpstreamEdits<'a> {
    let scope = &config.scope;
    let mut set: Vec<(&'a str, Cow<'a, str>)> = Vec::with_capacity(8);
    let mut put = |name: &'a str, value: Cow<'a, str>| set.push((name, value));
    put(&scope.auth, principal.auth_kind().into());
    match principal {
        Principal::Anonymous => {}
        Principal::Session { subject } => {
            if let Some(s) = subject.as_deref().filter(|s| is_header_value(s)) {
                put(&scope.user, s.into());
            }
        }
        Principal::ApiKey {
            record,
            environment,
        } => {
            put(&scope.key_id, record.id.as_str().into());
            let fields = &record.fields;
            if let Some(t) = &fields.tenant {
                put(&scope.tenant, t.as_str().into());
            }
            if !fields.organizations.is_empty() {
                put(&scope.organizations, fields.organizations.join(",").into());
            }
            if let Some(e) = environment {
                put(&scope.environment, e.as_str().into());
            }
            if let Some(p) = &fields.product {
                put(&scope.product, p.as_str().into());
            }
            if let Some(u) = &fields.user {
                put(&scope.user, u.as_str().into());
            }
            if !fields.permissions.is_empty() {
                put(&scope.permissions, fields.permissions.join(",").into());
            }
        }
    }
    if config.strip_credentials {
        strip_query_and_cookie_credentials(config, req, &mut set);
    }
    let mut remove: Vec<Cow<'a, str>> = config
        .headers_to_strip
        .iter()
        .filter(|h| !set.iter().any(|(n, _)| n == h) && req.has_header(h))
        .map(|h| Cow::Borrowed(h.as_str()))
        .collect();
    remove.extend(
        underscore_aliases(config, req)
            .into_iter()
            .map(|alias| Cow::Owned(alias.to_string())),
    );
    // Envoy may have picked the route before keygate ran, on a client-sent environment header:
    // whenever keygate sets that header or removes the client's copy, the route is picked again.
    let clear_route_cache = config.route_by_environment
        && set
            .iter()
            .map(|(name, _)| *name)
            .chain(remove.iter().map(|name| name.as_ref()))
            .any(|name| name == scope.environment);
    UpstreamEdits {
        remove,
        set,
        clear_route_cache,
    }
}

/// Query-parameter and cookie credentials live inside `:path` and `cookie`: rewrite those
/// without the credential rather than dropping them whole.
fn strip_query_and_cookie_credentials<'a>(
    config: &Config,
    req: &RequestView,
    set: &mut Vec<(&'a str, Cow<'a, str>)>,
) {
    for source in &config.sources {
        match &source.place {
            Place::Query(param) => {
                let path = req.path_with_query();
                if let Some(stripped) = path_without_param(path, param) {
                    set.retain(|(n, _)| *n != ":path");
                    set.push((":path", stripped.into()));
                }
            }
            Place::Cookie(name) => {
                if req.cookie_values(name).is_empty() {
                    continue;
                }
                let kept: Vec<String> = req
                    .header_values("cookie")
                    .flat_map(|v| v.split(|b| *b == b';'))
                    .map(|c| String::from_utf8_lossy(trim_ascii(c)).into_owned())
                    .filter(|c| !c.is_empty() && c.split('=').next() != Some(name.as_str()))
                    .collect();
                set.retain(|(n, _)| *n != "cookie");
                set.push(("cookie", kept.join("; ").into()));
            }
            Place::Header(_) | Place::Bearer(_) | Place::HeaderPair { .. } => {}
        }
    }
}

/// `path` without every `param=...` pair; `None` when the parameter is not there.
/// The query ends at `#`, exactly as `RequestView::query_values` reads it, so every parameter
/// keygate could have read a credential from is removed. A rewritten path drops the fragment:
/// clients never send one to a server (RFC 9110 §4.2.4), and nothing after `#` may carry a
/// credential upstream.
fn path_without_param(path: &str, param: &str) -> Option<String> {
    let (base, query) = path.split_once('?')?;
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    let mut removed = false;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
            let is_credential = percent_decode(name).as_deref() == Some(param);
            removed |= is_credential;
            !is_credential
        })
        .collect();
    if !removed {
        return None;
    }
    Some(if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keyset::KeySet;
    use crate::core::test_support::request_with as request;

    fn routed_config() -> (Config, KeySet) {
        let config = serde_json::json!({
            "route_by_environment": true,
            "credentials": [{"in": "header", "prefixes": [
                {"prefix": "caibo_test_sk_", "environment": "test"}, "cmp_"]}],
            "policies": {"public": {"auth": "none"}}
        });
        Config::parse(config.to_string().as_bytes()).unwrap()
    }

    /// A client-sent `x-keygate-environment: test` may have routed the request to the sandbox
    /// before keygate ran: removing it must make Envoy pick the route again, even when no key
    /// (and so no environment) is involved.
    #[test]
    fn removing_a_client_sent_environment_header_repicks_the_route() {
        let (config, _) = routed_config();
        let forged = request(&[(":path", "/"), ("x-keygate-environment", "test")]);
        let edits = upstream_edits(&config, &forged, &Principal::Anonymous);
        assert!(edits.remove.iter().any(|h| h == "x-keygate-environment"));
        assert!(edits.clear_route_cache);

        let plain = request(&[(":path", "/")]);
        assert!(!upstream_edits(&config, &plain, &Principal::Anonymous).clear_route_cache);
    }

    #[test]
    fn underscore_spellings_of_scope_headers_are_removed_for_every_principal() {
        let (config, _) = routed_config();
        let forged = request(&[
            (":path", "/"),
            ("x_keygate_user", "admin@victim-corp"),
            ("x_keygate_organizations", "org-victim"),
            ("x_api_key", "cmp_x"),
        ]);
        let edits = upstream_edits(&config, &forged, &Principal::Anonymous);
        for alias in ["x_keygate_user", "x_keygate_organizations", "x_api_key"] {
            assert!(edits.remove.iter().any(|h| h == alias), "{alias}");
        }
    }

    #[test]
    fn query_credential_is_removed_from_the_path() {
        assert_eq!(
            path_without_param("/p?a=1&api_key=s3cret&b=2", "api_key").as_deref(),
            Some("/p?a=1&b=2")
        );
        assert_eq!(
            path_without_param("/p?api%5Fkey=s3cret", "api_key").as_deref(),
            Some("/p")
        );
        assert_eq!(path_without_param("/p?a=1", "api_key"), None);
    }

    /// Found by the credential fuzz target: `?api%5Fkey#...` is read as the parameter `api_key`
    /// (the query ends at `#`), so it must also be removed, not forwarded.
    #[test]
    fn query_credential_before_a_fragment_is_removed() {
        assert_eq!(
            path_without_param("/p?a=1&api%5Fkey#:x", "api_key").as_deref(),
            Some("/p?a=1")
        );
        assert_eq!(
            path_without_param("/p?api_key=s3cret#frag", "api_key").as_deref(),
            Some("/p")
        );
        assert_eq!(
            path_without_param("/p?a=1#&api_key=s3cret", "api_key"),
            None,
            "a fragment is not part of the query"
        );
    }
}
