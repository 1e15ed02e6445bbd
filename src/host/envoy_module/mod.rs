//! The Envoy dynamic-module host (`libkeygate.so`): the same core as the wasm filter, called
//! in-process through Envoy 1.40's C ABI. This file is safe code; `ffi` holds every `unsafe`
//! block and the `catch_unwind` guard of every hook.
//!
//! One configuration is shared by all workers (`Sync`, read-only after load); each stream gets a
//! `Stream` holding an `Arc` to it.

mod ffi;
mod full_sync;
mod limits_table;
mod lookups_in_flight;
mod process_store;

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::core::access_log::AccessLogEntry;
use crate::core::codes::{ErrorCode, ALLOWED_COUNTER, DENIED_COUNTER};
use crate::core::config::{Config, SessionConfig};
use crate::core::credential::Credential;
use crate::core::decision::{
    begin, decide_for_key, lookup, reads_clock, Decision, Principal, Step,
};
use crate::core::keyset::{KeyRecord, KeySet};
use crate::core::keysource::host::{Clock, Counter, Gauge, Metrics};
use crate::core::keysource::lookup_flow::{
    unavailable as core_unavailable, LookupFlow, LookupOutcome,
};
use crate::core::keysource::lookup_on_miss::Answer;
use crate::core::keysource::paths::LookupKey;
use crate::core::keysource::service::{FetchResponse, KeyServiceMode};
use crate::core::policy::Policy;
use crate::core::reply::{denial_log_line, preflight_reply, unconfigured_reply};
use crate::core::request::{RequestView, SessionEvidence};
use crate::core::selectors::check_form_body;
use crate::core::session_token;
use crate::core::settle::{settle, Settlement};
use crate::core::upstream::upstream_edits;
use ffi::{log, log_enabled, CalloutOrigin, ConfigHandle, FilterHandle, LogLevel};
use full_sync::{FullSource, TICK_EVENT};
use limits_table::LimitsTable;
use lookups_in_flight::{LookupsInFlight, Outcome, Role, LOOKUP_ANSWERED};
use process_store::{ProcessSide, ProcessStore};

/// Envoy stats counters; Envoy prefixes their names with the module metrics namespace
/// (`dynamicmodulescustom.` by default).
struct Counters {
    allowed: Option<usize>,
    denied: Option<usize>,
    denied_by_code: Vec<(ErrorCode, Option<usize>)>,
    /// Lookup on miss, named as the wasm filter's.
    cache_hits: Option<usize>,
    cache_misses: Option<usize>,
    lookup_failures: Option<usize>,
    misses_over_cap: Option<usize>,
    coalesced: Option<usize>,
    unverified_allowed: Option<usize>,
}

impl Counters {
    fn define(handle: &ConfigHandle, name: &str, lookup: bool) -> Counters {
        let counter = |suffix: &str| handle.define_counter(&format!("keygate.{name}.{suffix}"));
        let lookup_counter = |suffix: &str| lookup.then(|| counter(suffix)).flatten();
        Counters {
            cache_hits: lookup_counter(Counter::CacheHits.name()),
            cache_misses: lookup_counter(Counter::CacheMisses.name()),
            lookup_failures: lookup_counter(Counter::LookupFailures.name()),
            misses_over_cap: lookup_counter(Counter::MissesOverCap.name()),
            coalesced: lookup_counter(Counter::Coalesced.name()),
            unverified_allowed: counter(Counter::UnverifiedAllowed.name()),
            allowed: counter(ALLOWED_COUNTER),
            denied: counter(DENIED_COUNTER),
            denied_by_code: ErrorCode::ALL
                .iter()
                .map(|c| (*c, counter(&c.denied_counter())))
                .collect(),
        }
    }

    fn bump(filter: &FilterHandle, id: Option<usize>) {
        if let Some(id) = id {
            filter.increment_counter(id);
        }
    }

    fn count_denial(&self, filter: &FilterHandle, code: ErrorCode) {
        Counters::bump(filter, self.denied);
        if let Some((_, id)) = self.denied_by_code.iter().find(|(c, _)| *c == code) {
            Counters::bump(filter, *id);
        }
    }
}

