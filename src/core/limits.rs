//! Per-key rate limits (429) and monthly budgets (402), counted in a store that every Envoy
//! worker shares, updated with compare-and-swap so N workers never let a key through N times.
//!
//! **Rate limit: a token bucket kept as one timestamp (GCRA).** A key may send `requests` every
//! `per_seconds`, and a key that has been idle may send `requests + burst` at once. The bucket is
//! stored as its "theoretical arrival time" (8 bytes), so one read-modify-write per request is the
//! whole algorithm. Chosen over a sliding window because the bound is exact and the state is
//! constant: a sliding log needs `requests` timestamps per key, and a sliding-window counter
//! only approximates (it assumes the previous window's traffic was spread evenly, so it can let
//! more through than the limit). Guarantee: in any interval of `t` seconds a key gets at most
//! `requests + burst + requests * t / per_seconds` requests; at one instant, exactly
//! `requests + burst`.
//!
//! **Budget: units spent per calendar month (UTC).** A request spends its route's `cost`; one that
//! would take the spent total past the key's cap is refused with `BUDGET_EXHAUSTED`. The month is
//! stored next to the total, so a new month starts from zero, and the cap is read from the key
//! record on every request, so a key set with a raised cap lifts the 402 at once. A record the
//! billing side marked `budget_exhausted` is refused without touching the store.
//!
//! **Bounded state.** Envoy's shared data cannot delete a key from wasm, so keygate never mints
//! per-key or per-month names: it owns a fixed table of `slots` entries (`keygate.limits.<i>`),
//! created once at configure time. A key's counters live in the slot its hashed id picks, next to
//! the other keys of that slot. Counters that carry no information any more (bucket full again,
//! nothing spent this month) are dropped whenever their slot is rewritten and by a periodic
//! sweep, so the table holds only keys active now or this month, and never more than `slots`
//! entries.

use serde_json::Value;
use sha2::{Digest as _, Sha256};

use super::codes::ErrorCode;
use super::config_error::ConfigError;
use super::json_fields::Fields;
use super::keyset::KeyRecord;
use super::keysource::store::{cas_update, Change, SharedStore};
use super::policy::Policy;
use super::rate_limit::{RateLimit, RateLimitSpec, MICROS_PER_SECOND};
use super::time::utc_year_month;

/// What to do when the store cannot be updated (persistent CAS contention or a host error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreFailurePolicy {
    /// Refuse with 429 and `Retry-After: 1`: a limit is never exceeded (the default).
    #[default]
    Deny,
    /// Let the request through uncounted: availability over exact limits.
    Allow,
}

const DEFAULT_SLOTS: u32 = 4096;
const MAX_SLOTS: u32 = 1 << 20;
const DEFAULT_MAX_RETRIES: u32 = 32;

/// The top-level `limits` object of the filter configuration.
#[derive(Debug, Clone, Default)]
pub struct LimitsSpec {
    /// Applies to keys whose record has no `rate_limit`.
    pub rate_limit: Option<RateLimitSpec>,
    /// Applies to keys whose record has no `monthly_budget`.
    pub monthly_budget: Option<u64>,
    /// Also send `RateLimit-*` headers on allowed responses (429s always carry them).
    pub response_headers: bool,
    pub on_store_failure: StoreFailurePolicy,
    /// Entries in the shared counter table; size it near the number of keys active at once.
    pub slots: Option<u32>,
    /// Compare-and-swap attempts per request before `on_store_failure` applies.
    pub max_retries: Option<u32>,
}

impl LimitsSpec {
    const FIELDS: &'static [&'static str] = &[
        "rate_limit",
        "monthly_budget",
        "response_headers",
        "on_store_failure",
        "slots",
        "max_retries",
    ];

    pub fn decode(value: &Value, path: &str) -> Result<LimitsSpec, ConfigError> {
        let fields = Fields::of(value, path, Self::FIELDS)?;
        let policies = [
            ("deny", StoreFailurePolicy::Deny),
            ("allow", StoreFailurePolicy::Allow),
        ];
        Ok(LimitsSpec {
            rate_limit: fields.decoded("rate_limit", RateLimitSpec::decode)?,
            monthly_budget: fields.u64("monthly_budget")?,
            response_headers: fields.bool("response_headers")?.unwrap_or(false),
            on_store_failure: fields
                .variant("on_store_failure", &policies)?
                .unwrap_or_default(),
            slots: fields.u32("slots")?,
            max_retries: fields.u32("max_retries")?,
        })
    }
}

/// The validated limits configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Whether any key can be limited, i.e. whether the adapter needs the shared table at all.
    pub enabled: bool,
    pub default_rate: Option<RateLimit>,
    pub default_budget: Option<u64>,
    pub response_headers: bool,
    pub on_store_failure: StoreFailurePolicy,
    pub slots: u32,
    pub max_retries: u32,
    /// Separates the counters of filter instances that share a `vm_id`: the config's name and
    /// where its keys come from (`scoped`).
    namespace: String,
    /// Inline keys: a key's counters also belong to its secret's digest, so two filters that
    /// share a `vm_id` and a name never count each other's `key-1`.
    per_secret: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            enabled: false,
            default_rate: None,
            default_budget: None,
            response_headers: false,
            on_store_failure: StoreFailurePolicy::Deny,
            slots: DEFAULT_SLOTS,
            max_retries: DEFAULT_MAX_RETRIES,
            namespace: String::new(),
            per_secret: false,
        }
    }
}

