//! The host side of keys from a key service: the fetch tick and its callout (full mode), the
//! paused request and its callout (lookup on miss), shared data, gauges and counters. Every
//! decision about leases, versions, staleness and caching is made by `core::keysource` and
//! `core::keycache`.

use std::cell::{Cell, RefCell};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType, MetricType};

use super::shared_store::HostStore;
use super::{log, now_millis, settle, KeygateRequest, Runtime, Settled, Verdict};
use crate::core::codes::ErrorCode;
use crate::core::credential::Credential;
use crate::core::decision::{begin, decide_for_key, lookup, Decision, Principal, Step};
use crate::core::keyset::KeySet;
use crate::core::keysource::docparts::{PartStep, PartedFetch};
use crate::core::keysource::full_sync::{
    age_ms, FetchOutcome, RemoteKeySet, SyncEvent, TickPlan, Unavailable, CHUNKS_PER_REQUEST,
    CHUNKS_PER_TICK,
};
use crate::core::keysource::lookup_on_miss::{parse_answer, Answer, Cached, KeyCache};
use crate::core::keysource::paths::LookupKey;
use crate::core::keysource::service::{FetchResponse, KeyService, KeyServiceMode, OnUnavailable};
use crate::core::policy::Policy;
use crate::core::request::RequestView;

/// How often root contexts tick in full mode: often enough that a period of `refresh_seconds`
/// is kept to within a quarter second, cheap enough (two small shared-data reads).
const FULL_MODE_TICK: Duration = Duration::from_millis(250);
const LOOKUP_MODE_TICK: Duration = Duration::from_millis(500);
/// A fetch whose callback never came is forgotten after its timeout plus this.
const IN_FLIGHT_GRACE_MS: i64 = 5_000;

struct SourceMetrics {
    version: Option<u32>,
    keys: Option<u32>,
    age_seconds: Option<u32>,
    fetches: Option<u32>,
    fetch_failures: Option<u32>,
    updates: Option<u32>,
    rollbacks_refused: Option<u32>,
    cache_hits: Option<u32>,
    cache_misses: Option<u32>,
    lookup_failures: Option<u32>,
    misses_over_cap: Option<u32>,
    coalesced: Option<u32>,
    unverified_allowed: Option<u32>,
}

