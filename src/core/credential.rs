//! Credential extraction: finds the API key a request carries, checks its shape and prefix,
//! and hashes its secret on arrival. Nothing here looks a key up.

use serde_json::Value;

use super::checksum::Checksum;
use super::codes::ErrorCode;
use super::config_error::ConfigError;
use super::digest::{sha256, Digest};
use super::json_fields::{self, Fields};
use super::keyset::is_id_byte;
use super::request::{trim_ascii, RequestView};

/// Longest credential accepted. Real keys are far shorter; anything longer is refused before
/// hashing so a 60 KiB header costs nothing.
pub const MAX_TOKEN_LEN: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// The whole header value is the token (`x-api-key: <token>`).
    Header,
    /// `Authorization: Bearer <token>` (header name configurable).
    Bearer,
    /// `?name=<token>`: opt-in, query strings end up in access logs.
    Query,
    /// `Cookie: name=<token>`: opt-in, cookies are sent by browsers automatically.
    Cookie,
    /// Key id and secret in two headers (`x-makecrypto-key-id` + `x-makecrypto-key-secret`).
    HeaderPair,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenFormat {
    /// The token is the secret; the key is found by its digest.
    #[default]
    Opaque,
    /// `<key id>:<secret>`, split at the first `:`; the secret is base64url.
    IdSecret,
}

/// An accepted prefix, optionally naming the environment it implies.
#[derive(Debug, Clone)]
pub enum PrefixSpec {
    Plain(String),
    WithEnvironment { prefix: String, environment: String },
}

/// One entry of `credentials`.
#[derive(Debug, Clone)]
pub struct CredentialSpec {
    /// `in`: where the credential is.
    pub location: Location,
    /// Header, query parameter or cookie name. Defaults: `x-api-key`, `authorization`.
    pub name: Option<String>,
    pub id_header: Option<String>,
    pub secret_header: Option<String>,
    pub format: TokenFormat,
    /// Accepted prefixes of the token (opaque) or of the key id (id:secret, header pair).
    pub prefixes: Vec<PrefixSpec>,
    /// Accepted prefixes of the secret (header pair, id:secret).
    pub secret_prefixes: Vec<String>,
    /// Keys end with a checksum of the text before it (`"crc32"`), verified before any lookup.
    pub checksum: Option<Checksum>,
}

const LOCATIONS: &[(&str, Location)] = &[
    ("header", Location::Header),
    ("bearer", Location::Bearer),
    ("query", Location::Query),
    ("cookie", Location::Cookie),
    ("header_pair", Location::HeaderPair),
];

const FORMATS: &[(&str, TokenFormat)] = &[
    ("opaque", TokenFormat::Opaque),
    ("id_secret", TokenFormat::IdSecret),
];

impl CredentialSpec {
    const FIELDS: &'static [&'static str] = &[
        "in",
        "name",
        "id_header",
        "secret_header",
        "format",
        "prefixes",
        "secret_prefixes",
        "checksum",
    ];

    pub fn decode(value: &Value, path: &str) -> Result<CredentialSpec, ConfigError> {
        let fields = Fields::of(value, path, Self::FIELDS)?;
        let prefixes_path = fields.path_of("prefixes");
        Ok(CredentialSpec {
            location: fields
                .variant("in", LOCATIONS)?
                .ok_or_else(|| fields.missing("in"))?,
            name: fields.string("name")?,
            id_header: fields.string("id_header")?,
            secret_header: fields.string("secret_header")?,
            format: fields.variant("format", FORMATS)?.unwrap_or_default(),
            prefixes: fields
                .array("prefixes")?
                .iter()
                .enumerate()
                .map(|(i, p)| PrefixSpec::decode(p, &format!("{prefixes_path}[{i}]")))
                .collect::<Result<_, _>>()?,
            secret_prefixes: fields.strings("secret_prefixes")?,
            checksum: fields.variant("checksum", Checksum::NAMES)?,
        })
    }
}