impl Limits {
    /// `keys_are_limited`: some key record carries its own rate limit or budget.
    pub fn from_spec(
        spec: Option<LimitsSpec>,
        namespace: &str,
        keys_are_limited: bool,
    ) -> Result<Limits, ConfigError> {
        let present = spec.is_some();
        let spec = spec.unwrap_or_default();
        let default_rate = spec
            .rate_limit
            .as_ref()
            .map(|r| RateLimit::from_spec(r, "limits.rate_limit"))
            .transpose()?;
        let slots = spec.slots.unwrap_or(DEFAULT_SLOTS);
        if slots == 0 || slots > MAX_SLOTS {
            return Err(ConfigError::new(
                "limits.slots",
                format!("must be between 1 and {MAX_SLOTS}"),
            ));
        }
        Ok(Limits {
            enabled: present || keys_are_limited,
            default_rate,
            default_budget: spec.monthly_budget,
            response_headers: spec.response_headers,
            on_store_failure: spec.on_store_failure,
            slots,
            max_retries: spec.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
            namespace: namespace.to_string(),
            per_secret: false,
        })
    }

    /// Counters keyed by where the keys come from, not only by the config's name: a key
    /// service's namespace (the same service means the same keys), or, for inline keys, each
    /// key's own secret digest.
    pub fn scoped(mut self, key_service_namespace: Option<&str>) -> Limits {
        match key_service_namespace {
            Some(service) => {
                self.namespace = format!("{}\0{service}", self.namespace);
                self.per_secret = false;
            }
            None => self.per_secret = true,
        }
        self
    }

    fn tag(&self, record: &KeyRecord) -> Tag {
        let mut hasher = Sha256::new()
            .chain_update(self.namespace.as_bytes())
            .chain_update([0u8])
            .chain_update(record.id.as_bytes());
        if self.per_secret {
            hasher = hasher.chain_update([0u8]).chain_update(record.digest);
        }
        let digest = hasher.finalize();
        let mut tag = [0u8; TAG_LEN];
        for (t, d) in tag.iter_mut().zip(digest.iter()) {
            *t = *d;
        }
        tag
    }

    fn slot_of(&self, tag: &Tag) -> u32 {
        let mut head = [0u8; 8];
        for (h, t) in head.iter_mut().zip(tag.iter()) {
            *h = *t;
        }
        (u64::from_le_bytes(head) % u64::from(self.slots)) as u32
    }
}

/// The shared-data key of slot `index`.
pub fn slot_name(index: u32) -> String {
    format!("{SLOT_PREFIX}{index}")
}

const SLOT_PREFIX: &str = "keygate.limits.";

/// The index of a slot from its shared-data key: the inverse of `slot_name`, for a host that
/// keeps the slots in a table rather than in a string-keyed store.
pub fn slot_index(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(SLOT_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The state of a key's rate limit after a request, for `RateLimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateStatus {
    /// Requests an idle key may send at once (`requests + burst`).
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
}

impl RateStatus {
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ratelimit-limit", self.limit.to_string()),
            ("ratelimit-remaining", self.remaining.to_string()),
            ("ratelimit-reset", self.reset_secs.to_string()),
        ]
    }
}

/// What an allowed request learned about its limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitInfo {
    pub rate: Option<RateStatus>,
}

/// A refusal by the limiter: the code plus what the reply must say about when to come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitDenial {
    pub code: ErrorCode,
    pub rate: Option<RateStatus>,
    pub retry_after_secs: Option<u64>,
}

impl LimitDenial {
    fn budget_exhausted() -> LimitDenial {
        LimitDenial {
            code: ErrorCode::BudgetExhausted,
            rate: None,
            retry_after_secs: None,
        }
    }

    /// Headers added to the pre-rendered reply at send time.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = self.rate.map(|r| r.headers()).unwrap_or_default();
        if let Some(secs) = self.retry_after_secs {
            headers.push(("retry-after", secs.to_string()));
        }
        headers
    }
}

const TAG_LEN: usize = 16;
type Tag = [u8; TAG_LEN];
/// Slot values start with this byte; anything else is treated as an empty slot.
const FORMAT: u8 = 1;
const ENTRY_LEN: usize = TAG_LEN + 8 + 4 + 8;

/// One key's counters inside a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Counters {
    /// When the bucket will be full again, in microseconds since the epoch (GCRA's TAT).
    tat_us: i64,
    /// `year * 12 + month - 1` of `spent`.
    month: u32,
    spent: u64,
}

impl Counters {
    /// Counters equal to a key never seen: dropping them loses nothing.
    fn is_idle(&self, now_us: i64, month: u32) -> bool {
        self.tat_us <= now_us && (self.month != month || self.spent == 0)
    }
}