impl SourceMetrics {
    fn define(name: &str, full: bool) -> SourceMetrics {
        let metric = |kind: MetricType, suffix: &str, wanted: bool| {
            wanted
                .then(|| hostcalls::define_metric(kind, &format!("keygate.{name}.{suffix}")).ok())
                .flatten()
        };
        let lookup = !full;
        SourceMetrics {
            version: metric(MetricType::Gauge, "keyset.version", full),
            keys: metric(MetricType::Gauge, "keyset.keys", full),
            age_seconds: metric(MetricType::Gauge, "keyset.age_seconds", full),
            fetches: metric(MetricType::Counter, "keyset.fetches", full),
            fetch_failures: metric(MetricType::Counter, "keyset.fetch_failures", full),
            updates: metric(MetricType::Counter, "keyset.updates", full),
            rollbacks_refused: metric(MetricType::Counter, "keyset.rollbacks_refused", full),
            cache_hits: metric(MetricType::Counter, "cache.hits", lookup),
            cache_misses: metric(MetricType::Counter, "cache.misses", lookup),
            lookup_failures: metric(MetricType::Counter, "cache.lookup_failures", lookup),
            misses_over_cap: metric(MetricType::Counter, "cache.misses_over_cap", lookup),
            coalesced: metric(MetricType::Counter, "cache.coalesced", lookup),
            unverified_allowed: metric(MetricType::Counter, "unverified_allowed", true),
        }
    }

    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn set(id: Option<u32>, value: u64) {
        if let Some(id) = id {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

/// One VM's side of a key source: its copy of the shared set, its fetch, its counters.
pub struct KeySource {
    name: String,
    service: KeyService,
    /// This VM's identity in the fetch lease (random: VMs share no counter they could trust).
    worker: u64,
    remote: RefCell<RemoteKeySet>,
    /// Token and start time of this VM's fetch in flight (of its current part).
    in_flight: Cell<Option<(u32, i64)>>,
    /// The parts of that fetch received so far.
    parts: RefCell<PartedFetch>,
    /// After a failed dispatch (this thread cannot call out), leave the lease to others until.
    backoff_until_ms: Cell<i64>,
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
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_i64(now_millis());
        let full = matches!(service.mode, KeyServiceMode::Full(_));
        let source = KeySource {
            name: name.to_string(),
            service: service.clone(),
            worker: hasher.finish().max(1),
            remote: RefCell::new(RemoteKeySet::default()),
            in_flight: Cell::new(None),
            parts: RefCell::new(PartedFetch::default()),
            backoff_until_ms: Cell::new(0),
            metrics: SourceMetrics::define(name, full),
            lookups_in_flight: RefCell::new(HashMap::new()),
            settled: RefCell::new(HashMap::new()),
        };
        if let KeyServiceMode::Full(sync) = &source.service.mode {
            sync.ensure_lease(&source.service, &HostStore);
        }
        source
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
        let KeyServiceMode::Full(sync) = &self.service.mode else {
            return;
        };
        let now = now_millis();
        self.sync(CHUNKS_PER_TICK);
        if let Some(age) = age_ms(&self.service, &HostStore, now) {
            SourceMetrics::set(self.metrics.age_seconds, (age.max(0) / 1000) as u64);
        }
        if let Some((_, since)) = self.in_flight.get() {
            if now - since > self.service.timeout_ms as i64 + IN_FLIGHT_GRACE_MS {
                self.in_flight.set(None);
                self.parts.borrow_mut().reset();
            }
        }
        if now < self.backoff_until_ms.get() {
            return;
        }
        let in_flight = self.in_flight.get().is_some();
        let TickPlan::Fetch { headers } =
            sync.plan(&self.service, &HostStore, self.worker, in_flight, now)
        else {
            return;
        };
        SourceMetrics::bump(self.metrics.fetches);
        self.parts.borrow_mut().reset();
        match dispatch(&self.service, &headers) {
            Ok(token) => self.in_flight.set(Some((token, now))),
            Err(reason) => {
                SourceMetrics::bump(self.metrics.fetch_failures);
                log(
                    LogLevel::Warn,
                    &format!(
                        "keygate[{}]: key-set fetch not sent: {reason}; leaving the fetch to another worker",
                        self.name
                    ),
                );
                sync.release_lease(&self.service, &HostStore, self.worker);
                self.backoff_until_ms
                    .set(now + sync.lease_ms(&self.service));
            }
        }
    }

    /// Full mode: the answer to this VM's fetch.
    pub fn on_fetch_response(&self, token: u32, body_size: usize) {
        let KeyServiceMode::Full(sync) = &self.service.mode else {
            return;
        };
        if self.in_flight.get().map(|(t, _)| t) != Some(token) {
            return;
        }
        self.in_flight.set(None);
        let (response, content_range) = read_call_response(body_size);
        let step = self
            .parts
            .borrow_mut()
            .accept(response, content_range.as_deref());
        let outcome = match step {
            PartStep::Fetch { offset } => {
                match dispatch(&self.service, &sync.part_headers(&self.service, offset)) {
                    Ok(token) => {
                        self.in_flight.set(Some((token, now_millis())));
                        return;
                    }
                    Err(reason) => {
                        self.parts.borrow_mut().reset();
                        sync.failed(&self.service, &HostStore, reason)
                    }
                }
            }
            PartStep::Failed(reason) => sync.failed(&self.service, &HostStore, reason),
            PartStep::Complete(response) => {
                let now = now_millis();
                sync.hold_lease_to_parse(
                    &self.service,
                    &HostStore,
                    self.worker,
                    now,
                    response.body.len(),
                );
                sync.finish(&self.service, &HostStore, now, response)
            }
        };
        match outcome {
            FetchOutcome::Updated { version, keys } => {
                SourceMetrics::bump(self.metrics.updates);
                let event = self.remote.borrow_mut().install(version, keys);
                self.report(event);
            }
            FetchOutcome::Unchanged { .. } => {}
            FetchOutcome::RolledBack {
                offered,
                current,
                failures,
            } => {
                SourceMetrics::bump(self.metrics.fetch_failures);
                SourceMetrics::bump(self.metrics.rollbacks_refused);
                log(
                    LogLevel::Warn,
                    &self
                        .remote
                        .borrow()
                        .rollback_line(&self.name, offered, current, failures),
                );
            }
            FetchOutcome::Failed { reason, failures } => {
                SourceMetrics::bump(self.metrics.fetch_failures);
                let line = self
                    .remote
                    .borrow()
                    .fetch_failed_line(&self.name, failures, &reason);
                log(LogLevel::Warn, &line);
            }
        }
    }

    /// The VM is going away: let another take over the fetch at once.
    pub fn on_done(&self) {
        if let KeyServiceMode::Full(sync) = &self.service.mode {
            sync.release_lease(&self.service, &HostStore, self.worker);
        }
    }

    /// Catches up with the shared set, copying in at most `chunks` chunks of a new version.
    fn sync(&self, chunks: u32) {
        let event = self
            .remote
            .borrow_mut()
            .sync(&self.service, &HostStore, chunks);
        if let Some(event) = event {
            self.report(event);
        }
    }

    fn report(&self, event: SyncEvent) {
        if let SyncEvent::Loaded { version, keys } = event {
            SourceMetrics::set(self.metrics.version, version);
            SourceMetrics::set(self.metrics.keys, keys as u64);
        }
        let (warning, line) = event.log_line(&self.name);
        log(
            if warning {
                LogLevel::Warn
            } else {
                LogLevel::Info
            },
            &line,
        );
    }

    /// Full mode: this VM's current set, after catching up with the shared version.
    fn keys(&self) -> Result<Arc<KeySet>, Unavailable> {
        self.sync(CHUNKS_PER_REQUEST);
        self.remote.borrow().current(&self.service, now_millis())
    }

    /// Keys cannot be verified: fail closed (503), or let the request through unauthenticated
    /// when the operator chose availability.
    fn unavailable<'a>(&self, policy: &'a Policy) -> Decision<'a> {
        match self.service.on_unavailable {
            OnUnavailable::Deny => Decision::Deny {
                code: ErrorCode::KeysetUnavailable,
                key_id: None,
            },
            OnUnavailable::Allow => {
                SourceMetrics::bump(self.metrics.unverified_allowed);
                log(
                    LogLevel::Warn,
                    &format!(
                        "keygate[{}]: keys cannot be verified; request allowed unauthenticated (on_unavailable: allow)",
                        self.name
                    ),
                );
                Decision::Allow {
                    principal: Principal::Anonymous,
                    policy,
                }
            }
        }
    }
}

