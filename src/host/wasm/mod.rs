//! The proxy-wasm host (keygate.wasm): the only code that talks to the host. It turns host calls into a
//! `RequestView`, asks the core for a decision, and applies the answer.

mod filter_state;
mod host_calls;
mod keysource;
mod local_reply;
mod raw;
mod request_headers;
mod shared_store;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::core::access_log::AccessLogEntry;
use crate::core::codes::{ErrorCode, ALLOWED_COUNTER, DENIED_COUNTER};
use crate::core::config::Config;
use crate::core::credential::Credential;
use crate::core::decision::{
    begin, decide_for_key, lookup, reads_clock, Decision, Principal, Step,
};
use crate::core::keyset::KeyRecord;
use crate::core::keyset::KeySet;
use crate::core::keysource::host::Clock;
use crate::core::keysource::lookup_flow::{LookupFlow, LookupOutcome};
use crate::core::keysource::lookup_on_miss::Answer;
use crate::core::keysource::lookup_waiters::LookupsInFlight;
use crate::core::keysource::paths::LookupKey;
use crate::core::limits::{ensure_slots, sweep, sweep_batch, sweep_due, SWEEP_PERIOD_MS};
use crate::core::policy::Policy;
use crate::core::reply::{preflight_reply, unconfigured_reply, LocalReply};
use crate::core::request::{RequestView, SessionEvidence};
use crate::core::selectors::check_form_body;
use crate::core::session_token;
use crate::core::settle::{settle as core_settle, Settlement};
use crate::core::upstream::upstream_edits;
use host_calls::{bump, log, now_millis, HostClock};
use keysource::{read_call_response, KeySource};
use local_reply::PreparedHeaders;
use shared_store::HostStore;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(KeygateRoot::default()) });
}}

/// Envoy stats counters, defined once per VM; Envoy shares counters of the same name.
struct Metrics {
    allowed: Option<u32>,
    denied: Option<u32>,
    denied_by_code: Vec<(ErrorCode, Option<u32>)>,
}

impl Metrics {
    fn define(name: &str) -> Metrics {
        let counter = |suffix: &str| {
            hostcalls::define_metric(MetricType::Counter, &format!("keygate.{name}.{suffix}")).ok()
        };
        Metrics {
            allowed: counter(ALLOWED_COUNTER),
            denied: counter(DENIED_COUNTER),
            denied_by_code: ErrorCode::ALL
                .iter()
                .map(|c| (*c, counter(&c.denied_counter())))
                .collect(),
        }
    }

    fn count_denial(&self, code: ErrorCode) {
        bump(self.denied);
        if let Some((_, id)) = self.denied_by_code.iter().find(|(c, _)| *c == code) {
            bump(*id);
        }
    }
}

struct Runtime {
    config: Config,
    /// The inline key set (empty when keys come from a key service).
    keys: KeySet,
    metrics: Metrics,
    /// Each code's reply headers, serialized for the host once.
    reply_headers: PreparedHeaders,
    source: Option<KeySource>,
    /// Lookup mode: the requests of this VM paused for a key lookup.
    lookups: Lookups,
    /// Whether a request's time matters: some key has a validity window, or keys come from a
    /// key service whose records may. The clock is the only per-request host call it saves, and
    /// the first call of a host function in a request is the expensive one.
    reads_clock: bool,
}

#[derive(Default)]
struct KeygateRoot {
    runtime: Option<Rc<Runtime>>,
    /// Next slot of the shared limits table the tick sweep visits.
    sweep_cursor: u32,
    last_sweep_ms: i64,
}

impl Context for KeygateRoot {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        if let Some(source) = self.runtime.as_ref().and_then(|r| r.source.as_ref()) {
            source.on_fetch_response(token, body_size);
        }
    }

    fn on_done(&mut self) -> bool {
        if let Some(source) = self.runtime.as_ref().and_then(|r| r.source.as_ref()) {
            source.on_done();
        }
        true
    }
}

