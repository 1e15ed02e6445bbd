//! Key checksums: the last characters of a checksummed key are a CRC32 of everything before
//! them, so the filter refuses a mistyped or truncated key before hashing or looking it up, and
//! a secret scanner can tell a real leaked key from random text without asking anyone.
//!
//! The suffix is the CRC-32 (IEEE, as in zlib and PNG) of the key text before it, written as
//! exactly six base62 characters (`0-9A-Za-z`, most significant first, zero-padded). Base62
//! keeps the key one copy-pasteable word and stays inside the base64url alphabet, so an
//! id:secret key's secret remains valid base64url.

/// Length of the checksum suffix: 62^6 > 2^32, so six characters hold any CRC-32.
pub const CHECKSUM_LEN: usize = 6;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The checksum a credential source requires (`"checksum": "crc32"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    Crc32,
}

impl Checksum {
    /// Each checksum by its configuration name.
    pub const NAMES: &'static [(&'static str, Checksum)] = &[("crc32", Checksum::Crc32)];

    /// The suffix for `body` (the key text it will follow).
    pub fn suffix(self, body: &str) -> String {
        match self {
            Checksum::Crc32 => base62_fixed(crc32(body.as_bytes())),
        }
    }

    /// `body` followed by its checksum suffix.
    pub fn append(self, body: &str) -> String {
        let mut out = String::with_capacity(body.len() + CHECKSUM_LEN);
        out.push_str(body);
        out.push_str(&self.suffix(body));
        out
    }

    /// Whether `text` ends with the checksum of the (non-empty) text before it.
    pub fn verify(self, text: &str) -> bool {
        let Some(body_len) = text.len().checked_sub(CHECKSUM_LEN) else {
            return false;
        };
        match text.split_at_checked(body_len) {
            Some((body, sum)) => !body.is_empty() && self.suffix(body) == sum,
            None => false,
        }
    }
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320). Bitwise: keys are short, and this
/// keeps the filter free of a lookup table.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

fn base62_fixed(mut value: u32) -> String {
    let mut digits = [b'0'; CHECKSUM_LEN];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62.get((value % 62) as usize).copied().unwrap_or(b'0');
        value /= 62;
    }
    digits.iter().map(|b| char::from(*b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::codes::ErrorCode;
    use crate::core::config::Config;
    use crate::core::credential::Credential;
    use crate::core::decision::{decide, Decision};
    use crate::core::digest::sha256;
    use crate::core::test_support::{credential_source as source, request_with as req};

    #[test]
    fn crc32_matches_the_standard_check_value() {
        // The CRC-32 catalogue's check value for "123456789".
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn suffix_is_six_base62_characters() {
        assert_eq!(base62_fixed(0), "000000");
        assert_eq!(base62_fixed(61), "00000z");
        assert_eq!(base62_fixed(62), "000010");
        assert_eq!(base62_fixed(u32::MAX), "4gfFC3");
        let sum = Checksum::Crc32.suffix("cmp_anything");
        assert_eq!(sum.len(), CHECKSUM_LEN);
        assert!(sum.bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn appended_checksum_verifies() {
        let key = Checksum::Crc32.append("cmp_9sK2mV8xQ4rT7wY1zB3n");
        assert_eq!(key.len(), "cmp_9sK2mV8xQ4rT7wY1zB3n".len() + CHECKSUM_LEN);
        assert!(Checksum::Crc32.verify(&key));
    }

    #[test]
    fn every_one_character_typo_fails_the_checksum() {
        let key = Checksum::Crc32.append("cmp_9sK2mV8xQ4rT7wY1zB3n");
        for (i, original) in key.char_indices() {
            for replacement in ['a', 'Z', '7', '_'] {
                if replacement == original {
                    continue;
                }
                let mut typo = key.clone();
                typo.replace_range(i..i + 1, &replacement.to_string());
                assert!(!Checksum::Crc32.verify(&typo), "{typo}");
            }
        }
    }

    #[test]
    fn swapped_neighbours_and_truncation_fail_the_checksum() {
        let key = Checksum::Crc32.append("caibo_live_sk_Q4rT7wY1zB3n9sK2mV8x");
        let bytes = key.as_bytes();
        for i in 0..bytes.len() - 1 {
            if bytes[i] == bytes[i + 1] {
                continue;
            }
            let mut swapped = bytes.to_vec();
            swapped.swap(i, i + 1);
            assert!(!Checksum::Crc32.verify(std::str::from_utf8(&swapped).unwrap()));
        }
        assert!(!Checksum::Crc32.verify(&key[..key.len() - 1]));
        assert!(!Checksum::Crc32.verify(&key[1..]));
    }

    /// Replaces the character at `at` with a different one of the same class.
    fn typo(key: &str, at: usize) -> String {
        let mut out = key.to_string();
        let old = &key[at..at + 1];
        let new = if old == "x" { "y" } else { "x" };
        out.replace_range(at..at + 1, new);
        out
    }

    #[test]
    fn checksummed_opaque_key_passes_and_a_typo_is_refused_before_hashing() {
        let s =
            source(serde_json::json!({"in": "header", "prefixes": ["cmp_"], "checksum": "crc32"}));
        let key = Checksum::Crc32.append("cmp_9sK2mV8xQ4rT7wY1zB3n");
        assert_eq!(
            s.extract(&req(&[("x-api-key", &key)])),
            Ok(Some(Credential::Opaque {
                digest: sha256(key.as_bytes()),
                environment: None
            }))
        );
        for at in 4..key.len() {
            assert_eq!(
                s.extract(&req(&[("x-api-key", &typo(&key, at))])),
                Err(ErrorCode::ApiKeyChecksumMismatch)
            );
        }
        // The prefix is still checked first.
        assert_eq!(
            s.extract(&req(&[("x-api-key", &format!("sk_{}", &key[4..]))])),
            Err(ErrorCode::MalformedApiKey)
        );
    }

    #[test]
    fn id_secret_checksum_covers_the_id_and_the_secret() {
        let s = source(serde_json::json!({"in": "bearer", "format": "id_secret",
            "prefixes": ["abk_"], "checksum": "crc32"}));
        let token = Checksum::Crc32.append("abk_a1b2c3:c2VjcmV0LXNlY3JldC1zZWNyZXQ");
        let (id, secret) = token.split_once(':').unwrap();
        assert_eq!(
            s.extract(&req(&[("authorization", &format!("Bearer {token}"))])),
            Ok(Some(Credential::Pair {
                id: id.into(),
                secret_digest: sha256(secret.as_bytes()),
                environment: None
            }))
        );
        for at in [5, id.len() + 3, token.len() - 1] {
            assert_eq!(
                s.extract(&req(&[(
                    "authorization",
                    &format!("Bearer {}", typo(&token, at))
                )])),
                Err(ErrorCode::ApiKeyChecksumMismatch)
            );
        }
    }

    #[test]
    fn header_pair_checksum_covers_the_secret_header() {
        let s = source(serde_json::json!({"in": "header_pair",
            "id_header": "x-key-id", "secret_header": "x-key-secret",
            "prefixes": ["mk_makepay_"], "secret_prefixes": ["mksec_"], "checksum": "crc32"}));
        let secret = Checksum::Crc32.append("mksec_Q4rT7wY1zB3n9sK2mV8x");
        let ok = req(&[("x-key-id", "mk_makepay_1"), ("x-key-secret", &secret)]);
        assert!(matches!(s.extract(&ok), Ok(Some(Credential::Pair { .. }))));
        let bad = req(&[
            ("x-key-id", "mk_makepay_1"),
            ("x-key-secret", &typo(&secret, 9)),
        ]);
        assert_eq!(s.extract(&bad), Err(ErrorCode::ApiKeyChecksumMismatch));
    }

    #[test]
    fn a_source_without_checksum_does_not_check_one() {
        let s = source(serde_json::json!({"in": "header", "prefixes": ["cmp_"]}));
        assert!(s
            .extract(&req(&[("x-api-key", "cmp_no_checksum")]))
            .unwrap()
            .is_some());
    }

    #[test]
    fn unknown_checksum_name_is_refused_by_the_config() {
        let err = Config::parse(br#"{"credentials": [{"in": "header", "checksum": "md5"}]}"#)
            .unwrap_err();
        assert!(err.message.contains("unknown variant `md5`"), "{err}");
    }

    #[test]
    fn a_mistyped_key_is_denied_with_the_checksum_code_not_a_lookup_miss() {
        let key = Checksum::Crc32.append("cmp_9sK2mV8xQ4rT7wY1zB3n");
        let json = serde_json::json!({
            "credentials": [{"in": "header", "prefixes": ["cmp_"], "checksum": "crc32"}],
            "keys": [{"id": "k", "secret_sha256": hex::encode(sha256(key.as_bytes()))}]
        });
        let (config, keys) = Config::parse(json.to_string().as_bytes()).unwrap();
        assert!(matches!(
            decide(&config, &keys, &req(&[("x-api-key", &key)])),
            Decision::Allow { .. }
        ));
        assert_eq!(
            decide(&config, &keys, &req(&[("x-api-key", &typo(&key, 10))])),
            Decision::Deny {
                code: ErrorCode::ApiKeyChecksumMismatch,
                key_id: None
            }
        );
        // A well-formed key that is simply unknown still reaches the lookup.
        let unknown = Checksum::Crc32.append("cmp_unknownunknownunknown");
        assert_eq!(
            decide(&config, &keys, &req(&[("x-api-key", &unknown)])),
            Decision::Deny {
                code: ErrorCode::InvalidApiKey,
                key_id: None
            }
        );
    }

    #[test]
    fn too_short_or_empty_body_fails() {
        assert!(!Checksum::Crc32.verify(""));
        assert!(!Checksum::Crc32.verify("00000"));
        assert!(!Checksum::Crc32.verify(&Checksum::Crc32.suffix("")));
        assert!(!Checksum::Crc32.verify("é00000"));
    }
}
