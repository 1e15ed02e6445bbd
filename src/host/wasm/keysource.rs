//! The host side of keys from a key service: the fetch tick and its callout (full mode), the
//! lookup flow the paused request uses (lookup on miss), shared data, gauges and counters. Every
//! decision about leases, versions, staleness and caching is made by `core::keysource`; the full
//! sync runs as the core's `FullSyncFlow` over this host's implementation of its traits.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

use super::host_calls::{bump, log, now_millis};
use super::shared_store::HostStore;
use crate::core::credential::Credential;
use crate::core::decision::Decision;
use crate::core::keyset::KeyRecord;
use crate::core::keysource::full_sync::{SharedKeys, Unavailable};
use crate::core::keysource::full_sync_flow::{Fetch, Fetchers, FullSyncFlow, IN_FLIGHT_GRACE_MS};
use crate::core::keysource::host::{
    CalloutError, Callouts, Clock, Counter, Gauge, Level, Log, Metrics,
};
use crate::core::keysource::lookup_flow::{unavailable, LookupFlow};
use crate::core::keysource::service::{FetchResponse, KeyService, KeyServiceMode};
use crate::core::keysource::store::{SharedStore, StoreError};
use crate::core::policy::Policy;

/// How often root contexts tick in full mode: often enough that a period of `refresh_seconds`
/// is kept to within a quarter second, cheap enough (two small shared-data reads).
const FULL_MODE_TICK: Duration = Duration::from_millis(250);
const LOOKUP_MODE_TICK: Duration = Duration::from_millis(500);
/// While a fetched document is read into shared data, a slice per tick: short ticks, so a
/// million keys load in seconds while each tick stays a few milliseconds.
const READING_TICK: Duration = Duration::from_millis(5);

/// The key source's metrics as defined in this VM (a metric the host refused is left out).
struct SourceMetrics {
    counters: Vec<(Counter, u32)>,
    gauges: Vec<(Gauge, u32)>,
}

impl SourceMetrics {
    fn define(name: &str, full: bool) -> SourceMetrics {
        let define = |kind: MetricType, suffix: &str| {
            hostcalls::define_metric(kind, &format!("keygate.{name}.{suffix}")).ok()
        };
        let of_mode: &[Counter] = if full {
            &Counter::FULL_SYNC
        } else {
            &Counter::LOOKUP_ON_MISS
        };
        let counters = of_mode.iter().chain([&Counter::UnverifiedAllowed]);
        let gauges: &[Gauge] = if full { &Gauge::ALL } else { &[] };
        SourceMetrics {
            counters: counters
                .filter_map(|c| Some((*c, define(MetricType::Counter, c.name())?)))
                .collect(),
            gauges: gauges
                .iter()
                .filter_map(|g| Some((*g, define(MetricType::Gauge, g.name())?)))
                .collect(),
        }
    }
}

/// The core's key-source host traits over proxy-wasm host calls.
pub(super) struct WasmHost<'a>(&'a SourceMetrics);

impl SharedStore for WasmHost<'_> {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        HostStore.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        HostStore.set(key, value, cas)
    }
}

impl Clock for WasmHost<'_> {
    fn now_ms(&self) -> i64 {
        now_millis()
    }
}

impl Callouts for WasmHost<'_> {
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&'static str, String)],
        timeout_ms: u64,
    ) -> Result<u64, CalloutError> {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        hostcalls::dispatch_http_call(
            cluster,
            headers,
            None,
            Vec::new(),
            Duration::from_millis(timeout_ms),
        )
        .map(u64::from)
        .map_err(|status| CalloutError {
            cluster: cluster.to_string(),
            why: format!("{status:?}"),
        })
    }
}

impl Metrics for WasmHost<'_> {
    fn bump(&self, counter: Counter) {
        bump(
            self.0
                .counters
                .iter()
                .find(|(c, _)| *c == counter)
                .map(|(_, id)| *id),
        );
    }
    fn record(&self, gauge: Gauge, value: u64) {
        if let Some((_, id)) = self.0.gauges.iter().find(|(g, _)| *g == gauge) {
            let _ = hostcalls::record_metric(*id, value);
        }
    }
}

impl Log for WasmHost<'_> {
    fn log(&self, level: Level, line: &str) {
        let level = match level {
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
        };
        log(level, line);
    }
}

/// One VM's side of a key source: its view of the shared set, its fetch, its counters.
pub struct KeySource {
    name: String,
    service: KeyService,
    /// Full mode: the fetch flow, this VM's fetch and its view of the set in shared data.
    full: Option<FullSyncFlow>,
    fetch: RefCell<Fetch>,
    shared: RefCell<SharedKeys>,
    metrics: SourceMetrics,
}

