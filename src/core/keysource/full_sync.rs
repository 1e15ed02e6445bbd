//! Full mode: the whole key set is one document, fetched every `refresh_seconds` by the holder
//! of a lease in the shared store, validated, and announced with a new version in the shared
//! meta (see the module docs of `keysource`).

use std::sync::Arc;

use super::docparts::{range_header, PartError};
use super::docstream::DocumentStream;
use super::host::CalloutError;
use super::service::{FetchResponse, FullSync, KeyService};
use super::setbuckets::{other_slot, slot_of, BuildError, Clearing, SetWriter, SharedSet};
use super::setdelta::{DeltaError, DeltaStop, SetDelta};
use super::store::{cas_update, Change, Reader, SharedStore};
use crate::core::config_error::ConfigError;
use crate::core::credential::Credential;
use crate::core::digest::{sha256, Digest, Sha256Stream};
use crate::core::keyset::{KeyRecord, KeyRecordSpec, KeySet};

/// First byte of every value this module writes.
const FORMAT: u8 = 1;
/// ETags longer than this are not kept (the document is then fetched in full every period).
const MAX_ETAG_LEN: usize = 256;

/// What every VM needs to know about the shared key set, in one small value read per request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Version of the stored document; 0 while there is none.
    pub version: u64,
    /// Last fetch that confirmed the stored document (200 or 304); the staleness clock.
    pub last_success_ms: i64,
    /// Start of the last fetch attempt; the refresh clock.
    pub last_attempt_ms: i64,
    /// Failed fetches since the last success.
    pub failures: u32,
    pub doc_sha256: [u8; 32],
    /// `serial` of the stored document: a fetched one must be higher to replace it.
    pub serial: u64,
    pub etag: Option<String>,
}

impl Meta {
    fn encode(&self) -> Vec<u8> {
        let etag = self
            .etag
            .as_deref()
            .filter(|e| e.len() <= MAX_ETAG_LEN)
            .unwrap_or("");
        let mut out = Vec::with_capacity(64 + etag.len());
        out.push(FORMAT);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.last_success_ms.to_le_bytes());
        out.extend_from_slice(&self.last_attempt_ms.to_le_bytes());
        out.extend_from_slice(&self.failures.to_le_bytes());
        out.extend_from_slice(&self.doc_sha256);
        out.extend_from_slice(&self.serial.to_le_bytes());
        out.extend_from_slice(&(etag.len() as u16).to_le_bytes());
        out.extend_from_slice(etag.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Meta> {
        let mut r = Reader(bytes);
        if r.u8()? != FORMAT {
            return None;
        }
        let version = r.u64()?;
        let last_success_ms = r.i64()?;
        let last_attempt_ms = r.i64()?;
        let failures = r.u32()?;
        let doc_sha256 = r.take(32)?.try_into().ok()?;
        let serial = r.u64()?;
        let etag_len = usize::from(r.u16()?);
        let etag = std::str::from_utf8(r.take(etag_len)?).ok()?;
        Some(Meta {
            version,
            last_success_ms,
            last_attempt_ms,
            failures,
            doc_sha256,
            serial,
            etag: (!etag.is_empty()).then(|| etag.to_string()),
        })
    }
}

/// Who may fetch, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    holder: u64,
    until_ms: i64,
}

impl Lease {
    const FREE: Lease = Lease {
        holder: 0,
        until_ms: 0,
    };

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17);
        out.push(FORMAT);
        out.extend_from_slice(&self.holder.to_le_bytes());
        out.extend_from_slice(&self.until_ms.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Lease> {
        let mut r = Reader(bytes);
        if r.u8()? != FORMAT {
            return None;
        }
        Some(Lease {
            holder: r.u64()?,
            until_ms: r.i64()?,
        })
    }
}

/// Parses and validates a key-set document exactly as inline keys are validated, and returns
/// its `serial`, which a key service's document must carry (so a rollback can be recognized).
pub fn parse_document(bytes: &[u8]) -> Result<(KeySet, u64), ConfigError> {
    let (keys, serial) = KeySet::from_document(bytes)?;
    let serial = serial.ok_or_else(|| {
        ConfigError::new(
            "serial",
            "required: a number raised with every published document (keygate keyset add/revoke/build write it)",
        )
    })?;
    Ok((keys, serial))
}

/// Why keys cannot be verified right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// No document has been fetched successfully since Envoy started.
    NotLoaded,
    /// The last successful fetch is older than `max_stale_seconds`.
    Stale { age_ms: i64 },
}

/// Something a VM did while catching up with the shared set, for its log and gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncEvent {
    Loaded {
        version: u64,
        keys: usize,
    },
    /// The stored document does not parse in this VM (it was valid when stored); the VM keeps
    /// its current set and does not retry this version.
    Refused {
        version: u64,
        error: ConfigError,
    },
}

impl SyncEvent {
    /// The log line of the event for the filter named `name`; a refusal is a warning.
    pub fn log_line(&self, name: &str) -> (bool, String) {
        match self {
            SyncEvent::Loaded { version, keys } => (
                false,
                format!("keygate[{name}]: key set version {version} loaded ({keys} keys)"),
            ),
            SyncEvent::Refused { version, error } => (
                true,
                format!("keygate[{name}]: stored key set version {version} refused: {error}"),
            ),
        }
    }
}

/// The process's one parsed key set (the native module): the fetcher parses each new version
/// itself (`install`); other threads share it through an `Arc`.
#[derive(Debug, Default)]
pub struct RemoteKeySet {
    version: u64,
    keys: Option<Arc<KeySet>>,
    last_success_ms: i64,
}