impl RootContext for KeygateRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = match hostcalls::get_buffer(
            proxy_wasm::types::BufferType::PluginConfiguration,
            0,
            usize::MAX,
        ) {
            Ok(Some(b)) => b,
            _ => {
                log(
                    LogLevel::Critical,
                    "keygate: configuration: the plugin configuration is empty",
                );
                return false;
            }
        };
        match Config::parse(&bytes) {
            Ok((config, keys)) => {
                let metrics = Metrics::define(&config.name);
                log(
                    LogLevel::Info,
                    &format!(
                        "keygate[{}]: configured with {} keys",
                        config.name,
                        keys.len()
                    ),
                );
                if config.limits.enabled {
                    // Create the shared counter table before this worker serves a request.
                    let created = ensure_slots(&config.limits, &HostStore);
                    log(
                        LogLevel::Info,
                        &format!(
                            "keygate[{}]: limits table of {} slots ({} created here)",
                            config.name, config.limits.slots, created
                        ),
                    );
                    let _ = hostcalls::set_tick_period(SWEEP_PERIOD);
                }
                let source = config
                    .key_service
                    .as_ref()
                    .map(|service| KeySource::new(&config.name, service));
                if let Some(period) = source.as_ref().and_then(KeySource::tick_period) {
                    // Also drives the limits sweep, which keeps its own one-second pace.
                    let _ = hostcalls::set_tick_period(period);
                }
                let reads_clock = reads_clock(&config, &keys);
                self.runtime = Some(Rc::new(Runtime {
                    reply_headers: PreparedHeaders::prepare(&config.replies),
                    config,
                    keys,
                    metrics,
                    source,
                    lookups: Lookups::default(),
                    reads_clock,
                }));
                true
            }
            Err(err) => {
                log(
                    LogLevel::Critical,
                    &format!("keygate: invalid configuration: {err}"),
                );
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(runtime) = self.runtime.clone() else {
            return;
        };
        if let Some(source) = &runtime.source {
            source.on_tick();
            expire_waiters(&runtime);
        }
        let limits = &runtime.config.limits;
        if !limits.enabled {
            return;
        }
        let now = now_millis();
        if !sweep_due(self.last_sweep_ms, now) {
            return;
        }
        self.last_sweep_ms = now;
        let batch = sweep_batch(limits);
        let _ = sweep(limits, &HostStore, now, self.sweep_cursor, batch);
        self.sweep_cursor = self.sweep_cursor.wrapping_add(batch) % limits.slots;
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(KeygateRequest {
            context_id,
            waiting: false,
            runtime: self.runtime.clone(),
            response_headers: Vec::new(),
            pending: None,
            request_ended: false,
            form_check: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The tick of a filter with limits and no key source: the sweep's period.
const SWEEP_PERIOD: Duration = Duration::from_millis(SWEEP_PERIOD_MS as u64);

struct KeygateRequest {
    context_id: u32,
    /// Paused for a lookup another request of this VM sent for the same key; that request
    /// settles this one (`resolve_waiter`).
    waiting: bool,
    runtime: Option<Rc<Runtime>>,
    /// `RateLimit-*` headers for the response of an allowed request, when configured.
    response_headers: Vec<(&'static str, String)>,
    /// The key lookup this request is paused for (lookup on miss).
    pending: Option<PendingLookup>,
    /// Whether the request headers ended the request (no body follows).
    request_ended: bool,
    /// An allowed API-key request with a form body, whose body must still be checked.
    form_check: Option<FormCheck>,
}

/// Reads all of a buffer whose size the hook was not told (Envoy stops at its end).
const WHOLE_BUFFER: usize = i32::MAX as usize;

/// A form body may name a tenant selector (Flask, Servlet and Rails merge it with the query).
/// proxy-wasm cannot see a body before the headers move on (a paused filter gets no body), so
/// the body is buffered here, not forwarded, and checked when complete: a refused request has
/// sent the upstream its headers but never its body, and Envoy resets that upstream stream.
struct FormCheck {
    req: RequestView,
    record: KeyRecord,
}

impl Context for KeygateRequest {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        self.on_lookup_response(token, body_size);
    }
}

/// What applying a decision did.
enum Verdict {
    /// A local reply was sent.
    Replied,
    /// The request goes upstream with its scope headers.
    Forwarded,
}

impl Verdict {
    fn action(self) -> Action {
        match self {
            Verdict::Replied => Action::Pause,
            Verdict::Forwarded => Action::Continue,
        }
    }
}

impl HttpContext for KeygateRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(runtime) = self.runtime.clone() else {
            send_unconfigured_reply();
            return Action::Pause;
        };
        self.request_ended = end_of_stream;
        let req = read_request(&runtime.config, runtime.reads_clock);
        self.decide(&runtime, req)
    }

    /// Only a form body of an allowed API-key request is read (see `FormCheck`); every other
    /// body passes untouched.
    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.adopt_if_settled();
        if self.form_check.is_none() {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.check_whole_form(body_size)
    }

    /// Trailers end a body whose data never ended the stream: a form body held for its check
    /// is whole now (Envoy's buffer of it, since every piece was paused).
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        self.adopt_if_settled();
        if self.form_check.is_none() {
            return Action::Continue;
        }
        self.check_whole_form(WHOLE_BUFFER)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.adopt_if_settled();
        for (name, value) in self.response_headers.drain(..) {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(&value));
        }
        Action::Continue
    }
}