fn decode(bytes: &[u8]) -> Vec<(Tag, Counters)> {
    let Some((&FORMAT, body)) = bytes.split_first() else {
        return Vec::new();
    };
    body.chunks_exact(ENTRY_LEN)
        .filter_map(|entry| {
            let (tag, rest) = entry.split_first_chunk::<TAG_LEN>()?;
            let (tat, rest) = rest.split_first_chunk::<8>()?;
            let (month, rest) = rest.split_first_chunk::<4>()?;
            let (spent, _) = rest.split_first_chunk::<8>()?;
            Some((
                *tag,
                Counters {
                    tat_us: i64::from_le_bytes(*tat),
                    month: u32::from_le_bytes(*month),
                    spent: u64::from_le_bytes(*spent),
                },
            ))
        })
        .collect()
}

fn encode(entries: &[(Tag, Counters)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + entries.len() * ENTRY_LEN);
    out.push(FORMAT);
    for (tag, c) in entries {
        out.extend_from_slice(tag);
        out.extend_from_slice(&c.tat_us.to_le_bytes());
        out.extend_from_slice(&c.month.to_le_bytes());
        out.extend_from_slice(&c.spent.to_le_bytes());
    }
    out
}

/// The calendar month (UTC) of a Unix time as one number.
fn month_number(unix_seconds: i64) -> u32 {
    let (year, month) = utc_year_month(unix_seconds);
    u32::try_from(year * 12 + i64::from(month) - 1).unwrap_or(0)
}

fn ceil_secs(micros: i64) -> u64 {
    let micros = micros.max(0) as u64;
    micros.div_ceil(MICROS_PER_SECOND as u64)
}

/// Decides one request against a key's counters: the counters to store, or the refusal.
/// Budget first, so a key that is out of money hears 402, not 429.
fn evaluate(
    current: Counters,
    rate: Option<RateLimit>,
    budget: Option<u64>,
    cost: u64,
    now_us: i64,
    month: u32,
) -> Result<(Counters, LimitInfo), LimitDenial> {
    let mut next = current;
    if let Some(cap) = budget {
        let spent = if current.month == month {
            current.spent
        } else {
            0
        };
        let after = spent.saturating_add(cost);
        if after > cap {
            return Err(LimitDenial::budget_exhausted());
        }
        next.month = month;
        next.spent = after;
    }
    let mut info = LimitInfo::default();
    if let Some(rate) = rate {
        let tolerance = rate.tolerance_us();
        let start = current.tat_us.max(now_us);
        let tat = start.saturating_add(rate.interval_us());
        let ahead = tat - now_us;
        if ahead > tolerance {
            return Err(LimitDenial {
                code: ErrorCode::RateLimitExceeded,
                rate: Some(RateStatus {
                    limit: rate.capacity(),
                    remaining: 0,
                    reset_secs: ceil_secs(start - now_us),
                }),
                retry_after_secs: Some(ceil_secs(ahead - tolerance).max(1)),
            });
        }
        next.tat_us = tat;
        info.rate = Some(RateStatus {
            limit: rate.capacity(),
            remaining: ((tolerance - ahead) / rate.interval_us()) as u64,
            reset_secs: ceil_secs(ahead),
        });
    }
    Ok((next, info))
}

/// Whether `apply_limits` has anything to do for this key: limits are on, or the key's budget is
/// marked spent, which refuses it even with limits off. A host skips the call (and the clock
/// read it needs) otherwise.
pub fn limits_apply_to(limits: &Limits, record: &KeyRecord) -> bool {
    limits.enabled || record.fields.budget_exhausted
}

/// Counts one request of an authenticated key against its rate limit and monthly budget.
/// `now_ms` is the host clock in milliseconds. Denials write nothing; an allowed request is
/// recorded with one compare-and-swap, retried on contention up to `max_retries` times.
pub fn apply_limits(
    limits: &Limits,
    record: &KeyRecord,
    policy: &Policy,
    store: &dyn SharedStore,
    now_ms: i64,
) -> Result<LimitInfo, LimitDenial> {
    if record.fields.budget_exhausted {
        return Err(LimitDenial::budget_exhausted());
    }
    let rate = record.rate_limit().or(limits.default_rate);
    let budget = record.fields.monthly_budget.or(limits.default_budget);
    if rate.is_none() && budget.is_none() {
        return Ok(LimitInfo::default());
    }
    let tag = limits.tag(record);
    let slot = slot_name(limits.slot_of(&tag));
    let now_us = now_ms.saturating_mul(1000);
    let month = month_number(now_ms.div_euclid(1000));

    let attempts = (limits.max_retries as usize).saturating_add(1);
    let recorded = cas_update(store, &slot, attempts, |bytes| {
        // Slots are created at configure time; one that is missing is recreated.
        let Some(bytes) = bytes else {
            return Change::Create(vec![FORMAT]);
        };
        let mut entries = decode(bytes);
        let current = entries
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, c)| *c)
            .unwrap_or_default();
        match evaluate(current, rate, budget, policy.cost, now_us, month) {
            Ok((next, info)) => {
                entries.retain(|(t, c)| *t != tag && !c.is_idle(now_us, month));
                entries.push((tag, next));
                Change::Write(encode(&entries), Ok(info))
            }
            Err(denial) => Change::Keep(Err(denial)),
        }
    });
    if let Ok(decided) = recorded {
        return decided;
    }
    match limits.on_store_failure {
        StoreFailurePolicy::Allow => Ok(LimitInfo::default()),
        StoreFailurePolicy::Deny => Err(LimitDenial {
            code: ErrorCode::RateLimitExceeded,
            rate: None,
            retry_after_secs: Some(1),
        }),
    }
}

