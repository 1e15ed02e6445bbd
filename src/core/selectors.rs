//! Tenant selectors as the upstream's framework may read them, not only as keygate spells them.
//!
//! With `strict_selectors` (the default), a query parameter is a selector when its name matches
//! after percent-decoding, trimming, removing a `[...]` suffix and case-folding: Express's `qs`,
//! PHP and Rails read `organizationId[]` and `organizationId[0]` as `organizationId`, ASP.NET
//! ignores case, PHP trims leading spaces. Every value of every such spelling must be in scope.
//! A `;` in the query (Rack 2 splits on it) and a selector header spelled with `_` (WSGI/CGI
//! read it as the `-` header) are refused outright. Form bodies (urlencoded or multipart) that
//! name a selector are checked too, because Flask, Servlet and Rails merge them with the query.

use super::codes::ErrorCode;
use super::config::Config;
use super::keyset::KeyRecord;
use super::policy::{SelectorPlace, TenantScope, TenantSelector};
use super::request::{percent_decode, RequestView};

/// The form a request body takes when a framework would merge it with the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormBody {
    UrlEncoded,
    Multipart,
}

/// How a framework would name a query or form parameter: decoded, trimmed, without a `[...]`
/// suffix, case-folded. A name with a broken escape is read as it was sent.
pub fn canonical_param_name(raw: &str) -> String {
    let decoded = percent_decode(raw).unwrap_or_else(|| raw.to_string());
    let trimmed = decoded.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    let base = trimmed.split_once('[').map_or(trimmed, |(base, _)| base);
    base.trim_matches(|c: char| c.is_whitespace())
        .chars()
        .map(fold_case)
        .collect()
}

/// One character of a parameter name case-folded as widely as a framework compares names with an
/// ASCII selector name (the config admits only those): ASCII letters, and the four letters whose
/// simple upper or lower case is an ASCII one, which Java's `equalsIgnoreCase` takes for it (`İ`
/// and `ı` for `i`, `ſ` for `s`, the Kelvin sign for `k`). Any other character cannot make a
/// name equal an ASCII one, so no Unicode case table is needed.
fn fold_case(c: char) -> char {
    match c {
        '\u{130}' | '\u{131}' => 'i',
        '\u{17f}' => 's',
        '\u{212a}' => 'k',
        other => other.to_ascii_lowercase(),
    }
}

/// A header name as WSGI/CGI-style servers read it: `_` and `-` are the same character.
pub fn canonical_header_name(name: &[u8]) -> Vec<u8> {
    name.iter()
        .map(|b| match b {
            b'_' => b'-',
            other => other.to_ascii_lowercase(),
        })
        .collect()
}

fn in_scope(scope: TenantScope, record: &KeyRecord, value: &str) -> bool {
    match scope {
        TenantScope::Tenant => record.fields.tenant.as_deref() == Some(value),
        TenantScope::Organizations => record.fields.organizations.iter().any(|o| o == value),
    }
}

/// Which query selector a parameter name stands for, if any.
fn query_selector<'c>(config: &'c Config, raw_name: &str) -> Option<&'c TenantSelector> {
    let name = canonical_param_name(raw_name);
    config
        .tenant_selectors
        .iter()
        .find(|s| matches!(&s.place, SelectorPlace::Query(q) if q.eq_ignore_ascii_case(&name)))
}

fn has_query_selectors(config: &Config) -> bool {
    config
        .tenant_selectors
        .iter()
        .any(|s| matches!(s.place, SelectorPlace::Query(_)))
}

/// Every value of every `name=value` pair that reads as a selector must be in scope.
fn check_pairs(config: &Config, record: &KeyRecord, pairs: &str) -> Result<(), ErrorCode> {
    for pair in pairs.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if let Some(selector) = query_selector(config, name) {
            let allowed =
                percent_decode(value).is_some_and(|v| in_scope(selector.scope, record, v.trim()));
            if !allowed {
                return Err(ErrorCode::TenantForbidden);
            }
        }
    }
    Ok(())
}

