//! Publishes the decision for Envoy's access log as filter state: Envoy 1.40's proxy-wasm host
//! has no host call that writes dynamic metadata, and `proxy_set_property` stores the value
//! under `wasm.<path>`, which `%FILTER_STATE(wasm.keygate:PLAIN)%` prints.

use proxy_wasm::types::Status;

use crate::core::access_log::AccessLogEntry;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
}

/// The filter-state name after Envoy's `wasm.` prefix.
const PATH: &[u8] = b"keygate";

/// One host call per request; the SDK's `set_property` would first copy the path into a new
/// buffer.
pub fn publish(entry: &AccessLogEntry) {
    let value = entry.to_json();
    // SAFETY: both pointers refer to live buffers of the given sizes for the whole call; the
    // host only reads them.
    let _ = unsafe { proxy_set_property(PATH.as_ptr(), PATH.len(), value.as_ptr(), value.len()) };
}