/// The core's key-source host traits on a worker, for one stream's hooks: the process store,
/// the stream's callouts and counters, Envoy's log.
struct StreamHost<'a> {
    filter: &'a FilterHandle,
    /// The lookup cache's store (`None`: not in lookup mode).
    store: Option<&'a ProcessStore>,
    counters: &'a Counters,
}

impl<'a> StreamHost<'a> {
    fn of(filter: &'a FilterHandle, runtime: &'a Runtime) -> StreamHost<'a> {
        StreamHost {
            filter,
            store: runtime.cache_store.as_deref(),
            counters: &runtime.counters,
        }
    }
}

impl ProcessSide for StreamHost<'_> {
    fn process_store(&self) -> Option<&ProcessStore> {
        self.store
    }
    fn callout_origin(&self) -> CalloutOrigin<'_> {
        CalloutOrigin::Stream(self.filter)
    }
}

impl Metrics for StreamHost<'_> {
    fn bump(&self, counter: Counter) {
        let c = self.counters;
        let id = match counter {
            Counter::CacheHits => c.cache_hits,
            Counter::CacheMisses => c.cache_misses,
            Counter::LookupFailures => c.lookup_failures,
            Counter::MissesOverCap => c.misses_over_cap,
            Counter::Coalesced => c.coalesced,
            Counter::UnverifiedAllowed => c.unverified_allowed,
            // Full mode's are counted on the main thread (`full_sync`).
            Counter::Fetches
            | Counter::FetchFailures
            | Counter::Updates
            | Counter::RollbacksRefused => None,
        };
        Counters::bump(self.filter, id);
    }
    fn record(&self, _gauge: Gauge, _value: u64) {
        // The gauges are full mode's, set on the main thread.
    }
}

struct Runtime {
    config: Config,
    keys: KeySet,
    counters: Counters,
    /// The process-wide counters (an empty table when limits are off).
    limits: Arc<LimitsTable>,
    /// The answers of lookup on miss, shared by every worker (`None`: not that mode).
    cache_store: Option<Arc<ProcessStore>>,
    /// Lookup on miss: the lookups being made, so a key is fetched once at a time.
    lookups: LookupsInFlight,
    /// The key service in full mode: one set for the process (`None`: not that mode).
    full: Option<Arc<FullSource>>,
    /// Whether a request's time matters: a key with a validity window, or keys looked up.
    reads_clock: bool,
}

/// What `config_new` hands Envoy: shared by every worker.
pub struct FilterConfig {
    runtime: Arc<Runtime>,
}

impl Drop for FilterConfig {
    fn drop(&mut self) {
        if let Some(full) = &self.runtime.full {
            full.stop();
        }
    }
}

// Envoy shares one config among all workers; a stream stays on its worker.
const _: () = {
    const fn shared_by_workers<T: Send + Sync>() {}
    shared_by_workers::<FilterConfig>();
};

