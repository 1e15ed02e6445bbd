//! The host-independent core of keygate. Nothing here talks to Envoy: the adapter builds a
//! `RequestView`, calls `decide`, and applies the rendered result.
//!
//! One request flows one way: headers in → `credential` → `keyset` lookup → `policy` →
//! `decision` → `reply` (a local reply, or the scope headers the upstream receives).
//!
//! Everything here reads hostile input (headers, query strings, key-set documents), so outside
//! tests no index or slice may panic: use `get`, `split_at_checked`, iterators.
#![cfg_attr(not(test), deny(clippy::indexing_slicing, clippy::string_slice))]

pub mod access_log;
pub mod checksum;
pub mod codes;
pub mod config;
pub mod config_error;
pub mod credential;
pub mod decision;
pub mod digest;
pub mod json_fields;
pub mod keyset;
pub mod keysource;
pub mod limits;
pub mod memory_store;
pub mod method_override;
pub mod path_guard;
pub mod policy;
pub mod rate_limit;
pub mod reply;
pub mod request;
pub mod selectors;
pub mod session_token;
pub mod settle;
pub mod small_sort;
#[cfg(test)]
pub mod test_support;
pub mod time;
pub mod upstream;
