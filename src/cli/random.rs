//! The OS random source. Reading `/dev/urandom` needs no crate: it is the kernel CSPRNG on Linux
//! and macOS, never blocks once the system has booted, and is what `getrandom` falls back to.

use std::fs::File;
use std::io::{self, Read};

/// Where key material comes from; tests substitute a fixed sequence.
pub trait RandomSource {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()>;
}

pub struct OsRandom(File);

impl OsRandom {
    pub fn open() -> io::Result<OsRandom> {
        File::open("/dev/urandom").map(OsRandom)
    }
}

impl RandomSource for OsRandom {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_random_fills_the_buffer_with_different_bytes_each_time() {
        let mut rng = OsRandom::open().unwrap();
        let (mut a, mut b) = ([0u8; 32], [0u8; 32]);
        rng.fill(&mut a).unwrap();
        rng.fill(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 32]);
    }
}
