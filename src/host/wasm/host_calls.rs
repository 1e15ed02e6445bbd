//! The host calls both the request path and the key source make, written once: the clock, a log
//! line, a counter bump.

use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::types::LogLevel;

/// Milliseconds since the Unix epoch (0 if the host cannot tell).
pub(super) fn now_millis() -> i64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as i64)
}

pub(super) fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Adds one to a counter, if the host defined it.
pub(super) fn bump(counter: Option<u32>) {
    if let Some(id) = counter {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

/// The host's clock for core code that takes a `Clock`.
pub(super) struct HostClock;

impl crate::core::keysource::host::Clock for HostClock {
    fn now_ms(&self) -> i64 {
        now_millis()
    }
}