/// One HTTP stream.
pub struct Stream {
    runtime: Arc<Runtime>,
    /// `RateLimit-*` headers for the response of an allowed request, when configured. A cell:
    /// a local reply re-enters this filter's response hook while the request hook runs.
    response_headers: RefCell<Vec<(&'static str, String)>>,
    /// The key lookup this request is paused for.
    pending: RefCell<Option<PendingLookup>>,
    /// Another request's lookup of this request's key, which this request is paused for.
    waiting: RefCell<Option<WaitingLookup>>,
    /// Set once a local reply went out: a panic after it must not send a second one.
    replied: Cell<bool>,
    /// Whether the request has ended: no body follows, or its last data or trailers came.
    request_ended: Cell<bool>,
    /// An allowed API-key request whose form body must still be checked whole.
    form_check: RefCell<Option<FormCheck>>,
}

/// A form body may name a tenant selector (Flask, Servlet and Rails merge it with the query).
/// The request is held, headers and all, until its body is whole and checked: a refused request
/// never reaches the upstream. Envoy buffers the body meanwhile, up to its buffer limit (413
/// past it), as it does for the wasm filter.
struct FormCheck {
    req: RequestView,
    record: KeyRecord,
}

/// What a request-body or trailers hook did with the request.
pub enum BodyVerdict {
    /// The request (its held headers too) goes on upstream.
    Pass,
    /// Envoy keeps the data buffered, up to its buffer limit (413 past it): the form body is
    /// incomplete.
    Hold,
    /// Envoy keeps the data, with flow control rather than a limit: the request is undecided
    /// (its key being looked up), as the wasm filter's paused request is.
    Wait,
    /// A local reply went out.
    Replied,
}

impl Stream {
    /// Paused for a key lookup, its own or another request's: nothing may go upstream yet.
    fn awaits_lookup(&self) -> bool {
        let pending = self.pending.try_borrow().map_or(true, |p| p.is_some());
        let waiting = self.waiting.try_borrow().map_or(true, |w| w.is_some());
        pending || waiting
    }
}

/// A request paused until another request's lookup of its key answers.
struct WaitingLookup {
    req: RequestView,
    outcome: Outcome,
    /// An expired cached answer, served if the lookup fails.
    stale: Option<Answer>,
}

impl Drop for Stream {
    /// A stream that goes away mid-lookup cancels its callout, which then never answers: its
    /// waiters are settled as by a failed lookup.
    fn drop(&mut self) {
        if let Some(pending) = self.pending.get_mut().take() {
            self.runtime.lookups.settle(&pending.key, None);
        }
    }
}

/// A request paused while its key is looked up.
struct PendingLookup {
    callout_id: u64,
    req: RequestView,
    key: LookupKey,
    /// An expired cached answer, served if the lookup fails.
    stale: Option<Answer>,
}

fn config_new(handle: &ConfigHandle, bytes: &[u8]) -> Option<FilterConfig> {
    let (config, keys) = match Config::parse(bytes) {
        Ok(parsed) => parsed,
        Err(err) => {
            log(
                LogLevel::Critical,
                &format!("keygate: invalid configuration: {err}"),
            );
            return None;
        }
    };
    let store = config
        .key_service
        .as_ref()
        .map(|_| ProcessStore::for_filter(&config.name));
    let (cache_store, full) = match (&config.key_service, store) {
        (Some(service), Some(store)) => match &service.mode {
            KeyServiceMode::Lookup(_) => (Some(store), None),
            KeyServiceMode::Full(sync) => {
                let full = FullSource::start(handle, &config.name, service, sync, store);
                (None, Some(full))
            }
        },
        _ => (None, None),
    };
    let counters = Counters::define(handle, &config.name, cache_store.is_some());
    let limits = if config.limits.enabled {
        LimitsTable::for_filter(&config.name, &config.limits)
    } else {
        Arc::new(LimitsTable::empty())
    };
    let reads_clock = reads_clock(&config, &keys);
    log(
        LogLevel::Info,
        &format!(
            "keygate[{}]: configured with {} keys (native module)",
            config.name,
            keys.len()
        ),
    );
    Some(FilterConfig {
        runtime: Arc::new(Runtime {
            config,
            keys,
            counters,
            limits,
            cache_store,
            lookups: LookupsInFlight::default(),
            full,
            reads_clock,
        }),
    })
}

fn stream_new(config: &FilterConfig) -> Stream {
    Stream {
        runtime: Arc::clone(&config.runtime),
        response_headers: RefCell::new(Vec::new()),
        pending: RefCell::new(None),
        waiting: RefCell::new(None),
        replied: Cell::new(false),
        request_ended: Cell::new(false),
        form_check: RefCell::new(None),
    }
}

/// Decides one request; true lets it go on upstream, false holds it: a local reply went out, or
/// it waits for a key lookup or for its form body (`on_request_body`).
fn on_request_headers(filter: &FilterHandle, stream: &Stream, end_of_stream: bool) -> bool {
    #[cfg(feature = "panic-probe")]
    panic_probe();
    stream.request_ended.set(end_of_stream);
    let runtime = &*stream.runtime;
    let config = &runtime.config;
    let req = read_request(filter, runtime);
    let decision = match begin(config, &req) {
        Step::Decided(decision) => decision,
        Step::Lookup { credential, policy } => {
            if runtime.cache_store.is_some() {
                return decide_by_lookup(filter, stream, req, credential, policy);
            }
            match &runtime.full {
                Some(full) => match full.current(now_millis()) {
                    Ok(keys) => {
                        let record = lookup(&keys, &credential);
                        let decision = decide_for_key(config, policy, &credential, record, &req);
                        return apply(filter, stream, &req, decision);
                    }
                    Err(_) => unavailable(filter, runtime, policy),
                },
                None => {
                    let record = lookup(&runtime.keys, &credential);
                    decide_for_key(config, policy, &credential, record, &req)
                }
            }
        }
    };
    apply(filter, stream, &req, decision)
}

/// Lookup on miss: decide from the process-wide cache, or pause the request and ask the key
/// service. True lets the request go on now.
fn decide_by_lookup(
    filter: &FilterHandle,
    stream: &Stream,
    req: RequestView,
    credential: Credential,
    policy: &Policy,
) -> bool {
    let runtime = &*stream.runtime;
    let config = &runtime.config;
    let Some(flow) = lookup_flow(runtime) else {
        return apply(
            filter,
            stream,
            &req,
            Decision::Deny {
                code: ErrorCode::KeysetUnavailable,
                key_id: None,
            },
        );
    };
    let host = StreamHost::of(filter, runtime);
    let key = LookupKey::of(&credential);
    let stale = match flow.cached(&host, &key) {
        Ok(answer) => {
            let outcome = LookupOutcome::Answer(&answer);
            let decision = flow.decide(&host, config, policy, &credential, &req, outcome);
            return apply(filter, stream, &req, decision);
        }
        Err(stale) => stale,
    };
    match runtime
        .lookups
        .join_or_lead(&key, || filter.waker(), || flow.admit(&host))
    {
        Role::Lead => {}
        Role::Wait(outcome) => {
            flow.coalesced(&host);
            if let Ok(mut waiting) = stream.waiting.try_borrow_mut() {
                *waiting = Some(WaitingLookup {
                    req,
                    outcome,
                    stale,
                });
            }
            return false;
        }
        Role::OverCap => {
            let outcome = LookupOutcome::over_cap(stale.as_ref());
            let decision = flow.decide(&host, config, policy, &credential, &req, outcome);
            return apply(filter, stream, &req, decision);
        }
    }
    match flow.send(&host, &key) {
        Some(callout_id) => {
            if let Ok(mut pending) = stream.pending.try_borrow_mut() {
                *pending = Some(PendingLookup {
                    callout_id,
                    req,
                    key,
                    stale,
                });
            }
            false
        }
        None => {
            runtime.lookups.settle(&key, None);
            let outcome = LookupOutcome::failed(stale.as_ref());
            let decision = flow.decide(&host, config, policy, &credential, &req, outcome);
            apply(filter, stream, &req, decision)
        }
    }
}

/// The lookup flow of the filter's key service, in lookup mode.
fn lookup_flow(runtime: &Runtime) -> Option<LookupFlow<'_>> {
    let service = runtime.config.key_service.as_ref()?;
    runtime.cache_store.as_ref()?;
    LookupFlow::of(&runtime.config.name, service)
}

