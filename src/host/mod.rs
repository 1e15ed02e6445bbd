//! Hosts over the core other than the proxy-wasm adapter.

pub mod envoy_module;
