//! keygate: API-key authentication for Envoy, as a proxy-wasm filter (`keygate.wasm`) or an
//! Envoy dynamic module (`libkeygate.so`).
//!
//! `core` decides (and is tested natively, free of both host APIs); `host::wasm` is the thin
//! proxy-wasm layer, compiled only for the wasm target; `host::envoy_module` is the thin
//! dynamic-module layer, compiled only with the `envoy-module` feature.

pub mod core;

/// The `keygate` command-line tool's logic (key generation, key-set files, config checks):
/// native only, never part of the filter.
#[cfg(not(target_arch = "wasm32"))]
pub mod cli;

#[cfg(any(target_arch = "wasm32", feature = "envoy-module"))]
mod host;
