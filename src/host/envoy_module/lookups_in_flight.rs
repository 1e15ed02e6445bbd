//! Lookup on miss, one fetch per key for the whole process: a request for a key already being
//! looked up (on any worker) waits for that answer instead of sending its own. The wasm filter
//! does this per VM; the module is one process, so one map serves every worker.

use std::sync::{Arc, Mutex, OnceLock};

use crate::core::keysource::lookup_on_miss::Answer;
use crate::core::keysource::lookup_waiters;
use crate::core::keysource::paths::LookupKey;

use super::ffi::StreamWaker;

/// What a lookup came to: the service's answer, or `None` when it failed (or its request went
/// away before the answer), and each waiter falls back to its own stale answer.
pub type Outcome = Arc<OnceLock<Option<Answer>>>;

/// The `on_http_filter_scheduled` event that tells a waiting stream its lookup answered.
pub const LOOKUP_ANSWERED: u64 = 1;

/// A waiting stream: how to wake it, and where it reads the outcome when woken.
type Waiter = (StreamWaker, Outcome);

#[derive(Default)]
pub struct LookupsInFlight {
    by_key: Mutex<lookup_waiters::LookupsInFlight<Waiter>>,
}

/// What `join_or_lead` decided for a request whose key is not cached.
pub enum Role {
    /// No lookup of this key is in flight: the caller sends it, then calls `settle`.
    Lead,
    /// The key is being looked up: the stream is woken with `LOOKUP_ANSWERED` once this is set.
    Wait(Outcome),
    /// Past the process's lookups per second: no fetch.
    OverCap,
}

impl LookupsInFlight {
    /// Joins the lookup in flight for `key`, or makes the caller its leader if `admit` counts
    /// one more lookup under the cap. A stream without a waker leads (it could not be woken).
    /// Waiters never count against the cap: they send nothing.
    pub fn join_or_lead(
        &self,
        key: &LookupKey,
        waker: impl FnOnce() -> Option<StreamWaker>,
        admit: impl FnOnce() -> bool,
    ) -> Role {
        let Ok(mut by_key) = self.by_key.lock() else {
            return if admit() { Role::Lead } else { Role::OverCap };
        };
        if by_key.is_in_flight(key) {
            if let Some(waker) = waker() {
                let outcome = Outcome::default();
                if by_key.wait(key, (waker, Arc::clone(&outcome))).is_ok() {
                    return Role::Wait(outcome);
                }
            }
            // Sends its own lookup; the waiters keep the first one's entry.
            return if admit() { Role::Lead } else { Role::OverCap };
        }
        // Admitted under the lock, so no request joins a lookup that is then not sent.
        if !admit() {
            return Role::OverCap;
        }
        // The module never expires a lookup (the leader's stream always settles it), so the
        // sent time goes unread.
        by_key.sent(key, 0);
        Role::Lead
    }

    /// The leader's lookup of `key` ended (`None`: it failed, or was never sent): its waiters
    /// get the outcome and are woken.
    pub fn settle(&self, key: &LookupKey, answer: Option<Answer>) {
        let waiters = match self.by_key.lock() {
            Ok(mut by_key) => by_key.settle(key),
            Err(_) => Vec::new(),
        };
        for (waker, outcome) in waiters {
            let _ = outcome.set(answer.clone());
            waker.wake(LOOKUP_ANSWERED);
        }
    }
}
