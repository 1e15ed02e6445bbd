//! The key service in full mode for the native module: one fetcher and one parsed key set for
//! the whole process, swapped under a lock when a new version arrives.
//!
//! Envoy's dynamic-module ABI gives HTTP filters no timer. A small module thread wakes every
//! 250 ms and posts a tick to Envoy's main thread (the config scheduler may be committed from
//! any thread); the tick, the fetch and its answer all run there. The decisions (period, ETag,
//! validation, versions, staleness) are `core::keysource`'s, over a process-wide store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::ffi::{log, ConfigHandle, LogLevel, MainThread};
use super::process_store::ProcessStore;
use crate::core::keyset::KeySet;
use crate::core::keysource::full_sync::{
    age_ms, FetchOutcome, RemoteKeySet, SyncEvent, TickPlan, Unavailable,
};
use crate::core::keysource::service::{FetchResponse, FullSync, KeyService};

/// How often the main thread checks whether a fetch is due (the wasm filter's tick).
const TICK: Duration = Duration::from_millis(250);
/// The event id of a tick posted to the main thread.
pub const TICK_EVENT: u64 = 1;
/// The lease holder: the process is the only fetcher.
const PROCESS: u64 = 1;
/// A fetch whose answer never came is forgotten after its timeout plus this.
const IN_FLIGHT_GRACE_MS: i64 = 5_000;

struct Gauges {
    version: Option<usize>,
    keys: Option<usize>,
    age_seconds: Option<usize>,
    fetches: Option<usize>,
    fetch_failures: Option<usize>,
    rollbacks_refused: Option<usize>,
    updates: Option<usize>,
}

/// Chunks to copy per sync: all of them. The process holds one set, loaded on the main thread,
/// so no request waits behind the copy.
const WHOLE_SET: u32 = u32::MAX;

pub struct FullSource {
    name: String,
    service: KeyService,
    sync: FullSync,
    store: Arc<ProcessStore>,
    remote: Mutex<RemoteKeySet>,
    /// Id and start of the fetch in flight (main thread only; a lock for `Sync`).
    in_flight: Mutex<Option<(u64, i64)>>,
    main: MainThread,
    metrics: Gauges,
    stopped: AtomicBool,
}

impl FullSource {
    /// Sets up the source and its ticker; the first tick fetches.
    pub fn start(
        handle: &ConfigHandle,
        name: &str,
        service: &KeyService,
        sync: &FullSync,
        store: Arc<ProcessStore>,
    ) -> Arc<FullSource> {
        let metric = |suffix: &str| format!("keygate.{name}.{suffix}");
        let metrics = Gauges {
            version: handle.define_gauge(&metric("keyset.version")),
            keys: handle.define_gauge(&metric("keyset.keys")),
            age_seconds: handle.define_gauge(&metric("keyset.age_seconds")),
            fetches: handle.define_counter(&metric("keyset.fetches")),
            fetch_failures: handle.define_counter(&metric("keyset.fetch_failures")),
            rollbacks_refused: handle.define_counter(&metric("keyset.rollbacks_refused")),
            updates: handle.define_counter(&metric("keyset.updates")),
        };
        sync.ensure_lease(service, &*store);
        let source = Arc::new(FullSource {
            name: name.to_string(),
            service: service.clone(),
            sync: sync.clone(),
            store,
            remote: Mutex::new(RemoteKeySet::default()),
            in_flight: Mutex::new(None),
            main: handle.main_thread(),
            metrics,
            stopped: AtomicBool::new(false),
        });
        let ticker: Weak<FullSource> = Arc::downgrade(&source);
        let spawned = std::thread::Builder::new()
            .name(format!("keygate-{name}-tick"))
            .spawn(move || loop {
                std::thread::sleep(TICK);
                match ticker.upgrade() {
                    Some(source) if !source.stopped.load(Ordering::Relaxed) => {
                        source.main.schedule(TICK_EVENT)
                    }
                    _ => break,
                }
            });
        if let Err(err) = spawned {
            log(
                LogLevel::Error,
                &format!("keygate[{name}]: cannot start the key-set ticker: {err}"),
            );
        }
        source.main.schedule(TICK_EVENT);
        source
    }

