//! The limits counters of the native module: one table per filter name for the whole process,
//! shared by every worker (the wasm filter keeps them in Envoy's shared data instead).
//!
//! The core's `apply_limits` reads a slot, computes, and writes it back with the token it read.
//! Here each slot sits behind its own lock, held only to copy the slot in or out, and the
//! tokens come from one atomic counter, so two workers never lose each other's count: the
//! second writer's token is stale and the core retries, as it does on shared data.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::core::keysource::store::{SharedStore, StoreError};
use crate::core::limits::{slot_index, sweep, sweep_batch, sweep_due, Limits};

/// Filter name and slot count to its table.
type TablesByFilter = HashMap<(String, u32), Arc<LimitsTable>>;

#[derive(Default)]
struct Slot {
    /// `None` until first written: the same "absent key" the shared-data store has.
    value: Option<(Vec<u8>, u32)>,
}

pub struct LimitsTable {
    slots: Vec<Mutex<Slot>>,
    next_token: AtomicU32,
    /// Request-driven sweep: the last time one ran and where the next one starts.
    last_sweep_ms: AtomicI64,
    sweep_cursor: AtomicU32,
}

impl LimitsTable {
    fn new(slots: u32) -> LimitsTable {
        LimitsTable {
            slots: (0..slots).map(|_| Mutex::new(Slot::default())).collect(),
            next_token: AtomicU32::new(1),
            last_sweep_ms: AtomicI64::new(0),
            sweep_cursor: AtomicU32::new(0),
        }
    }

    /// A table with no slots: what a filter without limits holds.
    pub fn empty() -> LimitsTable {
        LimitsTable::new(0)
    }

    /// The process's table for the filter `name`; a filter reconfigured with the same name and
    /// slot count (a listener update) keeps its counters.
    pub fn for_filter(name: &str, limits: &Limits) -> Arc<LimitsTable> {
        static TABLES: OnceLock<Mutex<TablesByFilter>> = OnceLock::new();
        let tables = TABLES.get_or_init(Default::default);
        let mut tables = tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tables
            .entry((name.to_string(), limits.slots))
            .or_insert_with(|| Arc::new(LimitsTable::new(limits.slots)))
            .clone()
    }

    fn slot(&self, key: &str) -> Option<&Mutex<Slot>> {
        self.slots.get(usize::try_from(slot_index(key)?).ok()?)
    }

    /// Sweeps one batch when a second has passed since the last sweep; one request wins the race.
    pub fn maybe_sweep(&self, limits: &Limits, now_ms: i64) {
        let last = self.last_sweep_ms.load(Ordering::Relaxed);
        if !sweep_due(last, now_ms)
            || self
                .last_sweep_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let batch = sweep_batch(limits);
        let first = self.sweep_cursor.fetch_add(batch, Ordering::Relaxed) % limits.slots.max(1);
        let _ = sweep(limits, self, now_ms, first, batch);
    }
}

impl SharedStore for LimitsTable {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        let slot = self.slot(key)?.lock().ok()?;
        slot.value.clone()
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let mut slot = self
            .slot(key)
            .ok_or(StoreError::Unavailable)?
            .lock()
            .map_err(|_| StoreError::Unavailable)?;
        if let Some((_, stored)) = &slot.value {
            if cas != 0 && cas != *stored {
                return Err(StoreError::CasMismatch);
            }
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed).max(1);
        slot.value = Some((value.to_vec(), token));
        Ok(())
    }
}
