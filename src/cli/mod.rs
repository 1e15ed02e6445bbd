//! What `keygate` (src/bin/keygate.rs) does, kept out of `main` so it is unit-tested natively.
//! Every check here goes through the filter's own parsers (`Config::parse`, `KeySet::from_json`),
//! so the tool accepts exactly what the filter accepts.

pub mod boundary_lint;
pub mod config_check;
pub mod envoy_config_sources;
pub mod keygen;
pub mod keyset_file;
pub mod random;