/// The strict check of every selector for a request authenticated by `record`.
pub fn check_strict(
    config: &Config,
    req: &RequestView,
    record: &KeyRecord,
) -> Result<(), ErrorCode> {
    // Without a query selector no parameter can name one: the query is not read at all (its
    // pairs would each be decoded and case-folded for nothing, on every request).
    let query = has_query_selectors(config)
        .then(|| req.path_with_query().split_once('?').map(|(_, q)| q))
        .flatten();
    if let Some(query) = query {
        let query = query.split_once('#').map_or(query, |(q, _)| q);
        if query.contains(';') {
            return Err(ErrorCode::TenantForbidden);
        }
        check_pairs(config, record, query)?;
    }
    for selector in &config.tenant_selectors {
        let SelectorPlace::Header(wanted) = &selector.place else {
            continue;
        };
        for (name, value) in req.headers.iter() {
            if canonical_header_name(name) != wanted.as_bytes() {
                continue;
            }
            if !name.eq_ignore_ascii_case(wanted.as_bytes()) {
                // `x_company_id`: the upstream may read it, Envoy's routing does not.
                return Err(ErrorCode::TenantForbidden);
            }
            let allowed = std::str::from_utf8(value).is_ok_and(|s| {
                s.split(',')
                    .all(|part| in_scope(selector.scope, record, part.trim()))
            });
            if !allowed {
                return Err(ErrorCode::TenantForbidden);
            }
        }
    }
    Ok(())
}

/// Whether keygate must read this request's body before deciding: a form body that a framework
/// could merge with the query, on a filter with query selectors checked strictly.
pub fn form_body_kind(config: &Config, req: &RequestView) -> Option<FormBody> {
    if !config.strict_selectors || !has_query_selectors(config) {
        return None;
    }
    let content_type = req.header_str("content-type")?.trim().to_ascii_lowercase();
    let media = content_type.split(';').next().unwrap_or("").trim();
    match media {
        "application/x-www-form-urlencoded" => Some(FormBody::UrlEncoded),
        "multipart/form-data" => Some(FormBody::Multipart),
        _ => None,
    }
}

/// The check of a complete form body (`form_body_kind`), after the request was allowed: a
/// urlencoded selector must be in scope, a multipart part naming one is refused.
pub fn check_form_body(
    config: &Config,
    req: &RequestView,
    record: &KeyRecord,
    body: &[u8],
) -> Result<(), ErrorCode> {
    match form_body_kind(config, req) {
        Some(FormBody::UrlEncoded) => {
            let Ok(text) = std::str::from_utf8(body) else {
                return Err(ErrorCode::TenantForbidden);
            };
            if text.contains(';') {
                return Err(ErrorCode::TenantForbidden);
            }
            check_pairs(config, record, text)
        }
        // A part's value may be in any transfer encoding or charset: a part that names a
        // selector is refused rather than read.
        Some(FormBody::Multipart)
            if multipart_names(body).any(|n| query_selector(config, &n).is_some()) =>
        {
            Err(ErrorCode::TenantForbidden)
        }
        _ => Ok(()),
    }
}

/// The `name` (and `name*`) parameters of every `Content-Disposition` line in a multipart body.
fn multipart_names(body: &[u8]) -> impl Iterator<Item = String> + '_ {
    body.split(|b| *b == b'\n')
        .filter_map(|line| {
            let line = String::from_utf8_lossy(line).to_ascii_lowercase();
            let rest = line
                .trim()
                .strip_prefix("content-disposition:")?
                .to_string();
            Some(rest)
        })
        .flat_map(|line| {
            line.split(';')
                .filter_map(|param| {
                    let (key, value) = param.split_once('=')?;
                    let key = key.trim();
                    if key != "name" && key != "name*" {
                        return None;
                    }
                    let value = value.trim().trim_matches('"');
                    // RFC 5987: `utf-8''organizationid`.
                    let value = value.rsplit_once("''").map_or(value, |(_, v)| v);
                    Some(value.to_string())
                })
                .collect::<Vec<_>>()
        })
}

/// Request headers that a WSGI/CGI-style upstream would read as a header keygate strips or
/// selects on, spelled with `_` (`x_keygate_user`): keygate removes them.
/// Nothing is allocated for a request without `_` in any header name, the usual case.
pub fn underscore_aliases<'r>(config: &Config, req: &'r RequestView) -> Vec<&'r str> {
    let is_guarded = |canonical: &[u8]| {
        let mut selector_headers = config
            .tenant_selectors
            .iter()
            .filter_map(|s| match &s.place {
                SelectorPlace::Header(h) => Some(h.as_str()),
                SelectorPlace::Query(_) => None,
            });
        config
            .headers_to_strip
            .iter()
            .any(|g| g.as_bytes() == canonical)
            || selector_headers.any(|g| g.as_bytes() == canonical)
    };
    req.headers
        .names()
        .filter(|name| has_underscore(name))
        .filter(|name| is_guarded(&canonical_header_name(name)))
        .filter_map(|name| std::str::from_utf8(name).ok())
        .collect()
}

