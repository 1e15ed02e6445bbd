//! keygate: API-key authentication for Envoy, as a proxy-wasm filter.
//!
//! `core` decides (and is tested natively); `adapter` is the thin proxy-wasm layer that is
//! compiled only for the wasm target.

pub mod core;

#[cfg(target_arch = "wasm32")]
mod adapter;
