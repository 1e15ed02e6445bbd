//! Defence in depth for the path keygate decides on. Envoy normalizes paths before routing when
//! its connection manager says so (`normalize_path`, `merge_slashes`,
//! `path_with_escaped_slashes_action`); an upstream that resolves dot segments or decodes `%2F`
//! on its own would otherwise serve a different resource than the route whose policy keygate
//! applied (`/health/../admin` through the public `/health` route). When an operator forgot
//! those settings, keygate refuses such paths itself instead of deciding on them.

use super::codes::ErrorCode;
use super::config::Config;
use super::request::RequestView;

/// Refuses an ambiguous path when this filter's decision depends on the path at all.
pub fn check(config: &Config, req: &RequestView) -> Result<(), ErrorCode> {
    if config.reject_ambiguous_paths && decision_depends_on_path(config) && is_ambiguous(req.path())
    {
        return Err(ErrorCode::AmbiguousPath);
    }
    Ok(())
}

/// Route-metadata policies, path rules and tenant selectors all read the path (or its query).
fn decision_depends_on_path(config: &Config) -> bool {
    !config.policies.is_empty() || !config.routes.is_empty() || !config.tenant_selectors.is_empty()
}

/// A path (without its query) that an upstream may read as another path: a `.` or `..`
/// segment, raw or percent-encoded in any case, or an encoded slash or backslash. A segment's
/// `;` parameters are ignored first, as Tomcat and Jetty do (`/..;/` is `..` to them).
/// Reads the bytes in place: this runs on every request of a path-dependent config.
pub fn is_ambiguous(path: &str) -> bool {
    let bytes = path.as_bytes();
    if !bytes.iter().any(|b| *b == b'.' || *b == b'%') {
        return false;
    }
    let encoded_separator = bytes
        .windows(3)
        .any(|w| w.eq_ignore_ascii_case(b"%2f") || w.eq_ignore_ascii_case(b"%5c"));
    encoded_separator
        || bytes
            .split(|b| *b == b'/' || *b == b'\\')
            .any(is_dot_segment)
}

/// `.` or `..`, each dot raw or `%2e`, before any `;` parameters.
fn is_dot_segment(segment: &[u8]) -> bool {
    let mut rest = segment.split(|b| *b == b';').next().unwrap_or(segment);
    let mut dots = 0;
    while !rest.is_empty() {
        rest = if let Some(tail) = rest.strip_prefix(b".") {
            tail
        } else if rest
            .get(..3)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"%2e"))
        {
            rest.get(3..).unwrap_or_default()
        } else {
            return false;
        };
        dots += 1;
    }
    dots == 1 || dots == 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::test_support::{merged, RequestBuilder};

    #[test]
    fn dot_segments_raw_or_encoded_in_any_case_are_ambiguous() {
        for path in [
            "/health/../api/developer/reports",
            "/health/./x",
            "/health/..",
            "/a/%2e%2e/b",
            "/a/%2E%2E/b",
            "/a/.%2e/b",
            "/a/%2e./b",
            "/a/%2e/b",
            "/a\\..\\b",
            "/health/..;/admin",
            "/health/..;jsessionid=1/admin",
        ] {
            assert!(is_ambiguous(path), "{path}");
        }
    }

    #[test]
    fn encoded_slashes_and_backslashes_are_ambiguous() {
        for path in [
            "/health%2F..%2Fapi",
            "/health%2f..%2fapi",
            "/files/a%2Fb",
            "/a%5Cb",
            "/a%5cb",
        ] {
            assert!(is_ambiguous(path), "{path}");
        }
    }

    #[test]
    fn ordinary_paths_with_dots_are_not_ambiguous() {
        for path in [
            "/",
            "/api/v1.2/reports",
            "/files/report..pdf",
            "/.well-known/x",
            "/a/...",
            "/a/%20b",
            "",
        ] {
            assert!(!is_ambiguous(path), "{path}");
        }
    }

    fn config(extra: serde_json::Value) -> Config {
        let spec = merged(
            serde_json::json!({"credentials": [{"in": "header"}]}),
            extra,
        );
        Config::parse(spec.to_string().as_bytes()).unwrap().0
    }

    fn get(path: &str) -> RequestView {
        RequestBuilder::to("GET", path).build()
    }

    #[test]
    fn refused_only_when_the_decision_depends_on_the_path_and_not_switched_off() {
        let with_policies = config(serde_json::json!({"policies": {"public": {"auth": "none"}}}));
        let tricky = get("/health/../admin?x=1");
        assert_eq!(
            check(&with_policies, &tricky),
            Err(ErrorCode::AmbiguousPath)
        );
        assert_eq!(check(&with_policies, &get("/admin?q=../x")), Ok(()));
        let with_selectors = config(serde_json::json!({
            "tenant_selectors": [{"query": "org", "scope": "organizations"}]}));
        assert_eq!(
            check(&with_selectors, &tricky),
            Err(ErrorCode::AmbiguousPath)
        );
        let path_blind = config(serde_json::json!({}));
        assert_eq!(check(&path_blind, &tricky), Ok(()));
        let switched_off = config(serde_json::json!({
            "policies": {"public": {"auth": "none"}}, "reject_ambiguous_paths": false}));
        assert_eq!(check(&switched_off, &tricky), Ok(()));
    }
}

#[cfg(test)]
mod decision_tests {
    use crate::core::codes::ErrorCode;
    use crate::core::config::Config;
    use crate::core::decision::{decide, Decision};
    use crate::core::test_support::RequestBuilder;

    #[test]
    fn a_dot_segment_through_a_public_route_is_refused_before_any_policy() {
        let spec = serde_json::json!({
            "credentials": [{"in": "header"}],
            "policies": {"public": {"auth": "none"}}
        });
        let (config, keys) = Config::parse(spec.to_string().as_bytes()).unwrap();
        let req = RequestBuilder::to("GET", "/health/../admin")
            .route_policy("public")
            .build();
        assert!(matches!(
            decide(&config, &keys, &req),
            Decision::Deny {
                code: ErrorCode::AmbiguousPath,
                key_id: None
            }
        ));
        let plain = RequestBuilder::to("GET", "/health")
            .route_policy("public")
            .build();
        assert!(matches!(
            decide(&config, &keys, &plain),
            Decision::Allow { .. }
        ));
    }
}
