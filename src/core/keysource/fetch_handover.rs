//! Which VM fetches a key set in full mode. The VM holding the fetch lease parses and validates
//! each new document on its own thread, a pause of about half a second at 1,000,000 keys: on a
//! worker, every request of that worker waits behind it. The wasm host also runs a VM on Envoy's
//! main thread, which serves no requests, so the fetch is left to a VM that has served none
//! lately: a busy VM gives the lease up and fetches only when the fetch is overdue (no idle VM
//! is there to take it, or it cannot call out).

use super::full_sync::read_meta;
use super::service::{FullSync, KeyService};
use super::store::SharedStore;

/// A VM that decided a request within this long is busy.
pub const BUSY_MS: i64 = 10_000;
/// How long past its period a fetch waits for an idle VM before a busy one makes it.
pub const HANDOVER_MS: i64 = 1_000;

/// Whether the VM `worker` leaves this tick's fetch to an idle VM, given when it last decided a
/// request (`None`: never) and whether a fetch of its own is in flight (a fetch in parts
/// finishes where it started). When it does, it gives up the lease if it holds it.
pub fn leaves_fetch_to_idle_vm(
    sync: &FullSync,
    service: &KeyService,
    store: &dyn SharedStore,
    worker: u64,
    now_ms: i64,
    last_request_ms: Option<i64>,
    in_flight: bool,
) -> bool {
    let busy = last_request_ms.is_some_and(|at| now_ms.saturating_sub(at) < BUSY_MS);
    if !busy || in_flight {
        return false;
    }
    let last_attempt_ms = read_meta(service, store).map_or(0, |(meta, _)| meta.last_attempt_ms);
    // Nothing fetched yet: whoever comes first, so keys are there as soon as possible.
    if last_attempt_ms == 0 {
        return false;
    }
    let overdue = now_ms >= last_attempt_ms + sync.refresh_ms + HANDOVER_MS;
    if overdue {
        return false;
    }
    sync.release_lease(service, store, worker);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keysource::full_sync::TickPlan;
    use crate::core::keysource::service::{KeyServiceMode, KeyServiceSpec};
    use crate::core::memory_store::MemoryStore;

    const BUSY: u64 = 1;
    const IDLE: u64 = 2;

    fn service() -> KeyService {
        let spec = serde_json::json!({"cluster": "keyservice", "refresh_seconds": 5});
        let spec = KeyServiceSpec::decode(&spec, "key_service").unwrap();
        KeyService::from_spec(spec, "test", true, true).unwrap()
    }

    fn full(service: &KeyService) -> &FullSync {
        match &service.mode {
            KeyServiceMode::Full(f) => f,
            KeyServiceMode::Lookup(_) => panic!("not full"),
        }
    }

    fn fetches(plan: TickPlan) -> bool {
        matches!(plan, TickPlan::Fetch { .. })
    }

    #[test]
    fn a_busy_vm_holding_the_lease_hands_it_to_an_idle_vm_which_then_fetches() {
        let (svc, store) = (service(), MemoryStore::new());
        let f = full(&svc);
        f.ensure_lease(&svc, &store);
        // At start nobody has fetched: the busy VM goes first rather than wait.
        assert!(!leaves_fetch_to_idle_vm(
            f,
            &svc,
            &store,
            BUSY,
            1_000,
            Some(900),
            false
        ));
        assert!(fetches(f.plan(&svc, &store, BUSY, false, 1_000)));
        // Its next tick, busy and not overdue: it lets go of the lease.
        assert!(leaves_fetch_to_idle_vm(
            f,
            &svc,
            &store,
            BUSY,
            1_250,
            Some(1_200),
            false
        ));
        assert_eq!(f.plan(&svc, &store, IDLE, false, 1_500), TickPlan::Wait);
        // The idle VM took the lease and makes the next period's fetch.
        assert!(fetches(f.plan(&svc, &store, IDLE, false, 6_000)));
        assert!(leaves_fetch_to_idle_vm(
            f,
            &svc,
            &store,
            BUSY,
            6_100,
            Some(6_050),
            false
        ));
    }

    #[test]
    fn a_busy_vm_fetches_when_no_idle_vm_did_within_the_handover() {
        let (svc, store) = (service(), MemoryStore::new());
        let f = full(&svc);
        f.ensure_lease(&svc, &store);
        assert!(fetches(f.plan(&svc, &store, BUSY, false, 1_000)));
        // Period 5 s: due at 6 s, an idle VM had until 7 s.
        assert!(leaves_fetch_to_idle_vm(
            f,
            &svc,
            &store,
            BUSY,
            6_999,
            Some(6_900),
            false
        ));
        assert!(!leaves_fetch_to_idle_vm(
            f,
            &svc,
            &store,
            BUSY,
            7_000,
            Some(6_900),
            false
        ));
        assert!(fetches(f.plan(&svc, &store, BUSY, false, 7_000)));
    }

    #[test]
    fn an_idle_vm_or_one_with_a_fetch_in_flight_never_steps_back() {
        let (svc, store) = (service(), MemoryStore::new());
        let f = full(&svc);
        f.ensure_lease(&svc, &store);
        assert!(fetches(f.plan(&svc, &store, BUSY, false, 1_000)));
        assert!(!leaves_fetch_to_idle_vm(
            f, &svc, &store, IDLE, 2_000, None, false
        ));
        assert!(!leaves_fetch_to_idle_vm(
            f,
            &svc,
            &store,
            IDLE,
            20_000,
            Some(9_000),
            false
        ));
        assert!(!leaves_fetch_to_idle_vm(
            f,
            &svc,
            &store,
            BUSY,
            2_000,
            Some(1_900),
            true
        ));
        // Still the holder: the fetch in parts goes on.
        assert_eq!(f.plan(&svc, &store, IDLE, false, 2_000), TickPlan::Wait);
    }
}
