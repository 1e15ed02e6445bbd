//! Where the key service is asked: the check every configured request path passes, the path
//! templates of lookup on miss, and the key a request is looked up by (which a template renders).

use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::core::credential::Credential;
use crate::core::digest::{parse_hex_digest, Digest};

/// A request path for the key service: printable ASCII, no spaces, starting with `/`.
pub fn is_request_path(path: &str) -> bool {
    path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic())
}

pub(super) const TAG_LEN: usize = 16;
pub(super) type Tag = [u8; TAG_LEN];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateKind {
    /// Opaque keys, found by the digest of the whole key.
    Digest,
    /// id:secret and split keys, found by their id.
    Id,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Text(String),
    /// The first `n` hex characters of the digest (64: all of it).
    Digest(usize),
    Id,
}

/// Why a path template was refused (the configuration names the field it came from).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    NotARequestPath,
    UnclosedBrace,
    StrayClosingBrace,
    /// `{digest:N}` with `N` outside 1 to 64 (the placeholder as written).
    DigestLength(String),
    /// A placeholder this kind of template does not know (its name as written).
    UnknownPlaceholder(TemplateKind, String),
    NoPlaceholder(TemplateKind),
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateError::NotARequestPath => {
                f.write_str("must start with '/' and be printable ASCII without spaces")
            }
            TemplateError::UnclosedBrace => f.write_str("an unclosed '{'"),
            TemplateError::StrayClosingBrace => f.write_str("a '}' without '{'"),
            TemplateError::DigestLength(name) => {
                write!(f, "'{{{name}}}': N of {{digest:N}} is 1 to 64")
            }
            TemplateError::UnknownPlaceholder(TemplateKind::Digest, name) => write!(
                f,
                "unknown placeholder '{{{name}}}' (use {{digest}} or {{digest:N}})"
            ),
            TemplateError::UnknownPlaceholder(TemplateKind::Id, name) => {
                write!(f, "unknown placeholder '{{{name}}}' (use {{id}})")
            }
            TemplateError::NoPlaceholder(TemplateKind::Digest) => {
                f.write_str("needs a {digest} or {digest:N} placeholder")
            }
            TemplateError::NoPlaceholder(TemplateKind::Id) => {
                f.write_str("needs an {id} placeholder")
            }
        }
    }
}

impl std::error::Error for TemplateError {}

/// A request path with placeholders, validated at configure time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    text: String,
    segments: Vec<Segment>,
}

impl PathTemplate {
    pub fn parse(text: &str, kind: TemplateKind) -> Result<PathTemplate, TemplateError> {
        if !is_request_path(text) {
            return Err(TemplateError::NotARequestPath);
        }
        let mut segments = Vec::new();
        let mut rest = text;
        while let Some((before, after)) = rest.split_once('{') {
            let (name, tail) = after.split_once('}').ok_or(TemplateError::UnclosedBrace)?;
            if before.contains('}') {
                return Err(TemplateError::StrayClosingBrace);
            }
            if !before.is_empty() {
                segments.push(Segment::Text(before.to_string()));
            }
            segments.push(match (kind, name) {
                (TemplateKind::Digest, "digest") => Segment::Digest(64),
                (TemplateKind::Digest, _) if name.starts_with("digest:") => {
                    let n = name
                        .strip_prefix("digest:")
                        .and_then(|n| n.parse::<usize>().ok())
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| TemplateError::DigestLength(name.to_string()))?;
                    Segment::Digest(n)
                }
                (TemplateKind::Id, "id") => Segment::Id,
                (kind, _) => return Err(TemplateError::UnknownPlaceholder(kind, name.to_string())),
            });
            rest = tail;
        }
        if rest.contains('}') {
            return Err(TemplateError::StrayClosingBrace);
        }
        if !rest.is_empty() {
            segments.push(Segment::Text(rest.to_string()));
        }
        let placeholders = segments
            .iter()
            .filter(|s| !matches!(s, Segment::Text(_)))
            .count();
        if placeholders == 0 {
            return Err(TemplateError::NoPlaceholder(kind));
        }
        // A shard path ({digest:N} alone) is fine: the file is then a key-set document.
        Ok(PathTemplate {
            text: text.to_string(),
            segments,
        })
    }

    /// The template as configured.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub(super) fn render(&self, key: &LookupKey) -> String {
        let digest_hex = match key {
            LookupKey::Digest(d) => hex::encode(d),
            LookupKey::Id(_) => String::new(),
        };
        let mut out = String::with_capacity(self.text.len() + 64);
        for segment in &self.segments {
            match (segment, key) {
                (Segment::Text(t), _) => out.push_str(t),
                (Segment::Digest(n), LookupKey::Digest(_)) => {
                    out.push_str(digest_hex.get(..*n).unwrap_or(&digest_hex))
                }
                (Segment::Id, LookupKey::Id(id)) => out.push_str(id),
                // Templates are parsed for one kind of key; nothing else reaches here.
                _ => {}
            }
        }
        out
    }
}

