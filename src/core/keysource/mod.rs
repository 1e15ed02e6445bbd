//! Key sets that change without restarts: keys fetched from a key service.
//!
//! **The key service** is anything that serves static JSON over HTTP (nginx, S3, a CDN): an Envoy
//! cluster plus paths in the filter config. Two modes:
//!
//! - **`full`**: the whole key set is one document, `{"keys": [records]}`, fetched every
//!   `refresh_seconds` with `If-None-Match`. One fetch per period per Envoy process: every VM's
//!   root context ticks, and only the holder of a compare-and-swap lease in shared data fetches.
//!   The holder fetches the document in ranges (`docparts`). In wasm it reads each part as it
//!   comes, a slice per tick (`docstream`), and writes the records into buckets in shared data
//!   under the next version's slot (`setbuckets`), or over the live version in place when only a
//!   few thousand records changed (`setdelta`); the meta then announces the version, and every
//!   VM looks each key up in its bucket: one copy of the set for the process. The native module
//!   parses the whole document into the process's one `KeySet`. A failed fetch (no answer, timeout, 5xx, malformed or truncated JSON,
//!   an invalid record) changes nothing but the failure count: a good set is never replaced by a
//!   broken one. With no set yet, or a set older than `max_stale_seconds`, keys cannot be
//!   verified and `on_unavailable` decides (503 `KEYSET_UNAVAILABLE` by default).
//! - **`lookup_on_miss`**: for sets too big to fetch whole; see `lookup_on_miss`.
//!
//! Shared data lives under a namespace derived from the config's name and the service's
//! cluster and paths, so two filters sharing a `vm_id` keep separate sets.
//!
//! The modules, from the leaves up: `store` (the shared store and its compare-and-swap loop),
//! `paths` (request paths and the key a request is looked up by), `service` (the validated
//! configuration), `docparts`, `docstream`, `setbuckets` and `setdelta` (a document fetched and
//! read in parts, a set in shared data and an update of it in place), then the two flows: `full_sync` (+ `full_sync_flow`, the flow
//! over the host traits of `host`; `fetch_handover` picks which VM fetches) and
//! `lookup_on_miss` (+ `lookup_flow`, and `lookup_waiters`: the requests waiting on one lookup,
//! for both hosts). `test_host` runs the flows in memory.

pub mod docparts;
pub mod docstream;
pub mod fetch_handover;
pub mod full_sync;
pub mod full_sync_flow;
pub mod host;
pub mod lookup_flow;
pub mod lookup_on_miss;
pub mod lookup_waiters;
pub mod paths;
pub mod service;
pub mod setbuckets;
pub mod setdelta;
pub mod store;
#[cfg(test)]
pub(crate) mod test_host;
