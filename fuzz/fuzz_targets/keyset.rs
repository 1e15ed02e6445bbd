//! Arbitrary bytes as a key-set document (`{"keys": [...]}`, what a key service serves):
//! `KeySet::from_json` must refuse or accept, never panic. An accepted set must index every
//! record both ways, and the header-safety check must not panic on it.
#![no_main]

use keygate::core::keyset::validate_header_safe_fields;
use keygate::core::keyset::KeySet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(set) = KeySet::from_json(data) else {
        return;
    };
    assert_eq!(set.len(), set.records().len());
    for record in set.records() {
        assert_eq!(set.by_id(&record.id), Some(record), "by id {}", record.id);
        assert_eq!(
            set.by_digest(&record.digest),
            Some(record),
            "by digest {}",
            record.id
        );
    }
    let _ = validate_header_safe_fields(&set);
});
