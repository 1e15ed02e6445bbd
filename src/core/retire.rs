//! Dropping a replaced key set a slice at a time. Freeing a million records (an id each) takes
//! a few hundred milliseconds at once, a pause for every request of that thread; spread over
//! the syncs that follow (each request and tick), no request waits more than a slice.

use std::sync::Arc;

use super::keyset::{KeyRecord, KeySet};

/// Records dropped per step: well under a millisecond.
pub const RECORDS_PER_STEP: usize = 8192;

/// Replaced sets not yet dropped.
#[derive(Debug, Default)]
pub struct Retiring {
    records: Vec<Vec<KeyRecord>>,
}

impl Retiring {
    /// Takes a replaced set. One still shared (a request of the native module holds it) is left
    /// to its last holder, which drops it whole as before.
    pub fn add(&mut self, set: Arc<KeySet>) {
        if let Ok(set) = Arc::try_unwrap(set) {
            let records = set.into_records();
            if !records.is_empty() {
                self.records.push(records);
            }
        }
    }

    /// Drops up to `RECORDS_PER_STEP` records.
    pub fn step(&mut self) {
        let Some(records) = self.records.last_mut() else {
            return;
        };
        let keep = records.len().saturating_sub(RECORDS_PER_STEP);
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
        retiring.add(Arc::new(set(RECORDS_PER_STEP * 2 + 10)));
        assert_eq!(retiring.pending(), RECORDS_PER_STEP * 2 + 10);
        retiring.step();
        assert_eq!(retiring.pending(), RECORDS_PER_STEP + 10);
        retiring.step();
        retiring.step();
        assert_eq!(retiring.pending(), 0);
        retiring.step();
        assert_eq!(retiring.pending(), 0);
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