impl KeygateRequest {
    /// The check of a form body held whole in Envoy's buffer (`body_size` bytes at most).
    fn check_whole_form(&mut self, body_size: usize) -> Action {
        let (Some(check), Some(runtime)) = (self.form_check.take(), self.runtime.clone()) else {
            return Action::Continue;
        };
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        match check_form_body(&runtime.config, &check.req, &check.record, &body) {
            Ok(()) => Action::Continue,
            Err(code) => {
                // Replaces the "allowed" entry the headers published for this request.
                let entry = AccessLogEntry::denied(Some(code), Some(&check.record.id));
                deny(&runtime, code, &entry, Vec::new());
                Action::Pause
            }
        }
    }

    /// Decides a request (looking its key up where needed) and applies the decision.
    fn decide(&mut self, runtime: &Runtime, req: RequestView) -> Action {
        let config = &runtime.config;
        let (credential, policy) = match begin(config, &req) {
            Step::Decided(decision) => return self.apply(runtime, &req, decision).action(),
            Step::Lookup { credential, policy } => (credential, policy),
        };
        match &runtime.source {
            Some(source) => self.decide_remote(runtime, source, req, credential, policy),
            None => {
                let record = lookup(&runtime.keys, &credential);
                let decision = decide_for_key(config, policy, &credential, record, &req);
                self.apply(runtime, &req, decision).action()
            }
        }
    }

    /// Applies a decision to this request and keeps what its later callbacks need.
    fn apply(&mut self, runtime: &Runtime, req: &RequestView, decision: Decision) -> Verdict {
        let (verdict, settled) = settle(runtime, req, decision, self.request_ended);
        self.adopt(settled);
        verdict
    }

    fn adopt(&mut self, settled: Settled) {
        self.response_headers = settled.response_headers;
        self.form_check = settled.form_check;
    }

    /// A request that waited for another request's lookup was settled by that request: take
    /// over what it left for this one.
    fn adopt_if_settled(&mut self) {
        if !self.waiting {
            return;
        }
        let settled = self
            .runtime
            .as_ref()
            .and_then(|r| r.lookups.settled.borrow_mut().remove(&self.context_id));
        if let Some(settled) = settled {
            self.waiting = false;
            self.adopt(settled);
        }
    }

