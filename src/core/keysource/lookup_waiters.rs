//! Lookup on miss, one fetch per key: the requests for a key whose lookup is already in flight
//! wait for that answer instead of sending their own. Host-free bookkeeping; each host keeps one
//! behind its own cell or lock, with `W` its own handle on a waiting request.

use std::collections::HashMap;

use super::paths::LookupKey;

/// The lookups in flight by key: when each was sent, and the requests waiting on its answer.
pub struct LookupsInFlight<W> {
    by_key: HashMap<LookupKey, (i64, Vec<W>)>,
}

impl<W> Default for LookupsInFlight<W> {
    fn default() -> Self {
        LookupsInFlight {
            by_key: HashMap::new(),
        }
    }
}

impl<W> LookupsInFlight<W> {
    pub fn is_in_flight(&self, key: &LookupKey) -> bool {
        self.by_key.contains_key(key)
    }

    /// Queues `waiter` on the lookup of `key` in flight; with none in flight, hands it back
    /// (the caller sends its own lookup).
    pub fn wait(&mut self, key: &LookupKey, waiter: W) -> Result<(), W> {
        match self.by_key.get_mut(key) {
            Some((_, waiters)) => {
                waiters.push(waiter);
                Ok(())
            }
            None => Err(waiter),
        }
    }

    /// The lookup of `key` was sent at `now_ms`: later requests for it wait. A lookup already
    /// in flight keeps its sent time and its waiters.
    pub fn sent(&mut self, key: &LookupKey, now_ms: i64) {
        self.by_key
            .entry(key.clone())
            .or_insert_with(|| (now_ms, Vec::new()));
    }

    /// The lookup of `key` ended (answered, failed, or never sent): its waiters, to be given the
    /// outcome. The key can then be sent again.
    pub fn settle(&mut self, key: &LookupKey) -> Vec<W> {
        self.by_key
            .remove(key)
            .map(|(_, waiters)| waiters)
            .unwrap_or_default()
    }

    /// Lookups sent more than `limit_ms` before `now_ms` whose answer never came: they are
    /// forgotten, and their waiters handed back to be settled as a failed lookup.
    pub fn expire(&mut self, now_ms: i64, limit_ms: i64) -> Vec<W> {
        let expired: Vec<LookupKey> = self
            .by_key
            .iter()
            .filter(|(_, (sent, _))| now_ms - sent > limit_ms)
            .map(|(key, _)| key.clone())
            .collect();
        expired
            .iter()
            .filter_map(|key| self.by_key.remove(key))
            .flat_map(|(_, waiters)| waiters)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> LookupKey {
        LookupKey::Id(id.to_string())
    }

    #[test]
    fn the_first_request_for_a_key_sends_and_later_ones_wait() {
        let mut lookups = LookupsInFlight::default();
        assert_eq!(lookups.wait(&key("a"), 1), Err(1));
        lookups.sent(&key("a"), 100);
        assert!(lookups.is_in_flight(&key("a")));
        assert_eq!(lookups.wait(&key("a"), 2), Ok(()));
        assert_eq!(lookups.wait(&key("a"), 3), Ok(()));
        assert_eq!(lookups.wait(&key("b"), 4), Err(4));
    }

    #[test]
    fn the_answer_settles_every_waiter_of_its_key_only() {
        let mut lookups = LookupsInFlight::default();
        lookups.sent(&key("a"), 100);
        lookups.sent(&key("b"), 100);
        for waiter in [1, 2, 3] {
            assert_eq!(lookups.wait(&key("a"), waiter), Ok(()));
        }
        assert_eq!(lookups.wait(&key("b"), 9), Ok(()));
        assert_eq!(lookups.settle(&key("a")), vec![1, 2, 3]);
        assert!(!lookups.is_in_flight(&key("a")));
        assert!(lookups.is_in_flight(&key("b")));
    }

    #[test]
    fn a_settled_key_can_be_sent_again() {
        let mut lookups = LookupsInFlight::default();
        lookups.sent(&key("a"), 100);
        assert_eq!(lookups.wait(&key("a"), 1), Ok(()));
        assert_eq!(lookups.settle(&key("a")), vec![1]);
        assert_eq!(lookups.wait(&key("a"), 2), Err(2));
        lookups.sent(&key("a"), 200);
        assert_eq!(lookups.wait(&key("a"), 3), Ok(()));
        assert_eq!(lookups.settle(&key("a")), vec![3]);
    }

    #[test]
    fn sending_a_key_already_in_flight_keeps_its_waiters_and_sent_time() {
        let mut lookups = LookupsInFlight::default();
        lookups.sent(&key("a"), 100);
        assert_eq!(lookups.wait(&key("a"), 1), Ok(()));
        lookups.sent(&key("a"), 900);
        assert_eq!(lookups.expire(1_000, 500), vec![1]);
    }

    #[test]
    fn expiry_hands_back_the_waiters_of_lookups_past_the_limit_only() {
        let mut lookups = LookupsInFlight::default();
        lookups.sent(&key("old"), 100);
        lookups.sent(&key("new"), 900);
        assert_eq!(lookups.wait(&key("old"), 1), Ok(()));
        assert_eq!(lookups.wait(&key("new"), 2), Ok(()));
        assert_eq!(lookups.expire(1_000, 500), vec![1]);
        assert!(!lookups.is_in_flight(&key("old")));
        assert!(lookups.is_in_flight(&key("new")));
        assert_eq!(lookups.expire(1_000, 500), Vec::<i32>::new());
    }
}
