//! An in-memory `SharedStore` with the semantics of Envoy's shared data: one CAS token per write
//! from a global counter, a write with token `0` is unconditional, and a write to an absent key
//! ignores the token. Used by unit tests and native measurements.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use super::keysource::store::{SharedStore, StoreError};

#[derive(Debug)]
pub struct MemoryStore {
    data: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: Cell<u32>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            data: RefCell::new(HashMap::new()),
            next_cas: Cell::new(1),
        }
    }
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Number of entries (shared-data keys).
    pub fn len(&self) -> usize {
        self.data.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.borrow().is_empty()
    }

    /// Bytes of keys plus values: the payload Envoy keeps for this store.
    pub fn payload_bytes(&self) -> usize {
        self.data
            .borrow()
            .iter()
            .map(|(k, (v, _))| k.len() + v.len())
            .sum()
    }

    fn take_cas(&self) -> u32 {
        let cas = self.next_cas.get();
        self.next_cas.set(cas.wrapping_add(1).max(1));
        cas
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.data.borrow().get(key).cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let mut data = self.data.borrow_mut();
        if let Some((_, stored)) = data.get(key) {
            if cas != 0 && cas != *stored {
                return Err(StoreError::CasMismatch);
            }
        }
        let token = self.take_cas();
        data.insert(key.to_string(), (value.to_vec(), token));
        Ok(())
    }
}
