//! The shared store every worker sees (Envoy's shared data in the wasm filter, a process-wide
//! map in the native module, a `MemoryStore` in tests), how its values are read, and the one
//! compare-and-swap loop every read-modify-write goes through.

/// A map shared by every worker, with a compare-and-swap token per value.
pub trait SharedStore {
    /// The value and its compare-and-swap token, or `None` when the key is absent.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value` if the stored token is still `cas` (`0` writes unconditionally).
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Another writer got there first: read again and retry.
    CasMismatch,
    /// The store refused the write for another reason.
    Unavailable,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreError::CasMismatch => "another writer changed the value since it was read",
            StoreError::Unavailable => "the shared store refused the write",
        })
    }
}

impl std::error::Error for StoreError {}

/// What a read-modify-write makes of the value it read.
pub enum Change<T> {
    /// Write this value (if nobody wrote since the read), then return `T`.
    Write(Vec<u8>, T),
    /// Nothing to write: return `T` now.
    Keep(T),
    /// The key is absent: create it with this value and read again. A write to an absent key
    /// ignores the token, so a creation race is settled by reading back, not by the write.
    Create(Vec<u8>),
}

/// Reads `key`, asks `change` what to make of its value (`None`: absent) and writes the result
/// with compare-and-swap, up to `attempts` times. `Err(CasMismatch)`: every attempt lost a race;
/// `Err(Unavailable)`: the store refused a write.
pub fn cas_update<T>(
    store: &dyn SharedStore,
    key: &str,
    attempts: usize,
    mut change: impl FnMut(Option<&[u8]>) -> Change<T>,
) -> Result<T, StoreError> {
    for _ in 0..attempts {
        let current = store.get(key);
        let cas = current.as_ref().map_or(0, |(_, cas)| *cas);
        match change(current.as_ref().map(|(bytes, _)| bytes.as_slice())) {
            Change::Keep(result) => return Ok(result),
            Change::Write(value, result) => match store.set(key, &value, cas) {
                Ok(()) => return Ok(result),
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Unavailable) => return Err(StoreError::Unavailable),
            },
            Change::Create(value) => store.set(key, &value, 0)?,
        }
    }
    Err(StoreError::CasMismatch)
}

/// Reads little-endian fields from a shared-data value without indexing (values may be
/// truncated or written by another version).
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    pub(crate) fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    pub(crate) fn rest(self) -> &'a [u8] {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::memory_store::MemoryStore;

    fn bump(store: &dyn SharedStore, attempts: usize) -> Result<u8, StoreError> {
        cas_update(store, "n", attempts, |value| {
            let next = value.and_then(|v| v.first().copied()).unwrap_or(0) + 1;
            Change::Write(vec![next], next)
        })
    }

    #[test]
    fn an_update_reads_modifies_and_writes_an_absent_or_present_key() {
        let store = MemoryStore::new();
        assert_eq!(bump(&store, 1), Ok(1));
        assert_eq!(bump(&store, 1), Ok(2));
        assert_eq!(store.get("n").map(|(v, _)| v), Some(vec![2]));
    }

    /// Another writer changes the key between every read and write, `races` times.
    struct Racing {
        inner: MemoryStore,
        races: std::cell::Cell<u32>,
    }

    impl SharedStore for Racing {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
            if self.races.get() > 0 {
                self.races.set(self.races.get() - 1);
                let (other, _) = self.inner.get(key).unwrap_or_default();
                let next = other.first().copied().unwrap_or(0) + 10;
                self.inner.set(key, &[next], 0)?;
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn a_lost_race_is_retried_on_the_new_value_and_persistent_contention_gives_up() {
        let store = Racing {
            inner: MemoryStore::new(),
            races: std::cell::Cell::new(0),
        };
        store.inner.set("n", &[1], 0).unwrap();
        store.races.set(2);
        // Two lost races (each adds 10), then the third attempt counts on top of them.
        assert_eq!(bump(&store, 3), Ok(22));
        store.races.set(3);
        assert_eq!(bump(&store, 3), Err(StoreError::CasMismatch));
    }

    #[test]
    fn keep_writes_nothing_and_create_makes_the_key_then_reads_it_again() {
        let store = MemoryStore::new();
        let kept = cas_update(&store, "k", 3, |_| Change::Keep("no"));
        assert_eq!((kept, store.get("k")), (Ok("no"), None));
        let mut reads = Vec::new();
        let made = cas_update(&store, "k", 3, |value| match value {
            None => Change::Create(vec![7]),
            Some(v) => {
                reads.push(v.to_vec());
                Change::Write(vec![8], "written")
            }
        });
        assert_eq!(made, Ok("written"));
        assert_eq!(reads, vec![vec![7]]);
        assert_eq!(store.get("k").map(|(v, _)| v), Some(vec![8]));
    }
}