/// The key service answered (or failed) for the paused request: cache the answer, decide, and
/// resume the request or reply.
fn on_callout_done(
    filter: &FilterHandle,
    stream: &Stream,
    callout_id: u64,
    response: FetchResponse,
) {
    let pending = match stream.pending.try_borrow_mut() {
        Ok(mut pending) if pending.as_ref().is_some_and(|p| p.callout_id == callout_id) => {
            pending.take()
        }
        _ => None,
    };
    let Some(pending) = pending else {
        return;
    };
    let runtime = &*stream.runtime;
    let Some(flow) = lookup_flow(runtime) else {
        return;
    };
    let fetched = flow.answered(&StreamHost::of(filter, runtime), &pending.key, &response);
    runtime.lookups.settle(&pending.key, fetched.clone());
    resume_decided(filter, stream, &pending.req, fetched.or(pending.stale));
}

/// The lookup this request waited for (sent by another request, maybe on another worker) has
/// answered: decide with its answer, or with this request's own old one if it failed.
fn on_stream_scheduled(filter: &FilterHandle, stream: &Stream, event_id: u64) {
    if event_id != LOOKUP_ANSWERED {
        return;
    }
    let waiting = match stream.waiting.try_borrow_mut() {
        Ok(mut waiting) => waiting.take(),
        Err(_) => None,
    };
    let Some(waiting) = waiting else {
        return;
    };
    let answer = waiting.outcome.get().cloned().flatten().or(waiting.stale);
    resume_decided(filter, stream, &waiting.req, answer);
}

