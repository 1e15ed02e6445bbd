//! A proxy-wasm HTTP filter that does nothing: the benchmark's floor for any Rust wasm filter.
//!
//! Built with `--features deny` (build/bench-deny.wasm) it answers every request with the 401
//! keygate sends for an unknown key (same status, headers and body) through the SDK's
//! `send_http_response`, and does nothing else: the floor of a wasm filter's local reply, the
//! yardstick for keygate's 401 path (`bench/ab.py --unknown`).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(EmptyRoot) });
}}

struct EmptyRoot;

impl Context for EmptyRoot {}

impl RootContext for EmptyRoot {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(EmptyRequest))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Every callback keeps the SDK's default: continue (or, with `deny`, answers 401).
struct EmptyRequest;

impl Context for EmptyRequest {}

#[cfg(not(feature = "deny"))]
impl HttpContext for EmptyRequest {}

/// keygate's default reply for INVALID_API_KEY, as `core::reply` renders it.
#[cfg(feature = "deny")]
const UNKNOWN_KEY_BODY: &[u8] = br#"{"code":"INVALID_API_KEY","message":"The API key is unknown, revoked or its secret is wrong."}"#;

#[cfg(feature = "deny")]
impl HttpContext for EmptyRequest {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> proxy_wasm::types::Action {
        self.send_http_response(
            401,
            vec![
                ("content-type", "application/json"),
                ("x-keygate-code", "INVALID_API_KEY"),
                ("www-authenticate", "ApiKey realm=\"keygate\""),
            ],
            Some(UNKNOWN_KEY_BODY),
        );
        proxy_wasm::types::Action::Pause
    }
}
