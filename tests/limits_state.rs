//! Bounded state: 100,000 distinct keys through the limiter with an in-memory store that has
//! Envoy's shared-data semantics. Prints the numbers (`cargo test --test limits_state --
//! --nocapture`) and asserts the bounds: the table never has more than `slots` entries, holds
//! 36 bytes per key active now or this month, and shrinks back once keys go quiet.

// A test file: its helpers may fail loudly.
#![allow(clippy::expect_used)]

use keygate::core::config::Config;
use keygate::core::keyset::{KeyRecord, KeySet};
use keygate::core::limits::{apply_limits, ensure_slots, slot_name, sweep, Limits};
use keygate::core::memory_store::MemoryStore;
use keygate::core::policy::Policy;
use keygate::core::time::parse_rfc3339;

const KEYS: usize = 100_000;

fn limits(slots: u32) -> (Limits, KeyRecord) {
    let cfg = serde_json::json!({
        "name": "bench",
        "credentials": [{"in": "header"}],
        "limits": {"slots": slots, "rate_limit": {"requests": 60, "per_seconds": 60}},
        "keys": [{"id": "template", "secret_sha256": "00".repeat(32), "monthly_budget": 1000}]
    });
    let (config, keys): (Config, KeySet) =
        Config::parse(cfg.to_string().as_bytes()).expect("valid config");
    let record = keys.by_id("template").expect("template key").clone();
    (config.limits, record)
}

fn run_keys(
    limits: &Limits,
    template: &KeyRecord,
    store: &MemoryStore,
    round: usize,
    now_ms: i64,
) -> usize {
    let policy = Policy::default();
    let mut record = template.clone();
    let mut allowed = 0;
    for i in 0..KEYS {
        record.id = format!("key-{round}-{i:06}").into();
        if apply_limits(limits, &record, &policy, store, now_ms).is_ok() {
            allowed += 1;
        }
    }
    allowed
}

fn sweep_all(limits: &Limits, store: &MemoryStore, now_ms: i64) -> u32 {
    sweep(limits, store, now_ms, 0, limits.slots).dropped
}

#[test]
fn state_for_100k_distinct_keys_stays_bounded() {
    let (limits, template) = limits(4096);
    let store = MemoryStore::new();
    ensure_slots(&limits, &store);
    let empty = store.payload_bytes();
    let names: usize = (0..limits.slots).map(|i| slot_name(i).len()).sum();
    println!(
        "empty table: {} entries, {} payload bytes",
        store.len(),
        empty
    );
    assert_eq!(empty, names + limits.slots as usize);

    let t0 = parse_rfc3339("2026-11-10T12:00:00Z").expect("time") * 1000;
    // Round 1: 100k distinct keys, each with a rate limit and a budget, one request each.
    assert_eq!(run_keys(&limits, &template, &store, 1, t0), KEYS);
    let active = store.payload_bytes();
    let per_key = (active - empty) as f64 / KEYS as f64;
    println!(
        "100k keys active: {} entries, {} payload bytes ({per_key:.1} bytes per key)",
        store.len(),
        active
    );
    assert_eq!(store.len(), limits.slots as usize);
    assert_eq!(active - empty, KEYS * 36);

    // A minute later the buckets are full again, but the budgets spent this month stay.
    let dropped = sweep_all(&limits, &store, t0 + 61_000);
    println!(
        "after a sweep 61 s later (same month): {} payload bytes, {dropped} counters dropped",
        store.payload_bytes()
    );
    assert_eq!(dropped, 0);

    // Next month nothing is worth keeping: one sweep brings the table back to empty.
    let next_month = parse_rfc3339("2026-12-01T00:00:00Z").expect("time") * 1000;
    let dropped = sweep_all(&limits, &store, next_month);
    println!(
        "after a sweep next month: {} entries, {} payload bytes, {dropped} counters dropped",
        store.len(),
        store.payload_bytes()
    );
    assert_eq!(dropped as usize, KEYS);
    assert_eq!(store.payload_bytes(), empty);
}

#[test]
fn key_churn_never_adds_entries_and_idle_rate_counters_expire() {
    // Rate limits only: a counter is worth keeping only until the key's bucket is full again.
    let (limits, mut template) = limits(4096);
    std::sync::Arc::make_mut(&mut template.profile)
        .fields
        .monthly_budget = None;
    let store = MemoryStore::new();
    ensure_slots(&limits, &store);
    let empty = store.payload_bytes();
    let t0 = parse_rfc3339("2026-11-10T12:00:00Z").expect("time") * 1000;
    let mut peak = 0;
    // Five rounds of 100k new keys, two minutes apart: 500k distinct keys in total.
    for round in 0..5 {
        let now = t0 + round as i64 * 120_000;
        assert_eq!(run_keys(&limits, &template, &store, round, now), KEYS);
        peak = peak.max(store.payload_bytes());
        assert_eq!(store.len(), limits.slots as usize);
    }
    println!(
        "500k distinct keys in 5 rounds: {} entries, peak {} payload bytes",
        store.len(),
        peak
    );
    // Writers prune their slot, so old rounds never pile up: the peak is one round's worth.
    assert!(peak <= empty + KEYS * 36, "{peak}");
    let dropped = sweep_all(&limits, &store, t0 + 10 * 60_000);
    println!(
        "after a sweep once idle: {} payload bytes ({dropped} dropped)",
        store.payload_bytes()
    );
    assert_eq!(store.payload_bytes(), empty);
}