    /// The config is going away: the ticker posts nothing more.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// The set to decide with, unless there is none yet or it is too old.
    pub fn current(&self, now_ms: i64) -> Result<Arc<KeySet>, Unavailable> {
        match self.remote.lock() {
            Ok(remote) => remote.current(&self.service, now_ms),
            Err(_) => Err(Unavailable::NotLoaded),
        }
    }

    /// Main thread: fetch when the period has passed and no fetch is in flight.
    pub fn on_tick(&self, now_ms: i64) {
        // Loads a set stored before this config existed (a listener update keeps the store).
        if let Ok(mut remote) = self.remote.lock() {
            if let Some(event) = remote.sync(&self.service, &*self.store, WHOLE_SET) {
                self.report(event);
            }
        }
        if let Some(age) = age_ms(&self.service, &*self.store, now_ms) {
            self.main
                .set_gauge(self.metrics.age_seconds, (age.max(0) / 1000) as u64);
        }
        let Ok(mut in_flight) = self.in_flight.lock() else {
            return;
        };
        if let Some((_, since)) = *in_flight {
            if now_ms - since > self.service.timeout_ms as i64 + IN_FLIGHT_GRACE_MS {
                *in_flight = None;
            }
        }
        let plan = self.sync.plan(
            &self.service,
            &*self.store,
            PROCESS,
            in_flight.is_some(),
            now_ms,
        );
        let TickPlan::Fetch { headers } = plan else {
            return;
        };
        self.main.increment_counter(self.metrics.fetches);
        // One request for the whole document: the module does not put ranged parts together
        // yet (the wasm filter does), so a document is limited by Envoy's callout buffer.
        let headers: Vec<(&str, String)> = headers
            .into_iter()
            .filter(|(name, _)| !name.eq_ignore_ascii_case("range"))
            .collect();
        match self
            .main
            .http_callout(&self.service.cluster, &headers, self.service.timeout_ms)
        {
            Ok(id) => *in_flight = Some((id, now_ms)),
            Err(reason) => {
                self.main.increment_counter(self.metrics.fetch_failures);
                log(
                    LogLevel::Warn,
                    &format!("keygate[{}]: key-set fetch not sent: {reason}", self.name),
                );
            }
        }
    }

    /// Main thread: the answer to the fetch.
    pub fn on_fetch_done(&self, callout_id: u64, response: FetchResponse, now_ms: i64) {
        match self.in_flight.lock() {
            Ok(mut in_flight) if in_flight.is_some_and(|(id, _)| id == callout_id) => {
                *in_flight = None
            }
            _ => return,
        }
        let outcome = self
            .sync
            .finish(&self.service, &*self.store, now_ms, response);
        let Ok(mut remote) = self.remote.lock() else {
            return;
        };
        match outcome {
            FetchOutcome::Updated { version, keys } => {
                self.main.increment_counter(self.metrics.updates);
                let event = remote.install(version, keys);
                self.report(event);
            }
            FetchOutcome::Unchanged { .. } => {}
            FetchOutcome::RolledBack {
                offered,
                current,
                failures,
            } => {
                self.main.increment_counter(self.metrics.fetch_failures);
                self.main.increment_counter(self.metrics.rollbacks_refused);
                log(
                    LogLevel::Warn,
                    &remote.rollback_line(&self.name, offered, current, failures),
                );
            }
            FetchOutcome::Failed { reason, failures } => {
                self.main.increment_counter(self.metrics.fetch_failures);
                log(
                    LogLevel::Warn,
                    &remote.fetch_failed_line(&self.name, failures, &reason),
                );
            }
        }
        // Catch up with the stored meta (the time of the last success, after a 304 too).
        if let Some(event) = remote.sync(&self.service, &*self.store, WHOLE_SET) {
            self.report(event);
        }
    }

    fn report(&self, event: SyncEvent) {
        if let SyncEvent::Loaded { version, keys } = event {
            self.main.set_gauge(self.metrics.version, version);
            self.main.set_gauge(self.metrics.keys, keys as u64);
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
}
