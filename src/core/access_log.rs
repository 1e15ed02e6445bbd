//! What keygate tells Envoy's access log about each request it decides: one small JSON object,
//! published by the adapter as filter state `wasm.keygate` (`%FILTER_STATE(wasm.keygate:PLAIN)%`).
//! Only ids and names go in, never a secret or a digest: access logs are shipped and kept.

use super::codes::ErrorCode;
use super::decision::Principal;

/// The decision as one access-log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessLogEntry<'a> {
    /// How the request was authenticated: `api_key`, `session` or `none` (denials too).
    pub auth: &'static str,
    /// The key's id, whenever the key was found (allowed, or denied after the lookup).
    pub key_id: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub environment: Option<&'a str>,
    /// The denial's code; absent when the request was allowed.
    pub code: Option<ErrorCode>,
}

impl<'a> AccessLogEntry<'a> {
    pub fn allowed(principal: &'a Principal<'a>) -> AccessLogEntry<'a> {
        let mut entry = AccessLogEntry::denied(None, None);
        entry.auth = principal.auth_kind();
        if let Principal::ApiKey {
            record,
            environment,
        } = principal
        {
            entry.key_id = Some(&record.id);
            entry.tenant = record.fields.tenant.as_deref();
            entry.environment = environment.as_deref();
        }
        entry
    }

    /// A found key refused after the lookup (rate limit, budget): who it was, and the code.
    pub fn limited(principal: &'a Principal<'a>, code: ErrorCode) -> AccessLogEntry<'a> {
        AccessLogEntry {
            auth: Principal::Anonymous.auth_kind(),
            code: Some(code),
            ..AccessLogEntry::allowed(principal)
        }
    }

    pub fn denied(code: Option<ErrorCode>, key_id: Option<&'a str>) -> AccessLogEntry<'a> {
        AccessLogEntry {
            auth: Principal::Anonymous.auth_kind(),
            key_id,
            tenant: None,
            environment: None,
            code,
        }
    }

    /// `{"auth":"api_key","key_id":"k1","tenant":"acme","environment":"live"}`: absent fields
    /// are left out rather than written as null, to keep log lines short.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.extend_from_slice(br#"{"auth":""#);
        out.extend_from_slice(self.auth.as_bytes());
        out.push(b'"');
        let fields = [
            ("key_id", self.key_id),
            ("tenant", self.tenant),
            ("environment", self.environment),
            ("code", self.code.map(ErrorCode::as_str)),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"\":");
                push_json_string(&mut out, value);
            }
        }
        out.push(b'}');
        out
    }
}

/// Key ids and tenants come from key-set documents: escape them so a quote cannot break the
/// log line's JSON. Runs of bytes that need no escape (all of a usual id) are copied whole: this
/// runs on every request.
fn push_json_string(out: &mut Vec<u8>, value: &str) {
    let hex = |nibble: u8| match nibble & 0xf {
        n @ 0..=9 => b'0' + n,
        n => b'a' + n - 10,
    };
    out.push(b'"');
    let bytes = value.as_bytes();
    let mut copied = 0;
    for (at, &byte) in bytes.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0..=0x1f => &[b'\\', b'u', b'0', b'0', hex(byte >> 4), hex(byte)],
            _ => continue,
        };
        out.extend_from_slice(bytes.get(copied..at).unwrap_or_default());
        out.extend_from_slice(escape);
        copied = at + 1;
    }
    out.extend_from_slice(bytes.get(copied..).unwrap_or_default());
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keyset::KeySet;

    fn one_key(id: &str, tenant: Option<&str>) -> KeySet {
        let spec = serde_json::json!({"keys": [{"id": id, "tenant": tenant,
            "secret_sha256": "4e2f2db88f4648fb2d6de4d51cb99c7816c6d3149abeb26ef2c5700ad8fdb4e7"}]});
        KeySet::from_json(spec.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn an_allowed_key_names_its_id_tenant_and_environment() {
        let keys = one_key("cmp_demo", Some("acme"));
        let principal = Principal::ApiKey {
            record: &keys.records()[0],
            environment: Some("live".into()),
        };
        let json = AccessLogEntry::allowed(&principal).to_json();
        let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"auth": "api_key", "key_id": "cmp_demo", "tenant": "acme",
                               "environment": "live"})
        );
    }

    #[test]
    fn a_denial_names_its_code_and_the_key_only_when_found() {
        let unknown = AccessLogEntry::denied(Some(ErrorCode::InvalidApiKey), None).to_json();
        assert_eq!(
            String::from_utf8(unknown).unwrap(),
            r#"{"auth":"none","code":"INVALID_API_KEY"}"#
        );
        let expired =
            AccessLogEntry::denied(Some(ErrorCode::ApiKeyExpired), Some("cmp_old")).to_json();
        assert_eq!(
            String::from_utf8(expired).unwrap(),
            r#"{"auth":"none","key_id":"cmp_old","code":"API_KEY_EXPIRED"}"#
        );
    }

    #[test]
    fn a_key_over_its_limit_keeps_its_id_and_tenant_next_to_the_code() {
        let keys = one_key("cmp_busy", Some("acme"));
        let principal = Principal::ApiKey {
            record: &keys.records()[0],
            environment: None,
        };
        let json = AccessLogEntry::limited(&principal, ErrorCode::RateLimitExceeded).to_json();
        assert_eq!(
            String::from_utf8(json).unwrap(),
            r#"{"auth":"none","key_id":"cmp_busy","tenant":"acme","code":"RATE_LIMIT_EXCEEDED"}"#
        );
    }

    #[test]
    fn sessions_and_public_routes_say_how_they_passed() {
        let session = Principal::Session {
            subject: Some("user-1".into()),
        };
        assert_eq!(
            AccessLogEntry::allowed(&session).to_json(),
            br#"{"auth":"session"}"#.to_vec()
        );
        assert_eq!(
            AccessLogEntry::allowed(&Principal::Anonymous).to_json(),
            br#"{"auth":"none"}"#.to_vec()
        );
    }

    #[test]
    fn quotes_and_control_characters_in_ids_stay_inside_the_json_string() {
        // Tenants come from key-set documents; a quote in one must not break the JSON.
        let entry = AccessLogEntry {
            tenant: Some("a\"b\\c\nd"),
            ..AccessLogEntry::denied(None, None)
        };
        let json = entry.to_json();
        let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(parsed["tenant"], "a\"b\\c\nd");
    }

    #[test]
    fn ids_round_trip_through_the_json_whatever_their_characters() {
        for id in [
            "plain-id",
            "",
            "\"",
            "x\u{1}y\u{1f}",
            "ünï\u{1F600}code\\",
            "end\t",
        ] {
            let entry = AccessLogEntry::denied(None, Some(id));
            let parsed: serde_json::Value = serde_json::from_slice(&entry.to_json()).unwrap();
            assert_eq!(parsed["key_id"], id, "{id:?}");
        }
    }
}
