//! The core's `SharedStore` over Envoy's shared data: one process-wide map per `vm_id`, shared by
//! every worker's VM, with a compare-and-swap token on each value. The retry loop and the
//! fail-open/closed choice live in the core (`limits::apply_limits`); this only maps host calls.

use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;

use crate::core::keysource::store::{SharedStore, StoreError};

pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), cas)) => Some((value, cas.unwrap_or(0))),
            // The host hands back no buffer for an empty value; the key still exists.
            Ok((None, Some(cas))) => Some((Vec::new(), cas)),
            Ok((None, None)) | Err(_) => None,
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let cas = if cas == 0 { None } else { Some(cas) };
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(_) => Err(StoreError::Unavailable),
        }
    }
}