/// Decides a paused request with its key's answer (`None`: keys cannot be verified now), then
/// resumes it or replies.
fn resume_decided(
    filter: &FilterHandle,
    stream: &Stream,
    req: &RequestView,
    answer: Option<Answer>,
) {
    let runtime = &*stream.runtime;
    let config = &runtime.config;
    // The same request view gives the same credential and policy as before the pause.
    let decision = match begin(config, req) {
        Step::Decided(decision) => decision,
        Step::Lookup { credential, policy } => match lookup_flow(runtime) {
            Some(flow) => {
                let host = StreamHost::of(filter, runtime);
                let outcome = LookupOutcome::failed(answer.as_ref());
                flow.decide(&host, config, policy, &credential, req, outcome)
            }
            None => Decision::Deny {
                code: ErrorCode::KeysetUnavailable,
                key_id: None,
            },
        },
    };
    if apply(filter, stream, req, decision) {
        filter.continue_decoding();
    }
}

/// Main thread: a tick the key-set ticker posted.
fn on_config_scheduled(config: &FilterConfig, event_id: u64) {
    if let (Some(full), TICK_EVENT) = (&config.runtime.full, event_id) {
        full.on_tick();
    }
}

/// Main thread: the answer to a key-set fetch.
fn on_fetch_done(config: &FilterConfig, callout_id: u64, response: FetchResponse) {
    if let Some(full) = &config.runtime.full {
        full.on_fetch_done(callout_id, response);
    }
}

/// Keys cannot be verified (full mode): `on_unavailable` decides.
fn unavailable<'a>(filter: &FilterHandle, runtime: &Runtime, policy: &'a Policy) -> Decision<'a> {
    match &runtime.config.key_service {
        Some(service) => core_unavailable(
            &runtime.config.name,
            service,
            &StreamHost::of(filter, runtime),
            policy,
        ),
        None => Decision::Deny {
            code: ErrorCode::KeysetUnavailable,
            key_id: None,
        },
    }
}

/// The `panic-probe` build panics on every request, to prove the hook guard fails closed.
#[cfg(feature = "panic-probe")]
#[allow(clippy::panic)]
fn panic_probe() {
    panic!("keygate panic probe");
}

/// Carries out the core's settlement of a decision: true lets the request go on now; false
/// holds it (replied, or its form body still to check).
fn apply(filter: &FilterHandle, stream: &Stream, req: &RequestView, decision: Decision) -> bool {
    let runtime = &*stream.runtime;
    let config = &runtime.config;
    let table = &*runtime.limits;
    let settlement = settle(config, req, decision, table, &SystemClock);
    if config.limits.enabled && !matches!(settlement, Settlement::Deny { .. }) {
        table.maybe_sweep(&config.limits, now_millis());
    }
    if let Some((code, extra_headers)) = settlement.refusal() {
        deny(
            filter,
            stream,
            code,
            &settlement.access_log_entry(),
            extra_headers,
        );
        return false;
    }
    publish(config, filter, &settlement.access_log_entry());
    let Settlement::Forward {
        principal,
        response_headers,
        check_form_body,
    } = settlement
    else {
        stream.replied.set(true);
        let reply = preflight_reply();
        filter.send_response(reply.status, &[], &reply.body);
        return false;
    };
    if !response_headers.is_empty() {
        if let Ok(mut headers) = stream.response_headers.try_borrow_mut() {
            *headers = response_headers;
        }
    }
    Counters::bump(filter, runtime.counters.allowed);
    let edits = upstream_edits(config, req, &principal);
    // Each removal is a host call that scans Envoy's header map: only for headers the
    // request carries (read in this same hook, so nothing added one since).
    for name in edits.remove.iter().filter(|name| req.has_header(name)) {
        filter.set_request_header(name, None);
    }
    // A set is a removal scan plus an add in Envoy: a header the request does not carry
    // (and not set twice here) is only added, and one it carries once with this very value
    // (an earlier keygate on the chain set it) is left as it is: the map would come out the
    // same. Not if a removal above took it out (`req` is the map before the removals).
    for (at, (name, value)) in edits.set.iter().enumerate() {
        let set_before = edits
            .set
            .get(..at)
            .is_some_and(|earlier| earlier.iter().any(|(n, _)| n == name));
        let mut carried = req.header_values(name);
        let first = carried.next();
        let unchanged = first == Some(value.as_bytes()) && carried.next().is_none();
        let removed = || edits.remove.iter().any(|r| r.eq_ignore_ascii_case(name));
        if !set_before && unchanged && !removed() {
            continue;
        }
        if set_before || first.is_some() {
            filter.set_request_header(name, Some(value));
        } else {
            filter.add_request_header(name, value);
        }
    }
    if edits.clear_route_cache {
        filter.clear_route_cache();
    }
    match &principal {
        Principal::ApiKey { record, .. } if check_form_body => {
            check_form_when_whole(filter, stream, req, record)
        }
        _ => true,
    }
}

