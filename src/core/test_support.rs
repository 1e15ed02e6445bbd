//! Builders the core's unit tests share: a request as the host would hand it over, a credential
//! source, a JSON configuration with some top-level fields replaced, and a decision's deny code.

use serde_json::Value;

use super::codes::ErrorCode;
use super::credential::{CredentialSource, CredentialSpec};
use super::decision::Decision;
use super::request::{RequestView, SessionEvidence};

/// A request built header by header, in the order given (a test may depend on it).
#[derive(Debug, Default)]
pub struct RequestBuilder {
    view: RequestView,
}

impl RequestBuilder {
    pub fn new() -> RequestBuilder {
        RequestBuilder::default()
    }

    /// `:method` and `:path`, as every request Envoy hands over carries them.
    pub fn to(method: &str, path: &str) -> RequestBuilder {
        RequestBuilder::new()
            .header(":method", method)
            .header(":path", path)
    }

    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> RequestBuilder {
        self.view.headers.push(name, value.as_ref());
        self
    }

    pub fn headers<V: AsRef<[u8]>>(self, headers: &[(&str, V)]) -> RequestBuilder {
        headers
            .iter()
            .fold(self, |builder, (name, value)| builder.header(name, value))
    }

    pub fn now(mut self, now: i64) -> RequestBuilder {
        self.view.now = now;
        self
    }

    pub fn route_policy(mut self, policy: &str) -> RequestBuilder {
        self.view.route_policy = Some(policy.to_string());
        self
    }

    pub fn session(mut self, session: SessionEvidence) -> RequestBuilder {
        self.view.session = session;
        self
    }

    pub fn build(self) -> RequestView {
        self.view
    }
}

/// A request of only these headers (no method or path unless given).
pub fn request_with<V: AsRef<[u8]>>(headers: &[(&str, V)]) -> RequestView {
    RequestBuilder::new().headers(headers).build()
}

/// The credential source of one `credentials` entry, which the test expects to be valid.
pub fn credential_source(spec: Value) -> CredentialSource {
    let spec = CredentialSpec::decode(&spec, "credentials[0]").unwrap();
    CredentialSource::from_spec(spec, "credentials[0]").unwrap()
}

/// The code a decision denies with, or `None` when it lets the request through.
pub fn deny_code(decision: Decision) -> Option<ErrorCode> {
    match decision {
        Decision::Deny { code, .. } => Some(code),
        Decision::Allow { .. } | Decision::Preflight => None,
    }
}

/// `base` with each top-level field of `extra` set (replacing, not merging into, a field that
/// `base` has): a test's configuration is a shared default plus what the test is about.
pub fn merged(mut base: Value, extra: Value) -> Value {
    if let (Some(fields), Value::Object(extra)) = (base.as_object_mut(), extra) {
        fields.extend(extra);
    }
    base
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_request_keeps_its_headers_in_order_and_its_other_fields() {
        let req = RequestBuilder::to("POST", "/p?x=1")
            .headers(&[("x-api-key", "k1"), ("x-api-key", "k2")])
            .header("cookie", b"a=1".as_slice())
            .now(7)
            .route_policy("public")
            .build();
        let headers: Vec<_> = req.headers.iter().collect();
        assert_eq!(headers.len(), 5);
        assert_eq!(req.method(), "POST");
        assert_eq!(req.path(), "/p");
        let keys: Vec<_> = req.header_values("x-api-key").collect();
        assert_eq!(keys, vec![b"k1".as_slice(), b"k2".as_slice()]);
        assert_eq!(req.now, 7);
        assert_eq!(req.route_policy.as_deref(), Some("public"));
        assert!(request_with::<&str>(&[]).headers.is_empty());
    }

    #[test]
    fn merged_replaces_top_level_fields_and_keeps_the_rest() {
        let base = serde_json::json!({"a": 1, "b": {"c": 2}});
        let got = merged(base, serde_json::json!({"b": {"d": 3}, "e": 4}));
        assert_eq!(got, serde_json::json!({"a": 1, "b": {"d": 3}, "e": 4}));
    }
}