/// A request paused while its key is looked up.
pub struct PendingLookup {
    token: u32,
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
        let Some(cache) = KeyCache::of(&source.service) else {
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
        let stale = match cache.get(&HostStore, &key, now_millis()) {
            Cached::Fresh(answer) => {
                SourceMetrics::bump(source.metrics.cache_hits);
                let decision = decide_for_key(config, policy, &credential, answer.record(), &req);
                return self.apply(runtime, &req, decision).action();
            }
            Cached::Stale(answer) => Some(answer),
            Cached::Miss => None,
        };
        SourceMetrics::bump(source.metrics.cache_misses);
        if let Some((_, waiters)) = source.lookups_in_flight.borrow_mut().get_mut(&key) {
            SourceMetrics::bump(source.metrics.coalesced);
            waiters.push(Waiter {
                context_id: self.context_id,
                req,
                stale,
                request_ended: self.request_ended,
            });
            self.waiting = true;
            return Action::Pause;
        }
        if !cache.admit_miss(&HostStore, now_millis()) {
            // Past the process's lookups per second: no fetch. A key with an old answer is
            // decided with it; an unknown one cannot be verified now, whatever on_unavailable
            // says (unknown keys must not get through unauthenticated by flooding).
            SourceMetrics::bump(source.metrics.misses_over_cap);
            let decision = match &stale {
                Some(answer) => decide_for_key(config, policy, &credential, answer.record(), &req),
                None => Decision::Deny {
                    code: ErrorCode::KeysetUnavailable,
                    key_id: None,
                },
            };
            return self.apply(runtime, &req, decision).action();
        }
        let sent = cache
            .request_headers(&key)
            .ok_or_else(|| "no lookup path for this kind of key".to_string())
            .and_then(|headers| dispatch(&source.service, &headers));
        match sent {
            Ok(token) => {
                source
                    .lookups_in_flight
                    .borrow_mut()
                    .insert(key.clone(), (now_millis(), Vec::new()));
                self.pending = Some(PendingLookup {
                    token,
                    req,
                    key,
                    stale,
                });
                Action::Pause
            }
            Err(reason) => {
                source.lookup_failed(&reason);
                let decision = match &stale {
                    Some(answer) => {
                        decide_for_key(config, policy, &credential, answer.record(), &req)
                    }
                    None => source.unavailable(policy),
                };
                self.apply(runtime, &req, decision).action()
            }
        }
    }

