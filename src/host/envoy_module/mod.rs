//! The Envoy dynamic-module host (`libkeygate.so`): the same core as the wasm filter, called
//! in-process through Envoy 1.40's C ABI. This file is safe code; `ffi` holds every `unsafe`
//! block and the `catch_unwind` guard of every hook.
//!
//! One configuration is shared by all workers (`Sync`, read-only after load); each stream gets a
//! `Stream` holding an `Arc` to it.

mod ffi;
mod limits_table;

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::core::codes::ErrorCode;
use crate::core::config::{Config, SessionConfig};
use crate::core::decision::{begin, decide_for_key, lookup, Decision, Principal, Step};
use crate::core::keyset::KeySet;
use crate::core::limits::apply_limits;
use crate::core::reply::{denial_log_line, upstream_edits};
use crate::core::request::{RequestView, SessionEvidence};
use crate::core::session_token;
use ffi::{log, log_enabled, ConfigHandle, FilterHandle, LogLevel};
use limits_table::LimitsTable;

/// Envoy stats counters; Envoy prefixes their names with the module metrics namespace
/// (`dynamicmodulescustom.` by default).
struct Counters {
    allowed: Option<usize>,
    denied: Option<usize>,
    denied_by_code: Vec<(ErrorCode, Option<usize>)>,
}

impl Counters {
    fn define(handle: &ConfigHandle, name: &str) -> Counters {
        let counter = |suffix: &str| handle.define_counter(&format!("keygate.{name}.{suffix}"));
        Counters {
            allowed: counter("allowed"),
            denied: counter("denied"),
            denied_by_code: ErrorCode::ALL
                .iter()
                .map(|c| {
                    let suffix = format!("denied.{}", c.as_str().to_ascii_lowercase());
                    (*c, counter(&suffix))
                })
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

struct Runtime {
    config: Config,
    keys: KeySet,
    counters: Counters,
    /// The process-wide counters (an empty table when limits are off).
    limits: Arc<LimitsTable>,
    /// Whether a request's time matters (a key with a validity window).
    reads_clock: bool,
}

/// What `config_new` hands Envoy: shared by every worker.
pub struct FilterConfig {
    runtime: Arc<Runtime>,
}

/// One HTTP stream.
pub struct Stream {
    runtime: Arc<Runtime>,
    /// `RateLimit-*` headers for the response of an allowed request, when configured. A cell:
    /// a local reply re-enters this filter's response hook while the request hook runs.
    response_headers: RefCell<Vec<(&'static str, String)>>,
}

/// Features the native host cannot serve yet. Refused at load, naming the field, rather than
/// run without them.
fn unsupported(config: &Config) -> Option<(&'static str, &'static str)> {
    if config.key_service.is_some() {
        return Some((
            "key_service",
            "the native module (libkeygate.so) serves inline keys only so far; \
             use keygate.wasm for a key service",
        ));
    }
    None
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
    if let Some((field, why)) = unsupported(&config) {
        log(
            LogLevel::Critical,
            &format!("keygate: invalid configuration: {field}: {why}"),
        );
        return None;
    }
    let counters = Counters::define(handle, &config.name);
    let limits = if config.limits.enabled {
        LimitsTable::for_filter(&config.name, &config.limits)
    } else {
        Arc::new(LimitsTable::empty())
    };
    let reads_clock = keys
        .records()
        .iter()
        .any(|r| r.expires_at.is_some() || r.not_after.is_some());
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
            reads_clock,
        }),
    })
}

fn stream_new(config: &FilterConfig) -> Stream {
    Stream {
        runtime: Arc::clone(&config.runtime),
        response_headers: RefCell::new(Vec::new()),
    }
}

/// Decides one request; true lets it go on upstream, false means a local reply was sent.
fn on_request_headers(filter: &FilterHandle, stream: &Stream) -> bool {
    #[cfg(feature = "panic-probe")]
    panic_probe();
    let runtime = &*stream.runtime;
    let config = &runtime.config;
    let req = read_request(filter, runtime);
    let decision = match begin(config, &req) {
        Step::Decided(decision) => decision,
        Step::Lookup { credential, policy } => {
            let record = lookup(&runtime.keys, &credential);
            decide_for_key(config, policy, &credential, record, &req)
        }
    };
    apply(filter, stream, &req, decision)
}

/// The `panic-probe` build panics on every request, to prove the hook guard fails closed.
#[cfg(feature = "panic-probe")]
#[allow(clippy::panic)]
fn panic_probe() {
    panic!("keygate panic probe");
}

fn apply(filter: &FilterHandle, stream: &Stream, req: &RequestView, decision: Decision) -> bool {
    let runtime = &*stream.runtime;
    let config = &runtime.config;
    match decision {
        Decision::Deny { code, key_id } => {
            deny(filter, runtime, code, key_id, Vec::new());
            false
        }
        Decision::Allow { principal, policy } => {
            if let Principal::ApiKey { record, .. } = &principal {
                if config.limits.enabled || record.budget_exhausted {
                    let now = now_millis();
                    let table = &*runtime.limits;
                    let outcome = apply_limits(&config.limits, record, policy, table, now);
                    if config.limits.enabled {
                        table.maybe_sweep(&config.limits, now);
                    }
                    match outcome {
                        Err(denial) => {
                            deny(
                                filter,
                                runtime,
                                denial.code,
                                Some(&record.id),
                                denial.headers(),
                            );
                            return false;
                        }
                        Ok(info) if config.limits.response_headers => {
                            if let Ok(mut headers) = stream.response_headers.try_borrow_mut() {
                                *headers = info.rate.map(|r| r.headers()).unwrap_or_default();
                            }
                        }
                        Ok(_) => {}
                    }
                }
            }
            Counters::bump(filter, runtime.counters.allowed);
            let edits = upstream_edits(config, req, &principal);
            for name in &edits.remove {
                filter.set_request_header(name, None);
            }
            for (name, value) in &edits.set {
                filter.set_request_header(name, Some(value));
            }
            if edits.clear_route_cache {
                filter.clear_route_cache();
            }
            true
        }
    }
}

/// Answers with the code's pre-rendered reply plus per-request headers, counts it and logs
/// the denial line.
fn deny(
    filter: &FilterHandle,
    runtime: &Runtime,
    code: ErrorCode,
    key_id: Option<&str>,
    extra_headers: Vec<(&'static str, String)>,
) {
    let config = &runtime.config;
    runtime.counters.count_denial(filter, code);
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

/// After a panic in the request hook: fail closed with 503 KEYSET_UNAVAILABLE.
fn on_panic(filter: &FilterHandle, stream: &Stream) {
    log(
        LogLevel::Error,
        &format!(
            "keygate[{}]: internal error (panic) while deciding; failing closed",
            stream.runtime.config.name
        ),
    );
    deny(
        filter,
        &stream.runtime,
        ErrorCode::KeysetUnavailable,
        None,
        Vec::new(),
    );
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
