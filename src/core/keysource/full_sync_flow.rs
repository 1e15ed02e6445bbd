//! Full mode as one flow over the host traits, the same for both hosts: each tick catches up
//! with the shared set and, for the lease holder once per period, sends the fetch; each answer
//! asks for the next part or is judged as a whole (`FullSync::finish`), and its outcome is
//! applied to the worker's copy with its counters and log lines. The hosts only keep the state
//! where their threading needs it and forward their hooks here.

use super::docparts::{PartStep, PartedFetch};
use super::fetch_handover::leaves_fetch_to_idle_vm;
use super::full_sync::{
    age_ms, fetch_failed_line, rollback_line, Build, BuildStep, FetchError, FetchOutcome,
    RemoteKeySet, SharedKeys, SyncEvent, TickPlan,
};
use super::host::{Counter, Gauge, KeySourceHost, Level};
use super::service::{FetchResponse, FullSync, KeyService};
use super::setbuckets::Clearing;
use super::setdelta::DeltaStop;

/// A fetch whose answer never came is forgotten after its timeout plus this.
pub const IN_FLIGHT_GRACE_MS: i64 = 5_000;

/// Document bytes read per `work` call (`Fetchers::Many`): a few thousand records, parsed and
/// written into their buckets in a few milliseconds, so no request of the worker waits long.
pub const SLICE_BYTES: usize = 128 * 1024;

/// A part received and not yet read, read a slice per `work` call.
#[derive(Debug)]
struct Queued {
    body: Vec<u8>,
    read: usize,
    /// The next part to ask for once this one is read; `None`: this is the last part.
    next: Option<u64>,
    etag: Option<String>,
}

/// Who else can fetch when this worker cannot send its call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetchers {
    /// Every VM of the process competes for the lease (wasm): one that cannot call out
    /// releases it and stays away for a lease period. The set is written into shared data part
    /// by part as the document arrives, and every VM looks keys up there (`SharedKeys`).
    Many,
    /// The worker is the process's only fetcher and its set the process's only copy, shared by
    /// every thread (the native module): it tries again next period, and stores only the meta.
    One,
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
    /// `Fetchers::Many`: the document being written into shared data as its parts arrive.
    build: Option<Build>,
    /// `Fetchers::Many`: the slot of a replaced (or unpublished) version, emptied a slice per
    /// tick.
    clearing: Option<Clearing>,
    /// `Fetchers::Many`: the part being read.
    queued: Option<Queued>,
    /// `Fetchers::Many`: every part is read and the build is being assembled, a group per
    /// `work` call; then it is published with this ETag.
    assembling: Option<Option<String>>,
    /// `Fetchers::Many`: the next build is whole, not an update in place (one gave way).
    whole_next: bool,
}

impl Fetch {
    /// A part is being read or the build assembled: the host calls `FullSyncFlow::work` often
    /// until it is done.
    pub fn is_working(&self) -> bool {
        self.queued.is_some() || self.assembling.is_some()
    }

    /// The host ticks this worker often: a part is being read, or a replaced slot emptied.
    pub fn wants_short_ticks(&self) -> bool {
        self.is_working() || self.clearing.is_some()
    }

    /// A fetch is under way: sent, or its parts being read.
    fn busy(&self) -> bool {
        self.in_flight.is_some() || self.queued.is_some() || self.build.is_some()
    }
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

    /// Reads the shared meta into the process's set (`Fetchers::One`): its staleness clock.
    pub fn catch_up(&self, host: &impl KeySourceHost, remote: &mut RemoteKeySet) {
        remote.sync(&self.service, host);
    }

