//! Full mode as one flow over the host traits, the same for both hosts: each tick catches up
//! with the shared set and, for the lease holder once per period, sends the fetch; each answer
//! asks for the next part or is judged as a whole (`FullSync::finish`), and its outcome is
//! applied to the worker's copy with its counters and log lines. The hosts only keep the state
//! where their threading needs it and forward their hooks here.

use super::docparts::{PartStep, PartedFetch};
use super::fetch_handover::leaves_fetch_to_idle_vm;
use super::full_sync::{
    age_ms, FetchError, FetchOutcome, Publish, RemoteKeySet, SyncEvent, TickPlan,
};
use super::host::{Counter, Gauge, KeySourceHost, Level};
use super::service::{FetchResponse, FullSync, KeyService};

/// A fetch whose answer never came is forgotten after its timeout plus this.
pub const IN_FLIGHT_GRACE_MS: i64 = 5_000;

/// Who else can fetch when this worker cannot send its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetchers {
    /// Every VM of the process competes for the lease (wasm): one that cannot call out
    /// releases it and stays away for a lease period.
    Many,
    /// The worker is the process's only fetcher and its set the process's only copy, shared by
    /// every thread (the native module): it tries again next period, and stores no chunks.
    One,
}

impl Fetchers {
    fn publish(self) -> Publish {
        match self {
            Fetchers::Many => Publish::Chunks,
            Fetchers::One => Publish::MetaOnly,
        }
    }
}

/// One worker's fetch: the call in flight (token, sent at) and the parts received so far.
#[derive(Debug, Default)]
pub struct Fetch {
    in_flight: Option<(u64, i64)>,
    parts: PartedFetch,
    backoff_until_ms: i64,
    /// When this worker last decided a request: a busy worker leaves fetching (and the parse
    /// that comes with it) to an idle one, see `fetch_handover`.
    last_request_ms: Option<i64>,
}

impl Fetch {
    /// The worker decided a request at `now_ms`.
    pub fn served_request(&mut self, now_ms: i64) {
        self.last_request_ms = Some(now_ms);
    }
}

/// The settings of one worker's full sync; its state lives in a `Fetch` and a `RemoteKeySet`,
/// each behind whatever lock the host's threading needs.
#[derive(Debug, Clone)]
pub struct FullSyncFlow {
    name: String,
    service: KeyService,
    sync: FullSync,
    /// This worker's identity in the fetch lease.
    worker: u64,
    fetchers: Fetchers,
}

impl FullSyncFlow {
    /// Prepares the shared lease (configure time: an absent key cannot be compared-and-swapped).
    pub fn start(
        name: &str,
        service: &KeyService,
        sync: &FullSync,
        worker: u64,
        fetchers: Fetchers,
        host: &impl KeySourceHost,
    ) -> FullSyncFlow {
        sync.ensure_lease(service, host);
        FullSyncFlow {
            name: name.to_string(),
            service: service.clone(),
            sync: sync.clone(),
            worker,
            fetchers,
        }
    }

    pub fn service(&self) -> &KeyService {
        &self.service
    }

    /// Copies in up to `budget` chunks of a newer shared version, and reports what happened.
    pub fn catch_up(&self, host: &impl KeySourceHost, remote: &mut RemoteKeySet, budget: u32) {
        if let Some(event) = remote.sync(&self.service, host, budget) {
            self.report(host, event);
        }
    }

