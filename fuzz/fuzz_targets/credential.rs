//! Hostile request headers through the whole per-request path: credential extraction, the
//! decision, and the upstream edits of an allowed request.
//!
//! Input: one flags byte, then header lines `name: value` separated by `\n` (a line starting
//! with `:` is a pseudo-header such as `:path: /x?api_key=...`). Values are raw bytes.
//!
//! Besides "never panics", it checks what must hold for any input:
//! - an API key is accepted only if the request carries that key's plaintext secret, and only
//!   while the key is enabled and unexpired;
//! - every denial is a 4xx;
//! - after the edits, scope headers carry only keygate's values and no credential header,
//!   query parameter or cookie is left for the upstream.
#![no_main]

use std::borrow::Cow;
use std::sync::OnceLock;

use keygate::core::checksum::Checksum;
use keygate::core::config::Config;
use keygate::core::credential::{extract_credential, Credential};
use keygate::core::decision::{decide, Decision, Principal};
use keygate::core::digest::sha256;
use keygate::core::keyset::{is_id_byte, KeySet};
use keygate::core::limits::apply_limits;
use keygate::core::memory_store::MemoryStore;
use keygate::core::request::{percent_decode, Headers, RequestView, SessionEvidence};
use keygate::core::upstream::upstream_edits;
use libfuzzer_sys::fuzz_target;

/// (key id, plaintext secret as presented, record extras). The secret of an `<id>:<secret>` or
/// split key is the part after the id.
const KEYS: &[(&str, &str, &str)] = &[
    (
        "cmp_demo",
        "cmp_demo_Q7fX2mLr9Wk4TbVn8PzA",
        r#""tenant": "acme", "organizations": ["org-1", "org-2"], "permissions": ["admin"],
           "origins": ["https://ok.example"]"#,
    ),
    (
        "cmp_test_key",
        "cmp_test_Xy12Ab34",
        r#""environment": "test""#,
    ),
    (
        "cmp_old",
        "cmp_old_Lk3pQ9sVx2",
        r#""expires_at": "2020-01-01T00:00:00Z""#,
    ),
    ("cmp_off", "cmp_off_Hq8wE4tYu6", r#""enabled": false"#),
    (
        "abk_demo",
        "c2VjcmV0",
        r#""tenant": "company-7", "user": "owner@company-7""#,
    ),
    (
        "mk_demo",
        "mksec_abc123",
        r#""tenant": "team-3", "product": "makepay""#,
    ),
    ("qk_demo", "qk_demo_secret1", r#""tenant": "acme""#),
    ("ck_demo", "Y29va2ll", r#""tenant": "acme""#),
    // Checksummed (`"checksum": "crc32"`): the last six characters are the CRC-32 of the rest.
    (
        "sum_demo",
        CHECKSUMMED,
        r#""tenant": "acme", "rate_limit": {"requests": 2, "per_seconds": 60}"#,
    ),
    (
        "cmp_budget",
        "cmp_budget_Yt5rE3wQ1",
        r#""monthly_budget": 3, "permissions": ["admin"]"#,
    ),
];

/// `sumk_live_abc123` followed by its CRC-32 suffix (see `Checksum::append`).
const CHECKSUMMED: &str = "sumk_live_abc12328loZ5";

const SCOPE: [&str; 8] = [
    "x-keygate-key-id",
    "x-keygate-tenant",
    "x-keygate-organizations",
    "x-keygate-environment",
    "x-keygate-product",
    "x-keygate-user",
    "x-keygate-permissions",
    "x-keygate-auth",
];

fn fixture() -> &'static (Config, KeySet) {
    static FIXTURE: OnceLock<(Config, KeySet)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let keys: Vec<String> = KEYS
            .iter()
            .map(|(id, secret, extra)| {
                format!(
                    r#"{{"id": "{id}", "secret_sha256": "{}", {extra}}}"#,
                    hex::encode(sha256(secret.as_bytes()))
                )
            })
            .collect();
        let json = format!(
            r#"{{
              "name": "fuzz",
              "credentials": [
                {{"in": "header", "name": "x-api-key",
                  "prefixes": ["cmp_", {{"prefix": "cmp_test_", "environment": "test"}}]}},
                {{"in": "bearer", "format": "id_secret", "prefixes": ["abk_"]}},
                {{"in": "header_pair", "id_header": "x-key-id", "secret_header": "x-key-secret",
                  "prefixes": ["mk_"], "secret_prefixes": ["mksec_"]}},
                {{"in": "query", "name": "api_key", "prefixes": ["qk_"]}},
                {{"in": "cookie", "name": "kg_key", "format": "id_secret", "prefixes": ["ck_"]}},
                {{"in": "header", "name": "x-sum-key", "prefixes": ["sumk_"], "checksum": "crc32"}}
              ],
              "limits": {{"rate_limit": {{"requests": 5, "per_seconds": 1, "burst": 2}},
                          "slots": 8, "response_headers": true}},
              "session": {{}},
              "policies": {{
                "public": {{"auth": "none"}},
                "admin": {{"required_permissions": ["admin"],
                           "deny_methods": {{"DELETE": "API_KEY_DELETE_FORBIDDEN"}}}},
                "web": {{"deny_api_keys": "WEB_SESSION_REQUIRED"}}
              }},
              "routes": [{{"path_prefix": "/web", "methods": ["POST"], "policy": "web"}}],
              "tenant_selectors": [{{"query": "org", "scope": "organizations"}},
                                   {{"header": "x-tenant", "scope": "tenant"}}],
              "route_by_environment": true,
              "keys": [{}]
            }}"#,
            keys.join(",")
        );
        assert_eq!(
            Checksum::Crc32.append("sumk_live_abc123"),
            CHECKSUMMED,
            "the fixture's checksummed key"
        );
        match Config::parse(json.as_bytes()) {
            Ok(parsed) => parsed,
            Err(err) => panic!("the fuzz fixture config is invalid: {err}"),
        }
    })
}