impl PrefixSpec {
    fn decode(value: &Value, path: &str) -> Result<PrefixSpec, ConfigError> {
        if let Value::String(prefix) = value {
            return Ok(PrefixSpec::Plain(prefix.clone()));
        }
        if !value.is_object() {
            return Err(json_fields::invalid_type(
                path,
                value,
                "a prefix or {\"prefix\", \"environment\"}",
            ));
        }
        let fields = Fields::of(value, path, &["prefix", "environment"])?;
        Ok(PrefixSpec::WithEnvironment {
            prefix: fields.required_string("prefix")?,
            environment: fields.required_string("environment")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixRule {
    pub prefix: String,
    pub environment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Header(String),
    Bearer(String),
    Query(String),
    Cookie(String),
    HeaderPair { id: String, secret: String },
}

/// One enabled credential scheme, validated at configure time.
#[derive(Debug, Clone)]
pub struct CredentialSource {
    pub place: Place,
    pub format: TokenFormat,
    pub prefixes: Vec<PrefixRule>,
    pub secret_prefixes: Vec<String>,
    pub checksum: Option<Checksum>,
}

/// A credential as presented, with its secret already reduced to a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Opaque {
        digest: Digest,
        environment: Option<String>,
    },
    Pair {
        id: String,
        secret_digest: Digest,
        environment: Option<String>,
    },
}

impl Credential {
    /// The digest of the presented secret: what the key record's `secret_sha256` must equal.
    pub fn digest(&self) -> &Digest {
        match self {
            Credential::Opaque { digest, .. } => digest,
            Credential::Pair { secret_digest, .. } => secret_digest,
        }
    }

    pub fn environment(&self) -> Option<&str> {
        match self {
            Credential::Opaque { environment, .. } | Credential::Pair { environment, .. } => {
                environment.as_deref()
            }
        }
    }
}

fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_'))
}

fn header_name(raw: Option<String>, default: &str, path: &str) -> Result<String, ConfigError> {
    let name = raw
        .unwrap_or_else(|| default.to_string())
        .to_ascii_lowercase();
    if name.is_empty() {
        return Err(ConfigError::new(path, "a name is required"));
    }
    if !valid_header_name(&name) {
        return Err(ConfigError::new(
            path,
            "expected a header name of letters, digits and '-'",
        ));
    }
    Ok(name)
}

impl CredentialSource {
    pub fn from_spec(spec: CredentialSpec, path: &str) -> Result<CredentialSource, ConfigError> {
        let name_path = format!("{path}.name");
        if spec.location != Location::HeaderPair
            && (spec.id_header.is_some() || spec.secret_header.is_some())
        {
            return Err(ConfigError::new(
                format!("{path}.id_header"),
                "id_header and secret_header belong to \"in\": \"header_pair\"",
            ));
        }
        let place = match spec.location {
            Location::Header => Place::Header(header_name(spec.name, "x-api-key", &name_path)?),
            Location::Bearer => Place::Bearer(header_name(spec.name, "authorization", &name_path)?),
            Location::Query | Location::Cookie => {
                let name = spec.name.unwrap_or_default();
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ConfigError::new(
                        name_path,
                        "a parameter or cookie name is required",
                    ));
                }
                if spec.location == Location::Query {
                    Place::Query(name)
                } else {
                    Place::Cookie(name)
                }
            }
            Location::HeaderPair => Place::HeaderPair {
                id: header_name(spec.id_header, "", &format!("{path}.id_header"))?,
                secret: header_name(spec.secret_header, "", &format!("{path}.secret_header"))?,
            },
        };
        if spec.location == Location::HeaderPair && spec.format == TokenFormat::IdSecret {
            return Err(ConfigError::new(
                format!("{path}.format"),
                "a header pair carries id and secret separately; use the default format",
            ));
        }
        let mut prefixes = Vec::with_capacity(spec.prefixes.len());
        for (i, p) in spec.prefixes.into_iter().enumerate() {
            let (prefix, environment) = match p {
                PrefixSpec::Plain(prefix) => (prefix, None),
                PrefixSpec::WithEnvironment {
                    prefix,
                    environment,
                } => (prefix, Some(environment)),
            };
            if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                return Err(ConfigError::new(
                    format!("{path}.prefixes[{i}]"),
                    "a prefix must be non-empty printable ASCII without ':'",
                ));
            }
            prefixes.push(PrefixRule {
                prefix,
                environment,
            });
        }
        for (i, p) in spec.secret_prefixes.iter().enumerate() {
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::new(
                    format!("{path}.secret_prefixes[{i}]"),
                    "a prefix must be non-empty printable ASCII",
                ));
            }
        }
        Ok(CredentialSource {
            place,
            format: spec.format,
            prefixes,
            secret_prefixes: spec.secret_prefixes,
            checksum: spec.checksum,
        })
    }

    /// The header names this source reads (stripped before the request goes upstream).
    pub fn header_names(&self) -> Vec<&str> {
        match &self.place {
            Place::Header(h) | Place::Bearer(h) => vec![h.as_str()],
            Place::HeaderPair { id, secret } => vec![id.as_str(), secret.as_str()],
            Place::Query(_) | Place::Cookie(_) => Vec::new(),
        }
    }

    /// A key used to refuse two sources reading the same place.
    pub fn place_key(&self) -> Vec<String> {
        match &self.place {
            Place::Header(h) | Place::Bearer(h) => vec![format!("header {h}")],
            Place::HeaderPair { id, secret } => {
                vec![format!("header {id}"), format!("header {secret}")]
            }
            Place::Query(q) => vec![format!("query {q}")],
            Place::Cookie(c) => vec![format!("cookie {c}")],
        }
    }

    /// Finds this source's credential in the request: `Ok(None)` when it is not there.
    pub fn extract(&self, req: &RequestView) -> Result<Option<Credential>, ErrorCode> {
        match &self.place {
            Place::Header(name) => match single_value(header_items(req, name))? {
                None => Ok(None),
                Some(token) => self.parse_token(token).map(Some),
            },
            Place::Bearer(name) => {
                let tokens = header_items(req, name).filter_map(bearer_token);
                match single_value(tokens)? {
                    None => Ok(None),
                    Some(token) => self.parse_token(token).map(Some),
                }
            }
            Place::Query(param) => {
                let values = req.query_values(param);
                if values.iter().any(Option::is_none) {
                    return Err(ErrorCode::MalformedApiKey);
                }
                let values = values.iter().flatten().map(|v| v.as_bytes());
                match single_value(values)? {
                    None => Ok(None),
                    Some(token) => self.parse_token(token).map(Some),
                }
            }
            Place::Cookie(cookie) => match single_value(req.cookie_values(cookie))? {
                None => Ok(None),
                Some(token) => self.parse_token(token).map(Some),
            },
            Place::HeaderPair { id, secret } => {
                let ids = header_items(req, id);
                let secrets = header_items(req, secret);
                match (single_value(ids)?, single_value(secrets)?) {
                    (None, None) => Ok(None),
                    (Some(_), None) | (None, Some(_)) => Err(ErrorCode::IncompleteApiKey),
                    (Some(id), Some(secret)) => self.parse_pair(id, secret, None).map(Some),
                }
            }
        }
    }

    fn parse_token(&self, token: &[u8]) -> Result<Credential, ErrorCode> {
        let token = visible_ascii(token)?;
        match self.format {
            TokenFormat::Opaque => {
                let environment = self.check_prefix(token)?;
                self.check_checksum(token)?;
                Ok(Credential::Opaque {
                    digest: sha256(token.as_bytes()),
                    environment,
                })
            }
            TokenFormat::IdSecret => {
                let (id, secret) = token.split_once(':').ok_or(ErrorCode::MalformedApiKey)?;
                if !is_base64url(secret) {
                    return Err(ErrorCode::MalformedApiKey);
                }
                self.parse_pair(id.as_bytes(), secret.as_bytes(), Some(token))
            }
        }
    }

    /// `token` is the whole `<id>:<secret>` text when the pair came as one token: its checksum
    /// covers the id too. A header pair's checksum covers the secret header's value.
    fn parse_pair(
        &self,
        id: &[u8],
        secret: &[u8],
        token: Option<&str>,
    ) -> Result<Credential, ErrorCode> {
        let id = visible_ascii(id)?;
        let secret = visible_ascii(secret)?;
        if !id.bytes().all(is_id_byte) {
            return Err(ErrorCode::MalformedApiKey);
        }
        let environment = self.check_prefix(id)?;
        if !self.secret_prefixes.is_empty()
            && !self
                .secret_prefixes
                .iter()
                .any(|p| secret.starts_with(p.as_str()))
        {
            return Err(ErrorCode::MalformedApiKey);
        }
        self.check_checksum(token.unwrap_or(secret))?;
        Ok(Credential::Pair {
            id: id.to_string(),
            secret_digest: sha256(secret.as_bytes()),
            environment,
        })
    }

    /// A mistyped key fails its checksum before it is hashed or looked up.
    fn check_checksum(&self, text: &str) -> Result<(), ErrorCode> {
        match self.checksum {
            Some(checksum) if !checksum.verify(text) => Err(ErrorCode::ApiKeyChecksumMismatch),
            _ => Ok(()),
        }
    }

    /// A wrong prefix is refused before any lookup; the matching prefix may name an environment.
    fn check_prefix(&self, text: &str) -> Result<Option<String>, ErrorCode> {
        if self.prefixes.is_empty() {
            return Ok(None);
        }
        self.prefixes
            .iter()
            .filter(|p| text.len() > p.prefix.len() && text.starts_with(p.prefix.as_str()))
            .max_by_key(|p| p.prefix.len())
            .map(|p| p.environment.clone())
            .ok_or(ErrorCode::MalformedApiKey)
    }
}

