//! New keys in the formats the filter reads, and the key record (digest only) that goes with them.

use std::fmt;
use std::io;

use super::random::RandomSource;
use crate::core::checksum::Checksum;
use crate::core::digest::sha256;
use crate::core::keyset::{is_id_byte, KeyRecordSpec, KeySet, TimeSpec};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Random base62 characters in an opaque key or a split key's secret: 32 × log2(62) ≈ 190 bits.
const SECRET_CHARS: usize = 32;
/// Random bytes behind an id:secret key's base64url secret (43 characters, 256 bits).
const SECRET_BYTES: usize = 32;
/// Random base62 characters in a generated key id: ids are public, they only need to be unique.
const ID_CHARS: usize = 12;

/// How a key is presented, matching a credential source's `format` / `in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One token that is the secret (`x-api-key: cmp_…`); digest of the whole token.
    Opaque,
    /// `<id>:<base64url secret>` (abaco); digest of the part after the first `:`.
    IdSecret,
    /// Key id and secret in two headers (MakePay); digest of the secret header's value.
    Pair,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Opaque => "opaque",
            Shape::IdSecret => "id-secret",
            Shape::Pair => "pair",
        }
    }
}

/// A named preset for one of the shipped API profiles (`envoy/<profile>.yaml`).
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub name: &'static str,
    pub shape: Shape,
    pub prefix: &'static str,
    pub secret_prefix: &'static str,
    /// Set on the record: the environment or product the profile's config expects.
    pub environment: Option<&'static str>,
    pub product: Option<&'static str>,
}

pub const PROFILES: [Profile; 6] = [
    Profile {
        name: "compago",
        shape: Shape::Opaque,
        prefix: "",
        secret_prefix: "",
        environment: None,
        product: None,
    },
    Profile {
        name: "compresr",
        shape: Shape::Opaque,
        prefix: "cmp_",
        secret_prefix: "",
        environment: None,
        product: None,
    },
    Profile {
        name: "abaco",
        shape: Shape::IdSecret,
        prefix: "abk_",
        secret_prefix: "",
        environment: None,
        product: None,
    },
    Profile {
        name: "caibo-test",
        shape: Shape::Opaque,
        prefix: "caibo_test_sk_",
        secret_prefix: "",
        environment: Some("test"),
        product: None,
    },
    Profile {
        name: "caibo-live",
        shape: Shape::Opaque,
        prefix: "caibo_live_sk_",
        secret_prefix: "",
        environment: Some("live"),
        product: None,
    },
    Profile {
        name: "makepay",
        shape: Shape::Pair,
        prefix: "mk_makepay_",
        secret_prefix: "mksec_",
        environment: None,
        product: Some("makepay"),
    },
];

pub fn profile(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// The shape of a key and the fixed parts around its random characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFormat {
    pub shape: Shape,
    /// Prefix of the token (opaque) or of the key id (id-secret, pair).
    pub prefix: String,
    /// Prefix of the secret (id-secret, pair).
    pub secret_prefix: String,
    pub checksum: Option<Checksum>,
}

/// A freshly generated key: what the client sends (shown once) and the record the filter keeps.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// (label, value): `key` for one-token keys; `key id` and `key secret` for split keys.
    pub presented: Vec<(&'static str, String)>,
    /// The key record, validated by the filter's key-set parser as the JSON it is written as.
    pub record: KeyRecordSpec,
}

#[derive(Debug)]
pub enum KeygenError {
    Invalid(String),
    Random(io::Error),
}

impl fmt::Display for KeygenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeygenError::Invalid(why) => f.write_str(why),
            KeygenError::Random(err) => write!(f, "reading the OS random source: {err}"),
        }
    }
}

fn invalid(why: impl Into<String>) -> KeygenError {
    KeygenError::Invalid(why.into())
}