    /// A tick (after `catch_up`): the age gauge, a lost call forgotten, and the fetch sent when
    /// this worker holds the lease and the period has passed.
    pub fn tick(&self, host: &impl KeySourceHost, fetch: &mut Fetch) {
        let now = host.now_ms();
        if let Some(age) = age_ms(&self.service, host, now) {
            host.record(Gauge::AgeSeconds, (age.max(0) / 1000) as u64);
        }
        if let Some(clearing) = &mut fetch.clearing {
            if clearing.step(&self.service, host) {
                fetch.clearing = None;
            }
        }
        if let Some((_, since)) = fetch.in_flight {
            if now - since > self.service.timeout_ms as i64 + IN_FLIGHT_GRACE_MS {
                fetch.in_flight = None;
                fetch.parts.reset();
                self.abandon_build(fetch);
            }
        }
        if now < fetch.backoff_until_ms {
            return;
        }
        let in_flight = fetch.busy();
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
        fetch.parts = match self.fetchers {
            Fetchers::Many => PartedFetch::streamed(),
            Fetchers::One => PartedFetch::default(),
        };
        fetch.queued = None;
        self.abandon_build(fetch);
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
        if self.fetchers == Fetchers::Many {
            return self.on_streamed_response(host, fetch, response, content_range.as_deref());
        }
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
                self.sync.finish(&self.service, host, now, response)
            }
        };
        Some(outcome)
    }

    /// `on_response` of a fetch whose parts are written into shared data as they come: a part
    /// is queued, to be read a slice per `work` call.
    fn on_streamed_response(
        &self,
        host: &impl KeySourceHost,
        fetch: &mut Fetch,
        response: FetchResponse,
        content_range: Option<&str>,
    ) -> Option<FetchOutcome> {
        let step = fetch.parts.accept(response, content_range);
        let part = fetch.parts.take_part();
        let queued = match step {
            PartStep::Fetch { offset } => part.map(|body| Queued {
                body,
                read: 0,
                next: Some(offset),
                etag: None,
            }),
            PartStep::Complete(response) if response.status == Some(200) => match part {
                // The last of the parts.
                Some(body) => Some(Queued {
                    body,
                    read: 0,
                    next: None,
                    etag: response.etag,
                }),
                // The whole document in one answer (the server ignored the range).
                None => {
                    self.abandon_build(fetch);
                    Some(Queued {
                        body: response.body,
                        read: 0,
                        next: None,
                        etag: response.etag,
                    })
                }
            },
            // A 304 or an error: judged as before (no 200 reaches this arm, so nothing is
            // parsed or published here).
            PartStep::Complete(response) => {
                self.abandon_build(fetch);
                return Some(
                    self.sync
                        .finish(&self.service, host, host.now_ms(), response),
                );
            }
            PartStep::Failed(reason) => {
                return Some(self.fail_build(host, fetch, FetchError::Parts(reason)))
            }
        };
        fetch.queued = queued;
        None
    }

    /// Reads the next slice of the queued part (`Fetchers::Many`); once the part is read, asks
    /// for the next one, or publishes the document after its last. The outcome is for
    /// `apply_shared`.
    pub fn work(&self, host: &impl KeySourceHost, fetch: &mut Fetch) -> Option<FetchOutcome> {
        if let Some(etag) = fetch.assembling.take() {
            return self.assemble(host, fetch, etag);
        }
        let mut queued = fetch.queued.take()?;
        let end = queued
            .read
            .saturating_add(SLICE_BYTES)
            .min(queued.body.len());
        let done = end == queued.body.len();
        let slice = queued.body.get(queued.read..end).unwrap_or_default();
        match self.feed_part(host, fetch, slice) {
            Err(reason) => return Some(self.fail_build(host, fetch, reason)),
            Ok(BuildStep::Rebuild(stop)) => return self.rebuild_whole(host, fetch, stop),
            Ok(_) => {}
        }
        queued.read = end;
        if !done {
            fetch.queued = Some(queued);
            return None;
        }
        if let Some(offset) = queued.next {
            let headers = self.sync.part_headers(&self.service, offset);
            return match host.dispatch(&self.service.cluster, &headers, self.service.timeout_ms) {
                Ok(token) => {
                    fetch.in_flight = Some((token, host.now_ms()));
                    None
                }
                Err(reason) => Some(self.fail_build(host, fetch, FetchError::NotSent(reason))),
            };
        }
        fetch.assembling = Some(queued.etag);
        None
    }

    /// Writes the next group of the finished build's buckets; publishes it after the last.
    fn assemble(
        &self,
        host: &impl KeySourceHost,
        fetch: &mut Fetch,
        etag: Option<String>,
    ) -> Option<FetchOutcome> {
        self.sync
            .hold_lease(&self.service, host, self.worker, host.now_ms());
        match fetch.build.as_mut()?.assemble(&self.service, host) {
            Ok(BuildStep::Going) => {
                fetch.assembling = Some(etag);
                None
            }
            Ok(BuildStep::Rebuild(stop)) => self.rebuild_whole(host, fetch, stop),
            Ok(BuildStep::Done) => {
                let build = fetch.build.take()?;
                if let Some(changed) = build.changed_in_place() {
                    host.log(
                        Level::Info,
                        &format!(
                            "keygate[{}]: key set updated in place (records changed, added or removed: {changed})",
                            self.name
                        ),
                    );
                }
                let (outcome, clearing) =
                    self.sync
                        .publish_built(&self.service, host, host.now_ms(), etag, build);
                self.clear(fetch, clearing);
                Some(outcome)
            }
            Err(reason) => Some(self.fail_build(host, fetch, reason)),
        }
    }

    /// The fetch failed: its parts and build are forgotten.
    fn fail_build(
        &self,
        host: &impl KeySourceHost,
        fetch: &mut Fetch,
        reason: FetchError,
    ) -> FetchOutcome {
        fetch.parts.reset();
        fetch.queued = None;
        fetch.in_flight = None;
        self.abandon_build(fetch);
        self.sync.failed(&self.service, host, reason)
    }

    /// An update in place gave way (nothing of it was written): the document is asked for
    /// again from its first part, to be built whole.
    fn rebuild_whole(
        &self,
        host: &impl KeySourceHost,
        fetch: &mut Fetch,
        stop: DeltaStop,
    ) -> Option<FetchOutcome> {
        host.log(
            Level::Info,
            &format!(
                "keygate[{}]: key set to be rebuilt whole: {}",
                self.name,
                stop.reason()
            ),
        );
        fetch.build = None;
        fetch.queued = None;
        fetch.assembling = None;
        fetch.whole_next = true;
        fetch.parts = PartedFetch::streamed();
        let headers = self.sync.part_headers(&self.service, 0);
        match host.dispatch(&self.service.cluster, &headers, self.service.timeout_ms) {
            Ok(token) => {
                fetch.in_flight = Some((token, host.now_ms()));
                None
            }
            Err(reason) => Some(self.fail_build(host, fetch, FetchError::NotSent(reason))),
        }
    }

    /// Reads one part's records into the build, starting it on the first part.
    fn feed_part(
        &self,
        host: &impl KeySourceHost,
        fetch: &mut Fetch,
        part: &[u8],
    ) -> Result<BuildStep, FetchError> {
        let now = host.now_ms();
        self.sync.hold_lease(&self.service, host, self.worker, now);
        if fetch.build.is_none() {
            let whole = std::mem::take(&mut fetch.whole_next);
            let build = Build::start(&self.service, host, now, whole);
            // A slot still being cleared is the one this build writes: the build replaces each
            // bucket it touches, and what it does not touch is tagged as another build's.
            if fetch.clearing.is_some_and(|c| c.slot == build.slot()) {
                fetch.clearing = None;
            }
            fetch.build = Some(build);
        }
        match &mut fetch.build {
            Some(build) => build.feed(&self.service, host, part),
            None => Ok(BuildStep::Going),
        }
    }

    /// Forgets a build that will not be published; its slot is cleared in slices.
    fn abandon_build(&self, fetch: &mut Fetch) {
        fetch.assembling = None;
        if let Some(clearing) = fetch.build.take().and_then(|b| b.clearing()) {
            fetch.clearing = Some(clearing);
        }
    }

    /// Schedules `clearing`. One still under way (a second reload within the seconds a clear
    /// takes) is left: its buckets are tagged as an old build's and the next build into that
    /// slot replaces them; clearing it at once would stall this VM's requests.
    fn clear(&self, fetch: &mut Fetch, clearing: Option<Clearing>) {
        if clearing.is_some() {
            fetch.clearing = clearing;
        }
    }

    /// Catches up with the shared set (`Fetchers::Many`) and reports what happened.
    pub fn catch_up_shared(&self, host: &impl KeySourceHost, keys: &mut SharedKeys) {
        if let Some(event) = keys.sync(&self.service, host) {
            self.report(host, event);
        }
    }

    /// Applies a fetch's outcome (`Fetchers::Many`): the counters and log lines; the set itself
    /// is in shared data already.
    pub fn apply_shared(
        &self,
        host: &impl KeySourceHost,
        keys: &mut SharedKeys,
        outcome: FetchOutcome,
    ) {
        match outcome {
            FetchOutcome::Published { .. } => {
                host.bump(Counter::Updates);
                self.catch_up_shared(host, keys);
            }
            FetchOutcome::Updated { .. } | FetchOutcome::Unchanged { .. } => {}
            refused => self.report_refusal(host, refused, keys.version(), keys.len()),
        }
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
            FetchOutcome::Unchanged { .. } | FetchOutcome::Published { .. } => {}
            refused => self.report_refusal(host, refused, remote.version(), remote.len()),
        }
    }

    /// Counts and logs a fetch that left the serving set (`version`, `keys` records) as it was.
    fn report_refusal(
        &self,
        host: &impl KeySourceHost,
        outcome: FetchOutcome,
        version: u64,
        keys: usize,
    ) {
        match outcome {
            FetchOutcome::RolledBack {
                offered,
                current,
                failures,
            } => {
                host.bump(Counter::FetchFailures);
                host.bump(Counter::RollbacksRefused);
                let line = rollback_line(&self.name, offered, current, failures, version);
                host.log(Level::Warn, &line);
            }
            FetchOutcome::Failed { reason, failures } => {
                host.bump(Counter::FetchFailures);
                let line = fetch_failed_line(&self.name, failures, &reason, version, keys);
                host.log(Level::Warn, &line);
            }
            FetchOutcome::Updated { .. }
            | FetchOutcome::Unchanged { .. }
            | FetchOutcome::Published { .. } => {}
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
    use crate::core::credential::Credential;
    use crate::core::digest::sha256;
    use crate::core::keyset::KeyRecord;
    use crate::core::keysource::full_sync::Unavailable;
    use crate::core::keysource::host::Clock;
    use crate::core::keysource::service::KeyServiceMode;
    use crate::core::keysource::store::SharedStore;
    use crate::core::keysource::test_host::{document, ok, service, Call, TestHost};

    const PERIOD_MS: i64 = 5_000;

    /// A worker of the flow: its settings, its fetch and its view of the set (its own copy
    /// with `Fetchers::One`, the shared set's header with `Fetchers::Many`).
    struct Worker {
        flow: FullSyncFlow,
        fetch: Fetch,
        remote: RemoteKeySet,
        shared: SharedKeys,
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
                shared: SharedKeys::default(),
            }
        }

        fn many(&self) -> bool {
            self.flow.fetchers == Fetchers::Many
        }

        /// One tick as a host runs it; the calls it sent.
        fn tick(&mut self, host: &TestHost) -> Vec<Call> {
            if self.many() {
                self.flow.catch_up_shared(host, &mut self.shared);
            } else {
                self.flow.catch_up(host, &mut self.remote);
            }
            self.flow.tick(host, &mut self.fetch);
            host.take_calls()
        }

        /// Answers `call`; the calls the answer made the flow send.
        fn answer(&mut self, host: &TestHost, call: &Call, response: FetchResponse) -> Vec<Call> {
            let mut outcome = self
                .flow
                .on_response(host, &mut self.fetch, call.token, response);
            while outcome.is_none() && self.fetch.is_working() {
                outcome = self.flow.work(host, &mut self.fetch);
            }
            if let Some(outcome) = outcome {
                if self.many() {
                    self.flow.apply_shared(host, &mut self.shared, outcome);
                } else {
                    self.flow.apply(host, &mut self.remote, outcome);
                }
            }
            host.take_calls()
        }

        /// The record of the id:secret key `id` (secret `secret-<id>`), as a request finds it.
        fn find(&self, host: &TestHost, id: &str) -> Result<Option<KeyRecord>, Unavailable> {
            let credential = Credential::Pair {
                id: id.to_string(),
                secret_digest: sha256(format!("secret-{id}").as_bytes()),
                environment: None,
            };
            let service = self.flow.service();
            if self.many() {
                return self.shared.find(service, host, &credential, host.now_ms());
            }
            let keys = self.remote.current(service, host.now_ms())?;
            Ok(keys.by_id(id).cloned())
        }

        fn has(&self, host: &TestHost, id: &str) -> bool {
            self.find(host, id).unwrap().is_some()
        }
    }

    /// A worker sharing the set (wasm) that fetched version 1, keys a and b, at 1_000.
    fn serving_a_and_b(host: &TestHost) -> Worker {
        let mut worker = Worker::new(host, 1, Fetchers::Many);
        let call = only(worker.tick(host));
        worker.answer(host, &call, ok(document(&["a", "b"], 1), "\"e1\""));
        worker
    }

    fn only(calls: Vec<Call>) -> Call {
        assert_eq!(calls.len(), 1, "{calls:?}");
        calls.into_iter().next().unwrap()
    }

    #[test]
    fn the_first_tick_fetches_and_the_answer_is_loaded_with_its_gauges_and_counters() {
        let host = TestHost::at(1_000);
        let mut worker = Worker::new(&host, 1, Fetchers::Many);
        assert_eq!(worker.find(&host, "a"), Err(Unavailable::NotLoaded));
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
    fn a_process_with_one_shared_set_stores_only_its_lease_and_meta() {
        let host = TestHost::at(1_000);
        let mut only_copy = Worker::new(&host, 1, Fetchers::One);
        let call = only(only_copy.tick(&host));
        only_copy.answer(&host, &call, ok(document(&["a", "b"], 1), "\"e1\""));
        assert!(only_copy.has(&host, "a") && only_copy.has(&host, "b"));
        let service = only_copy.flow.service();
        assert!(host.store.get(&service.key("lease")).is_some());
        assert!(host.store.get(&service.key("meta")).is_some());
        assert_eq!(host.store.len(), 2, "no copy of the set in shared data");
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

    /// The parts of `doc` as a server answers ranges of `part` bytes.
    fn ranged(doc: &[u8], from: usize, part: usize, etag: &str) -> FetchResponse {
        let to = (from + part).min(doc.len());
        FetchResponse {
            status: Some(206),
            etag: Some(etag.into()),
            content_range: Some(format!("bytes {from}-{}/{}", to - 1, doc.len())),
            body: doc[from..to].to_vec(),
        }
    }

    /// Answers `call` and the part requests that follow with `doc` in parts of `part` bytes,
    /// from where each asks.
    fn answer_in_parts(worker: &mut Worker, host: &TestHost, call: Call, doc: &[u8], part: usize) {
        let mut call = call;
        loop {
            let from = call
                .header("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.split('-').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let more = worker.answer(host, &call, ranged(doc, from, part, "\"p\""));
            match more.into_iter().next() {
                Some(next) => call = next,
                None => break,
            }
        }
    }

    #[test]
    fn a_document_in_parts_is_written_into_shared_data_as_it_comes_and_found_there() {
        let host = TestHost::at(1_000);
        let mut fetcher = Worker::new(&host, 1, Fetchers::Many);
        let mut other = Worker::new(&host, 2, Fetchers::Many);
        let ids: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let doc = document(&ids, 1);
        let call = only(fetcher.tick(&host));
        // Parts of 97 bytes: most records are cut by a part's end.
        answer_in_parts(&mut fetcher, &host, call, &doc, 97);
        assert_eq!(host.gauge(Gauge::Keys), Some(200));
        other.tick(&host);
        let found = other.find(&host, "k150").unwrap().unwrap();
        assert_eq!(found.digest, sha256(b"secret-k150"));
        assert_eq!(other.find(&host, "k200"), Ok(None));
        assert!(host.warnings().is_empty(), "{:?}", host.warnings());
    }

    #[test]
    fn a_duplicate_in_a_later_part_refuses_the_version_and_the_last_good_set_serves() {
        let host = TestHost::at(1_000);
        let mut worker = serving_a_and_b(&host);
        host.now_ms.set(1_000 + PERIOD_MS);
        let call = only(worker.tick(&host));
        let ids: Vec<String> = (0..50)
            .map(|i| format!("n{i}"))
            .chain(["n3".into()])
            .collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        answer_in_parts(&mut worker, &host, call, &document(&ids, 2), 500);
        let warnings = host.warnings();
        assert!(
            warnings[0].contains("keys[50].id: duplicate key id (also keys[3])")
                && warnings[0].contains("keeping version 1 (2 keys)"),
            "{warnings:?}"
        );
        assert!(worker.has(&host, "a") && !worker.has(&host, "n1"));
        assert_eq!(host.gauge(Gauge::Version), Some(1));
        // The refused build's slot is emptied on the ticks that follow; the set still serves.
        for _ in 0..3 {
            worker.tick(&host);
        }
        assert!(worker.fetch.clearing.is_none());
        assert!(worker.has(&host, "a"));
    }

    #[test]
    fn a_replaced_version_is_cleared_from_shared_data_and_the_new_one_serves() {
        let host = TestHost::at(1_000);
        let mut worker = serving_a_and_b(&host);
        for version in 2..=5u64 {
            host.now_ms.set(1_000 + PERIOD_MS * version as i64);
            let call = only(worker.tick(&host));
            let id = format!("v{version}");
            worker.answer(&host, &call, ok(document(&["a", &id], version), "\"e\""));
            assert!(worker.has(&host, &id) && worker.has(&host, "a"));
            assert!(!worker.has(&host, "b"));
            worker.tick(&host);
            assert!(worker.fetch.clearing.is_none(), "the old slot is empty");
        }
        assert_eq!(host.gauge(Gauge::Version), Some(5));
        assert!(host.warnings().is_empty(), "{:?}", host.warnings());
    }

    fn logged(host: &TestHost, text: &str) -> bool {
        host.logs
            .borrow()
            .iter()
            .any(|(_, line)| line.contains(text))
    }

    fn ids(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("k{i}")).collect()
    }

    #[test]
    fn a_few_changed_keys_are_written_over_the_live_version_and_no_other_slot_is_used() {
        let host = TestHost::at(1_000);
        let mut fetcher = Worker::new(&host, 1, Fetchers::Many);
        let mut other = Worker::new(&host, 2, Fetchers::Many);
        let v1 = ids(0..300);
        let call = only(fetcher.tick(&host));
        let doc = document(&v1.iter().map(String::as_str).collect::<Vec<_>>(), 1);
        answer_in_parts(&mut fetcher, &host, call, &doc, 900);
        let mut v2: Vec<&str> = v1
            .iter()
            .map(String::as_str)
            .filter(|id| *id != "k7")
            .collect();
        v2.push("added");
        host.now_ms.set(1_000 + PERIOD_MS);
        let call = only(fetcher.tick(&host));
        answer_in_parts(&mut fetcher, &host, call, &document(&v2, 2), 900);
        assert!(
            logged(
                &host,
                "key set updated in place (records changed, added or removed: 2)"
            ),
            "{:?}",
            host.logs.borrow()
        );
        assert_eq!(host.gauge(Gauge::Version), Some(2));
        assert!(fetcher.fetch.clearing.is_none());
        other.tick(&host);
        assert!(other.has(&host, "added") && other.has(&host, "k299"));
        assert!(!other.has(&host, "k7") && !fetcher.has(&host, "k7"));
        // Version 1 was written to slot 1 and version 2 over it: slot 0 was never written.
        let service = fetcher.flow.service();
        assert!(host.get(&service.key("s0.h")).is_none());
        assert!(host.warnings().is_empty(), "{:?}", host.warnings());
    }

    #[test]
    fn an_update_that_gives_way_reads_the_document_again_and_builds_it_whole() {
        let host = TestHost::at(1_000);
        let mut worker = serving_a_and_b(&host);
        // 20,000 new keys: more than an update in place rewrites.
        let v2 = ids(0..20_000);
        let v2: Vec<&str> = v2.iter().map(String::as_str).collect();
        host.now_ms.set(1_000 + PERIOD_MS);
        let call = only(worker.tick(&host));
        answer_in_parts(&mut worker, &host, call, &document(&v2, 2), 64 * 1024);
        assert!(
            logged(&host, "key set to be rebuilt whole: more records changed"),
            "{:?}",
            host.logs.borrow()
        );
        assert_eq!(host.gauge(Gauge::Version), Some(2));
        assert_eq!(host.gauge(Gauge::Keys), Some(20_000));
        assert!(worker.has(&host, "k19999") && !worker.has(&host, "a"));
        // The whole build went to the other slot; the replaced one is emptied on later ticks.
        while worker.fetch.clearing.is_some() {
            worker.tick(&host);
        }
        assert!(worker.has(&host, "k0"));
        assert!(host.warnings().is_empty(), "{:?}", host.warnings());
    }
}
