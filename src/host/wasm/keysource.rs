//! The host side of keys from a key service: the fetch tick and its callout (full mode), the
//! paused request and its callout (lookup on miss), shared data, gauges and counters. Every
//! decision about leases, versions, staleness and caching is made by `core::keysource`; the full
//! sync runs as the core's `FullSyncFlow` over this host's implementation of its traits.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType, MetricType};

use super::shared_store::HostStore;
use super::{log, now_millis, settle, KeygateRequest, Runtime, Settled, Verdict};
use crate::core::credential::Credential;
use crate::core::decision::{begin, decide_for_key, lookup, Decision, Step};
use crate::core::keyset::KeySet;
use crate::core::keysource::full_sync::{
    RemoteKeySet, Unavailable, CHUNKS_PER_REQUEST, CHUNKS_PER_TICK,
};
use crate::core::keysource::full_sync_flow::{Fetch, Fetchers, FullSyncFlow, IN_FLIGHT_GRACE_MS};
use crate::core::keysource::host::{Callouts, Clock, Counter, Gauge, Level, Log, Metrics};
use crate::core::keysource::lookup_flow::{unavailable, LookupFlow, LookupOutcome};
use crate::core::keysource::lookup_on_miss::Answer;
use crate::core::keysource::paths::LookupKey;
use crate::core::keysource::service::{FetchResponse, KeyService, KeyServiceMode};
use crate::core::keysource::store::{SharedStore, StoreError};
use crate::core::policy::Policy;
use crate::core::request::RequestView;

/// How often root contexts tick in full mode: often enough that a period of `refresh_seconds`
/// is kept to within a quarter second, cheap enough (two small shared-data reads).
const FULL_MODE_TICK: Duration = Duration::from_millis(250);
const LOOKUP_MODE_TICK: Duration = Duration::from_millis(500);

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
struct WasmHost<'a>(&'a SourceMetrics);

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
    ) -> Result<u64, String> {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        hostcalls::dispatch_http_call(
            cluster,
            headers,
            None,
            Vec::new(),
            Duration::from_millis(timeout_ms),
        )
        .map(u64::from)
        .map_err(|status| format!("cannot call cluster '{cluster}' ({status:?})"))
    }
}