/// Checks the form body of an allowed request now if the request has ended, else holds the
/// request until it has (`on_request_body`). True lets the request go on now.
fn check_form_when_whole(
    filter: &FilterHandle,
    stream: &Stream,
    req: &RequestView,
    record: &KeyRecord,
) -> bool {
    if stream.request_ended.get() {
        return check_form(filter, stream, req, record);
    }
    if let Ok(mut slot) = stream.form_check.try_borrow_mut() {
        *slot = Some(FormCheck {
            req: req.clone(),
            record: record.clone(),
        });
    }
    false
}

/// The core's check of the whole form body Envoy holds; a refusal replaces the "allowed" entry
/// already published for this request. True lets the request go on.
fn check_form(
    filter: &FilterHandle,
    stream: &Stream,
    req: &RequestView,
    record: &KeyRecord,
) -> bool {
    let body = filter.request_body();
    match check_form_body(&stream.runtime.config, req, record, &body) {
        Ok(()) => true,
        Err(code) => {
            let entry = AccessLogEntry::denied(Some(code), Some(&record.id));
            deny(filter, stream, code, &entry, Vec::new());
            false
        }
    }
}

/// Request data: held while the request's key is looked up (returning Continue here would send
/// the held headers upstream undecided) or while its form body is incomplete; checked when whole.
fn on_request_body(filter: &FilterHandle, stream: &Stream, end_of_stream: bool) -> BodyVerdict {
    if end_of_stream {
        stream.request_ended.set(true);
    }
    body_verdict(filter, stream)
}

/// Trailers end the request: a form body still held is whole now.
fn on_request_trailers(filter: &FilterHandle, stream: &Stream) -> BodyVerdict {
    stream.request_ended.set(true);
    body_verdict(filter, stream)
}

fn body_verdict(filter: &FilterHandle, stream: &Stream) -> BodyVerdict {
    if stream.replied.get() {
        return BodyVerdict::Replied;
    }
    if stream.awaits_lookup() {
        return BodyVerdict::Wait;
    }
    let check = match stream.form_check.try_borrow_mut() {
        Ok(mut slot) if slot.is_some() => {
            if !stream.request_ended.get() {
                return BodyVerdict::Hold;
            }
            slot.take()
        }
        Ok(_) => None,
        Err(_) => return BodyVerdict::Hold,
    };
    match check {
        Some(check) if !check_form(filter, stream, &check.req, &check.record) => {
            BodyVerdict::Replied
        }
        _ => BodyVerdict::Pass,
    }
}

/// The filter-state name of the decision: the one the wasm filter's `proxy_set_property` gets
/// (Envoy prefixes it with `wasm.`), so one access-log format serves both hosts.
const ACCESS_LOG_STATE: &str = "wasm.keygate";

/// Skipped when the config turns the access log off, as in the wasm host.
fn publish(config: &Config, filter: &FilterHandle, entry: &AccessLogEntry) {
    if config.access_log {
        filter.set_filter_state(ACCESS_LOG_STATE, &entry.to_json());
    }
}

