//! The method a request ends up with. Express's method-override, Laravel, Rails and Symfony
//! let a header or a `_method` parameter replace the request's method, so a POST can become a
//! DELETE behind keygate's back. A method that `deny_methods` refuses is refused wherever the
//! request names it; allowed overrides are forwarded unchanged, so clients that tunnel PATCH
//! through POST keep working.

use super::request::{percent_decode, trim_ascii, RequestView};

/// Headers frameworks read as a method override, lower case with `-`.
pub const OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The query parameter Laravel, Rails and Symfony read as the method.
pub const OVERRIDE_PARAM: &str = "_method";

/// Whether the request asks for `method` (upper case): as its own method, in an override header
/// (any case, `_` read as `-`, comma-separated values), or in a `_method` query parameter.
pub fn requests_method(req: &RequestView, method: &str) -> bool {
    req.method() == method
        || header_override_names(req, method)
        || query_override_names(req, method)
}

fn header_override_names(req: &RequestView, method: &str) -> bool {
    req.headers.iter().any(|(name, value)| {
        is_override_header(name)
            && value
                .split(|b| *b == b',')
                .any(|part| trim_ascii(part).eq_ignore_ascii_case(method.as_bytes()))
    })
}

fn is_override_header(name: &[u8]) -> bool {
    OVERRIDE_HEADERS.iter().any(|known| {
        known.len() == name.len()
            && known
                .bytes()
                .zip(name)
                .all(|(k, n)| k == n.to_ascii_lowercase() || (k == b'-' && *n == b'_'))
    })
}

fn query_override_names(req: &RequestView, method: &str) -> bool {
    let Some((_, query)) = req.path_with_query().split_once('?') else {
        return false;
    };
    // `;` separates parameters for Rack 2 and some servlet containers.
    query.split(['&', ';']).any(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        // Decode only names that need it: this runs for every pair of the query.
        let names_override = if name.contains(['%', '+']) {
            percent_decode(name).is_some_and(|n| n.trim().eq_ignore_ascii_case(OVERRIDE_PARAM))
        } else {
            name.trim().eq_ignore_ascii_case(OVERRIDE_PARAM)
        };
        names_override
            && percent_decode(value).is_some_and(|v| v.trim().eq_ignore_ascii_case(method))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::test_support::RequestBuilder;

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestView {
        RequestBuilder::to(method, path).headers(headers).build()
    }

    #[test]
    fn the_request_method_itself_counts() {
        assert!(requests_method(&req("DELETE", "/p/1", &[]), "DELETE"));
        assert!(!requests_method(&req("POST", "/p/1", &[]), "DELETE"));
    }

    #[test]
    fn each_override_header_in_any_case_and_spelling_counts() {
        for name in [
            "x-http-method-override",
            "X-HTTP-Method-Override",
            "x-http-method",
            "x-method-override",
            "x_http_method_override",
        ] {
            for value in ["DELETE", "delete", " Delete ", "GET, DELETE"] {
                assert!(
                    requests_method(&req("POST", "/p/1", &[(name, value)]), "DELETE"),
                    "{name}: {value}"
                );
            }
        }
        assert!(!requests_method(
            &req("POST", "/p/1", &[("x-http-method-override", "PATCH")]),
            "DELETE"
        ));
        assert!(!requests_method(
            &req("POST", "/p/1", &[("x-other", "DELETE")]),
            "DELETE"
        ));
    }

    #[test]
    fn a_method_query_parameter_counts() {
        for path in [
            "/p/1?_method=DELETE",
            "/p/1?a=1&_method=delete",
            "/p/1?a=1;_method=DELETE",
            "/p/1?%5Fmethod=DELETE",
            "/p/1?_METHOD=%44ELETE",
        ] {
            assert!(requests_method(&req("POST", path, &[]), "DELETE"), "{path}");
        }
        for path in [
            "/p/1?_method=PATCH",
            "/p/1?method=DELETE",
            "/p/_method=DELETE",
        ] {
            assert!(
                !requests_method(&req("POST", path, &[]), "DELETE"),
                "{path}"
            );
        }
    }
}

#[cfg(test)]
mod decision_tests {
    use crate::core::codes::ErrorCode;
    use crate::core::config::Config;
    use crate::core::decision::{decide, Decision};
    use crate::core::digest::sha256;
    use crate::core::test_support::RequestBuilder;

    #[test]
    fn a_denied_method_named_by_an_override_is_refused_with_its_code_and_others_pass() {
        let spec = serde_json::json!({
            "credentials": [{"in": "header"}],
            "default_policy": {"deny_methods": {"DELETE": "API_KEY_DELETE_FORBIDDEN"}},
            "keys": [{"id": "k", "secret_sha256": hex::encode(sha256(b"key"))}]
        });
        let (config, keys) = Config::parse(spec.to_string().as_bytes()).unwrap();
        let post = |path: &str, header: Option<(&str, &str)>| {
            let req = RequestBuilder::to("POST", path)
                .header("x-api-key", "key")
                .headers(header.as_slice())
                .build();
            match decide(&config, &keys, &req) {
                Decision::Deny { code, .. } => Some(code),
                Decision::Allow { .. } => None,
                Decision::Preflight => panic!("a POST is never a preflight"),
            }
        };
        let forbidden = Some(ErrorCode::ApiKeyDeleteForbidden);
        assert_eq!(
            post("/p/12", Some(("x-http-method-override", "DELETE"))),
            forbidden
        );
        assert_eq!(post("/p/12", Some(("x-http-method", "delete"))), forbidden);
        assert_eq!(
            post("/p/12", Some(("x-method-override", "Delete"))),
            forbidden
        );
        assert_eq!(post("/p/12?_method=DELETE", None), forbidden);
        assert_eq!(
            post("/p/12", Some(("x-http-method-override", "PATCH"))),
            None
        );
        assert_eq!(post("/p/12", None), None);
    }
}
