//! The key service in full mode for the native module: one fetcher and one parsed key set for
//! the whole process, swapped under a lock when a new version arrives. The set is the only copy:
//! the flow stores nothing but the meta for it (`Fetchers::One`), and it outlives a listener update the way
//! the process store does. Requests read it under a lock held only to clone an `Arc`.
//!
//! Envoy's dynamic-module ABI gives HTTP filters no timer. A small module thread wakes every
//! 250 ms and posts a tick to Envoy's main thread (the config scheduler may be committed from
//! any thread); the tick, the fetch (in ranged parts, like the wasm filter) and its answers all
//! run there, as the core's `FullSyncFlow` over this module's implementation of its traits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use super::ffi::{log, CalloutOrigin, ConfigHandle, LogLevel, MainThread};
use super::process_store::{ProcessSide, ProcessStore};
use crate::core::keyset::KeySet;
use crate::core::keysource::full_sync::{RemoteKeySet, Unavailable};
use crate::core::keysource::full_sync_flow::{Fetch, Fetchers, FullSyncFlow};
use crate::core::keysource::host::{Counter, Gauge, Metrics};
use crate::core::keysource::service::{FetchResponse, FullSync, KeyService};

/// How often the main thread checks whether a fetch is due (the wasm filter's tick).
const TICK: Duration = Duration::from_millis(250);
/// The event id of a tick posted to the main thread.
pub const TICK_EVENT: u64 = 1;
/// The lease holder: the process is the only fetcher.
const PROCESS: u64 = 1;

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

impl ProcessSide for MainThreadHost<'_> {
    fn process_store(&self) -> Option<&ProcessStore> {
        Some(self.store)
    }
    fn callout_origin(&self) -> CalloutOrigin<'_> {
        CalloutOrigin::MainThread(self.main)
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

/// The process's copy of one key service's set: one per filter name and service, kept across
/// listener updates like the process store, so a new config serves the set at once.
struct ProcessSet {
    /// Written on the main thread only; requests lock it to clone the current set's `Arc`.
    remote: Mutex<RemoteKeySet>,
    /// The set the last new version replaced, freed on the main thread's next tick: freeing a
    /// million records takes tens of milliseconds, which must not run under `remote`'s lock
    /// (every request waits for it) nor in a request that happened to hold the last `Arc`.
    retired: Mutex<Option<Arc<KeySet>>>,
}

/// Filter name and service namespace to the process's set.
type SetsByService = HashMap<String, Arc<ProcessSet>>;

impl ProcessSet {
    fn for_service(name: &str, service: &KeyService) -> Arc<ProcessSet> {
        static SETS: OnceLock<Mutex<SetsByService>> = OnceLock::new();
        let sets = SETS.get_or_init(Default::default);
        let mut sets = sets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = format!("{name}\n{}", service.key("set"));
        sets.entry(key)
            .or_insert_with(|| {
                Arc::new(ProcessSet {
                    remote: Mutex::new(RemoteKeySet::default()),
                    retired: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Main thread: changes the set. A set the change replaces is kept until `free_retired`.
    fn change(&self, change: impl FnOnce(&mut RemoteKeySet)) {
        let replaced = match self.remote.lock() {
            Ok(mut remote) => {
                let before = remote.held();
                change(&mut remote);
                before.filter(|old| remote.held().is_none_or(|new| !Arc::ptr_eq(old, &new)))
            }
            Err(_) => None,
        };
        if let Some(old) = replaced {
            if let Ok(mut retired) = self.retired.lock() {
                // A set retired a tick ago and not yet freed is freed here, outside `remote`.
                drop(retired.replace(old));
            }
        }
    }

    /// Main thread, a tick after a change: frees the replaced set, by then held by no request
    /// (requests hold a set for one decision).
    fn free_retired(&self) {
        let old = self
            .retired
            .lock()
            .ok()
            .and_then(|mut retired| retired.take());
        drop(old);
    }

    /// The set to decide with.
    fn current(&self, service: &KeyService, now_ms: i64) -> Result<Arc<KeySet>, Unavailable> {
        match self.remote.lock() {
            Ok(remote) => remote.current(service, now_ms),
            Err(_) => Err(Unavailable::NotLoaded),
        }
    }
}

pub struct FullSource {
    flow: FullSyncFlow,
    service: KeyService,
    store: Arc<ProcessStore>,
    set: Arc<ProcessSet>,
    /// The fetch in flight and its parts (main thread only; a lock for `Sync`).
    fetch: Mutex<Fetch>,
    main: MainThread,
    metrics: SourceMetrics,
    /// Whether the ticker may still post ticks: held across the check and the post, so once
    /// `stop` returns no post to Envoy's main thread is under way or to come.
    ticking: Mutex<bool>,
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
            set: ProcessSet::for_service(name, service),
            fetch: Mutex::new(Fetch::default()),
            main,
            metrics,
            ticking: Mutex::new(true),
        });
        let ticker: Weak<FullSource> = Arc::downgrade(&source);
        let spawned = std::thread::Builder::new()
            .name(format!("keygate-{name}-tick"))
            .spawn(move || loop {
                std::thread::sleep(TICK);
                match ticker.upgrade() {
                    Some(source) if source.post_tick() => {}
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

    /// The config is going away: the ticker posts nothing more. Waits for a post under way, so
    /// none reaches Envoy's scheduler once Envoy starts tearing the config (and, at exit, its
    /// main dispatcher) down.
    pub fn stop(&self) {
        let mut ticking = self
            .ticking
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *ticking = false;
    }

    /// Ticker thread: posts a tick unless stopped; false once stopped.
    fn post_tick(&self) -> bool {
        let Ok(ticking) = self.ticking.lock() else {
            return false;
        };
        if *ticking {
            self.main.schedule(TICK_EVENT);
        }
        *ticking
    }

    /// The set to decide with, unless there is none yet or it is too old. Takes no lock while
    /// the set is unchanged since this thread's last request.
    pub fn current(&self, now_ms: i64) -> Result<Arc<KeySet>, Unavailable> {
        self.set.current(&self.service, now_ms)
    }

    /// Main thread: catch up with the store (the time of the last success, after a 304 too),
    /// then fetch when the period has passed.
    pub fn on_tick(&self) {
        self.set.free_retired();
        let host = self.host();
        self.set.change(|remote| self.flow.catch_up(&host, remote));
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
        let Some(outcome) = outcome else {
            return;
        };
        self.set.change(|remote| {
            self.flow.apply(&host, remote, outcome);
            // Catch up with the stored meta (the time of the last success, after a 304 too).
            self.flow.catch_up(&host, remote);
        });
    }
}