impl RemoteKeySet {
    /// Reads the shared meta (one small value) for the staleness clock: a 304 or the same
    /// bytes confirm the set without a new version.
    pub fn sync(&mut self, service: &KeyService, store: &dyn SharedStore) {
        if let Some((meta, _)) = read_meta(service, store) {
            self.last_success_ms = meta.last_success_ms;
        }
    }

    /// The set held now, whatever its age: a host keeps the set a new version replaces, so
    /// the million records it frees are not freed under the lock requests take (or by one of
    /// them), but later, on the fetcher's thread.
    pub fn held(&self) -> Option<Arc<KeySet>> {
        self.keys.clone()
    }

    /// Adopts the set the fetcher parsed after a successful fetch. The set it replaces is
    /// dropped here unless the host holds it too (`held`).
    pub fn install(&mut self, version: u64, keys: KeySet) -> SyncEvent {
        let count = keys.len();
        self.version = version;
        self.keys = Some(Arc::new(keys));
        SyncEvent::Loaded {
            version,
            keys: count,
        }
    }

    /// The set to decide with, unless there is none yet or it is too old.
    pub fn current(&self, service: &KeyService, now_ms: i64) -> Result<Arc<KeySet>, Unavailable> {
        let keys = self.keys.as_ref().ok_or(Unavailable::NotLoaded)?;
        check_age(service, self.last_success_ms, now_ms)?;
        Ok(Arc::clone(keys))
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn len(&self) -> usize {
        self.keys.as_ref().map_or(0, |k| k.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The warning for a fetch that failed while version `version` (`keys` keys) keeps serving.
pub fn fetch_failed_line(
    name: &str,
    failures: u32,
    reason: &FetchError,
    version: u64,
    keys: usize,
) -> String {
    format!(
        "keygate[{name}]: key-set fetch failed ({failures} in a row): {reason}; \
         keeping version {version} ({keys} keys)"
    )
}

/// The warning for a refused rollback (`FetchOutcome::RolledBack`) while `version` serves.
pub fn rollback_line(
    name: &str,
    offered: u64,
    current: u64,
    failures: u32,
    version: u64,
) -> String {
    format!(
        "keygate[{name}]: key-set document refused ({failures} failed fetches in a row): \
         serial {offered} is not above serial {current} of version {version}"
    )
}

/// The shared set as one VM sees it (wasm): the header of the current version, its profiles
/// decoded once; each key is looked up in shared data (`setbuckets`).
#[derive(Debug, Default)]
pub struct SharedKeys {
    set: Option<SharedSet>,
    refused_version: u64,
    last_success_ms: i64,
}

impl SharedKeys {
    /// Reads the shared meta (one small value) and, when the version moved, the new version's
    /// header.
    pub fn sync(&mut self, service: &KeyService, store: &dyn SharedStore) -> Option<SyncEvent> {
        let meta = read_meta(service, store)?.0;
        self.last_success_ms = meta.last_success_ms;
        let current = self.set.as_ref().map_or(0, |s| s.version);
        if meta.version == 0 || meta.version == current || meta.version == self.refused_version {
            return None;
        }
        match SharedSet::load(service, store, meta.version) {
            Ok(Some(set)) => {
                let event = SyncEvent::Loaded {
                    version: set.version,
                    keys: set.len(),
                };
                self.set = Some(set);
                Some(event)
            }
            // The header is being replaced: the meta moved on since it was read.
            Ok(None) => None,
            Err(message) => {
                self.refused_version = meta.version;
                Some(SyncEvent::Refused {
                    version: meta.version,
                    error: ConfigError::new("stored key set", message),
                })
            }
        }
    }

    /// The record a credential names (`Ok(None)`: no such key), unless there is no set yet or
    /// it is too old.
    pub fn find(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        credential: &Credential,
        now_ms: i64,
    ) -> Result<Option<KeyRecord>, Unavailable> {
        let set = self.set.as_ref().ok_or(Unavailable::NotLoaded)?;
        check_age(service, self.last_success_ms, now_ms)?;
        Ok(match credential {
            Credential::Opaque { digest, .. } => set.by_digest(service, store, digest),
            Credential::Pair { id, .. } => set.by_id(service, store, id),
        })
    }

    pub fn version(&self) -> u64 {
        self.set.as_ref().map_or(0, |s| s.version)
    }

    pub fn len(&self) -> usize {
        self.set.as_ref().map_or(0, |s| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A document being written into shared data part by part as its ranges arrive: over the live
/// version in place when there is one (`SetDelta`), else whole into the other slot.
#[derive(Debug)]
pub struct Build {
    /// The version stored when the build began: the one it replaces.
    base: u64,
    stream: DocumentStream,
    writer: Writer,
    digest: Sha256Stream,
    /// A delta's verdict once compared: whether the document is to be published at all (it is
    /// written over the live version only then).
    publishable: Option<bool>,
}

#[derive(Debug)]
enum Writer {
    Whole(Box<SetWriter>),
    InPlace(Box<SetDelta>),
}

impl Writer {
    /// One record of the document (one reader of the document for both writers).
    fn add(&mut self, position: usize, spec: KeyRecordSpec) -> Result<(), ConfigError> {
        match self {
            Writer::Whole(w) => w.intake.add(position, spec),
            Writer::InPlace(d) => d.intake.add(position, spec),
        }
    }
}

/// Where a build stands after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStep {
    Going,
    /// Every bucket is written: the build is ready to publish.
    Done,
    /// An update in place gave way: the document is to be read again and built whole.
    Rebuild(DeltaStop),
}

impl Build {
    /// Starts the build of the version after the stored one: over it in place, unless there is
    /// none or `whole` asks for a whole build.
    pub fn start(service: &KeyService, store: &dyn SharedStore, now_ms: i64, whole: bool) -> Build {
        let stored = read_meta(service, store).map_or(0, |(m, _)| m.version);
        let live = (stored != 0)
            .then(|| SharedSet::load(service, store, stored).ok().flatten())
            .flatten();
        let tag = now_ms as u64;
        let writer = match live {
            Some(live) if !whole => Writer::InPlace(Box::new(SetDelta::start(&live))),
            Some(live) => Writer::Whole(Box::new(SetWriter::start(
                other_slot(live.layout().slot),
                tag,
            ))),
            None => Writer::Whole(Box::new(SetWriter::start(slot_of(stored + 1), tag))),
        };
        Build {
            base: stored,
            stream: DocumentStream::default(),
            writer,
            digest: Default::default(),
            publishable: None,
        }
    }

    /// The slot this build writes.
    pub fn slot(&self) -> u64 {
        match &self.writer {
            Writer::Whole(w) => w.slot(),
            Writer::InPlace(d) => d.slot(),
        }
    }

    /// Records an update in place changed, added or removed; `None` for a whole build.
    pub fn changed_in_place(&self) -> Option<usize> {
        match &self.writer {
            Writer::Whole(_) => None,
            Writer::InPlace(d) => Some(d.changed()),
        }
    }

    /// Reads the next bytes of the document: a whole build stages their records in shared data,
    /// an update compares them with the live set.
    pub fn feed(
        &mut self,
        service: &KeyService,
        store: &dyn SharedStore,
        part: &[u8],
    ) -> Result<BuildStep, FetchError> {
        self.digest.update(part);
        let writer = &mut self.writer;
        self.stream
            .feed(part, |position, spec| writer.add(position, spec))
            .map_err(FetchError::InvalidDocument)?;
        match &mut self.writer {
            Writer::Whole(writer) => writer.flush(service, store).map_err(build_error)?,
            Writer::InPlace(delta) => {
                return delta_step(delta.flush(service, store).map(|()| false))
            }
        }
        Ok(BuildStep::Going)
    }

    /// Every part is in: writes the next group of buckets (an update compares first, and
    /// writes only a document that will be published).
    pub fn assemble(
        &mut self,
        service: &KeyService,
        store: &dyn SharedStore,
    ) -> Result<BuildStep, FetchError> {
        if let (None, Writer::InPlace(delta)) = (self.publishable, &mut self.writer) {
            match delta.compare_step(service, store) {
                Ok(true) => {}
                other => return delta_step(other.map(|_| false)),
            }
            self.publishable = Some(self.judge(service, store));
        }
        match &mut self.writer {
            Writer::Whole(writer) => match writer.assemble_step(service, store) {
                Ok(true) => Ok(BuildStep::Done),
                Ok(false) => Ok(BuildStep::Going),
                Err(e) => Err(build_error(e)),
            },
            // Not to be published: `publish_built` says why, and nothing was written.
            Writer::InPlace(_) if self.publishable == Some(false) => Ok(BuildStep::Done),
            Writer::InPlace(delta) => delta_step(delta.apply_step(service, store)),
        }
    }

    /// Whether the document read is to be published over the version the build began with
    /// (still the stored one).
    fn judge(&self, service: &KeyService, store: &dyn SharedStore) -> bool {
        matches!(self.verdict(service, store), Verdict::Publish { stored, .. } if stored.version == self.base)
    }

    /// What the document read comes to against the stored meta: published only with a serial
    /// above the stored one and other bytes than the stored ones.
    fn verdict(&self, service: &KeyService, store: &dyn SharedStore) -> Verdict {
        let serial = match self.stream.finish() {
            Ok((Some(serial), _)) => serial,
            Ok((None, _)) => {
                return Verdict::Invalid(ConfigError::new(
                    "serial",
                    "required: a number raised with every published document (keygate keyset add/revoke/build write it)",
                ))
            }
            Err(error) => return Verdict::Invalid(error),
        };
        let digest: Digest = self.digest.clone().finish();
        let stored = read_meta(service, store)
            .map(|(m, _)| m)
            .unwrap_or_default();
        if stored.version != 0 && digest == stored.doc_sha256 {
            return Verdict::Same;
        }
        if stored.version != 0 && serial <= stored.serial {
            return Verdict::RolledBack {
                offered: serial,
                current: stored.serial,
            };
        }
        Verdict::Publish {
            serial,
            digest,
            stored,
        }
    }

    /// The version this build is published as after `stored`, unless the stored version moved
    /// since it began (its slot was chosen then).
    fn next_version(&self, stored: u64) -> Option<u64> {
        (stored == self.base).then_some(stored + 1)
    }

    fn finish(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        version: u64,
    ) -> Result<usize, BuildError> {
        match &self.writer {
            Writer::Whole(w) => w.intake.publish(service, store, w.layout(), version),
            Writer::InPlace(d) => d.intake.publish(service, store, d.layout(), version),
        }
    }

    /// What clears this build's slot (a whole build that is not published; an update writes
    /// only what it publishes).
    pub fn clearing(&self) -> Option<Clearing> {
        match &self.writer {
            Writer::Whole(w) => Some(w.clearing()),
            Writer::InPlace(_) => None,
        }
    }
}

/// What a document read whole comes to, before it is published.
enum Verdict {
    Invalid(ConfigError),
    /// The stored bytes again: only confirmed.
    Same,
    RolledBack {
        offered: u64,
        current: u64,
    },
    Publish {
        serial: u64,
        digest: Digest,
        stored: Meta,
    },
}

/// An update's step as a build's.
fn delta_step(step: Result<bool, DeltaError>) -> Result<BuildStep, FetchError> {
    match step {
        Ok(true) => Ok(BuildStep::Done),
        Ok(false) => Ok(BuildStep::Going),
        Err(DeltaError::Stop(stop)) => Ok(BuildStep::Rebuild(stop)),
        Err(DeltaError::Invalid(e)) => Err(FetchError::InvalidDocument(e)),
        Err(DeltaError::Store) => Err(FetchError::StoreRefused),
    }
}

fn build_error(error: BuildError) -> FetchError {
    match error {
        BuildError::Invalid(error) => FetchError::InvalidDocument(error),
        BuildError::Store => FetchError::StoreRefused,
    }
}

/// A set last confirmed at `last_success_ms` is too old past `max_stale_seconds`.
fn check_age(service: &KeyService, last_success_ms: i64, now_ms: i64) -> Result<(), Unavailable> {
    let age_ms = now_ms.saturating_sub(last_success_ms);
    if service.max_stale_ms.is_some_and(|max| age_ms > max) {
        return Err(Unavailable::Stale { age_ms });
    }
    Ok(())
}
/// The shared meta and its compare-and-swap token.
pub fn read_meta(service: &KeyService, store: &dyn SharedStore) -> Option<(Meta, u32)> {
    let (bytes, cas) = store.get(&service.key("meta"))?;
    Some((Meta::decode(&bytes)?, cas))
}

/// Seconds since the last successful fetch, if there ever was one.
pub fn age_ms(service: &KeyService, store: &dyn SharedStore, now_ms: i64) -> Option<i64> {
    let (meta, _) = read_meta(service, store)?;
    (meta.version != 0).then(|| now_ms.saturating_sub(meta.last_success_ms))
}

/// What a root context should do on this tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickPlan {
    /// Another VM holds the lease, a fetch is in flight, or the period has not passed.
    Wait,
    /// This VM fetches now, with these request headers.
    Fetch {
        headers: Vec<(&'static str, String)>,
    },
}

#[derive(Debug)]
pub enum FetchOutcome {
    /// A new, valid document is stored under `version`; `keys` is its parsed set.
    Updated { version: u64, keys: KeySet },
    /// A new, valid document of `keys` records is stored in shared data under `version`, to be
    /// looked up there (`SharedKeys`).
    Published { version: u64, keys: usize },
    /// The stored document is still current (304, or the same bytes).
    Unchanged { version: u64 },
    /// Nothing changed but the failure count.
    Failed { reason: FetchError, failures: u32 },
    /// A valid document whose serial is not above the stored one (a stale cache or replica
    /// served an older set): refused, the stored set stays, and it counts as a failed fetch.
    RolledBack {
        offered: u64,
        current: u64,
        failures: u32,
    },
}

/// Why a fetch failed (the stored set stays).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The call for a later part could not be sent.
    NotSent(CalloutError),
    Parts(PartError),
    /// The call got no response: the connection failed or timed out.
    NoAnswer {
        cluster: String,
        timeout_ms: u64,
    },
    Status {
        status: u32,
        path: String,
    },
    InvalidDocument(ConfigError),
    /// The shared store refused the new meta (or a bucket of the set).
    StoreRefused,
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::NotSent(err) => err.fmt(f),
            FetchError::Parts(err) => err.fmt(f),
            FetchError::NoAnswer {
                cluster,
                timeout_ms,
            } => write!(
                f,
                "no answer from cluster '{cluster}' (connection failure or timeout after {timeout_ms} ms)"
            ),
            FetchError::Status { status, path } => write!(f, "status {status} for {path}"),
            FetchError::InvalidDocument(err) => write!(f, "invalid key-set document: {err}"),
            FetchError::StoreRefused => f.write_str("the shared key-set entry could not be written"),
        }
    }
}

impl std::error::Error for FetchError {}

/// A slow bound of how fast one VM parses a document (measured: about 20 MB/s on a loaded
/// 2-core machine), for the lease a parse needs.
const PARSE_BYTES_PER_MS: usize = 5_000;

/// Attempts at a contended compare-and-swap on the meta before giving up for this round.
const META_RETRIES: usize = 8;

impl FullSync {
    /// How long a lease lasts without renewal: long enough for a fetch to finish, short enough
    /// that another VM takes over soon after the holder goes away.
    pub fn lease_ms(&self, service: &KeyService) -> i64 {
        self.refresh_ms + service.timeout_ms as i64 + 2000
    }

    /// Creates the lease entry if it is absent. Called at configure time, before the worker
    /// serves: a write to an absent shared-data key cannot be compare-and-swapped.
    pub fn ensure_lease(&self, service: &KeyService, store: &dyn SharedStore) {
        let name = service.key("lease");
        if store.get(&name).is_none() {
            let _ = store.set(&name, &Lease::FREE.encode(), 0);
        }
    }

    /// Takes or renews the fetch lease. True when `worker` holds it until `now + lease_ms`.
    pub fn hold_lease(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        worker: u64,
        now_ms: i64,
    ) -> bool {
        self.hold_lease_for(service, store, worker, now_ms, self.lease_ms(service))
    }

    /// Renews the lease for as long as parsing a fetched document of `document_bytes` may take
    /// at the least: the holder's ticks stop while it parses, and a lease that expired meanwhile
    /// would let another VM fetch and parse the same document at the same time.
    pub fn hold_lease_to_parse(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        worker: u64,
        now_ms: i64,
        document_bytes: usize,
    ) -> bool {
        let parse_ms = i64::try_from(document_bytes / PARSE_BYTES_PER_MS).unwrap_or(i64::MAX);
        let lease_ms = self.lease_ms(service).saturating_add(parse_ms);
        self.hold_lease_for(service, store, worker, now_ms, lease_ms)
    }

    fn hold_lease_for(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        worker: u64,
        now_ms: i64,
        lease_ms: i64,
    ) -> bool {
        let name = service.key("lease");
        let renewed = Lease {
            holder: worker,
            until_ms: now_ms.saturating_add(lease_ms),
        };
        match store.get(&name) {
            Some((bytes, cas)) => {
                let lease = Lease::decode(&bytes).unwrap_or(Lease::FREE);
                let free = lease.holder == worker || lease.until_ms <= now_ms;
                // A lost race leaves the lease to the winner.
                free && store.set(&name, &renewed.encode(), cas).is_ok()
            }
            None => {
                // Absent (never configured here): create it, then see who won a creation race.
                store.set(&name, &renewed.encode(), 0).is_ok()
                    && store
                        .get(&name)
                        .and_then(|(b, _)| Lease::decode(&b))
                        .is_some_and(|l| l.holder == worker)
            }
        }
    }

    /// Gives the lease up (the VM is going away, or it cannot make calls).
    pub fn release_lease(&self, service: &KeyService, store: &dyn SharedStore, worker: u64) {
        let name = service.key("lease");
        if let Some((bytes, cas)) = store.get(&name) {
            if Lease::decode(&bytes).is_some_and(|l| l.holder == worker) {
                let _ = store.set(&name, &Lease::FREE.encode(), cas);
            }
        }
    }

    /// Decides whether `worker` fetches now. Call once per tick; `in_flight` is whether this
    /// VM's previous fetch is still waiting for its answer.
    pub fn plan(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        worker: u64,
        in_flight: bool,
        now_ms: i64,
    ) -> TickPlan {
        if !self.hold_lease(service, store, worker, now_ms) || in_flight {
            return TickPlan::Wait;
        }
        let (mut meta, cas) = read_meta(service, store).unwrap_or_default();
        if meta.last_attempt_ms != 0 && now_ms < meta.last_attempt_ms + self.refresh_ms {
            return TickPlan::Wait;
        }
        // Record the attempt first, so the period runs from start to start whoever fetches.
        meta.last_attempt_ms = now_ms;
        if store
            .set(&service.key("meta"), &meta.encode(), cas)
            .is_err()
        {
            return TickPlan::Wait;
        }
        // Only send the ETag of a document that is actually stored.
        let etag = meta.etag.as_deref().filter(|_| meta.version != 0);
        let mut headers = service.request_headers(&self.path, etag);
        // The first part; a small document comes whole in it (see `docparts`).
        headers.push(range_header(0));
        TickPlan::Fetch { headers }
    }

    /// Request headers for a later part of a document fetched in parts: no `If-None-Match`,
    /// which would answer 304 to a part of the very document being put together.
    pub fn part_headers(&self, service: &KeyService, offset: u64) -> Vec<(&'static str, String)> {
        let mut headers = service.request_headers(&self.path, None);
        headers.push(range_header(offset));
        headers
    }

    /// A fetch that failed between its parts: counted like any failed fetch.
    pub fn failed(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        reason: FetchError,
    ) -> FetchOutcome {
        FetchOutcome::Failed {
            reason,
            failures: count_failure(service, store),
        }
    }

    /// Applies the answer of a whole fetched document to the shared meta; a new set is parsed
    /// and handed back (`Updated`) for the fetcher's process, which holds the only copy.
    pub fn finish(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        now_ms: i64,
        response: FetchResponse,
    ) -> FetchOutcome {
        let failure = |reason: FetchError| FetchOutcome::Failed {
            reason,
            failures: count_failure(service, store),
        };
        let status = match response.status {
            Some(status) => status,
            None => {
                return failure(FetchError::NoAnswer {
                    cluster: service.cluster.clone(),
                    timeout_ms: service.timeout_ms,
                })
            }
        };
        let stored = read_meta(service, store)
            .map(|(m, _)| m)
            .unwrap_or_default();
        match status {
            304 if stored.version != 0 => confirm(service, store, now_ms, response.etag),
            200 => {
                let digest = sha256(&response.body);
                if stored.version != 0 && digest == stored.doc_sha256 {
                    return confirm(service, store, now_ms, response.etag);
                }
                let (keys, serial) = match parse_document(&response.body) {
                    Ok(parsed) => parsed,
                    Err(err) => return failure(FetchError::InvalidDocument(err)),
                };
                // Different bytes need a higher serial: an older copy served again must not
                // re-enable what a newer one revoked.
                if stored.version != 0 && serial <= stored.serial {
                    return FetchOutcome::RolledBack {
                        offered: serial,
                        current: stored.serial,
                        failures: count_failure(service, store),
                    };
                }
                drop(response.body);
                let stored_as = cas_update(store, &service.key("meta"), META_RETRIES, |bytes| {
                    let mut meta = bytes.and_then(Meta::decode).unwrap_or_default();
                    let version = meta.version + 1;
                    meta.version = version;
                    meta.doc_sha256 = digest;
                    meta.serial = serial;
                    meta.etag = response.etag.clone();
                    meta.last_success_ms = now_ms;
                    meta.failures = 0;
                    Change::Write(meta.encode(), Some(version))
                });
                match stored_as {
                    Ok(Some(version)) => FetchOutcome::Updated { version, keys },
                    _ => failure(FetchError::StoreRefused),
                }
            }
            status => failure(FetchError::Status {
                status,
                path: self.path.clone(),
            }),
        }
    }
}

impl FullSync {
    /// Publishes a document built part by part (`Build`): checked like `finish`
    /// checks a whole one (serial required and raised; the same bytes only confirm), then its
    /// header and the meta that announces it. Also returns the slot to clear: the old version's
    /// once the new one is announced, or the build's own when it is not published.
    pub fn publish_built(
        &self,
        service: &KeyService,
        store: &dyn SharedStore,
        now_ms: i64,
        etag: Option<String>,
        build: Build,
    ) -> (FetchOutcome, Option<Clearing>) {
        let failure = |reason: FetchError| FetchOutcome::Failed {
            reason,
            failures: count_failure(service, store),
        };
        let unused = build.clearing();
        let (serial, digest, stored) = match build.verdict(service, store) {
            Verdict::Publish {
                serial,
                digest,
                stored,
            } => (serial, digest, stored),
            Verdict::Invalid(error) => {
                return (failure(FetchError::InvalidDocument(error)), unused)
            }
            Verdict::Same => return (confirm(service, store, now_ms, etag), unused),
            Verdict::RolledBack { offered, current } => {
                let outcome = FetchOutcome::RolledBack {
                    offered,
                    current,
                    failures: count_failure(service, store),
                };
                return (outcome, unused);
            }
        };
        // An update wrote over the old version; a whole build leaves it to be cleared.
        let old = build.clearing().and_then(|_| {
            SharedSet::load(service, store, stored.version)
                .ok()
                .flatten()
        });
        let stored_as = cas_update(store, &service.key("meta"), META_RETRIES, |bytes| {
            let mut meta = bytes.and_then(Meta::decode).unwrap_or_default();
            // The slot was chosen when the build began: a meta that moved since is not
            // overwritten.
            let Some(version) = build.next_version(meta.version) else {
                return Change::Keep(None);
            };
            let Ok(keys) = build.finish(service, store, version) else {
                return Change::Keep(None);
            };
            meta.version = version;
            meta.doc_sha256 = digest;
            meta.serial = serial;
            meta.etag = etag.clone();
            meta.last_success_ms = now_ms;
            meta.failures = 0;
            Change::Write(meta.encode(), Some((version, keys)))
        });
        match stored_as {
            Ok(Some((version, keys))) => {
                let clear_old = old.map(|old| old.clearing());
                (FetchOutcome::Published { version, keys }, clear_old)
            }
            _ => (failure(FetchError::StoreRefused), unused),
        }
    }
}

/// One more failed fetch since the last success; the new count.
fn count_failure(service: &KeyService, store: &dyn SharedStore) -> u32 {
    update_meta(service, store, |m| {
        m.failures = m.failures.saturating_add(1);
        m.failures
    })
    .unwrap_or(0)
}

/// A 304 or identical bytes: the stored document is current as of now.
fn confirm(
    service: &KeyService,
    store: &dyn SharedStore,
    now_ms: i64,
    etag: Option<String>,
) -> FetchOutcome {
    match update_meta(service, store, |m| {
        m.last_success_ms = now_ms;
        m.failures = 0;
        if etag.is_some() {
            m.etag = etag.clone();
        }
        m.version
    }) {
        Some(version) => FetchOutcome::Unchanged { version },
        None => FetchOutcome::Failed {
            reason: FetchError::StoreRefused,
            failures: 0,
        },
    }
}

/// Read-modify-write of the meta with compare-and-swap; returns what `change` returned.
fn update_meta<T>(
    service: &KeyService,
    store: &dyn SharedStore,
    mut change: impl FnMut(&mut Meta) -> T,
) -> Option<T> {
    cas_update(store, &service.key("meta"), META_RETRIES, |bytes| {
        let mut meta = bytes.and_then(Meta::decode).unwrap_or_default();
        let result = change(&mut meta);
        Change::Write(meta.encode(), result)
    })
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keysource::service::KeyServiceMode;
    use crate::core::keysource::test_host::{self, document as doc, ok};
    use crate::core::memory_store::MemoryStore;
    use crate::core::test_support::merged;

    fn service(extra: serde_json::Value) -> KeyService {
        let settings = serde_json::json!({"refresh_seconds": 5, "max_stale_seconds": 60});
        test_host::service(merged(settings, extra))
    }

    fn full(service: &KeyService) -> &FullSync {
        match &service.mode {
            KeyServiceMode::Full(f) => f,
            KeyServiceMode::Lookup(_) => panic!("not full"),
        }
    }

    fn fetch_headers(plan: TickPlan) -> Vec<(&'static str, String)> {
        match plan {
            TickPlan::Fetch { headers } => headers,
            TickPlan::Wait => panic!("expected a fetch"),
        }
    }

    #[test]
    fn each_fetch_failure_reads_as_the_warning_has_always_said() {
        let cases = [
            (
                FetchError::NotSent(CalloutError {
                    cluster: "keys".into(),
                    why: "ClusterNotFound".into(),
                }),
                "cannot call cluster 'keys' (ClusterNotFound)",
            ),
            (
                FetchError::Parts(PartError::DocumentChanged),
                "the document changed while it was fetched in parts",
            ),
            (
                FetchError::NoAnswer {
                    cluster: "keys".into(),
                    timeout_ms: 2_000,
                },
                "no answer from cluster 'keys' (connection failure or timeout after 2000 ms)",
            ),
            (
                FetchError::Status {
                    status: 404,
                    path: "/keys.json".into(),
                },
                "status 404 for /keys.json",
            ),
            (
                FetchError::InvalidDocument(ConfigError::new("serial", "required")),
                "invalid key-set document: serial: required",
            ),
            (
                FetchError::StoreRefused,
                "the shared key-set entry could not be written",
            ),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
        }
    }

    #[test]
    fn only_the_lease_holder_fetches_and_only_once_per_period() {
        let (svc, store) = (service(serde_json::json!({})), MemoryStore::new());
        let f = full(&svc);
        f.ensure_lease(&svc, &store);
        let headers = fetch_headers(f.plan(&svc, &store, 1, false, 1_000));
        assert!(headers.contains(&(":path", "/keys.json".to_string())));
        assert!(headers.contains(&(":authority", "keyservice".to_string())));
        // Worker 2 ticks in the same period: the lease is taken.
        assert_eq!(f.plan(&svc, &store, 2, false, 1_100), TickPlan::Wait);
        // The holder waits for the period, whatever its ticks.
        assert_eq!(f.plan(&svc, &store, 1, false, 5_999), TickPlan::Wait);
        fetch_headers(f.plan(&svc, &store, 1, false, 6_000));
        // A fetch in flight is never doubled.
        assert_eq!(f.plan(&svc, &store, 1, true, 20_000), TickPlan::Wait);
    }

    #[test]
    fn a_lease_held_to_parse_a_large_document_outlasts_the_parse() {
        let (svc, store) = (service(serde_json::json!({})), MemoryStore::new());
        let f = full(&svc);
        f.ensure_lease(&svc, &store);
        assert!(f.hold_lease_to_parse(&svc, &store, 1, 0, 100 * 1024 * 1024));
        // 20 s later the holder is still parsing: nobody else fetches the same document.
        assert!(!f.hold_lease(&svc, &store, 2, f.lease_ms(&svc) + 20_000));
        assert!(f.hold_lease(&svc, &store, 2, f.lease_ms(&svc) + 21_000));
    }

    #[test]
    fn an_expired_or_released_lease_passes_to_another_worker() {
        let (svc, store) = (service(serde_json::json!({})), MemoryStore::new());
        let f = full(&svc);
        f.ensure_lease(&svc, &store);
        assert!(f.hold_lease(&svc, &store, 1, 0));
        assert!(!f.hold_lease(&svc, &store, 2, f.lease_ms(&svc) - 1));
        assert!(f.hold_lease(&svc, &store, 2, f.lease_ms(&svc)));
        f.release_lease(&svc, &store, 1); // not the holder: no effect
        assert!(!f.hold_lease(&svc, &store, 1, f.lease_ms(&svc) + 1));
        f.release_lease(&svc, &store, 2);
        assert!(f.hold_lease(&svc, &store, 1, f.lease_ms(&svc) + 1));
    }

    /// Installs the set of an `Updated` outcome in `worker`, as the fetcher's process does.
    fn install(worker: &mut RemoteKeySet, outcome: FetchOutcome) -> u64 {
        match outcome {
            FetchOutcome::Updated { version, keys } => {
                worker.install(version, keys);
                version
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fetched_document_is_installed_confirmed_by_a_304_and_replaced_on_revocation() {
        let (svc, store) = (service(serde_json::json!({})), MemoryStore::new());
        let f = full(&svc);
        let mut worker = RemoteKeySet::default();
        worker.sync(&svc, &store);
        assert_eq!(worker.current(&svc, 0).unwrap_err(), Unavailable::NotLoaded);
        fetch_headers(f.plan(&svc, &store, 1, false, 1_000));
        let outcome = f.finish(&svc, &store, 1_050, ok(doc(&["a", "b"], 1), "\"e1\""));
        assert_eq!(install(&mut worker, outcome), 1);
        assert!(worker.current(&svc, 2_000).unwrap().by_id("b").is_some());

        // The next fetch sends the ETag; a 304 keeps the version and restarts the stale clock.
        let headers = fetch_headers(f.plan(&svc, &store, 1, false, 6_000));
        assert!(headers.contains(&("if-none-match", "\"e1\"".to_string())));
        let not_modified = FetchResponse {
            status: Some(304),
            ..Default::default()
        };
        assert!(matches!(
            f.finish(&svc, &store, 6_010, not_modified),
            FetchOutcome::Unchanged { version: 1 }
        ));
        assert_eq!(age_ms(&svc, &store, 7_010), Some(1_000));

        // Revocation: a new document without "b".
        fetch_headers(f.plan(&svc, &store, 1, false, 11_000));
        let outcome = f.finish(&svc, &store, 11_010, ok(doc(&["a"], 2), "\"e2\""));
        assert_eq!(install(&mut worker, outcome), 2);
        assert!(worker.current(&svc, 12_000).unwrap().by_id("b").is_none());
    }

    #[test]
    fn the_same_bytes_without_an_etag_are_not_a_new_version() {
        let (svc, store) = (service(serde_json::json!({})), MemoryStore::new());
        let f = full(&svc);
        let plain = |body| FetchResponse {
            status: Some(200),
            body,
            ..Default::default()
        };
        assert!(matches!(
            f.finish(&svc, &store, 1, plain(doc(&["a"], 1))),
            FetchOutcome::Updated { version: 1, .. }
        ));
        assert!(matches!(
            f.finish(&svc, &store, 2, plain(doc(&["a"], 1))),
            FetchOutcome::Unchanged { version: 1 }
        ));
    }

    #[test]
    fn an_older_or_equal_serial_is_refused_and_the_current_set_stays() {
        let svc = service(serde_json::json!({}));
        let store = MemoryStore::default();
        let f = full(&svc);
        let enabled = doc(&["k1"], 1);
        let revoked = doc(&["k2"], 2);
        let mut worker = RemoteKeySet::default();
        let outcome = f.finish(&svc, &store, 1_000, ok(enabled.clone(), "\"e1\""));
        assert_eq!(install(&mut worker, outcome), 1);
        let outcome = f.finish(&svc, &store, 2_000, ok(revoked, "\"e2\""));
        assert_eq!(install(&mut worker, outcome), 2);
        // The old document served again (a stale CDN edge): refused, version 2 stays.
        match f.finish(&svc, &store, 3_000, ok(enabled, "\"e1\"")) {
            FetchOutcome::RolledBack {
                offered: 1,
                current: 2,
                failures: 1,
            } => {}
            other => panic!("{other:?}"),
        }
        let same_serial_other_bytes = doc(&["k1", "k2"], 2);
        assert!(matches!(
            f.finish(&svc, &store, 4_000, ok(same_serial_other_bytes, "\"e3\"")),
            FetchOutcome::RolledBack { offered: 2, .. }
        ));
        worker.sync(&svc, &store);
        assert_eq!(worker.version(), 2);
        let keys = worker.current(&svc, 4_000).unwrap();
        assert!(keys.by_id("k2").is_some() && keys.by_id("k1").is_none());
        let meta = read_meta(&svc, &store).unwrap().0;
        assert_eq!(
            (meta.serial, meta.last_success_ms),
            (2, 2_000),
            "a refused document is not a confirmation"
        );
    }

    #[test]
    fn a_document_without_a_serial_is_refused() {
        let svc = service(serde_json::json!({}));
        let store = MemoryStore::default();
        let body = br#"{"keys": []}"#.to_vec();
        match full(&svc).finish(&svc, &store, 1_000, ok(body, "\"e1\"")) {
            FetchOutcome::Failed {
                reason: FetchError::InvalidDocument(err),
                ..
            } => assert_eq!(err.path, "serial"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failures_never_replace_a_good_set() {
        let (svc, store) = (service(serde_json::json!({})), MemoryStore::new());
        let f = full(&svc);
        let mut worker = RemoteKeySet::default();
        install(
            &mut worker,
            f.finish(&svc, &store, 1_000, ok(doc(&["a"], 1), "\"e1\"")),
        );
        let truncated = doc(&["a", "b"], 1);
        let truncated = truncated.get(..truncated.len() / 2).unwrap().to_vec();
        let bad_record = br#"{"keys": [{"id": "x", "secret_sha256": "nothex"}]}"#.to_vec();
        let header_injection = serde_json::json!({"keys": [{"id": "x",
            "secret_sha256": "00".repeat(32), "tenant": "a\r\nx-evil: 1"}]})
        .to_string()
        .into_bytes();
        let answers = [
            FetchResponse::default(),
            FetchResponse {
                status: Some(503),
                ..Default::default()
            },
            ok(truncated, "\"t\""),
            ok(b"<html>not json</html>".to_vec(), "\"h\""),
            ok(bad_record, "\"r\""),
            ok(header_injection, "\"i\""),
            FetchResponse {
                status: Some(304),
                ..Default::default()
            },
        ];
        for (i, answer) in answers.into_iter().enumerate() {
            match f.finish(&svc, &store, 2_000 + i as i64, answer) {
                FetchOutcome::Failed { failures, .. } => assert_eq!(failures, i as u32 + 1),
                FetchOutcome::Unchanged { .. } => assert_eq!(i, 6, "only the 304 confirms"),
                other => panic!("{i}: {other:?}"),
            }
        }
        worker.sync(&svc, &store);
        assert_eq!(worker.version(), 1);
        assert_eq!(read_meta(&svc, &store).unwrap().0.version, 1);
        assert!(worker.current(&svc, 3_000).unwrap().by_id("a").is_some());
    }

    #[test]
    fn a_set_older_than_max_stale_is_unavailable() {
        let (svc, store) = (service(serde_json::json!({})), MemoryStore::new());
        let f = full(&svc);
        let mut worker = RemoteKeySet::default();
        install(
            &mut worker,
            f.finish(&svc, &store, 1_000, ok(doc(&["a"], 1), "\"e1\"")),
        );
        worker.sync(&svc, &store);
        assert!(worker.current(&svc, 61_000).is_ok());
        assert_eq!(
            worker.current(&svc, 61_001).unwrap_err(),
            Unavailable::Stale { age_ms: 60_001 }
        );
        // A later success (304) makes it fresh again once the worker has seen the meta.
        f.finish(
            &svc,
            &store,
            70_000,
            FetchResponse {
                status: Some(304),
                ..Default::default()
            },
        );
        worker.sync(&svc, &store);
        assert!(worker.current(&svc, 70_001).is_ok());
        let unlimited = service(serde_json::json!({"max_stale_seconds": 0}));
        assert_eq!(unlimited.max_stale_ms, None);
    }

    #[test]
    fn a_304_before_any_document_is_a_failure() {
        let (svc, store) = (service(serde_json::json!({})), MemoryStore::new());
        let outcome = full(&svc).finish(
            &svc,
            &store,
            1,
            FetchResponse {
                status: Some(304),
                ..Default::default()
            },
        );
        assert!(matches!(outcome, FetchOutcome::Failed { .. }));
    }

    #[test]
    fn meta_round_trips_and_garbage_is_ignored() {
        let meta = Meta {
            version: 7,
            last_success_ms: 12,
            last_attempt_ms: 13,
            failures: 2,
            doc_sha256: [9; 32],
            serial: 5,
            etag: Some("\"abc\"".into()),
        };
        assert_eq!(Meta::decode(&meta.encode()), Some(meta.clone()));
        let bytes = meta.encode();
        for cut in 0..bytes.len() {
            assert_eq!(Meta::decode(bytes.get(..cut).unwrap()), None);
        }
    }
}
