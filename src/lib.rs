//! keygate: API-key authentication for Envoy, as a proxy-wasm filter.
//!
//! `core` decides (and is tested natively); `adapter` is the thin proxy-wasm layer that is
//! compiled only for the wasm target.

pub mod core;

/// The `keygate` command-line tool's logic (key generation, key-set files, config checks):
/// native only, never part of the filter.
#[cfg(not(target_arch = "wasm32"))]
pub mod cli;

#[cfg(target_arch = "wasm32")]
mod adapter;
