//! Arbitrary bytes as a key-set document (`{"keys": [...]}`, what a key service serves):
//! `KeySet::from_json` must refuse or accept, never panic. An accepted set must index every
//! record both ways, and hold only header-safe values in the fields sent upstream.
#![no_main]

use keygate::core::config_error::is_header_value;
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
        let fields = &record.fields;
        for value in [&fields.tenant, &fields.environment, &fields.product, &fields.user]
            .into_iter()
            .flatten()
            .chain(&fields.organizations)
            .chain(&fields.permissions)
        {
            assert!(is_header_value(value), "{} carries {value:?}", record.id);
        }
    }
});
