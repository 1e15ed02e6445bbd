//! The core's `SharedStore` for the whole process: what the key cache of lookup on miss keeps.
//! The wasm filter keeps it in Envoy's shared data (one map per VM id, a compare-and-swap token
//! per value); here one map per filter name serves every worker, with the same semantics, so
//! an answer cached by one worker is found by all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::ffi::{log, CalloutOrigin, LogLevel};
use super::now_millis;
use crate::core::keysource::host::{CalloutError, Callouts, Clock, Level, Log};
use crate::core::keysource::store::{SharedStore, StoreError};

#[derive(Default)]
pub struct ProcessStore {
    values: Mutex<HashMap<String, (Vec<u8>, u32)>>,
    next_token: AtomicU32,
}

/// Filter name to its store.
type StoresByFilter = HashMap<String, Arc<ProcessStore>>;

impl ProcessStore {
    /// The process's store for the filter `name`; a reconfigured filter keeps its cache.
    pub fn for_filter(name: &str) -> Arc<ProcessStore> {
        static STORES: OnceLock<Mutex<StoresByFilter>> = OnceLock::new();
        let stores = STORES.get_or_init(Default::default);
        let mut stores = stores
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        stores.entry(name.to_string()).or_default().clone()
    }
}

impl SharedStore for ProcessStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.values.lock().ok()?.get(key).cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let mut values = self.values.lock().map_err(|_| StoreError::Unavailable)?;
        if let Some((_, stored)) = values.get(key) {
            if cas != 0 && cas != *stored {
                return Err(StoreError::CasMismatch);
            }
        }
        let token = self
            .next_token
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
            .max(1);
        values.insert(key.to_string(), (value.to_vec(), token));
        Ok(())
    }
}

/// A host of the key-source flows in this process (main thread or stream): its store, clock,
/// log and callouts are written once here for both.
pub trait ProcessSide {
    /// The store the flow reads and writes (`None`: this host keeps nothing).
    fn process_store(&self) -> Option<&ProcessStore>;
    /// Where its callouts go out from (the config on the main thread, or the stream).
    fn callout_origin(&self) -> CalloutOrigin<'_>;
}

impl<T: ProcessSide> Callouts for T {
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&'static str, String)],
        timeout_ms: u64,
    ) -> Result<u64, CalloutError> {
        self.callout_origin()
            .http_callout(cluster, headers, timeout_ms)
    }
}

impl<T: ProcessSide> SharedStore for T {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.process_store()?.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        self.process_store()
            .ok_or(StoreError::Unavailable)?
            .set(key, value, cas)
    }
}

impl<T: ProcessSide> Clock for T {
    fn now_ms(&self) -> i64 {
        now_millis()
    }
}

impl<T: ProcessSide> Log for T {
    fn log(&self, level: Level, line: &str) {
        let level = match level {
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
        };
        log(level, line);
    }
}