/// Splits `name: value` lines; a leading `:` belongs to the (pseudo-header) name.
fn request_from(data: &[u8]) -> RequestView {
    let (flags, lines) = match data.split_first() {
        Some((flags, rest)) => (*flags, rest),
        None => (0, data),
    };
    let mut headers = Vec::new();
    for line in lines.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().skip(1).position(|b| *b == b':').map(|p| p + 1) else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        let value = value.get(1..).unwrap_or_default();
        let value = value.strip_prefix(b" ").unwrap_or(value);
        headers.push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
    }
    let session = match flags & 0b11 {
        0 => SessionEvidence::Absent,
        1 => SessionEvidence::Verified {
            subject: Some("user-1".into()),
        },
        2 => SessionEvidence::Failed { expired: true },
        _ => SessionEvidence::Failed { expired: false },
    };
    let route_policy = match (flags >> 2) & 0b11 {
        0 => None,
        1 => Some("public".to_string()),
        2 => Some("admin".to_string()),
        _ => Some("no-such-policy".to_string()),
    };
    RequestView {
        headers: headers.into(),
        // 2025-01-01 (the expired key is expired, the others are valid) or far in the future.
        now: if flags & 0b1_0000 == 0 {
            1_735_689_600
        } else {
            4_102_444_800
        },
        route_policy,
        session,
    }
}

/// Whether the request carries `secret` anywhere a credential source could read it from.
fn mentions(req: &RequestView, secret: &str) -> bool {
    let needle = secret.as_bytes();
    let in_headers = req
        .headers
        .iter()
        .any(|(_, v)| v.windows(needle.len()).any(|w| w == needle));
    let in_query = req
        .path_with_query()
        .split(['?', '&', '='])
        .any(|piece| percent_decode(piece).is_some_and(|p| p.contains(secret)));
    in_headers || in_query
}

/// The request headers the upstream would receive after the edits (Envoy semantics: remove
/// deletes every value of a name; set replaces every value).
fn apply(
    headers: &Headers,
    remove: &[Cow<str>],
    set: &[(&str, Cow<str>)],
) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), v.to_vec()))
        .filter(|(n, _)| !remove.iter().any(|r| r.eq_ignore_ascii_case(n)))
        .collect();
    for (name, value) in set {
        out.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        out.push((name.to_string(), value.as_bytes().to_vec()));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let (config, keys) = fixture();
    let req = request_from(data);

    if let Ok(Some(Credential::Pair { id, .. })) = extract_credential(&config.sources, &req) {
        assert!(!id.is_empty() && id.bytes().all(is_id_byte), "id {id:?}");
    }

    match decide(config, keys, &req) {
        Decision::Deny { code, .. } => {
            let status = config.replies.get(code).status;
            assert!((400..500).contains(&status), "{code:?} answered {status}");
        }
        // Answered locally with 204: nothing reaches the upstream.
        Decision::Preflight => {}
        Decision::Allow { principal, policy } => {
            if let Principal::ApiKey { record, .. } = &principal {
                // The limits of an allowed key, three times over, on a fresh table: a denial is
                // a 4xx (429 or 402) and nothing panics.
                let store = MemoryStore::new();
                for step in 0..3 {
                    let now_ms = req.now.saturating_mul(1000).saturating_add(step * 400);
                    if let Err(denial) =
                        apply_limits(&config.limits, record, policy, &store, now_ms)
                    {
                        let status = config.replies.get(denial.code).status;
                        assert!(
                            (400..500).contains(&status),
                            "{:?} answered {status}",
                            denial.code
                        );
                    }
                }
                let secret = KEYS
                    .iter()
                    .find(|(id, _, _)| *id == record.id)
                    .map(|(_, secret, _)| *secret)
                    .unwrap_or_else(|| panic!("allowed an unknown key {}", record.id));
                assert!(
                    mentions(&req, secret),
                    "allowed {} without its secret",
                    record.id
                );
                assert!(record.enabled(), "allowed disabled key {}", record.id);
                assert!(
                    record.expires_at().is_none_or(|t| req.now < t),
                    "allowed expired key {}",
                    record.id
                );
            }
            let edits = upstream_edits(config, &req, &principal);
            let upstream = apply(&req.headers, &edits.remove, &edits.set);
            for (name, value) in &upstream {
                if SCOPE.iter().any(|s| s.eq_ignore_ascii_case(name)) {
                    let ours = edits
                        .set
                        .iter()
                        .any(|(n, v)| n.eq_ignore_ascii_case(name) && v.as_bytes() == value);
                    assert!(ours, "client-sent {name} reached the upstream");
                }
                for credential_header in [
                    "x-api-key",
                    "authorization",
                    "x-key-id",
                    "x-key-secret",
                    "x-sum-key",
                ] {
                    assert!(
                        !name.eq_ignore_ascii_case(credential_header),
                        "{name} reached the upstream"
                    );
                }
            }
            let forwarded = RequestView {
                headers: upstream.into(),
                ..Default::default()
            };
            assert!(
                forwarded.query_values("api_key").is_empty(),
                "the api_key parameter reached the upstream: {}",
                forwarded.path_with_query()
            );
            assert!(
                forwarded.cookie_values("kg_key").is_empty(),
                "the kg_key cookie reached the upstream"
            );
        }
    }
});
