//! Dropping a replaced key set a slice at a time. Freeing a million records (an id each) takes
//! a few hundred milliseconds at once, a pause for every request of that thread; spread over
//! the syncs that follow (a slice per request, as many as chunks copied per tick), no request
//! waits more than a slice. At most one set waits: memory stays what it was when sets were
//! dropped at once, plus the time it takes to drop one.

use std::sync::Arc;

use crate::core::keyset::{KeyRecord, KeySet};

/// Records dropped per slice: well under a millisecond.
pub const RECORDS_PER_SLICE: usize = 8192;

/// Replaced sets not yet dropped.
#[derive(Debug, Default)]
pub struct Retiring {
    records: Vec<Vec<KeyRecord>>,
}

impl Retiring {
    /// Takes a replaced set, dropping at once what is left of the one before. A set still shared
    /// (a request of the native module holds it) is left to its last holder, which drops it
    /// whole as before.
    pub fn add(&mut self, set: Arc<KeySet>) {
        self.records.clear();
        if let Ok(set) = Arc::try_unwrap(set) {
            let records = set.into_records();
            if !records.is_empty() {
                self.records.push(records);
            }
        }
    }

    /// Drops up to `slices` times `RECORDS_PER_SLICE` records.
    pub fn step(&mut self, slices: u32) {
        let Some(records) = self.records.last_mut() else {
            return;
        };
        let count = RECORDS_PER_SLICE.saturating_mul(slices as usize);
        let keep = records.len().saturating_sub(count);
        records.truncate(keep);
        if records.is_empty() {
            self.records.pop();
        }
    }

    /// Records still to drop.
    pub fn pending(&self) -> usize {
        self.records.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::digest::sha256;

    fn set(count: usize) -> KeySet {
        let keys: Vec<serde_json::Value> = (0..count)
            .map(|i| {
                serde_json::json!({"id": format!("k{i}"),
                    "secret_sha256": hex::encode(sha256(format!("s{i}").as_bytes()))})
            })
            .collect();
        KeySet::from_json(serde_json::json!({ "keys": keys }).to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_replaced_set_is_dropped_a_slice_per_step_until_none_is_left() {
        let mut retiring = Retiring::default();
        retiring.add(Arc::new(set(RECORDS_PER_SLICE * 3 + 10)));
        assert_eq!(retiring.pending(), RECORDS_PER_SLICE * 3 + 10);
        retiring.step(1);
        assert_eq!(retiring.pending(), RECORDS_PER_SLICE * 2 + 10);
        retiring.step(2);
        assert_eq!(retiring.pending(), 10);
        retiring.step(1);
        assert_eq!(retiring.pending(), 0);
        retiring.step(1);
        assert_eq!(retiring.pending(), 0);
    }

    #[test]
    fn a_second_replaced_set_drops_what_is_left_of_the_first_at_once() {
        let mut retiring = Retiring::default();
        retiring.add(Arc::new(set(RECORDS_PER_SLICE + 5)));
        retiring.step(1);
        retiring.add(Arc::new(set(7)));
        assert_eq!(retiring.pending(), 7);
    }

    #[test]
    fn a_set_someone_still_holds_is_left_to_them() {
        let mut retiring = Retiring::default();
        let shared = Arc::new(set(3));
        let holder = Arc::clone(&shared);
        retiring.add(shared);
        assert_eq!(retiring.pending(), 0);
        assert_eq!(holder.len(), 3);
    }
}