/// Creates every slot that does not exist yet. Called at configure time, before the worker
/// serves traffic: Envoy's shared data cannot create a key atomically (a write to an absent key
/// ignores the CAS token), so creation is kept off the request path. Returns how many it created.
pub fn ensure_slots(limits: &Limits, store: &dyn SharedStore) -> u32 {
    let mut created = 0;
    for index in 0..limits.slots {
        let name = slot_name(index);
        if store.get(&name).is_none() && store.set(&name, &[FORMAT], 0).is_ok() {
            created += 1;
        }
    }
    created
}

/// How often a host sweeps one batch (`sweep_batch`) of the counter table for idle counters.
pub const SWEEP_PERIOD_MS: i64 = 1000;

/// Whether the next sweep is due, the last one having run at `last_ms`.
pub fn sweep_due(last_ms: i64, now_ms: i64) -> bool {
    now_ms.saturating_sub(last_ms) >= SWEEP_PERIOD_MS
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub visited: u32,
    pub rewritten: u32,
    pub dropped: u32,
}

/// Drops idle counters from `count` slots starting at `first` (wrapping). A slot another writer
/// changed meanwhile is skipped: every writer prunes its slot anyway.
pub fn sweep(
    limits: &Limits,
    store: &dyn SharedStore,
    now_ms: i64,
    first: u32,
    count: u32,
) -> SweepReport {
    let now_us = now_ms.saturating_mul(1000);
    let month = month_number(now_ms.div_euclid(1000));
    let mut report = SweepReport::default();
    for step in 0..count.min(limits.slots) {
        let index = ((u64::from(first) + u64::from(step)) % u64::from(limits.slots)) as u32;
        let name = slot_name(index);
        report.visited += 1;
        let Some((bytes, cas)) = store.get(&name) else {
            continue;
        };
        let valid = bytes.first() == Some(&FORMAT) && (bytes.len() - 1) % ENTRY_LEN == 0;
        let mut entries = decode(&bytes);
        let before = entries.len();
        entries.retain(|(_, c)| !c.is_idle(now_us, month));
        if (entries.len() < before || !valid) && store.set(&name, &encode(&entries), cas).is_ok() {
            report.rewritten += 1;
            report.dropped += (before - entries.len()) as u32;
        }
    }
    report
}

/// How many slots one sweep tick visits so the whole table is covered about every 16 ticks.
pub fn sweep_batch(limits: &Limits) -> u32 {
    limits.slots.div_ceil(16).clamp(1, 4096)
}

