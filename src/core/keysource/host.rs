//! What the key-source flows reach outside the core through: the shared store (`store`), the
//! clock, callouts to the key service, metrics and a log. Each host implements these once
//! (proxy-wasm host calls, the dynamic module's ABI); the tests implement them in memory
//! (`test_host`), so the flows are unit-tested without Envoy.

use super::store::SharedStore;

/// Milliseconds since the Unix epoch, as the host sees them.
pub trait Clock {
    fn now_ms(&self) -> i64;
}

/// GETs on the key service's cluster. The answer comes back to the flow that sent the call,
/// with the token `dispatch` returned.
pub trait Callouts {
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&'static str, String)],
        timeout_ms: u64,
    ) -> Result<u64, CalloutError>;
}

/// A call the host refused to send (an unknown cluster, a call from a thread that may not make
/// one): the flow counts it as a failed fetch or lookup and logs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutError {
    pub cluster: String,
    /// The host's own name for the refusal (its status or error code).
    pub why: String,
}

impl std::fmt::Display for CalloutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot call cluster '{}' ({})", self.cluster, self.why)
    }
}

impl std::error::Error for CalloutError {}

/// The counters of a key source, named `keygate.<filter name>.<name()>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    Fetches,
    FetchFailures,
    Updates,
    RollbacksRefused,
    CacheHits,
    CacheMisses,
    LookupFailures,
    MissesOverCap,
    Coalesced,
    UnverifiedAllowed,
}

impl Counter {
    /// The counters of a key source in full mode (plus `UnverifiedAllowed`, in either mode).
    pub const FULL_SYNC: [Counter; 4] = [
        Counter::Fetches,
        Counter::FetchFailures,
        Counter::Updates,
        Counter::RollbacksRefused,
    ];
    /// The counters of a key source in lookup mode (plus `UnverifiedAllowed`).
    pub const LOOKUP_ON_MISS: [Counter; 5] = [
        Counter::CacheHits,
        Counter::CacheMisses,
        Counter::LookupFailures,
        Counter::MissesOverCap,
        Counter::Coalesced,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::Fetches => "keyset.fetches",
            Counter::FetchFailures => "keyset.fetch_failures",
            Counter::Updates => "keyset.updates",
            Counter::RollbacksRefused => "keyset.rollbacks_refused",
            Counter::CacheHits => "cache.hits",
            Counter::CacheMisses => "cache.misses",
            Counter::LookupFailures => "cache.lookup_failures",
            Counter::MissesOverCap => "cache.misses_over_cap",
            Counter::Coalesced => "cache.coalesced",
            Counter::UnverifiedAllowed => "unverified_allowed",
        }
    }
}

/// The gauges of a key source in full mode, named like the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gauge {
    Version,
    Keys,
    AgeSeconds,
}

impl Gauge {
    pub const ALL: [Gauge; 3] = [Gauge::Version, Gauge::Keys, Gauge::AgeSeconds];

    pub fn name(self) -> &'static str {
        match self {
            Gauge::Version => "keyset.version",
            Gauge::Keys => "keyset.keys",
            Gauge::AgeSeconds => "keyset.age_seconds",
        }
    }
}

/// Counters and gauges; a metric the host could not define is silently skipped.
pub trait Metrics {
    fn bump(&self, counter: Counter);
    fn record(&self, gauge: Gauge, value: u64);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
}

pub trait Log {
    fn log(&self, level: Level, line: &str);
}

/// Everything a key-source flow needs from its host.
pub trait KeySourceHost: SharedStore + Clock + Callouts + Metrics + Log {}

impl<T: SharedStore + Clock + Callouts + Metrics + Log> KeySourceHost for T {}