/// What a request's key is looked up by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LookupKey {
    Digest(Digest),
    Id(String),
}

impl LookupKey {
    pub fn of(credential: &Credential) -> LookupKey {
        match credential {
            Credential::Opaque { digest, .. } => LookupKey::Digest(*digest),
            Credential::Pair { id, .. } => LookupKey::Id(id.clone()),
        }
    }

    pub(super) fn tag(&self, namespace: &str) -> Tag {
        let mut hasher = Sha256::new().chain_update(namespace.as_bytes());
        hasher = match self {
            LookupKey::Digest(d) => hasher.chain_update(b"\0d\0").chain_update(d),
            LookupKey::Id(id) => hasher.chain_update(b"\0i\0").chain_update(id.as_bytes()),
        };
        let digest = hasher.finalize();
        let mut tag = [0u8; TAG_LEN];
        for (t, d) in tag.iter_mut().zip(digest.iter()) {
            *t = *d;
        }
        tag
    }

    pub(super) fn matches(&self, candidate: &Value) -> bool {
        match self {
            LookupKey::Digest(d) => candidate
                .get("secret_sha256")
                .and_then(Value::as_str)
                .and_then(parse_hex_digest)
                .is_some_and(|found| found == *d),
            LookupKey::Id(id) => candidate.get("id").and_then(Value::as_str) == Some(id.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_templates_are_refused() {
        for (text, kind) in [
            ("/keys/{digest", TemplateKind::Digest),
            ("/keys/{id}.json", TemplateKind::Digest),
            ("/keys/{digest:0}.json", TemplateKind::Digest),
            ("/keys/{digest:65}.json", TemplateKind::Digest),
            ("/keys/static.json", TemplateKind::Digest),
            ("keys/{id}", TemplateKind::Id),
            ("/keys/{id}}", TemplateKind::Id),
            ("/keys/{digest}", TemplateKind::Id),
            ("/keys/ {id}", TemplateKind::Id),
        ] {
            assert!(PathTemplate::parse(text, kind).is_err(), "{text}");
        }
        assert!(PathTemplate::parse("/shards/{digest:3}.json", TemplateKind::Digest).is_ok());
    }

    #[test]
    fn a_refused_template_says_what_is_wrong_with_it() {
        use TemplateKind::{Digest, Id};
        for (text, kind, message) in [
            (
                "keys/{id}",
                Id,
                "must start with '/' and be printable ASCII without spaces",
            ),
            ("/keys/{digest", Digest, "an unclosed '{'"),
            ("/keys/{id}}", Id, "a '}' without '{'"),
            (
                "/keys/{digest:65}",
                Digest,
                "'{digest:65}': N of {digest:N} is 1 to 64",
            ),
            (
                "/keys/{id}",
                Digest,
                "unknown placeholder '{id}' (use {digest} or {digest:N})",
            ),
            (
                "/keys/{digest}",
                Id,
                "unknown placeholder '{digest}' (use {id})",
            ),
            (
                "/keys/static.json",
                Digest,
                "needs a {digest} or {digest:N} placeholder",
            ),
            ("/keys/x", Id, "needs an {id} placeholder"),
        ] {
            let refused = PathTemplate::parse(text, kind).unwrap_err();
            assert_eq!(refused.to_string(), message, "{text}");
        }
    }
}
