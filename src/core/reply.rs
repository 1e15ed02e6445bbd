//! Local replies: every code's status, headers and body, rendered once at configure time from
//! the table in `codes`. (The edits made to a request that goes upstream are in `upstream`.)

use std::collections::HashMap;
use std::fmt;

use super::codes::{reason_phrase, ErrorCode, Language};
use super::config_error::is_header_value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyFormat {
    /// `{"code": "...", "message": "..."}` as application/json.
    #[default]
    Json,
    /// The message (by default the status's reason phrase) as text/plain.
    Text,
}

impl BodyFormat {
    /// Each format by its configuration name.
    pub const NAMES: &'static [(&'static str, BodyFormat)] =
        &[("json", BodyFormat::Json), ("text", BodyFormat::Text)];
}

/// A reply keygate sends itself instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl LocalReply {
    /// The code's status alone: the fallback when no rendered reply is at hand.
    fn bare(code: ErrorCode) -> LocalReply {
        LocalReply {
            status: code.status(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// The reply for `code`: the configured message, else the code's default from `codes`.
    fn render(
        code: ErrorCode,
        language: Language,
        format: BodyFormat,
        message: Option<&str>,
        www_authenticate: &str,
    ) -> Result<LocalReply, ReplyError> {
        let status = code.status();
        let (content_type, body) = match format {
            BodyFormat::Json => {
                let message = message.unwrap_or(code.default_message(language));
                let body = serde_json::json!({"code": code.as_str(), "message": message});
                ("application/json", body.to_string().into_bytes())
            }
            BodyFormat::Text => {
                let message = message.unwrap_or(reason_phrase(status));
                if message.chars().any(char::is_control) {
                    return Err(ReplyError::ControlCharacterInText(code));
                }
                ("text/plain; charset=utf-8", message.as_bytes().to_vec())
            }
        };
        let mut headers = vec![
            ("content-type", content_type.to_string()),
            ("x-keygate-code", code.as_str().to_string()),
        ];
        if status == 401 && is_header_value(www_authenticate) {
            headers.push(("www-authenticate", www_authenticate.to_string()));
        }
        Ok(LocalReply {
            status,
            headers,
            body,
        })
    }
}

/// A configured message that cannot be sent as a reply body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// A `text` body must not hold control characters (they could split the response).
    ControlCharacterInText(ErrorCode),
}

impl ReplyError {
    /// The code whose message was refused.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReplyError::ControlCharacterInText(code) => *code,
        }
    }
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::ControlCharacterInText(_) => {
                f.write_str("a text message must not contain control characters")
            }
        }
    }
}

impl std::error::Error for ReplyError {}

/// Every code's reply, rendered once at configure time.
#[derive(Debug, Clone)]
pub struct Replies {
    by_code: HashMap<ErrorCode, LocalReply>,
}

impl Replies {
    pub fn render(
        language: Language,
        format: BodyFormat,
        overrides: &HashMap<ErrorCode, String>,
        www_authenticate: &str,
    ) -> Result<Replies, ReplyError> {
        let by_code = ErrorCode::ALL
            .into_iter()
            .map(|code| {
                let message = overrides.get(&code).map(String::as_str);
                LocalReply::render(code, language, format, message, www_authenticate)
                    .map(|reply| (code, reply))
            })
            .collect::<Result<HashMap<_, _>, _>>()?;
        Ok(Replies { by_code })
    }

    /// The code's pre-rendered reply, borrowed: the per-request path copies nothing.
    pub fn rendered(&self, code: ErrorCode) -> Option<&LocalReply> {
        self.by_code.get(&code)
    }

    pub fn get(&self, code: ErrorCode) -> LocalReply {
        self.by_code
            .get(&code)
            .cloned()
            .unwrap_or_else(|| LocalReply::bare(code))
    }
}

/// The answer of a filter that has no configuration (it failed to load, or its stream state
/// could not be created): 503 `KEYSET_UNAVAILABLE` in the default JSON form, as no configured
/// language or body format is known.
pub fn unconfigured_reply() -> LocalReply {
    let code = ErrorCode::KeysetUnavailable;
    LocalReply::render(code, Language::En, BodyFormat::Json, None, "")
        .unwrap_or_else(|_| LocalReply::bare(code))
}

/// The answer to a CORS preflight that reached keygate: no content and no CORS grant (only
/// Envoy's `cors` filter grants one, for the origins it is configured with).
pub fn preflight_reply() -> LocalReply {
    LocalReply {
        status: 204,
        headers: Vec::new(),
        body: Vec::new(),
    }
}

/// The one log line of a denial. It names the code and the key id, never the secret.
pub fn denial_log_line(
    filter_name: &str,
    status: u32,
    code: ErrorCode,
    key_id: Option<&str>,
) -> String {
    format!(
        "keygate[{filter_name}]: denied status={status} code={} key_id={}",
        code.as_str(),
        key_id.unwrap_or("-")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denial_log_line_names_status_code_and_key_id_or_a_dash() {
        assert_eq!(
            denial_log_line("demo", 401, ErrorCode::ApiKeyExpired, Some("cmp_expired")),
            "keygate[demo]: denied status=401 code=API_KEY_EXPIRED key_id=cmp_expired"
        );
        assert_eq!(
            denial_log_line("demo", 401, ErrorCode::TokenMissing, None),
            "keygate[demo]: denied status=401 code=TOKEN_MISSING key_id=-"
        );
    }

    #[test]
    fn unconfigured_reply_is_keyset_unavailable_from_the_codes_table() {
        let reply = unconfigured_reply();
        assert_eq!(reply.status, 503);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["code"], "KEYSET_UNAVAILABLE");
        assert_eq!(
            body["message"],
            ErrorCode::KeysetUnavailable.default_message(Language::En)
        );
        assert!(reply
            .headers
            .contains(&("content-type", "application/json".to_string())));
    }

    #[test]
    fn text_message_with_a_control_character_is_refused_naming_its_code() {
        let overrides = HashMap::from([(ErrorCode::Forbidden, "no\r\nx-evil: 1".to_string())]);
        let err = Replies::render(Language::En, BodyFormat::Text, &overrides, "").unwrap_err();
        assert_eq!(err.code(), ErrorCode::Forbidden);
        assert_eq!(
            err.to_string(),
            "a text message must not contain control characters"
        );
    }
}