impl KeySource {
    pub fn new(name: &str, service: &KeyService) -> KeySource {
        let full = matches!(service.mode, KeyServiceMode::Full(_));
        let mut source = KeySource {
            name: name.to_string(),
            service: service.clone(),
            full: None,
            fetch: RefCell::new(Fetch::default()),
            shared: RefCell::new(SharedKeys::default()),
            metrics: SourceMetrics::define(name, full),
        };
        if let KeyServiceMode::Full(sync) = &service.mode {
            // This VM's identity in the fetch lease (random: VMs share no counter they could
            // trust).
            let mut hasher = RandomState::new().build_hasher();
            hasher.write_i64(now_millis());
            let worker = hasher.finish().max(1);
            let host = source.host();
            let flow = FullSyncFlow::start(name, service, sync, worker, Fetchers::Many, &host);
            source.full = Some(flow);
        }
        source
    }

    pub(super) fn host(&self) -> WasmHost<'_> {
        WasmHost(&self.metrics)
    }

    /// Lookup mode: the core's lookup flow over this source (`None` in full mode).
    pub(super) fn lookup_flow(&self) -> Option<LookupFlow<'_>> {
        LookupFlow::of(&self.name, &self.service)
    }

    /// How long a lookup may stay in flight before its waiters are settled as failed.
    pub(super) fn in_flight_limit_ms(&self) -> i64 {
        self.service.timeout_ms as i64 + IN_FLIGHT_GRACE_MS
    }

    /// The tick this source needs: full mode fetches on it, lookup mode settles requests whose
    /// shared lookup never got an answer (the request that sent it went away).
    pub fn tick_period(&self) -> Option<Duration> {
        match self.service.mode {
            KeyServiceMode::Full(_) => Some(FULL_MODE_TICK),
            KeyServiceMode::Lookup(_) => Some(LOOKUP_MODE_TICK),
        }
    }

    /// Full mode: catch up with the shared set, update the gauges, and fetch if this VM holds
    /// the lease and the period has passed.
    pub fn on_tick(&self) {
        let Some(flow) = &self.full else {
            return;
        };
        let host = self.host();
        let mut fetch = self.fetch.borrow_mut();
        let was_working = fetch.wants_short_ticks();
        if let Some(outcome) = flow.work(&host, &mut fetch) {
            flow.apply_shared(&host, &mut self.shared.borrow_mut(), outcome);
        }
        flow.catch_up_shared(&host, &mut self.shared.borrow_mut());
        flow.tick(&host, &mut fetch);
        self.pace(was_working, fetch.wants_short_ticks());
    }

    /// Short ticks while a document is being read or a replaced slot emptied, the usual ones
    /// otherwise.
    fn pace(&self, was_working: bool, working: bool) {
        if was_working == working {
            return;
        }
        let period = if working {
            READING_TICK
        } else {
            FULL_MODE_TICK
        };
        let _ = hostcalls::set_tick_period(period);
    }

    /// Full mode: the answer to this VM's fetch (or to one of its parts).
    pub fn on_fetch_response(&self, token: u32, body_size: usize) {
        let Some(flow) = &self.full else {
            return;
        };
        let host = self.host();
        let response = read_call_response(body_size);
        let mut fetch = self.fetch.borrow_mut();
        let was_working = fetch.wants_short_ticks();
        let outcome = flow.on_response(&host, &mut fetch, token.into(), response);
        if let Some(outcome) = outcome {
            flow.apply_shared(&host, &mut self.shared.borrow_mut(), outcome);
        }
        self.pace(was_working, fetch.wants_short_ticks());
    }

    /// The VM is going away: let another take over the fetch at once.
    pub fn on_done(&self) {
        if let Some(flow) = &self.full {
            flow.stop(&self.host());
        }
    }

    /// Full mode: the record `credential` names in the current shared version (`Ok(None)`:
    /// no such key).
    pub(super) fn find(&self, credential: &Credential) -> Result<Option<KeyRecord>, Unavailable> {
        let Some(flow) = &self.full else {
            return Err(Unavailable::NotLoaded);
        };
        let host = self.host();
        let now = host.now_ms();
        if let Ok(mut fetch) = self.fetch.try_borrow_mut() {
            fetch.served_request(now);
        }
        let mut shared = self.shared.borrow_mut();
        flow.catch_up_shared(&host, &mut shared);
        shared.find(&self.service, &host, credential, now)
    }

    /// Keys cannot be verified (full mode): `on_unavailable` decides.
    pub(super) fn unavailable<'a>(&self, policy: &'a Policy) -> Decision<'a> {
        unavailable(&self.name, &self.service, &self.host(), policy)
    }
}

/// Status, ETag, `content-range` and body of the callout being answered (no status when there
/// was no answer).
pub(super) fn read_call_response(body_size: usize) -> FetchResponse {
    let headers = hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default();
    let text = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
    };
    let body = if body_size > 0 {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    FetchResponse {
        status: text(":status").and_then(|s| s.parse().ok()),
        etag: text("etag"),
        content_range: text("content-range"),
        body,
    }
}
