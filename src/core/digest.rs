//! Secrets become fixed-size SHA-256 digests the moment they arrive; only digests are compared.

use sha2::{Digest as _, Sha256};

pub type Digest = [u8; 32];

pub fn sha256(secret: &[u8]) -> Digest {
    Sha256::digest(secret).into()
}

/// The digest of bytes that arrive in parts (a document fetched in ranges).
#[derive(Debug, Default, Clone)]
pub struct Sha256Stream(Sha256);

impl Sha256Stream {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> Digest {
        self.0.finalize().into()
    }
}

/// Compares two digests without an early exit, so timing does not reveal how many bytes matched.
pub fn digests_equal(a: &Digest, b: &Digest) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    // black_box keeps the optimizer from turning the fold back into a short-circuit compare.
    std::hint::black_box(diff) == 0
}

/// Parses a 64-character hex SHA-256 digest.
pub fn parse_hex_digest(text: &str) -> Option<Digest> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_known_vector() {
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn equal_and_unequal_digests_compare_correctly() {
        let a = sha256(b"one");
        let mut b = a;
        assert!(digests_equal(&a, &b));
        b[31] ^= 1;
        assert!(!digests_equal(&a, &b));
    }

    #[test]
    fn hex_digest_must_be_64_hex_chars() {
        assert!(parse_hex_digest(&"ab".repeat(32)).is_some());
        assert!(parse_hex_digest(&"ab".repeat(31)).is_none());
        assert!(parse_hex_digest(&"zz".repeat(32)).is_none());
    }
}
