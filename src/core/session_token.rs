//! Reading claims from a session token that Envoy's `jwt_authn` filter has already judged.
//!
//! A host that cannot read `jwt_authn`'s nested dynamic metadata (Envoy 1.40's dynamic-module
//! ABI reads top-level values only) learns from the metadata's keys *whether* the token was
//! verified or failed, and reads the claims from the cookie itself. Nothing here verifies a
//! signature: it is only asked about the token `jwt_authn` verified or rejected in this request.

use serde_json::{Map, Value};

/// The default `clock_skew_seconds` of `jwt_authn`: a token is expired only this long after `exp`.
pub const JWT_AUTHN_CLOCK_SKEW_SECS: i64 = 60;

/// The claims of a compact JWS (`header.payload.signature`), if its payload is a JSON object.
pub fn claims(token: &[u8]) -> Option<Map<String, Value>> {
    use base64::Engine;
    let mut parts = token.split(|b| *b == b'.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let payload = payload
        .strip_suffix(b"==")
        .or(payload.strip_suffix(b"="))
        .unwrap_or(payload);
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    match serde_json::from_slice(&json).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// A string claim, the way `jwt_authn`'s payload metadata would hold it.
pub fn string_claim(token: &[u8], claim: &str) -> Option<String> {
    match claims(token)?.remove(claim)? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// Whether a token `jwt_authn` rejected was rejected for its lifetime: it checks `exp` (with its
/// default clock skew) before the signature, so a token past `exp` fails as expired.
pub fn expired(token: &[u8], now: i64) -> bool {
    claims(token)
        .and_then(|c| c.get("exp").and_then(Value::as_i64))
        .is_some_and(|exp| exp.saturating_add(JWT_AUTHN_CLOCK_SKEW_SECS) < now)
}

/// Whether `jwt_authn`'s failure message (its failure metadata's `message`, "Jwt is expired")
/// says the token was rejected for its lifetime: for a host that reads the message instead of
/// the token (`expired`).
pub fn failure_says_expired(message: &str) -> bool {
    message.to_ascii_lowercase().contains("expired")
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn token(payload: &str) -> Vec<u8> {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2ln", b64(r#"{"alg":"HS256"}"#), b64(payload)).into_bytes()
    }

    #[test]
    fn the_subject_claim_is_read_from_the_payload() {
        let t = token(r#"{"sub":"u9","exp":2000000000}"#);
        assert_eq!(string_claim(&t, "sub").as_deref(), Some("u9"));
        assert_eq!(string_claim(&t, "email"), None);
    }

    #[test]
    fn a_non_string_claim_or_a_malformed_token_yields_nothing() {
        assert_eq!(string_claim(&token(r#"{"sub":42}"#), "sub"), None);
        assert_eq!(string_claim(b"not-a-jwt", "sub"), None);
        assert_eq!(string_claim(b"a.%%%.c", "sub"), None);
        assert_eq!(string_claim(&token("[1,2]"), "sub"), None);
        assert_eq!(string_claim(b"a.b.c.d", "sub"), None);
    }

    #[test]
    fn only_a_failure_message_naming_expiry_counts_as_expired() {
        assert!(failure_says_expired("Jwt is expired"));
        assert!(failure_says_expired("JWT IS EXPIRED"));
        assert!(!failure_says_expired("Jwt verification fails"));
        assert!(!failure_says_expired(""));
    }

    #[test]
    fn expired_only_past_exp_plus_jwt_authn_clock_skew() {
        let t = token(r#"{"sub":"u9","exp":1000}"#);
        assert!(!expired(&t, 1000 + JWT_AUTHN_CLOCK_SKEW_SECS));
        assert!(expired(&t, 1001 + JWT_AUTHN_CLOCK_SKEW_SECS));
        assert!(!expired(&token(r#"{"sub":"u9"}"#), i64::MAX));
    }
}