/// Whether `name` holds a `_`, eight bytes at a time: every request name is checked, and
/// almost none has one.
fn has_underscore(name: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const UNDERSCORES: u64 = u64::from_ne_bytes([b'_'; 8]);
    let mut words = name.chunks_exact(8);
    // A byte of `word ^ UNDERSCORES` is zero exactly where the word has `_`; the classic test
    // below is non-zero if and only if some byte of `x` is zero.
    let any_zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS != 0;
    let found = words.by_ref().any(|word| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        any_zero_byte(u64::from_ne_bytes(bytes) ^ UNDERSCORES)
    });
    found || words.remainder().contains(&b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::digest::sha256;
    use crate::core::keyset::KeySet;
    use crate::core::test_support::RequestBuilder;

    fn setup() -> (Config, KeySet) {
        let cfg = serde_json::json!({
            "credentials": [{"in": "header", "prefixes": ["cmp_"]}],
            "tenant_selectors": [{"query": "organizationId", "scope": "organizations"},
                                 {"header": "x-organization-id", "scope": "organizations"}],
            "keys": [{"id": "k1", "secret_sha256": hex::encode(sha256(b"cmp_one")),
                      "organizations": ["org-101", "org-102"]}]
        });
        Config::parse(cfg.to_string().as_bytes()).unwrap()
    }

    fn req(path: &str, headers: &[(&str, &str)]) -> RequestView {
        RequestBuilder::new()
            .header(":path", path)
            .headers(headers)
            .build()
    }

    #[test]
    fn parameter_names_are_read_the_way_frameworks_read_them() {
        for raw in [
            "organizationId",
            "organizationId[]",
            "organizationId%5B%5D",
            "organizationId[0]",
            "OrganizationId",
            "organizationid",
            "%20organizationId",
            "+organizationId",
        ] {
            assert_eq!(canonical_param_name(raw), "organizationid", "{raw}");
        }
        assert_eq!(canonical_param_name("organization"), "organization");
    }

    #[test]
    fn letters_java_takes_for_ascii_ones_fold_to_them() {
        // ſ (long s), ı (dotless i), İ (dotted capital I), K (Kelvin sign): Java's
        // equalsIgnoreCase reads each as the ASCII letter.
        assert_eq!(canonical_param_name("\u{17f}coPe"), "scope");
        assert_eq!(canonical_param_name("\u{131}d"), "id");
        assert_eq!(canonical_param_name("\u{130}D"), "id");
        assert_eq!(canonical_param_name("\u{212a}ey"), "key");
        assert_eq!(canonical_param_name("\u{e9}t\u{c9}"), "\u{e9}t\u{c9}");
    }

    #[test]
    fn a_selector_spelled_with_a_dotless_or_dotted_i_is_checked() {
        let (c, k) = setup();
        let record = k.by_id("k1").unwrap();
        // organizationId with a dotless i, or a dotted capital I.
        for query in [
            "organ\u{131}zationId=org-901",
            "organizat\u{130}onId[]=org-901",
        ] {
            let r = req(&format!("/p?{query}"), &[]);
            assert_eq!(
                check_strict(&c, &r, record),
                Err(ErrorCode::TenantForbidden),
                "{query}"
            );
        }
    }

    #[test]
    fn every_spelling_of_an_out_of_scope_selector_is_refused() {
        let (c, k) = setup();
        let record = k.by_id("k1").unwrap();
        for query in [
            "organizationId[]=org-901",
            "organizationId%5B%5D=org-901",
            "organizationId[0]=org-901",
            "OrganizationId=org-901",
            "organizationid=org-901",
            "%20organizationId=org-901",
            "limit=1;organizationId=org-901",
            "limit=1;x=2",
            "organizationId=org-101&organizationId[]=org-901",
        ] {
            let r = req(&format!("/p?{query}"), &[]);
            assert_eq!(
                check_strict(&c, &r, record),
                Err(ErrorCode::TenantForbidden),
                "{query}"
            );
        }
        let ok = req(
            "/p?organizationId[]=org-101&OrganizationId=org-102&limit=1",
            &[],
        );
        assert_eq!(check_strict(&c, &ok, record), Ok(()));
    }

    #[test]
    fn without_query_selectors_the_query_never_refuses() {
        let cfg = serde_json::json!({
            "credentials": [{"in": "header", "prefixes": ["cmp_"]}],
            "tenant_selectors": [{"header": "x-organization-id", "scope": "organizations"}],
            "keys": [{"id": "k1", "secret_sha256": hex::encode(sha256(b"cmp_one")),
                      "organizations": ["org-101"]}]
        });
        let (c, k) = Config::parse(cfg.to_string().as_bytes()).unwrap();
        let record = k.by_id("k1").unwrap();
        for query in [
            "organizationId=org-901",
            "limit=1;x=2",
            "a=%zz&organizationId[]=org-9",
        ] {
            let r = req(&format!("/p?{query}"), &[]);
            assert_eq!(check_strict(&c, &r, record), Ok(()), "{query}");
        }
        let forged = req("/p?limit=1", &[("x-organization-id", "org-901")]);
        assert_eq!(
            check_strict(&c, &forged, record),
            Err(ErrorCode::TenantForbidden)
        );
    }

    #[test]
    fn a_selector_header_spelled_with_underscores_is_refused() {
        let (c, k) = setup();
        let record = k.by_id("k1").unwrap();
        let forged = req("/p", &[("x_organization_id", "org-101")]);
        assert_eq!(
            check_strict(&c, &forged, record),
            Err(ErrorCode::TenantForbidden)
        );
        let fine = req("/p", &[("x-organization-id", "org-101, org-102")]);
        assert_eq!(check_strict(&c, &fine, record), Ok(()));
    }

    #[test]
    fn form_bodies_naming_a_selector_are_checked() {
        let (c, k) = setup();
        let record = k.by_id("k1").unwrap();
        let form = |ct: &str, body: &str| {
            let r = req("/p", &[("content-type", ct)]);
            check_form_body(&c, &r, record, body.as_bytes())
        };
        let urlencoded = "application/x-www-form-urlencoded";
        assert_eq!(
            form(urlencoded, "a=1&organizationId%5B%5D=org-901"),
            Err(ErrorCode::TenantForbidden)
        );
        assert_eq!(form(urlencoded, "a=1&organizationId=org-101"), Ok(()));
        let multipart = "multipart/form-data; boundary=XX";
        let named = "--XX\r\nContent-Disposition: form-data; name=\"organizationId\"\r\n\r\norg-101\r\n--XX--\r\n";
        assert_eq!(form(multipart, named), Err(ErrorCode::TenantForbidden));
        let file = "--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.pdf\"\r\n\r\n%PDF\r\n--XX--\r\n";
        assert_eq!(form(multipart, file), Ok(()));
        assert_eq!(
            form_body_kind(&c, &req("/p", &[("content-type", "application/json")])),
            None
        );
    }

    #[test]
    fn underscore_spellings_of_guarded_headers_are_found() {
        let (c, _) = setup();
        let r = req(
            "/p",
            &[
                ("x_keygate_user", "admin"),
                ("X_Keygate_Tenant", "t"),
                ("x_organization_id", "org-9"),
                ("x_other_thing", "1"),
                ("x-keygate-user", "u"),
            ],
        );
        assert_eq!(
            underscore_aliases(&c, &r),
            vec!["x_keygate_user", "X_Keygate_Tenant", "x_organization_id"]
        );
    }

    #[test]
    fn has_underscore_finds_it_at_any_place_and_nothing_else() {
        for len in 0..20 {
            let plain = vec![b'x'; len];
            assert!(!has_underscore(&plain), "{len}");
            for at in 0..len {
                let mut name = plain.clone();
                name[at] = b'_';
                assert!(has_underscore(&name), "{len} {at}");
            }
        }
        for other in [0u8, b'^', b'`', 0xdf, 0x5e, 0x60, 0xff, b'-'] {
            assert!(!has_underscore(&[other; 17]), "{other}");
        }
    }
}
