//! The key service in full mode for the native module: one fetcher and one parsed key set for
//! the whole process, swapped under a lock when a new version arrives.
//!
//! Envoy's dynamic-module ABI gives HTTP filters no timer. A small module thread wakes every
//! 250 ms and posts a tick to Envoy's main thread (the config scheduler may be committed from
//! any thread); the tick, the fetch (in ranged parts, like the wasm filter) and its answers all
//! run there, as the core's `FullSyncFlow` over this module's implementation of its traits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::ffi::{log, ConfigHandle, LogLevel, MainThread};
use super::now_millis;
use super::process_store::ProcessStore;
use crate::core::keyset::KeySet;
use crate::core::keysource::full_sync::{RemoteKeySet, Unavailable};
use crate::core::keysource::full_sync_flow::{Fetch, Fetchers, FullSyncFlow};
use crate::core::keysource::host::{Callouts, Clock, Counter, Gauge, Level, Log, Metrics};
use crate::core::keysource::service::{FetchResponse, FullSync, KeyService};
use crate::core::keysource::store::{SharedStore, StoreError};

/// How often the main thread checks whether a fetch is due (the wasm filter's tick).
const TICK: Duration = Duration::from_millis(250);
/// The event id of a tick posted to the main thread.
pub const TICK_EVENT: u64 = 1;
/// The lease holder: the process is the only fetcher.
const PROCESS: u64 = 1;

/// Chunks to copy per sync: all of them. The process holds one set, loaded on the main thread,
/// so no request waits behind the copy.
const WHOLE_SET: u32 = u32::MAX;

/// The full-mode metrics as defined on this config (a metric Envoy refused is left out).
struct SourceMetrics {
    counters: Vec<(Counter, usize)>,
    gauges: Vec<(Gauge, usize)>,
}

/// The core's key-source host traits on the main thread: the process store, the config's
/// callouts and metrics, Envoy's log.
struct MainThreadHost<'a> {
    store: &'a ProcessStore,
    main: &'a MainThread,
    metrics: &'a SourceMetrics,
}

impl SharedStore for MainThreadHost<'_> {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.store.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        self.store.set(key, value, cas)
    }
}

impl Clock for MainThreadHost<'_> {
    fn now_ms(&self) -> i64 {
        now_millis()
    }
}

impl Callouts for MainThreadHost<'_> {
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&'static str, String)],
        timeout_ms: u64,
    ) -> Result<u64, String> {
        let headers: Vec<(&str, String)> = headers.to_vec();
        self.main.http_callout(cluster, &headers, timeout_ms)
    }
}

impl Metrics for MainThreadHost<'_> {
    fn bump(&self, counter: Counter) {
        let id = self.metrics.counters.iter().find(|(c, _)| *c == counter);
        self.main.increment_counter(id.map(|(_, id)| *id));
    }
    fn record(&self, gauge: Gauge, value: u64) {
        let id = self.metrics.gauges.iter().find(|(g, _)| *g == gauge);
        self.main.set_gauge(id.map(|(_, id)| *id), value);
    }
}

impl Log for MainThreadHost<'_> {
    fn log(&self, level: Level, line: &str) {
        let level = match level {
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
        };
        log(level, line);
    }
}

pub struct FullSource {
    flow: FullSyncFlow,
    service: KeyService,
    store: Arc<ProcessStore>,
    remote: Mutex<RemoteKeySet>,
    /// The fetch in flight and its parts (main thread only; a lock for `Sync`).
    fetch: Mutex<Fetch>,
    main: MainThread,
    metrics: SourceMetrics,
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
        let metrics = SourceMetrics {
            counters: Counter::FULL_SYNC
                .iter()
                .filter_map(|c| Some((*c, handle.define_counter(&metric(c.name()))?)))
                .collect(),
            gauges: Gauge::ALL
                .iter()
                .filter_map(|g| Some((*g, handle.define_gauge(&metric(g.name()))?)))
                .collect(),
        };
        let main = handle.main_thread();
        let flow = FullSyncFlow::start(
            name,
            service,
            sync,
            PROCESS,
            Fetchers::One,
            &MainThreadHost {
                store: &store,
                main: &main,
                metrics: &metrics,
            },
        );
        let source = Arc::new(FullSource {
            flow,
            service: service.clone(),
            store,
            remote: Mutex::new(RemoteKeySet::default()),
            fetch: Mutex::new(Fetch::default()),
            main,
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

    fn host(&self) -> MainThreadHost<'_> {
        MainThreadHost {
            store: &self.store,
            main: &self.main,
            metrics: &self.metrics,
        }
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

    /// Main thread: catch up with the store (a listener update keeps it, with a set stored
    /// before this config existed), then fetch when the period has passed.
    pub fn on_tick(&self) {
        let host = self.host();
        if let Ok(mut remote) = self.remote.lock() {
            self.flow.catch_up(&host, &mut remote, WHOLE_SET);
        }
        if let Ok(mut fetch) = self.fetch.lock() {
            self.flow.tick(&host, &mut fetch);
        }
    }

    /// Main thread: the answer to the fetch or to one of its parts. The document is parsed
    /// before the set's lock is taken, so requests keep deciding with the current set meanwhile.
    pub fn on_fetch_done(&self, callout_id: u64, response: FetchResponse) {
        let host = self.host();
        let outcome = match self.fetch.lock() {
            Ok(mut fetch) => self
                .flow
                .on_response(&host, &mut fetch, callout_id, response),
            Err(_) => return,
        };
        let (Some(outcome), Ok(mut remote)) = (outcome, self.remote.lock()) else {
            return;
        };
        self.flow.apply(&host, &mut remote, outcome);
        // Catch up with the stored meta (the time of the last success, after a 304 too).
        self.flow.catch_up(&host, &mut remote, WHOLE_SET);
    }
}
