//! The error every configuration parser returns, and the checks several of them share. A leaf:
//! the parsers of each part (credentials, key records, policies, limits, key services) use it
//! without reaching back up to `config`.

use std::fmt;

/// A configuration problem, located by its path in the JSON (`keys[3].secret_sha256`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }

    /// serde_json names unknown or missing fields and the position in its message.
    pub fn from_json(err: serde_json::Error) -> ConfigError {
        ConfigError::new(
            format!("line {} column {}", err.line(), err.column()),
            err.to_string(),
        )
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Whether `text` can be sent as a header value as it is (printable ASCII).
pub fn is_header_value(text: &str) -> bool {
    text.bytes().all(|b| (0x20..0x7f).contains(&b))
}
