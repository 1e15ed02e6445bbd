//! Publishes the decision for Envoy's access log as filter state: Envoy 1.40's proxy-wasm host
//! has no host call that writes dynamic metadata, and `proxy_set_property` stores the value
//! under `wasm.<path>`, which `%FILTER_STATE(wasm.keygate:PLAIN)%` prints.

use super::raw;
use crate::core::access_log::AccessLogEntry;
use crate::core::config::Config;

/// The filter-state name after Envoy's `wasm.` prefix.
const PATH: &[u8] = b"keygate";

/// One host call per request, none when the config turns the access log off; the SDK's
/// `set_property` would first copy the path into a new buffer.
pub fn publish(config: &Config, entry: &AccessLogEntry) {
    if config.access_log {
        raw::set_property(PATH, &entry.to_json());
    }
}
