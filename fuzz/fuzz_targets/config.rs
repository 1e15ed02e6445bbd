//! Arbitrary bytes as the plugin configuration: `Config::parse` must refuse or accept, never
//! panic. An accepted config must then decide a few ordinary requests without panicking, and
//! render a 4xx or 5xx reply for every code.
#![no_main]

use keygate::core::codes::ErrorCode;
use keygate::core::config::Config;
use keygate::core::decision::{decide, Decision};
use keygate::core::request::RequestView;
use keygate::core::upstream::upstream_edits;
use libfuzzer_sys::fuzz_target;

fn request(headers: &[(&str, &str)]) -> RequestView {
    RequestView {
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        now: 1_735_689_600,
        ..Default::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok((config, keys)) = Config::parse(data) else {
        return;
    };
    for code in ErrorCode::ALL {
        let status = config.replies.get(code).status;
        assert!((400..600).contains(&status), "{code:?} answered {status}");
    }
    let requests = [
        request(&[(":method", "GET"), (":path", "/")]),
        request(&[
            (":method", "POST"),
            (":path", "/a/b?api_key=k_1&organizationId=o"),
            ("x-api-key", "cmp_live_abc"),
            ("authorization", "Bearer abk_1:c2VjcmV0"),
            ("cookie", "accessToken=x; api_key=y"),
            ("origin", "https://a.example"),
        ]),
    ];
    for req in &requests {
        if let Decision::Allow { principal, .. } = decide(&config, &keys, req) {
            let _ = upstream_edits(&config, req, &principal);
        }
    }
});