    /// A tick (after `catch_up`): the age gauge, a lost call forgotten, and the fetch sent when
    /// this worker holds the lease and the period has passed.
    pub fn tick(&self, host: &impl KeySourceHost, fetch: &mut Fetch) {
        let now = host.now_ms();
        if let Some(age) = age_ms(&self.service, host, now) {
            host.record(Gauge::AgeSeconds, (age.max(0) / 1000) as u64);
        }
        if let Some((_, since)) = fetch.in_flight {
            if now - since > self.service.timeout_ms as i64 + IN_FLIGHT_GRACE_MS {
                fetch.in_flight = None;
                fetch.parts.reset();
            }
        }
        if now < fetch.backoff_until_ms {
            return;
        }
        let in_flight = fetch.in_flight.is_some();
        if leaves_fetch_to_idle_vm(
            &self.sync,
            &self.service,
            host,
            self.worker,
            now,
            fetch.last_request_ms,
            in_flight,
        ) {
            return;
        }
        let TickPlan::Fetch { headers } =
            self.sync
                .plan(&self.service, host, self.worker, in_flight, now)
        else {
            return;
        };
        host.bump(Counter::Fetches);
        fetch.parts.reset();
        match host.dispatch(&self.service.cluster, &headers, self.service.timeout_ms) {
            Ok(token) => fetch.in_flight = Some((token, now)),
            Err(reason) => {
                host.bump(Counter::FetchFailures);
                match self.fetchers {
                    Fetchers::Many => {
                        host.log(
                            Level::Warn,
                            &format!(
                                "keygate[{}]: key-set fetch not sent: {reason}; leaving the fetch to another worker",
                                self.name
                            ),
                        );
                        self.sync.release_lease(&self.service, host, self.worker);
                        fetch.backoff_until_ms = now + self.sync.lease_ms(&self.service);
                    }
                    Fetchers::One => host.log(
                        Level::Warn,
                        &format!("keygate[{}]: key-set fetch not sent: {reason}", self.name),
                    ),
                }
            }
        }
    }

    /// The answer to a call: `None` while more parts are coming (or the call is not this
    /// worker's fetch), else the fetch's outcome for `apply`. The shared store is updated here;
    /// the worker's copy is not, so a host can parse without holding the lock of its copy.
    pub fn on_response(
        &self,
        host: &impl KeySourceHost,
        fetch: &mut Fetch,
        token: u64,
        mut response: FetchResponse,
    ) -> Option<FetchOutcome> {
        if fetch.in_flight.map(|(t, _)| t) != Some(token) {
            return None;
        }
        fetch.in_flight = None;
        let content_range = response.content_range.take();
        let outcome = match fetch.parts.accept(response, content_range.as_deref()) {
            PartStep::Fetch { offset } => {
                let headers = self.sync.part_headers(&self.service, offset);
                match host.dispatch(&self.service.cluster, &headers, self.service.timeout_ms) {
                    Ok(token) => {
                        fetch.in_flight = Some((token, host.now_ms()));
                        return None;
                    }
                    Err(err) => {
                        fetch.parts.reset();
                        self.sync
                            .failed(&self.service, host, FetchError::NotSent(err))
                    }
                }
            }
            PartStep::Failed(err) => self
                .sync
                .failed(&self.service, host, FetchError::Parts(err)),
            PartStep::Complete(response) => {
                let now = host.now_ms();
                self.sync.hold_lease_to_parse(
                    &self.service,
                    host,
                    self.worker,
                    now,
                    response.body.len(),
                );
                self.sync.finish_publishing(
                    &self.service,
                    host,
                    now,
                    response,
                    self.fetchers.publish(),
                )
            }
        };
        Some(outcome)
    }

    /// Applies a fetch's outcome to this worker's copy, with its counters and log lines.
    pub fn apply(
        &self,
        host: &impl KeySourceHost,
        remote: &mut RemoteKeySet,
        outcome: FetchOutcome,
    ) {
        match outcome {
            FetchOutcome::Updated { version, keys } => {
                host.bump(Counter::Updates);
                let event = remote.install(version, keys);
                self.report(host, event);
            }
            FetchOutcome::Unchanged { .. } => {}
            FetchOutcome::RolledBack {
                offered,
                current,
                failures,
            } => {
                host.bump(Counter::FetchFailures);
                host.bump(Counter::RollbacksRefused);
                host.log(
                    Level::Warn,
                    &remote.rollback_line(&self.name, offered, current, failures),
                );
            }
            FetchOutcome::Failed { reason, failures } => {
                host.bump(Counter::FetchFailures);
                host.log(
                    Level::Warn,
                    &remote.fetch_failed_line(&self.name, failures, &reason),
                );
            }
        }
    }