/// Each value of a header, split on `,` because Envoy joins repeated headers with commas.
fn header_items<'a>(req: &'a RequestView, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    req.header_values(name)
        .flat_map(|value| value.split(|b| *b == b',').map(trim_ascii))
}

/// At most one distinct value: the same credential sent twice is fine, two different ones are not.
/// Read as it comes: nothing is collected for the usual single value.
fn single_value<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Option<&'a [u8]>, ErrorCode> {
    let mut values = values.into_iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.any(|v| v != first) {
        return Err(ErrorCode::ConflictingCredentials);
    }
    Ok(Some(first))
}

/// The token of `Bearer <token>`; `None` for other schemes, which are not keygate's to judge.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    match rest.first() {
        None | Some(b' ' | b'\t') => Some(trim_ascii(rest)),
        Some(_) => None, // e.g. "Bearerx" or "Bearer:": a different scheme name
    }
}

fn visible_ascii(bytes: &[u8]) -> Result<&str, ErrorCode> {
    if bytes.is_empty() || bytes.len() > MAX_TOKEN_LEN || !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(ErrorCode::MalformedApiKey);
    }
    std::str::from_utf8(bytes).map_err(|_| ErrorCode::MalformedApiKey)
}

fn is_base64url(text: &str) -> bool {
    let body = text.trim_end_matches('=');
    !body.is_empty()
        && text.len() - body.len() <= 2
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Runs every enabled source. Two different credentials in one request are refused: never guess.
pub fn extract_credential(
    sources: &[CredentialSource],
    req: &RequestView,
) -> Result<Option<Credential>, ErrorCode> {
    let mut found: Option<Credential> = None;
    let mut failure: Option<ErrorCode> = None;
    for source in sources {
        match source.extract(req) {
            Ok(None) => {}
            Ok(Some(credential)) => match &found {
                Some(existing) if *existing != credential => {
                    return Err(ErrorCode::ConflictingCredentials)
                }
                Some(_) => {}
                None => found = Some(credential),
            },
            Err(code) => {
                failure.get_or_insert(code);
            }
        }
    }
    match (found, failure) {
        // A broken credential next to a good one is still two different credentials.
        (Some(_), Some(_)) => Err(ErrorCode::ConflictingCredentials),
        (_, Some(code)) => Err(code),
        (found, None) => Ok(found),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::test_support::{credential_source as source, request_with};

    /// Values as bytes: some tests send what is not UTF-8.
    fn req(headers: &[(&str, &[u8])]) -> RequestView {
        request_with(headers)
    }

    #[test]
    fn opaque_key_is_hashed_whole_and_prefix_checked() {
        let s = source(serde_json::json!({"in": "header", "prefixes": ["cmp_"]}));
        let got = s.extract(&req(&[("x-api-key", b"cmp_abc")])).unwrap();
        assert_eq!(
            got,
            Some(Credential::Opaque {
                digest: sha256(b"cmp_abc"),
                environment: None
            })
        );
        assert_eq!(
            s.extract(&req(&[("x-api-key", b"sk_abc")])),
            Err(ErrorCode::MalformedApiKey)
        );
        assert_eq!(
            s.extract(&req(&[("x-api-key", b"cmp_")])),
            Err(ErrorCode::MalformedApiKey)
        );
    }

    #[test]
    fn prefix_names_the_environment() {
        let s = source(serde_json::json!({"in": "header", "prefixes": [
            {"prefix": "caibo_test_sk_", "environment": "test"},
            {"prefix": "caibo_live_sk_", "environment": "live"}]}));
        let got = s
            .extract(&req(&[("x-api-key", b"caibo_test_sk_1")]))
            .unwrap();
        assert_eq!(
            got.and_then(|c| c.environment().map(str::to_string)),
            Some("test".into())
        );
    }

    #[test]
    fn id_secret_splits_at_first_colon_and_hashes_the_secret() {
        let s = source(
            serde_json::json!({"in": "bearer", "format": "id_secret", "prefixes": ["abk_"]}),
        );
        let got = s
            .extract(&req(&[("authorization", b"Bearer abk_1:c2VjcmV0")]))
            .unwrap();
        assert_eq!(
            got,
            Some(Credential::Pair {
                id: "abk_1".into(),
                secret_digest: sha256(b"c2VjcmV0"),
                environment: None
            })
        );
        for bad in [
            b"Bearer abk_1:a:b".as_slice(),
            b"Bearer :secret",
            b"Bearer abk_1:",
            b"Bearer",
            b"Bearer    ",
            b"Bearer abk_1",
            b"Bearer xyz_1:abc",
            b"Bearer abk_1:s\xffx",
        ] {
            assert_eq!(
                s.extract(&req(&[("authorization", bad)])),
                Err(ErrorCode::MalformedApiKey),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        for not_bearer in [
            b"Basic dXNlcg==".as_slice(),
            b"Bearer:abk_1:c2VjcmV0",
            b"Bearerabk_1:c2VjcmV0",
            b"Beare",
            b"",
            b"\xff\xfe\xfd\xfc\xfb\xfa\xf9",
        ] {
            assert_eq!(
                s.extract(&req(&[("authorization", not_bearer)])),
                Ok(None),
                "{}",
                String::from_utf8_lossy(not_bearer)
            );
        }
        for spaced in [
            b"Bearer\tabk_1:c2VjcmV0".as_slice(),
            b"BEARER   abk_1:c2VjcmV0  ",
        ] {
            assert!(s
                .extract(&req(&[("authorization", spaced)]))
                .unwrap()
                .is_some());
        }
    }

    #[test]
    fn repeated_header_with_different_values_conflicts() {
        let s = source(serde_json::json!({"in": "header"}));
        assert_eq!(
            s.extract(&req(&[("x-api-key", b"a1"), ("x-api-key", b"b2")])),
            Err(ErrorCode::ConflictingCredentials)
        );
        assert!(s
            .extract(&req(&[("x-api-key", b"a1"), ("x-api-key", b"a1")]))
            .unwrap()
            .is_some());
        assert_eq!(
            s.extract(&req(&[("x-api-key", b"a1,b2")])),
            Err(ErrorCode::ConflictingCredentials)
        );
    }

    #[test]
    fn header_pair_needs_both_halves() {
        let s = source(serde_json::json!({"in": "header_pair",
            "id_header": "x-makecrypto-key-id", "secret_header": "x-makecrypto-key-secret",
            "prefixes": ["mk_makepay_"], "secret_prefixes": ["mksec_"]}));
        assert_eq!(
            s.extract(&req(&[("x-makecrypto-key-id", b"mk_makepay_1")])),
            Err(ErrorCode::IncompleteApiKey)
        );
        assert_eq!(
            s.extract(&req(&[
                ("x-makecrypto-key-id", b"mk_makepay_1"),
                ("x-makecrypto-key-secret", b"nope_1")
            ])),
            Err(ErrorCode::MalformedApiKey)
        );
        let ok = s
            .extract(&req(&[
                ("x-makecrypto-key-id", b"mk_makepay_1"),
                ("x-makecrypto-key-secret", b"mksec_abc"),
            ]))
            .unwrap();
        assert!(matches!(ok, Some(Credential::Pair { .. })));
    }

    #[test]
    fn oversized_and_empty_values_are_malformed() {
        let s = source(serde_json::json!({"in": "header"}));
        let big = vec![b'a'; 16 * 1024];
        assert_eq!(
            s.extract(&req(&[("x-api-key", &big)])),
            Err(ErrorCode::MalformedApiKey)
        );
        assert_eq!(
            s.extract(&req(&[("x-api-key", b"")])),
            Err(ErrorCode::MalformedApiKey)
        );
    }

    #[test]
    fn two_schemes_disagreeing_conflict_and_agreeing_pass() {
        let sources = vec![
            source(serde_json::json!({"in": "bearer", "format": "id_secret"})),
            source(serde_json::json!({"in": "header", "format": "id_secret"})),
        ];
        let agree = req(&[
            ("authorization", b"Bearer k1:abc"),
            ("x-api-key", b"k1:abc"),
        ]);
        assert!(extract_credential(&sources, &agree).unwrap().is_some());
        let disagree = req(&[
            ("authorization", b"Bearer k1:abc"),
            ("x-api-key", b"k2:abc"),
        ]);
        assert_eq!(
            extract_credential(&sources, &disagree),
            Err(ErrorCode::ConflictingCredentials)
        );
        let one_broken = req(&[("authorization", b"Bearer k1:abc"), ("x-api-key", b"junk")]);
        assert_eq!(
            extract_credential(&sources, &one_broken),
            Err(ErrorCode::ConflictingCredentials)
        );
        assert_eq!(extract_credential(&sources, &req(&[])), Ok(None));
    }
}