impl Metrics for WasmHost<'_> {
    fn bump(&self, counter: Counter) {
        if let Some((_, id)) = self.0.counters.iter().find(|(c, _)| *c == counter) {
            let _ = hostcalls::increment_metric(*id, 1);
        }
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

/// One VM's side of a key source: its copy of the shared set, its fetch, its counters.
pub struct KeySource {
    name: String,
    service: KeyService,
    /// Full mode: the fetch flow, this VM's fetch and its copy of the shared set.
    full: Option<FullSyncFlow>,
    fetch: RefCell<Fetch>,
    remote: RefCell<RemoteKeySet>,
    metrics: SourceMetrics,
    /// Lookup mode: this VM's lookups in flight, by key: when each was sent, and the requests
    /// that wait for its answer instead of sending their own (one fetch per key per VM).
    lookups_in_flight: RefCell<HashMap<LookupKey, (i64, Vec<Waiter>)>>,
    /// What a waiting request was settled with, until its own callbacks take it over.
    settled: RefCell<HashMap<u32, Settled>>,
}

/// A request of this VM paused until another request's lookup of the same key is answered.
struct Waiter {
    context_id: u32,
    req: RequestView,
    stale: Option<Answer>,
    request_ended: bool,
}

/// Settled waiters whose callbacks never came to take their state (the client went away) are
/// forgotten beyond this many.
const MAX_SETTLED: usize = 4096;

impl KeySource {
    pub fn new(name: &str, service: &KeyService) -> KeySource {
        let full = matches!(service.mode, KeyServiceMode::Full(_));
        let mut source = KeySource {
            name: name.to_string(),
            service: service.clone(),
            full: None,
            fetch: RefCell::new(Fetch::default()),
            remote: RefCell::new(RemoteKeySet::default()),
            metrics: SourceMetrics::define(name, full),
            lookups_in_flight: RefCell::new(HashMap::new()),
            settled: RefCell::new(HashMap::new()),
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

    fn host(&self) -> WasmHost<'_> {
        WasmHost(&self.metrics)
    }

    /// The tick this source needs: full mode fetches on it, lookup mode settles requests whose
    /// shared lookup never got an answer (the request that sent it went away).
    pub fn tick_period(&self) -> Option<Duration> {
        match self.service.mode {
            KeyServiceMode::Full(_) => Some(FULL_MODE_TICK),
            KeyServiceMode::Lookup(_) => Some(LOOKUP_MODE_TICK),
        }
    }

    pub(super) fn take_settled(&self, context_id: u32) -> Option<Settled> {
        self.settled.borrow_mut().remove(&context_id)
    }

    /// Full mode: catch up with the shared set, update the gauges, and fetch if this VM holds
    /// the lease and the period has passed.
    pub fn on_tick(&self) {
        let Some(flow) = &self.full else {
            return;
        };
        let host = self.host();
        flow.catch_up(&host, &mut self.remote.borrow_mut(), CHUNKS_PER_TICK);
        flow.tick(&host, &mut self.fetch.borrow_mut());
    }

    /// Full mode: the answer to this VM's fetch (or to one of its parts).
    pub fn on_fetch_response(&self, token: u32, body_size: usize) {
        let Some(flow) = &self.full else {
            return;
        };
        let host = self.host();
        let response = read_call_response(body_size);
        let outcome = flow.on_response(&host, &mut self.fetch.borrow_mut(), token.into(), response);
        if let Some(outcome) = outcome {
            flow.apply(&host, &mut self.remote.borrow_mut(), outcome);
        }
    }

    /// The VM is going away: let another take over the fetch at once.
    pub fn on_done(&self) {
        if let Some(flow) = &self.full {
            flow.stop(&self.host());
        }
    }

    /// Full mode: this VM's current set, after catching up with the shared version.
    fn keys(&self) -> Result<Arc<KeySet>, Unavailable> {
        let Some(flow) = &self.full else {
            return Err(Unavailable::NotLoaded);
        };
        let host = self.host();
        let now = host.now_ms();
        if let Ok(mut fetch) = self.fetch.try_borrow_mut() {
            fetch.served_request(now);
        }
        let mut remote = self.remote.borrow_mut();
        flow.catch_up(&host, &mut remote, CHUNKS_PER_REQUEST);
        remote.current(&self.service, now)
    }

    /// Keys cannot be verified (full mode): `on_unavailable` decides.
    fn unavailable<'a>(&self, policy: &'a Policy) -> Decision<'a> {
        unavailable(&self.name, &self.service, &self.host(), policy)
    }
}

/// A request paused while its key is looked up.
pub struct PendingLookup {
    token: u64,
    req: RequestView,
    key: LookupKey,
    /// An expired cached answer, served if the lookup fails.
    stale: Option<Answer>,
}

impl KeygateRequest {
    /// Decides a request whose key must come from the key service.
    pub(super) fn decide_remote(
        &mut self,
        runtime: &Runtime,
        source: &KeySource,
        req: RequestView,
        credential: Credential,
        policy: &Policy,
    ) -> Action {
        let config = &runtime.config;
        let host = source.host();
        let Some(flow) = LookupFlow::of(&source.name, &source.service) else {
            let keys = source.keys();
            let decision = match &keys {
                Ok(keys) => {
                    decide_for_key(config, policy, &credential, lookup(keys, &credential), &req)
                }
                Err(_) => source.unavailable(policy),
            };
            return self.apply(runtime, &req, decision).action();
        };
        let key = LookupKey::of(&credential);
        let stale = match flow.cached(&host, &key) {
            Ok(answer) => {
                let outcome = LookupOutcome::Answer(&answer);
                let decision = flow.decide(&host, config, policy, &credential, &req, outcome);
                return self.apply(runtime, &req, decision).action();
            }
            Err(stale) => stale,
        };
        if let Some((_, waiters)) = source.lookups_in_flight.borrow_mut().get_mut(&key) {
            flow.coalesced(&host);
            waiters.push(Waiter {
                context_id: self.context_id,
                req,
                stale,
                request_ended: self.request_ended,
            });
            self.waiting = true;
            return Action::Pause;
        }
        if !flow.admit(&host) {
            let outcome = stale
                .as_ref()
                .map_or(LookupOutcome::OverCap, LookupOutcome::Answer);
            let decision = flow.decide(&host, config, policy, &credential, &req, outcome);
            return self.apply(runtime, &req, decision).action();
        }
        match flow.send(&host, &key) {
            Some(token) => {
                source
                    .lookups_in_flight
                    .borrow_mut()
                    .insert(key.clone(), (host.now_ms(), Vec::new()));
                self.pending = Some(PendingLookup {
                    token,
                    req,
                    key,
                    stale,
                });
                Action::Pause
            }
            None => {
                let outcome = stale
                    .as_ref()
                    .map_or(LookupOutcome::Unavailable, LookupOutcome::Answer);
                let decision = flow.decide(&host, config, policy, &credential, &req, outcome);
                self.apply(runtime, &req, decision).action()
            }
        }
    }