    /// The key service answered (or failed) for the paused request: cache the answer, decide,
    /// and resume or reply.
    pub(super) fn on_lookup_response(&mut self, token: u32, body_size: usize) {
        let Some(pending) = self.pending.take_if(|p| p.token == token) else {
            return;
        };
        let Some(runtime) = self.runtime.clone() else {
            return;
        };
        let Some(source) = &runtime.source else {
            return;
        };
        let Some(cache) = KeyCache::of(&source.service) else {
            return;
        };
        let config = &runtime.config;
        let (response, _) = read_call_response(body_size);
        let fetched = match parse_answer(response.status, &response.body, &pending.key) {
            Ok(fetched) => {
                cache.put(&HostStore, &pending.key, &fetched, now_millis());
                Some(fetched.answer)
            }
            Err(reason) => {
                source.lookup_failed(&reason);
                None
            }
        };
        let answer = fetched.clone().or(pending.stale);
        // The same request view gives the same credential and policy as before the pause.
        let decision = match begin(config, &pending.req) {
            Step::Decided(decision) => decision,
            Step::Lookup { credential, policy } => match &answer {
                Some(answer) => {
                    decide_for_key(config, policy, &credential, answer.record(), &pending.req)
                }
                None => source.unavailable(policy),
            },
        };
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
            resolve_waiter(&runtime, source, waiter, fetched.as_ref());
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }
}

/// Decides a waiting request with the answer its key's lookup got (or its own old answer, if
/// the lookup failed) and applies the decision in that request's context.
fn resolve_waiter(runtime: &Runtime, source: &KeySource, waiter: Waiter, fetched: Option<&Answer>) {
    if hostcalls::set_effective_context(waiter.context_id).is_err() {
        return; // The request is gone.
    }
    let config = &runtime.config;
    let answer = fetched.or(waiter.stale.as_ref());
    let decision = match begin(config, &waiter.req) {
        Step::Decided(decision) => decision,
        Step::Lookup { credential, policy } => match answer {
            Some(answer) => {
                decide_for_key(config, policy, &credential, answer.record(), &waiter.req)
            }
            None => source.unavailable(policy),
        },
    };
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
        resolve_waiter(runtime, source, waiter, None);
    }
}

impl KeySource {
    fn lookup_failed(&self, reason: &str) {
        SourceMetrics::bump(self.metrics.lookup_failures);
        log(
            LogLevel::Warn,
            &format!("keygate[{}]: key lookup failed: {reason}", self.name),
        );
    }
}

/// Sends a GET to the key service's cluster.
fn dispatch(service: &KeyService, headers: &[(&'static str, String)]) -> Result<u32, String> {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    hostcalls::dispatch_http_call(
        &service.cluster,
        headers,
        None,
        Vec::new(),
        Duration::from_millis(service.timeout_ms),
    )
    .map_err(|status| format!("cannot call cluster '{}' ({status:?})", service.cluster))
}

/// Status, ETag and body of the callout being answered (no status when there was no answer),
/// and its `content-range`.
fn read_call_response(body_size: usize) -> (FetchResponse, Option<String>) {
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
    let response = FetchResponse {
        status: text(":status").and_then(|s| s.parse().ok()),
        etag: text("etag"),
        body,
    };
    (response, text("content-range"))
}