    /// Decides a request whose key must come from the key service.
    fn decide_remote(
        &mut self,
        runtime: &Runtime,
        source: &KeySource,
        req: RequestView,
        credential: Credential,
        policy: &Policy,
    ) -> Action {
        let config = &runtime.config;
        let host = source.host();
        let Some(flow) = source.lookup_flow() else {
            let record = source.find(&credential);
            let decision = match &record {
                Ok(record) => decide_for_key(config, policy, &credential, record.as_ref(), &req),
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
        let waiter = Waiter {
            context_id: self.context_id,
            req,
            stale,
            request_ended: self.request_ended,
        };
        let joined = runtime.lookups.in_flight.borrow_mut().wait(&key, waiter);
        let Waiter { req, stale, .. } = match joined {
            Ok(()) => {
                flow.coalesced(&host);
                self.waiting = true;
                return Action::Pause;
            }
            Err(waiter) => waiter,
        };
        if !flow.admit(&host) {
            let outcome = LookupOutcome::over_cap(stale.as_ref());
            let decision = flow.decide(&host, config, policy, &credential, &req, outcome);
            return self.apply(runtime, &req, decision).action();
        }
        match flow.send(&host, &key) {
            Some(token) => {
                runtime
                    .lookups
                    .in_flight
                    .borrow_mut()
                    .sent(&key, host.now_ms());
                self.pending = Some(PendingLookup {
                    token,
                    req,
                    key,
                    stale,
                });
                Action::Pause
            }
            None => {
                let outcome = LookupOutcome::failed(stale.as_ref());
                let decision = flow.decide(&host, config, policy, &credential, &req, outcome);
                self.apply(runtime, &req, decision).action()
            }
        }
    }

    /// The key service answered (or failed) for the paused request: cache the answer, decide,
    /// and resume or reply.
    fn on_lookup_response(&mut self, token: u32, body_size: usize) {
        let Some(pending) = self.pending.take_if(|p| p.token == u64::from(token)) else {
            return;
        };
        let Some(runtime) = self.runtime.clone() else {
            return;
        };
        let Some(source) = &runtime.source else {
            return;
        };
        let Some(flow) = source.lookup_flow() else {
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
        let waiters = runtime.lookups.in_flight.borrow_mut().settle(&pending.key);
        for waiter in waiters {
            resolve_waiter(&runtime, &flow, source, waiter, fetched.as_ref());
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }
}

/// A request paused while its key is looked up.
struct PendingLookup {
    token: u64,
    req: RequestView,
    key: LookupKey,
    /// An expired cached answer, served if the lookup fails.
    stale: Option<Answer>,
}

/// This VM's lookups in flight and the requests waiting on them (lookup on miss).
#[derive(Default)]
struct Lookups {
    /// One fetch per key per VM: the requests that wait for a lookup's answer instead of
    /// sending their own.
    in_flight: RefCell<LookupsInFlight<Waiter>>,
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
            let outcome = LookupOutcome::failed(answer);
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
    let mut all = runtime.lookups.settled.borrow_mut();
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
fn expire_waiters(runtime: &Runtime) {
    let Some(source) = &runtime.source else {
        return;
    };
    let Some(flow) = source.lookup_flow() else {
        return;
    };
    let now = now_millis();
    let limit = source.in_flight_limit_ms();
    let expired = runtime.lookups.in_flight.borrow_mut().expire(now, limit);
    for waiter in expired {
        resolve_waiter(runtime, &flow, source, waiter, None);
    }
}

/// What applying a decision leaves for the rest of the request: `RateLimit-*` headers for the
/// response, and a form body still to check.
#[derive(Default)]
pub(crate) struct Settled {
    response_headers: Vec<(&'static str, String)>,
    form_check: Option<FormCheck>,
}

/// Carries out the core's settlement of a decision for the request whose context is the
/// effective one: the local reply, or scope headers for the upstream.
fn settle(
    runtime: &Runtime,
    req: &RequestView,
    decision: Decision,
    request_ended: bool,
) -> (Verdict, Settled) {
    let config = &runtime.config;
    let settlement = core_settle(config, req, decision, &HostStore, &HostClock);
    if let Some((code, extra_headers)) = settlement.refusal() {
        deny(runtime, code, &settlement.access_log_entry(), extra_headers);
        return (Verdict::Replied, Settled::default());
    }
    filter_state::publish(config, &settlement.access_log_entry());
    let Settlement::Forward {
        principal,
        response_headers,
        check_form_body,
    } = settlement
    else {
        send(&preflight_reply());
        return (Verdict::Replied, Settled::default());
    };
    bump(runtime.metrics.allowed);
    let edits = upstream_edits(config, req, &principal);
    for name in &edits.remove {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
    }
    for (name, value) in &edits.set {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
    }
    if edits.clear_route_cache {
        let _ = hostcalls::call_foreign_function("clear_route_cache", None);
    }
    let form_check = match &principal {
        Principal::ApiKey { record, .. } if check_form_body && !request_ended => Some(FormCheck {
            req: req.clone(),
            record: (*record).clone(),
        }),
        _ => None,
    };
    (
        Verdict::Forwarded,
        Settled {
            response_headers,
            form_check,
        },
    )
}

/// Answers locally with the code's pre-rendered reply plus any per-request headers
/// (`Retry-After`, `RateLimit-*`), counts it and publishes it for the access log. No log line:
/// the access log records every denial, and a log host call per denial is what a
/// credential-stuffing attack would multiply.
fn deny(
    runtime: &Runtime,
    code: ErrorCode,
    entry: &AccessLogEntry,
    extra_headers: Vec<(&'static str, String)>,
) {
    runtime.metrics.count_denial(code);
    filter_state::publish(&runtime.config, entry);
    let reply = runtime.config.replies.rendered(code);
    let status = reply.map_or(code.status(), |r| r.status);
    let body = reply.map_or(&[][..], |r| r.body.as_slice());
    match runtime.reply_headers.get(code) {
        Some(prepared) if extra_headers.is_empty() => local_reply::send(status, prepared, body),
        _ => {
            let headers = reply
                .into_iter()
                .flat_map(local_reply::pairs)
                .chain(extra_headers.iter().map(|(n, v)| (*n, v.as_str())));
            local_reply::send(status, &local_reply::serialize(headers), body);
        }
    }
}

/// Not configured: fail closed. Out of line and cold, so rendering this reply does not sit in the
/// request path's code.
#[cold]
#[inline(never)]
fn send_unconfigured_reply() {
    send(&unconfigured_reply());
}

fn send(reply: &LocalReply) {
    let headers = local_reply::serialize(local_reply::pairs(reply));
    local_reply::send(reply.status, &headers, &reply.body);
}

fn property(path: Vec<&str>) -> Option<Vec<u8>> {
    hostcalls::get_property(path).ok().flatten()
}

fn property_text(path: Vec<&str>) -> Option<String> {
    property(path).and_then(|b| String::from_utf8(b).ok())
}

/// Gathers everything the core needs with as few host calls as the config allows.
fn read_request(config: &Config, reads_clock: bool) -> RequestView {
    let headers = request_headers::read();
    // Whole seconds, as the core's validity windows count them.
    let now = if reads_clock { now_millis() / 1000 } else { 0 };
    let mut req = RequestView {
        headers,
        now,
        route_policy: None,
        session: SessionEvidence::Absent,
    };
    if config.uses_route_policies() {
        req.route_policy = property_text(vec![
            "xds",
            "route_metadata",
            "filter_metadata",
            "keygate",
            "policy",
        ]);
    }
    if let Some(session) = &config.session {
        if session.cookie_present(&req) {
            req.session = read_session(session);
        }
    }
    req
}

fn read_session(session: &crate::core::config::SessionConfig) -> SessionEvidence {
    let ns = session.metadata_namespace.as_str();
    if property(vec![
        "metadata",
        "filter_metadata",
        ns,
        &session.payload_key,
    ])
    .is_some()
    {
        let subject = property_text(vec![
            "metadata",
            "filter_metadata",
            ns,
            &session.payload_key,
            &session.subject_claim,
        ]);
        return SessionEvidence::Verified { subject };
    }
    match property_text(vec![
        "metadata",
        "filter_metadata",
        ns,
        &session.failure_key,
        "message",
    ]) {
        Some(message) => SessionEvidence::Failed {
            expired: session_token::failure_says_expired(&message),
        },
        None => SessionEvidence::Absent,
    }
}