    /// The key service answered (or failed) for the paused request: cache the answer, decide,
    /// and resume or reply.
    pub(super) fn on_lookup_response(&mut self, token: u32, body_size: usize) {
        let Some(pending) = self.pending.take_if(|p| p.token == u64::from(token)) else {
            return;
        };
        let Some(runtime) = self.runtime.clone() else {
            return;
        };
        let Some(source) = &runtime.source else {
            return;
        };
        let Some(flow) = LookupFlow::of(&source.name, &source.service) else {
            return;
        };
        let host = source.host();
        let response = read_call_response(body_size);
        let fetched = flow.answered(&host, &pending.key, &response);
        let answer = fetched.clone().or(pending.stale);
        let decision = decide_paused(&runtime, &flow, source, &pending.req, answer.as_ref());
        if let Verdict::Forwarded = self.apply(&runtime, &pending.req, decision) {
            let _ = hostcalls::resume_http_request();
        }
        let waiters = source
            .lookups_in_flight
            .borrow_mut()
            .remove(&pending.key)
            .map(|(_, waiters)| waiters)
            .unwrap_or_default();
        for waiter in waiters {
            resolve_waiter(&runtime, &flow, source, waiter, fetched.as_ref());
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }
}

/// Decides a request paused for its key's lookup with the answer it came to (`None`: keys
/// cannot be verified now). The same request view gives the same credential and policy as
/// before the pause.
fn decide_paused<'a>(
    runtime: &'a Runtime,
    flow: &LookupFlow,
    source: &KeySource,
    req: &RequestView,
    answer: Option<&'a Answer>,
) -> Decision<'a> {
    let config = &runtime.config;
    match begin(config, req) {
        Step::Decided(decision) => decision,
        Step::Lookup { credential, policy } => {
            let outcome = answer.map_or(LookupOutcome::Unavailable, LookupOutcome::Answer);
            flow.decide(&source.host(), config, policy, &credential, req, outcome)
        }
    }
}

/// Decides a waiting request with the answer its key's lookup got (or its own old answer, if
/// the lookup failed) and applies the decision in that request's context.
fn resolve_waiter(
    runtime: &Runtime,
    flow: &LookupFlow,
    source: &KeySource,
    waiter: Waiter,
    fetched: Option<&Answer>,
) {
    if hostcalls::set_effective_context(waiter.context_id).is_err() {
        return; // The request is gone.
    }
    let answer = fetched.or(waiter.stale.as_ref());
    let decision = decide_paused(runtime, flow, source, &waiter.req, answer);
    let (verdict, settled) = settle(runtime, &waiter.req, decision, waiter.request_ended);
    let mut all = source.settled.borrow_mut();
    if all.len() >= MAX_SETTLED {
        all.clear();
    }
    all.insert(waiter.context_id, settled);
    drop(all);
    if let Verdict::Forwarded = verdict {
        let _ = hostcalls::resume_http_request();
    }
}

/// Lookups whose answer never came (the request that sent one went away, which cancels its
/// call): their waiters are settled as a failed lookup.
pub(super) fn expire_waiters(runtime: &Runtime) {
    let Some(source) = &runtime.source else {
        return;
    };
    let Some(flow) = LookupFlow::of(&source.name, &source.service) else {
        return;
    };
    let now = now_millis();
    let limit = source.service.timeout_ms as i64 + IN_FLIGHT_GRACE_MS;
    let expired: Vec<Waiter> = {
        let mut in_flight = source.lookups_in_flight.borrow_mut();
        let keys: Vec<LookupKey> = in_flight
            .iter()
            .filter(|(_, (sent, _))| now - sent > limit)
            .map(|(key, _)| key.clone())
            .collect();
        keys.iter()
            .filter_map(|key| in_flight.remove(key))
            .flat_map(|(_, waiters)| waiters)
            .collect()
    };
    for waiter in expired {
        resolve_waiter(runtime, &flow, source, waiter, None);
    }
}

/// Status, ETag, `content-range` and body of the callout being answered (no status when there
/// was no answer).
fn read_call_response(body_size: usize) -> FetchResponse {
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