    /// The VM is going away: another worker may fetch at once.
    pub fn stop(&self, host: &impl KeySourceHost) {
        self.sync.release_lease(&self.service, host, self.worker);
    }

    fn report(&self, host: &impl KeySourceHost, event: SyncEvent) {
        if let SyncEvent::Loaded { version, keys } = event {
            host.record(Gauge::Version, version);
            host.record(Gauge::Keys, keys as u64);
        }
        let (warning, line) = event.log_line(&self.name);
        host.log(if warning { Level::Warn } else { Level::Info }, &line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::digest::sha256;
    use crate::core::keysource::full_sync::Unavailable;
    use crate::core::keysource::host::Clock;
    use crate::core::keysource::service::KeyServiceMode;
    use crate::core::keysource::store::SharedStore;
    use crate::core::keysource::test_host::{document, ok, service, Call, TestHost};

    const PERIOD_MS: i64 = 5_000;

    /// A worker of the flow: its settings, its fetch and its copy of the set.
    struct Worker {
        flow: FullSyncFlow,
        fetch: Fetch,
        remote: RemoteKeySet,
    }

    impl Worker {
        fn new(host: &TestHost, id: u64, fetchers: Fetchers) -> Worker {
            let service = service(serde_json::json!({"refresh_seconds": 5,
                                                     "max_stale_seconds": 60}));
            let KeyServiceMode::Full(sync) = &service.mode else {
                panic!("not full")
            };
            Worker {
                flow: FullSyncFlow::start("t", &service, sync, id, fetchers, host),
                fetch: Fetch::default(),
                remote: RemoteKeySet::default(),
            }
        }

        /// One tick as a host runs it; the calls it sent.
        fn tick(&mut self, host: &TestHost) -> Vec<Call> {
            self.flow.catch_up(host, &mut self.remote, u32::MAX);
            self.flow.tick(host, &mut self.fetch);
            host.take_calls()
        }

        /// Answers `call`; the calls the answer made the flow send.
        fn answer(&mut self, host: &TestHost, call: &Call, response: FetchResponse) -> Vec<Call> {
            if let Some(outcome) =
                self.flow
                    .on_response(host, &mut self.fetch, call.token, response)
            {
                self.flow.apply(host, &mut self.remote, outcome);
            }
            host.take_calls()
        }

        fn has(&self, host: &TestHost, id: &str) -> bool {
            let keys = self
                .remote
                .current(self.flow.service(), host.now_ms())
                .unwrap();
            keys.by_id(id).is_some()
        }
    }

    fn only(calls: Vec<Call>) -> Call {
        assert_eq!(calls.len(), 1, "{calls:?}");
        calls.into_iter().next().unwrap()
    }

    #[test]
    fn the_first_tick_fetches_and_the_answer_is_loaded_with_its_gauges_and_counters() {
        let host = TestHost::at(1_000);
        let mut worker = Worker::new(&host, 1, Fetchers::Many);
        assert_eq!(
            worker
                .remote
                .current(worker.flow.service(), 1_000)
                .unwrap_err(),
            Unavailable::NotLoaded
        );
        let call = only(worker.tick(&host));
        assert_eq!(call.cluster, "keyservice");
        assert_eq!(call.header(":path"), Some("/keys.json"));
        assert!(call
            .header("range")
            .is_some_and(|r| r.starts_with("bytes=0-")));
        assert_eq!(call.header("if-none-match"), None);
        let more = worker.answer(&host, &call, ok(document(&["a", "b"], 1), "\"e1\""));
        assert!(more.is_empty());
        assert!(worker.has(&host, "a") && worker.has(&host, "b"));
        assert_eq!(host.gauge(Gauge::Version), Some(1));
        assert_eq!(host.gauge(Gauge::Keys), Some(2));
        assert_eq!(host.counter(Counter::Fetches), 1);
        assert_eq!(host.counter(Counter::Updates), 1);
        assert!(host.warnings().is_empty(), "{:?}", host.warnings());
        // Within the period, ticks send nothing.
        host.now_ms.set(1_000 + PERIOD_MS - 1);
        assert!(worker.tick(&host).is_empty());
    }

    #[test]
    fn a_new_version_replaces_the_set_and_reaches_a_worker_that_did_not_fetch() {
        let host = TestHost::at(1_000);
        let mut fetcher = Worker::new(&host, 1, Fetchers::Many);
        let mut other = Worker::new(&host, 2, Fetchers::Many);
        let call = only(fetcher.tick(&host));
        assert!(other.tick(&host).is_empty(), "the lease is taken");
        fetcher.answer(&host, &call, ok(document(&["a", "b"], 1), "\"e1\""));
        host.now_ms.set(1_000 + PERIOD_MS);
        let call = only(fetcher.tick(&host));
        assert_eq!(call.header("if-none-match"), Some("\"e1\""));
        fetcher.answer(&host, &call, ok(document(&["a"], 2), "\"e2\""));
        assert!(fetcher.has(&host, "a") && !fetcher.has(&host, "b"));
        assert_eq!(host.gauge(Gauge::Version), Some(2));
        other.tick(&host);
        assert!(other.has(&host, "a") && !other.has(&host, "b"));
    }

    #[test]
    fn a_failed_fetch_keeps_the_last_good_set_and_says_so() {
        let host = TestHost::at(1_000);
        let mut worker = Worker::new(&host, 1, Fetchers::Many);
        let call = only(worker.tick(&host));
        worker.answer(&host, &call, ok(document(&["a"], 1), "\"e1\""));
        for (i, failure) in [
            FetchResponse::default(),
            FetchResponse {
                status: Some(503),
                ..Default::default()
            },
            ok(b"{\"keys\": [".to_vec(), "\"t\""),
        ]
        .into_iter()
        .enumerate()
        {
            host.now_ms.set(host.now_ms() + PERIOD_MS);
            let call = only(worker.tick(&host));
            worker.answer(&host, &call, failure);
            assert!(worker.has(&host, "a"));
            assert_eq!(host.counter(Counter::FetchFailures), i as u64 + 1);
        }
        let warnings = host.warnings();
        assert_eq!(warnings.len(), 3);
        assert!(
            warnings[2].contains("key-set fetch failed (3 in a row)")
                && warnings[2].contains("keeping version 1 (1 keys)"),
            "{warnings:?}"
        );
        assert_eq!(host.gauge(Gauge::Version), Some(1));
    }

    #[test]
    fn a_rolled_back_document_is_refused_and_counted() {
        let host = TestHost::at(1_000);
        let mut worker = Worker::new(&host, 1, Fetchers::Many);
        let call = only(worker.tick(&host));
        worker.answer(&host, &call, ok(document(&["a"], 2), "\"e2\""));
        host.now_ms.set(1_000 + PERIOD_MS);
        let call = only(worker.tick(&host));
        worker.answer(&host, &call, ok(document(&["a", "revoked"], 1), "\"e1\""));
        assert!(!worker.has(&host, "revoked"));
        assert_eq!(host.counter(Counter::RollbacksRefused), 1);
        assert_eq!(host.counter(Counter::FetchFailures), 1);
        assert!(
            host.warnings()[0].contains("serial 1 is not above serial 2"),
            "{:?}",
            host.warnings()
        );
    }

    #[test]
    fn a_document_in_ranged_parts_is_put_together_then_loaded() {
        let host = TestHost::at(1_000);
        let mut worker = Worker::new(&host, 1, Fetchers::One);
        let doc = document(&["a", "b", "c"], 1);
        let total = doc.len();
        let part = |from: usize, to: usize| FetchResponse {
            status: Some(206),
            etag: Some("\"e1\"".into()),
            content_range: Some(format!("bytes {from}-{}/{total}", to - 1)),
            body: doc[from..to].to_vec(),
        };
        let call = only(worker.tick(&host));
        let call = only(worker.answer(&host, &call, part(0, 10)));
        assert_eq!(
            call.header("range").map(|r| r.starts_with("bytes=10-")),
            Some(true)
        );
        assert_eq!(call.header("if-none-match"), None, "no 304 for a part");
        let call = only(worker.answer(&host, &call, part(10, 40)));
        assert!(worker.answer(&host, &call, part(40, total)).is_empty());
        assert!(worker.has(&host, "c"));
        assert_eq!(host.counter(Counter::Fetches), 1, "one fetch, three parts");
        let digest = sha256(b"secret-b");
        let keys = worker.remote.current(worker.flow.service(), 1_000).unwrap();
        assert!(keys.by_digest(&digest).is_some());
    }

    #[test]
    fn a_process_with_one_shared_set_stores_its_meta_but_no_chunks() {
        let host = TestHost::at(1_000);
        let mut only_copy = Worker::new(&host, 1, Fetchers::One);
        let call = only(only_copy.tick(&host));
        only_copy.answer(&host, &call, ok(document(&["a", "b"], 1), "\"e1\""));
        assert!(only_copy.has(&host, "a") && only_copy.has(&host, "b"));
        let service = only_copy.flow.service();
        assert_eq!(host.store.get(&service.key("set")), None);
        assert_eq!(host.store.get(&service.key("set.0")), None);
        assert!(host.store.get(&service.key("meta")).is_some());
        // A 304 confirms the set it holds, and the set keeps serving.
        host.now_ms.set(1_000 + PERIOD_MS);
        let call = only(only_copy.tick(&host));
        assert_eq!(call.header("if-none-match"), Some("\"e1\""));
        let not_modified = FetchResponse {
            status: Some(304),
            ..Default::default()
        };
        only_copy.answer(&host, &call, not_modified);
        only_copy.tick(&host);
        assert!(only_copy.has(&host, "a"));
        assert_eq!(host.gauge(Gauge::Version), Some(1));
        assert!(host.warnings().is_empty(), "{:?}", host.warnings());
    }

    #[test]
    fn a_worker_that_cannot_call_out_hands_the_fetch_to_another() {
        let host = TestHost::at(1_000);
        let mut stuck = Worker::new(&host, 1, Fetchers::Many);
        let mut other = Worker::new(&host, 2, Fetchers::Many);
        *host.refuse_calls.borrow_mut() = Some("no calls from this thread");
        assert!(stuck.tick(&host).is_empty());
        assert_eq!(host.counter(Counter::FetchFailures), 1);
        assert!(host.warnings()[0].contains("leaving the fetch to another worker"));
        *host.refuse_calls.borrow_mut() = None;
        host.now_ms.set(1_000 + PERIOD_MS);
        assert!(stuck.tick(&host).is_empty(), "backing off");
        only(other.tick(&host));
    }

    #[test]
    fn an_answer_that_never_came_is_forgotten_and_the_next_period_fetches_again() {
        let host = TestHost::at(1_000);
        let mut worker = Worker::new(&host, 1, Fetchers::One);
        only(worker.tick(&host));
        host.now_ms.set(1_000 + PERIOD_MS);
        assert!(worker.tick(&host).is_empty(), "still in flight");
        host.now_ms.set(1_000 + 1_000 + IN_FLIGHT_GRACE_MS + 1);
        only(worker.tick(&host));
    }
}
