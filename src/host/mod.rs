//! The hosts over the core, each a thin adapter: the proxy-wasm filter (`keygate.wasm`) and
//! the Envoy dynamic module (`libkeygate.so`).

/// Compiled only for the wasm target.
#[cfg(target_arch = "wasm32")]
mod wasm;

/// Built only into `libkeygate.so`: it references callbacks that only Envoy's process provides.
#[cfg(all(feature = "envoy-module", not(target_arch = "wasm32")))]
pub mod envoy_module;