/// Counters currently stored for a key: `(spent this month, bucket full at µs)`. For tests and
/// tools; the request path never needs it.
pub fn peek(
    limits: &Limits,
    store: &dyn SharedStore,
    record: &KeyRecord,
    now_ms: i64,
) -> Option<(u64, i64)> {
    let tag = limits.tag(record);
    let (bytes, _) = store.get(&slot_name(limits.slot_of(&tag)))?;
    let month = month_number(now_ms.div_euclid(1000));
    decode(&bytes)
        .into_iter()
        .find(|(t, _)| *t == tag)
        .map(|(_, c)| (if c.month == month { c.spent } else { 0 }, c.tat_us))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::Config;
    use crate::core::digest::sha256;
    use crate::core::keyset::KeySet;
    use crate::core::keysource::store::StoreError;
    use crate::core::memory_store::MemoryStore;
    use crate::core::time::parse_rfc3339;
    use std::cell::Cell;

    #[test]
    fn slot_index_reads_back_every_slot_name_and_nothing_else() {
        for index in [0, 7, 4095, u32::MAX] {
            assert_eq!(slot_index(&slot_name(index)), Some(index));
        }
        for other in [
            "keygate.limits.",
            "keygate.limits.+1",
            "keygate.limits.1x",
            "other.1",
        ] {
            assert_eq!(slot_index(other), None, "{other}");
        }
    }

    /// 2026-11-22T06:32:16Z in milliseconds.
    const NOW_MS: i64 = 1_795_329_136_000;

    fn setup(limits: serde_json::Value, keys: serde_json::Value) -> (Config, KeySet) {
        let keys: Vec<serde_json::Value> = keys
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|mut k| {
                let id = k["id"].as_str().unwrap_or_default().to_string();
                k["secret_sha256"] = serde_json::json!(hex::encode(sha256(id.as_bytes())));
                k
            })
            .collect();
        let cfg = serde_json::json!({
            "name": "t",
            "credentials": [{"in": "header"}],
            "limits": limits,
            "keys": keys,
        });
        Config::parse(cfg.to_string().as_bytes()).unwrap()
    }

    fn ready(config: &Config) -> MemoryStore {
        let store = MemoryStore::new();
        ensure_slots(&config.limits, &store);
        store
    }

    fn policy(cost: u64) -> Policy {
        Policy {
            cost,
            ..Policy::default()
        }
    }

    fn hit(
        c: &Config,
        k: &KeySet,
        id: &str,
        store: &dyn SharedStore,
        now_ms: i64,
    ) -> Result<LimitInfo, LimitDenial> {
        apply_limits(&c.limits, k.by_id(id).unwrap(), &policy(1), store, now_ms)
    }

    fn allowed_in_a_row(c: &Config, k: &KeySet, id: &str, store: &MemoryStore, now: i64) -> u32 {
        (0..1000)
            .take_while(|_| hit(c, k, id, store, now).is_ok())
            .count() as u32
    }

    #[test]
    fn an_idle_key_gets_exactly_requests_plus_burst_at_once() {
        let (c, k) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "a", "rate_limit": {"requests": 20, "per_seconds": 60, "burst": 5}}]),
        );
        let store = ready(&c);
        assert_eq!(allowed_in_a_row(&c, &k, "a", &store, NOW_MS), 25);
        let denial = hit(&c, &k, "a", &store, NOW_MS).unwrap_err();
        assert_eq!(denial.code, ErrorCode::RateLimitExceeded);
        // One request's worth of bucket drains in 60 s / 20 = 3 s.
        assert_eq!(denial.retry_after_secs, Some(3));
        assert_eq!(
            denial.headers(),
            vec![
                ("ratelimit-limit", "25".to_string()),
                ("ratelimit-remaining", "0".to_string()),
                ("ratelimit-reset", "75".to_string()),
                ("retry-after", "3".to_string()),
            ]
        );
    }

    #[test]
    fn allowed_requests_report_what_remains() {
        let (c, k) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "a", "rate_limit": {"requests": 10, "per_seconds": 10}}]),
        );
        let store = ready(&c);
        let first = hit(&c, &k, "a", &store, NOW_MS).unwrap().rate.unwrap();
        assert_eq!(
            first,
            RateStatus {
                limit: 10,
                remaining: 9,
                reset_secs: 1
            }
        );
        let second = hit(&c, &k, "a", &store, NOW_MS).unwrap().rate.unwrap();
        assert_eq!((second.remaining, second.reset_secs), (8, 2));
    }

    #[test]
    fn the_bucket_refills_at_the_configured_rate_and_no_faster() {
        let (c, k) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "a", "rate_limit": {"requests": 20, "per_seconds": 60, "burst": 5}}]),
        );
        let store = ready(&c);
        assert_eq!(allowed_in_a_row(&c, &k, "a", &store, NOW_MS), 25);
        assert_eq!(allowed_in_a_row(&c, &k, "a", &store, NOW_MS + 2_999), 0);
        assert_eq!(allowed_in_a_row(&c, &k, "a", &store, NOW_MS + 3_000), 1);
        // A long idle period fills the bucket to its capacity, never beyond.
        assert_eq!(
            allowed_in_a_row(&c, &k, "a", &store, NOW_MS + 3_600_000),
            25
        );
    }

    #[test]
    fn no_window_of_per_seconds_sees_more_than_twice_requests_plus_burst() {
        let (c, k) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "a", "rate_limit": {"requests": 20, "per_seconds": 60, "burst": 5}}]),
        );
        let store = ready(&c);
        // A client hammering every 100 ms for 10 minutes.
        let mut allowed_at = Vec::new();
        for step in 0..6000 {
            let now = NOW_MS + step * 100;
            if hit(&c, &k, "a", &store, now).is_ok() {
                allowed_at.push(now);
            }
        }
        // Burst 25 plus one per 3 s over 600 s (the last refill lands just outside).
        assert_eq!(allowed_at.len(), 25 + 199);
        for (i, start) in allowed_at.iter().enumerate() {
            let in_window = allowed_at[i..]
                .iter()
                .take_while(|t| **t < start + 60_000)
                .count();
            assert!(in_window <= 20 + 5 + 20, "{in_window} at {start}");
        }
    }

    #[test]
    fn filters_sharing_a_vm_id_and_a_name_never_share_a_keys_counters() {
        let tenant = |secret: &str| {
            let cfg = serde_json::json!({
                "credentials": [{"in": "header"}],
                "keys": [{"id": "key-1", "secret_sha256": hex::encode(sha256(secret.as_bytes())),
                          "monthly_budget": 1}],
            });
            Config::parse(cfg.to_string().as_bytes()).unwrap()
        };
        let (a, a_keys) = tenant("tenant-a-secret");
        let (b, b_keys) = tenant("tenant-b-secret");
        let store = ready(&a);
        let spend = |c: &Config, k: &KeySet| {
            let record = k.by_id("key-1").unwrap();
            apply_limits(&c.limits, record, &policy(1), &store, NOW_MS).map(|_| ())
        };
        assert!(spend(&a, &a_keys).is_ok());
        assert_eq!(
            spend(&a, &a_keys).unwrap_err().code,
            ErrorCode::BudgetExhausted
        );
        assert!(
            spend(&b, &b_keys).is_ok(),
            "tenant B's key-1 has its own budget"
        );
    }

    #[test]
    fn a_budget_of_n_lets_exactly_n_through_then_402() {
        let (c, k) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "b", "monthly_budget": 7}]),
        );
        let store = ready(&c);
        assert_eq!(allowed_in_a_row(&c, &k, "b", &store, NOW_MS), 7);
        let denial = hit(&c, &k, "b", &store, NOW_MS).unwrap_err();
        assert_eq!(denial.code, ErrorCode::BudgetExhausted);
        assert_eq!(denial.headers(), vec![]);
        assert_eq!(
            peek(&c.limits, &store, k.by_id("b").unwrap(), NOW_MS).map(|(spent, _)| spent),
            Some(7)
        );
    }

    #[test]
    fn the_month_rolling_over_in_utc_lifts_the_402() {
        let (c, k) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "b", "monthly_budget": 3}]),
        );
        let store = ready(&c);
        let last_second = parse_rfc3339("2026-12-31T23:59:59Z").unwrap() * 1000;
        assert_eq!(allowed_in_a_row(&c, &k, "b", &store, last_second), 3);
        assert_eq!(
            hit(&c, &k, "b", &store, last_second + 999)
                .unwrap_err()
                .code,
            ErrorCode::BudgetExhausted
        );
        let new_year = last_second + 1000;
        assert_eq!(allowed_in_a_row(&c, &k, "b", &store, new_year), 3);
        assert_eq!(
            hit(&c, &k, "b", &store, new_year).unwrap_err().code,
            ErrorCode::BudgetExhausted
        );
    }

    #[test]
    fn a_key_set_with_a_raised_cap_lifts_the_402_and_keeps_what_was_spent() {
        let (c, k) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "b", "monthly_budget": 2}]),
        );
        let store = ready(&c);
        assert_eq!(allowed_in_a_row(&c, &k, "b", &store, NOW_MS), 2);
        // The billing side raises the cap to 5: a new key set, the same shared counters.
        let (c2, k2) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "b", "monthly_budget": 5}]),
        );
        assert_eq!(allowed_in_a_row(&c2, &k2, "b", &store, NOW_MS), 3);
    }

    #[test]
    fn a_sweep_is_due_once_a_period_has_passed_since_the_last() {
        assert!(sweep_due(0, NOW_MS));
        assert!(!sweep_due(NOW_MS, NOW_MS + SWEEP_PERIOD_MS - 1));
        assert!(sweep_due(NOW_MS, NOW_MS + SWEEP_PERIOD_MS));
    }

    #[test]
    fn limits_apply_when_on_and_to_a_key_marked_exhausted_even_when_off() {
        // No `limits` object and no key with a limit of its own: limits are off.
        let (off, keys) = setup(
            serde_json::Value::Null,
            serde_json::json!([{"id": "plain"}, {"id": "x", "budget_exhausted": true}]),
        );
        assert!(!off.limits.enabled);
        assert!(!limits_apply_to(&off.limits, keys.by_id("plain").unwrap()));
        assert!(limits_apply_to(&off.limits, keys.by_id("x").unwrap()));
        let (on, keys) = setup(
            serde_json::json!({"rate_limit": {"requests": 5, "per_seconds": 60}}),
            serde_json::json!([{"id": "plain"}]),
        );
        assert!(limits_apply_to(&on.limits, keys.by_id("plain").unwrap()));
    }

    #[test]
    fn a_record_marked_exhausted_by_billing_is_402_without_touching_the_store() {
        let (c, k) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "x", "budget_exhausted": true}]),
        );
        let store = MemoryStore::new();
        assert_eq!(
            hit(&c, &k, "x", &store, NOW_MS).unwrap_err().code,
            ErrorCode::BudgetExhausted
        );
        assert!(store.is_empty());
    }

    #[test]
    fn each_request_spends_its_routes_cost() {
        let (c, k) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "b", "monthly_budget": 10}]),
        );
        let store = ready(&c);
        let record = k.by_id("b").unwrap();
        let expensive = policy(3);
        let spend = |p: &Policy| apply_limits(&c.limits, record, p, &store, NOW_MS).is_ok();
        assert!(spend(&expensive) && spend(&expensive) && spend(&expensive));
        // 9 spent: another 3 would pass the cap, a cost-1 request still fits.
        assert!(!spend(&expensive));
        assert!(spend(&policy(1)));
        assert!(!spend(&policy(1)));
    }

    #[test]
    fn an_exhausted_budget_answers_402_even_when_the_bucket_is_empty() {
        let (c, k) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "b", "monthly_budget": 2,
                                "rate_limit": {"requests": 2, "per_seconds": 3600}}]),
        );
        let store = ready(&c);
        assert_eq!(allowed_in_a_row(&c, &k, "b", &store, NOW_MS), 2);
        assert_eq!(
            hit(&c, &k, "b", &store, NOW_MS).unwrap_err().code,
            ErrorCode::BudgetExhausted
        );
    }

    #[test]
    fn a_rate_limited_request_spends_no_budget() {
        let (c, k) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "b", "monthly_budget": 100,
                                "rate_limit": {"requests": 2, "per_seconds": 3600}}]),
        );
        let store = ready(&c);
        for _ in 0..10 {
            let _ = hit(&c, &k, "b", &store, NOW_MS);
        }
        assert_eq!(
            peek(&c.limits, &store, k.by_id("b").unwrap(), NOW_MS).map(|(s, _)| s),
            Some(2)
        );
    }

    #[test]
    fn config_defaults_apply_to_keys_without_their_own_limits() {
        let (c, k) = setup(
            serde_json::json!({"rate_limit": {"requests": 3, "per_seconds": 60}, "monthly_budget": 100}),
            serde_json::json!([{"id": "d"}, {"id": "own", "rate_limit": {"requests": 5, "per_seconds": 60}}]),
        );
        let store = ready(&c);
        assert_eq!(allowed_in_a_row(&c, &k, "d", &store, NOW_MS), 3);
        assert_eq!(allowed_in_a_row(&c, &k, "own", &store, NOW_MS), 5);
    }

    #[test]
    fn keys_without_limits_never_touch_the_store() {
        let (c, k) = setup(serde_json::Value::Null, serde_json::json!([{"id": "free"}]));
        assert!(!c.limits.enabled);
        let store = MemoryStore::new();
        assert_eq!(allowed_in_a_row(&c, &k, "free", &store, NOW_MS), 1000);
        assert!(store.is_empty());
    }

    #[test]
    fn keys_count_separately() {
        let (c, k) = setup(
            serde_json::json!({"slots": 1, "rate_limit": {"requests": 2, "per_seconds": 60}}),
            serde_json::json!([{"id": "a"}, {"id": "b"}]),
        );
        let store = ready(&c);
        assert_eq!(allowed_in_a_row(&c, &k, "a", &store, NOW_MS), 2);
        assert_eq!(allowed_in_a_row(&c, &k, "b", &store, NOW_MS), 2);
    }

    #[test]
    fn denials_write_nothing() {
        let (c, k) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "a", "rate_limit": {"requests": 1, "per_seconds": 60}},
                               {"id": "b", "monthly_budget": 1}]),
        );
        let store = ready(&c);
        assert!(hit(&c, &k, "a", &store, NOW_MS).is_ok());
        assert!(hit(&c, &k, "b", &store, NOW_MS).is_ok());
        let before: Vec<_> = (0..c.limits.slots)
            .map(|i| store.get(&slot_name(i)))
            .collect();
        assert!(hit(&c, &k, "a", &store, NOW_MS).is_err());
        assert!(hit(&c, &k, "b", &store, NOW_MS).is_err());
        let after: Vec<_> = (0..c.limits.slots)
            .map(|i| store.get(&slot_name(i)))
            .collect();
        assert_eq!(before, after);
    }

    /// A store where another worker writes the same slot between our read and our write.
    struct Contended<'a> {
        inner: &'a MemoryStore,
        interruptions: Cell<u32>,
        writes_attempted: Cell<u32>,
        competitor: &'a dyn Fn(),
    }

    impl SharedStore for Contended<'_> {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
            self.writes_attempted.set(self.writes_attempted.get() + 1);
            if self.interruptions.get() > 0 {
                self.interruptions.set(self.interruptions.get() - 1);
                (self.competitor)();
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn a_lost_compare_and_swap_is_retried_and_nothing_is_double_counted() {
        let (c, k) = setup(
            serde_json::json!({}),
            serde_json::json!([{"id": "a", "rate_limit": {"requests": 20, "per_seconds": 3600, "burst": 5}}]),
        );
        let shared = ready(&c);
        let competitor_allowed = Cell::new(0u32);
        let competitor = || {
            if hit(&c, &k, "a", &shared, NOW_MS).is_ok() {
                competitor_allowed.set(competitor_allowed.get() + 1);
            }
        };
        let store = Contended {
            inner: &shared,
            interruptions: Cell::new(10),
            writes_attempted: Cell::new(0),
            competitor: &competitor,
        };
        let mut ours = 0;
        for _ in 0..100 {
            if hit(&c, &k, "a", &store, NOW_MS).is_ok() {
                ours += 1;
            }
        }
        // Our first write lost ten races in a row, each to a request the competitor was allowed.
        assert_eq!(competitor_allowed.get(), 10);
        assert_eq!(ours, 15);
        assert_eq!(ours + competitor_allowed.get(), 25);
        assert_eq!(store.writes_attempted.get(), 10 + 15);
    }

    #[test]
    fn persistent_contention_fails_closed_by_default_and_open_when_configured() {
        for (policy_name, expect_allowed) in [("deny", false), ("allow", true)] {
            // One slot, so the competitor's key always shares "a"'s slot and wins every race.
            let (c, k) = setup(
                serde_json::json!({"slots": 1, "max_retries": 3, "on_store_failure": policy_name,
                                   "rate_limit": {"requests": 100, "per_seconds": 60}}),
                serde_json::json!([{"id": "a"}, {"id": "other"}]),
            );
            let shared = ready(&c);
            let competitor = || {
                let _ = hit(&c, &k, "other", &shared, NOW_MS);
            };
            let store = Contended {
                inner: &shared,
                interruptions: Cell::new(u32::MAX),
                writes_attempted: Cell::new(0),
                competitor: &competitor,
            };
            let result = hit(&c, &k, "a", &store, NOW_MS);
            assert_eq!(store.writes_attempted.get(), 4);
            match result {
                Ok(info) => {
                    assert!(expect_allowed);
                    assert_eq!(info, LimitInfo::default());
                }
                Err(denial) => {
                    assert!(!expect_allowed);
                    assert_eq!(denial.code, ErrorCode::RateLimitExceeded);
                    assert_eq!(denial.retry_after_secs, Some(1));
                }
            }
        }
    }

    #[test]
    fn default_store_failure_policy_is_deny() {
        assert_eq!(Limits::default().on_store_failure, StoreFailurePolicy::Deny);
        let (c, _) = setup(serde_json::json!({}), serde_json::json!([]));
        assert_eq!(c.limits.on_store_failure, StoreFailurePolicy::Deny);
    }

    #[test]
    fn a_missing_slot_is_recreated_on_the_request_path() {
        let (c, k) = setup(
            serde_json::json!({"rate_limit": {"requests": 2, "per_seconds": 60}}),
            serde_json::json!([{"id": "a"}]),
        );
        let store = MemoryStore::new();
        assert_eq!(allowed_in_a_row(&c, &k, "a", &store, NOW_MS), 2);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn idle_counters_are_dropped_by_writers_and_by_the_sweep() {
        let (c, k) = setup(
            serde_json::json!({"slots": 1, "rate_limit": {"requests": 10, "per_seconds": 10}}),
            serde_json::json!([{"id": "a"}, {"id": "b"}, {"id": "c", "monthly_budget": 5}]),
        );
        let store = ready(&c);
        for id in ["a", "b", "c"] {
            assert!(hit(&c, &k, id, &store, NOW_MS).is_ok());
        }
        let full = store.payload_bytes();
        assert_eq!(full, slot_name(0).len() + 1 + 3 * ENTRY_LEN);
        // 10 s later a's and b's buckets are full again; a write by "a" drops "b".
        let later = NOW_MS + 10_000;
        assert!(hit(&c, &k, "a", &store, later).is_ok());
        assert!(peek(&c.limits, &store, k.by_id("b").unwrap(), later).is_none());
        // "c" spent budget this month: kept until the month ends, even when its bucket is full.
        let report = sweep(&c.limits, &store, later + 10_000, 0, 1);
        assert_eq!(report.dropped, 1);
        assert!(peek(&c.limits, &store, k.by_id("c").unwrap(), later + 10_000).is_some());
        let next_month = parse_rfc3339("2026-12-01T00:00:00Z").unwrap() * 1000;
        let report = sweep(&c.limits, &store, next_month, 0, 1);
        assert_eq!((report.rewritten, report.dropped), (1, 1));
        assert_eq!(store.payload_bytes(), slot_name(0).len() + 1);
    }

    #[test]
    fn the_sweep_leaves_busy_slots_alone_and_repairs_unreadable_ones() {
        let (c, k) = setup(
            serde_json::json!({"slots": 4, "rate_limit": {"requests": 1, "per_seconds": 60}}),
            serde_json::json!([{"id": "a"}]),
        );
        let store = ready(&c);
        assert!(hit(&c, &k, "a", &store, NOW_MS).is_ok());
        let report = sweep(&c.limits, &store, NOW_MS, 0, 4);
        assert_eq!(
            report,
            SweepReport {
                visited: 4,
                rewritten: 0,
                dropped: 0
            }
        );
        store.set(&slot_name(2), b"garbage", 0).unwrap();
        assert_eq!(sweep(&c.limits, &store, NOW_MS, 2, 1).rewritten, 1);
        assert_eq!(store.get(&slot_name(2)).map(|(v, _)| v), Some(vec![FORMAT]));
    }

    #[test]
    fn state_is_one_table_of_fixed_size() {
        let (c, _) = setup(serde_json::json!({"slots": 64}), serde_json::json!([]));
        let store = MemoryStore::new();
        assert_eq!(ensure_slots(&c.limits, &store), 64);
        assert_eq!(ensure_slots(&c.limits, &store), 0);
        assert_eq!(store.len(), 64);
    }

    #[test]
    fn bad_limits_are_refused_with_their_path() {
        let err = |limits: serde_json::Value, keys: serde_json::Value| {
            let cfg = serde_json::json!({"credentials": [{"in": "header"}], "limits": limits, "keys": keys});
            Config::parse(cfg.to_string().as_bytes()).unwrap_err()
        };
        assert_eq!(
            err(
                serde_json::json!({"rate_limit": {"requests": 0, "per_seconds": 1}}),
                serde_json::json!([])
            )
            .path,
            "limits.rate_limit.requests"
        );
        assert_eq!(
            err(serde_json::json!({"slots": 0}), serde_json::json!([])).path,
            "limits.slots"
        );
        let key = serde_json::json!([{"id": "a", "secret_sha256": "00".repeat(32),
                                      "rate_limit": {"requests": 1, "per_seconds": 0}}]);
        assert_eq!(
            err(serde_json::json!({}), key).path,
            "keys[0].rate_limit.per_seconds"
        );
        let huge = serde_json::json!([{"id": "a", "secret_sha256": "00".repeat(32),
                                       "rate_limit": {"requests": 1, "per_seconds": 4_000_000_000u64}}]);
        assert_eq!(err(serde_json::json!({}), huge).path, "keys[0].rate_limit");
        let unknown = err(serde_json::json!({"rate": 1}), serde_json::json!([]));
        assert!(
            unknown.message.contains("unknown field `rate`"),
            "{unknown}"
        );
    }
}