/// Answers with the code's pre-rendered reply plus per-request headers, counts it, publishes
/// it for the access log and logs the denial line.
fn deny(
    filter: &FilterHandle,
    stream: &Stream,
    code: ErrorCode,
    entry: &AccessLogEntry,
    extra_headers: Vec<(&'static str, String)>,
) {
    let runtime = &*stream.runtime;
    let config = &runtime.config;
    stream.replied.set(true);
    runtime.counters.count_denial(filter, code);
    publish(config, filter, entry);
    let key_id = entry.key_id;
    let reply = config.replies.rendered(code);
    let status = reply.map_or(code.status(), |r| r.status);
    if log_enabled(LogLevel::Info) {
        log(
            LogLevel::Info,
            &denial_log_line(&config.name, status, code, key_id),
        );
    }
    let headers: Vec<(&str, &str)> = reply
        .iter()
        .flat_map(|r| r.headers.iter())
        .chain(extra_headers.iter())
        .map(|(n, v)| (*n, v.as_str()))
        .collect();
    let body = reply.map_or(&[][..], |r| r.body.as_slice());
    filter.send_response(status, &headers, body);
}

/// After a panic in the request hook: fail closed with 503 KEYSET_UNAVAILABLE, unless the
/// request was answered already.
fn on_panic(filter: &FilterHandle, stream: &Stream) {
    if stream.replied.get() {
        return;
    }
    log(
        LogLevel::Error,
        &format!(
            "keygate[{}]: internal error (panic) while deciding; failing closed",
            stream.runtime.config.name
        ),
    );
    let code = ErrorCode::KeysetUnavailable;
    deny(
        filter,
        stream,
        code,
        &AccessLogEntry::denied(Some(code), None),
        Vec::new(),
    );
}

/// A stream without keygate state (its creation failed): 503 KEYSET_UNAVAILABLE.
fn send_unconfigured_reply(filter: &FilterHandle) {
    let reply = unconfigured_reply();
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .collect();
    filter.send_response(reply.status, &headers, &reply.body);
}

fn on_response_headers(filter: &FilterHandle, stream: &Stream) {
    let Ok(mut headers) = stream.response_headers.try_borrow_mut() else {
        return;
    };
    for (name, value) in headers.drain(..) {
        filter.set_response_header(name, &value);
    }
}

fn unix_now() -> std::time::Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn now_millis() -> i64 {
    i64::try_from(unix_now().as_millis()).unwrap_or(i64::MAX)
}

/// The system clock for core code that takes a `Clock`.
struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_millis()
    }
}

fn now_secs() -> i64 {
    i64::try_from(unix_now().as_secs()).unwrap_or(i64::MAX)
}

/// Gathers what the core needs with as few host calls as the config allows.
fn read_request(filter: &FilterHandle, runtime: &Runtime) -> RequestView {
    let config = &runtime.config;
    let mut req = RequestView {
        headers: filter.request_headers(),
        now: if runtime.reads_clock { now_secs() } else { 0 },
        route_policy: None,
        session: SessionEvidence::Absent,
    };
    if config.uses_route_policies() {
        req.route_policy = filter.route_metadata_string("keygate", "policy");
    }
    if let Some(session) = &config.session {
        if session.cookie_present(&req) {
            req.session = read_session(filter, session, &req);
        }
    }
    req
}

/// What `jwt_authn` concluded about the session cookie. The ABI reads only top-level metadata
/// values, so its keys tell verified from failed, and the claims come from the cookie that
/// `jwt_authn` just judged (see `core::session_token`).
fn read_session(
    filter: &FilterHandle,
    session: &SessionConfig,
    req: &RequestView,
) -> SessionEvidence {
    let keys = filter.dynamic_metadata_keys(&session.metadata_namespace);
    let token = req
        .cookie_values(&session.cookie)
        .first()
        .map(|t| t.to_vec());
    let token = token.as_deref().unwrap_or_default();
    if keys.contains(&session.payload_key) {
        SessionEvidence::Verified {
            subject: session_token::string_claim(token, &session.subject_claim),
        }
    } else if keys.contains(&session.failure_key) {
        SessionEvidence::Failed {
            expired: session_token::expired(token, now_secs()),
        }
    } else {
        SessionEvidence::Absent
    }
}