impl KeyFormat {
    /// Refuses formats whose keys the filter could not read with a matching credential source.
    pub fn validate(&self) -> Result<(), KeygenError> {
        if !self
            .prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b':')
        {
            return Err(invalid(
                "--prefix must be printable ASCII without spaces or ':'",
            ));
        }
        match self.shape {
            Shape::Opaque => {
                if !self.secret_prefix.is_empty() {
                    return Err(invalid(
                        "--secret-prefix belongs to the id-secret and pair formats",
                    ));
                }
            }
            Shape::IdSecret | Shape::Pair => {
                if !self.prefix.bytes().all(is_id_byte) {
                    return Err(invalid(
                        "a key id prefix may use only letters, digits, '_', '-' and '.'",
                    ));
                }
                let secret_ok = if self.shape == Shape::IdSecret {
                    // The filter requires the secret of an id:secret token to be base64url.
                    self.secret_prefix
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                } else {
                    self.secret_prefix.bytes().all(|b| b.is_ascii_graphic())
                };
                if !secret_ok {
                    return Err(invalid(format!(
                        "--secret-prefix is not valid in a {} key's secret",
                        self.shape.name()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// `len` characters drawn uniformly from base62 (rejection sampling: bytes ≥ 248 are redrawn,
/// so no character is more likely than another).
pub fn random_base62(rng: &mut dyn RandomSource, len: usize) -> Result<String, KeygenError> {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        rng.fill(&mut buf).map_err(KeygenError::Random)?;
        for b in buf {
            if out.len() == len {
                break;
            }
            if b < 248 {
                if let Some(c) = BASE62.get(usize::from(b % 62)) {
                    out.push(char::from(*c));
                }
            }
        }
    }
    Ok(out)
}

fn random_bytes(rng: &mut dyn RandomSource, len: usize) -> Result<Vec<u8>, KeygenError> {
    let mut buf = vec![0u8; len];
    rng.fill(&mut buf).map_err(KeygenError::Random)?;
    Ok(buf)
}

/// Generates a key in `format` and its record: `fields` as given, with the id and digest set
/// here. `id` is the record's id (for split keys, the id the client sends); without one, a
/// random id is made.
pub fn new_key(
    format: &KeyFormat,
    id: Option<&str>,
    fields: KeyRecordSpec,
    rng: &mut dyn RandomSource,
) -> Result<NewKey, KeygenError> {
    format.validate()?;
    let id = match id {
        Some(id) => id.to_string(),
        None => match format.shape {
            // An opaque key's id is only a label: it must not look like (or leak) the key.
            Shape::Opaque => format!("key-{}", random_base62(rng, ID_CHARS)?),
            Shape::IdSecret | Shape::Pair => {
                format!("{}{}", format.prefix, random_base62(rng, ID_CHARS)?)
            }
        },
    };
    if id.is_empty() || !id.bytes().all(is_id_byte) {
        return Err(invalid(
            "the key id may use only letters, digits, '_', '-' and '.'",
        ));
    }
    if format.shape != Shape::Opaque
        && !(id.len() > format.prefix.len() && id.starts_with(format.prefix.as_str()))
    {
        return Err(invalid(format!(
            "the key id must start with the prefix '{}' and continue after it",
            format.prefix
        )));
    }
    let with_checksum = |body: String| match format.checksum {
        Some(checksum) => checksum.append(&body),
        None => body,
    };
    let (presented, secret) = match format.shape {
        Shape::Opaque => {
            let key = with_checksum(format!(
                "{}{}",
                format.prefix,
                random_base62(rng, SECRET_CHARS)?
            ));
            (vec![("key", key.clone())], key)
        }
        Shape::IdSecret => {
            let secret = URL_SAFE_NO_PAD.encode(random_bytes(rng, SECRET_BYTES)?);
            let token = with_checksum(format!("{id}:{}{secret}", format.secret_prefix));
            let secret = token
                .split_once(':')
                .map(|(_, s)| s.to_string())
                .unwrap_or_default();
            (vec![("key", token)], secret)
        }
        Shape::Pair => {
            let secret = with_checksum(format!(
                "{}{}",
                format.secret_prefix,
                random_base62(rng, SECRET_CHARS)?
            ));
            (
                vec![("key id", id.clone()), ("key secret", secret.clone())],
                secret,
            )
        }
    };
    let record = KeyRecordSpec {
        id,
        secret_sha256: hex::encode(sha256(secret.as_bytes())),
        ..fields
    };
    check_record(&record)?;
    Ok(NewKey { presented, record })
}

/// A time flag as the record format takes it: digits are Unix seconds, anything else RFC 3339
/// text (checked with the record).
pub fn time_spec(text: &str) -> TimeSpec {
    match text.parse::<i64>() {
        Ok(secs) => TimeSpec::Unix(secs),
        Err(_) => TimeSpec::Text(text.to_string()),
    }
}

/// Runs the record, as the JSON it is printed as, through the filter's key-set parser, so a
/// record the filter would refuse is never printed.
fn check_record(record: &KeyRecordSpec) -> Result<(), KeygenError> {
    let text = serde_json::to_string(record).map_err(|e| invalid(e.to_string()))?;
    let doc = format!("{{\"keys\": [{text}]}}");
    KeySet::from_json(doc.as_bytes())
        .map(|_| ())
        .map_err(|err| invalid(format!("the key record would be refused: {err}")))
}

/// The digest the filter computes for a presented key: the whole token (opaque, or the value
/// of a pair's secret header) or the part after the first `:` (id-secret).
pub fn digest_of(shape: Shape, key: &str) -> Result<String, String> {
    let secret = match shape {
        Shape::Opaque | Shape::Pair => key,
        Shape::IdSecret => match key.split_once(':') {
            Some((id, secret)) if !id.is_empty() && !secret.is_empty() => secret,
            _ => return Err("an id-secret key looks like <key id>:<secret>".into()),
        },
    };
    Ok(hex::encode(sha256(secret.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::Config;
    use crate::core::decision::{decide, Decision};
    use crate::core::keyset::Enabled;
    use crate::core::limits::RateLimitSpec;
    use crate::core::request::RequestView;

    /// A deterministic source: 0, 1, 2, … so tests can see rejection sampling at work.
    struct Counter(u8);
    impl RandomSource for Counter {
        fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
            for b in buf {
                *b = self.0;
                self.0 = self.0.wrapping_add(1);
            }
            Ok(())
        }
    }

    fn format(shape: Shape, prefix: &str, secret_prefix: &str) -> KeyFormat {
        KeyFormat {
            shape,
            prefix: prefix.into(),
            secret_prefix: secret_prefix.into(),
            checksum: Some(Checksum::Crc32),
        }
    }

    /// Builds a filter config with `source`, holding `key`'s record, and decides one request.
    fn decide_with(source: serde_json::Value, key: &NewKey, headers: &[(&str, String)]) -> bool {
        let config = serde_json::json!({"credentials": [source], "keys": [key.record]});
        let (config, keys) = Config::parse(config.to_string().as_bytes()).unwrap();
        let req = RequestView {
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            ..Default::default()
        };
        matches!(decide(&config, &keys, &req), Decision::Allow { .. })
    }

    #[test]
    fn base62_sampling_skips_biased_bytes() {
        let mut rng = Counter(246);
        // 246 → 'g'? no: 246 % 62 = 60 → 'y'; 247 → 'z'; 248..=255 redrawn; 0 → '0'.
        assert_eq!(random_base62(&mut rng, 3).unwrap(), "yz0");
    }

    #[test]
    fn opaque_key_is_prefix_random_checksum_and_the_filter_accepts_it() {
        let key = new_key(
            &format(Shape::Opaque, "cmp_", ""),
            None,
            KeyRecordSpec::default(),
            &mut Counter(0),
        )
        .unwrap();
        let token = &key.presented[0].1;
        assert_eq!(token.len(), 4 + SECRET_CHARS + 6);
        assert!(token.starts_with("cmp_"));
        assert!(Checksum::Crc32.verify(token));
        assert!(key.record.id.starts_with("key-"));
        assert_eq!(
            key.record.secret_sha256,
            hex::encode(sha256(token.as_bytes()))
        );
        let source = serde_json::json!({"in": "header", "prefixes": ["cmp_"], "checksum": "crc32"});
        assert!(decide_with(
            source.clone(),
            &key,
            &[("x-api-key", token.clone())]
        ));
        let mut typo = token.clone();
        typo.replace_range(10..11, if &token[10..11] == "a" { "b" } else { "a" });
        assert!(!decide_with(source, &key, &[("x-api-key", typo)]));
    }

    #[test]
    fn id_secret_key_hashes_only_the_secret_and_the_filter_accepts_it() {
        let key = new_key(
            &format(Shape::IdSecret, "abk_", ""),
            Some("abk_partner7"),
            KeyRecordSpec::default(),
            &mut Counter(0),
        )
        .unwrap();
        let token = &key.presented[0].1;
        let (id, secret) = token.split_once(':').unwrap();
        assert_eq!(id, "abk_partner7");
        assert_eq!(secret.len(), 43 + 6);
        assert_eq!(
            key.record.secret_sha256,
            hex::encode(sha256(secret.as_bytes()))
        );
        assert_eq!(
            digest_of(Shape::IdSecret, token).unwrap(),
            key.record.secret_sha256
        );
        let source = serde_json::json!({"in": "bearer", "format": "id_secret",
            "prefixes": ["abk_"], "checksum": "crc32"});
        assert!(decide_with(
            source,
            &key,
            &[("authorization", format!("Bearer {token}"))]
        ));
    }

    #[test]
    fn pair_key_has_an_id_and_a_checksummed_secret_the_filter_accepts() {
        let p = profile("makepay").unwrap();
        let fields = KeyRecordSpec {
            tenant: Some("team-3".into()),
            product: p.product.map(str::to_string),
            ..Default::default()
        };
        let key = new_key(
            &format(p.shape, p.prefix, p.secret_prefix),
            None,
            fields,
            &mut Counter(7),
        )
        .unwrap();
        assert_eq!(key.presented[0], ("key id", key.record.id.clone()));
        let secret = &key.presented[1].1;
        assert!(key.record.id.starts_with("mk_makepay_") && secret.starts_with("mksec_"));
        assert_eq!(key.record.product.as_deref(), Some("makepay"));
        let source = serde_json::json!({"in": "header_pair", "id_header": "x-id",
            "secret_header": "x-secret", "prefixes": ["mk_makepay_"],
            "secret_prefixes": ["mksec_"], "checksum": "crc32"});
        assert!(decide_with(
            source,
            &key,
            &[
                ("x-id", key.record.id.clone()),
                ("x-secret", secret.clone())
            ]
        ));
    }

    #[test]
    fn record_carries_the_given_fields_in_order_and_never_the_secret() {
        let fields = KeyRecordSpec {
            tenant: Some("acme".into()),
            organizations: vec!["o1".into(), "o2".into()],
            permissions: vec!["compress".into()],
            origins: vec!["https://merchant.example".into()],
            user: Some("u1".into()),
            expires_at: Some(time_spec("2030-01-01T00:00:00Z")),
            not_after: Some(time_spec("1900000000")),
            enabled: Enabled(false),
            rate_limit: Some(RateLimitSpec {
                requests: 600,
                per_seconds: 60,
                burst: 120,
            }),
            monthly_budget: Some(100_000),
            ..Default::default()
        };
        let key = new_key(
            &format(Shape::Opaque, "cmp_", ""),
            Some("cmp-prod"),
            fields,
            &mut Counter(0),
        )
        .unwrap();
        let text = serde_json::to_string(&key.record).unwrap();
        assert!(
            text.starts_with(r#"{"id":"cmp-prod","secret_sha256":""#),
            "{text}"
        );
        assert!(text.contains(r#""not_after":1900000000"#), "{text}");
        assert!(text.contains(r#""enabled":false"#), "{text}");
        assert!(
            text.ends_with(
                r#""rate_limit":{"requests":600,"per_seconds":60,"burst":120},"monthly_budget":100000}"#
            ),
            "{text}"
        );
        assert!(
            !text.contains(&key.presented[0].1),
            "the secret must not be in the record"
        );
    }

    #[test]
    fn bad_ids_formats_and_fields_are_refused() {
        let abk = format(Shape::IdSecret, "abk_", "");
        for id in ["partner7", "abk_", "abk_a:b", "abk_ñ"] {
            assert!(
                new_key(&abk, Some(id), KeyRecordSpec::default(), &mut Counter(0)).is_err(),
                "{id}"
            );
        }
        assert!(new_key(
            &format(Shape::IdSecret, "abk_", "s+"),
            None,
            KeyRecordSpec::default(),
            &mut Counter(0)
        )
        .is_err());
        assert!(new_key(
            &format(Shape::Opaque, "cmp_", "x"),
            None,
            KeyRecordSpec::default(),
            &mut Counter(0)
        )
        .is_err());
        assert!(new_key(
            &format(Shape::Opaque, "a b", ""),
            None,
            KeyRecordSpec::default(),
            &mut Counter(0)
        )
        .is_err());
        let bad_origin = KeyRecordSpec {
            origins: vec!["merchant.example".into()],
            ..Default::default()
        };
        let err = new_key(
            &format(Shape::Opaque, "", ""),
            None,
            bad_origin,
            &mut Counter(0),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("keys[0].origins[0]"), "{err}");
    }

    #[test]
    fn digest_of_matches_what_the_filter_hashes() {
        assert_eq!(
            digest_of(Shape::Opaque, "cmp_abc").unwrap(),
            hex::encode(sha256(b"cmp_abc"))
        );
        assert_eq!(
            digest_of(Shape::IdSecret, "abk_1:c2Vj:cmV0").unwrap(),
            hex::encode(sha256(b"c2Vj:cmV0"))
        );
        assert!(digest_of(Shape::IdSecret, "no-colon").is_err());
    }
}
