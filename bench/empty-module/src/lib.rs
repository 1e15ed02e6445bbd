//! An Envoy 1.40 dynamic module (ABI `v0.2.0`) whose HTTP filter does nothing: the benchmark's
//! floor for any dynamic-module filter, next to bench/empty-filter's floor for wasm filters.
//!
//! It exports every `envoy_dynamic_module_on_*` hook Envoy 1.40 resolves when it loads a filter
//! config (a missing one refuses the config) and nothing else. Config and stream are one static
//! byte each: no allocation per config or per request. The hooks are declared by hand from the
//! facts in DYNAMIC-MODULES.md (the same ABI as src/host/envoy_module/ffi.rs, which this crate
//! does not link).
//!
//! Built with `--features deny` (build/libbench_deny.so) the request hook answers every request
//! with the 401 keygate sends for an unknown key (same status, headers and body) through
//! `http_send_response`, and does nothing else: the floor of a dynamic module's local reply, the
//! yardstick for keygate-native's 401 path (`bench/ab.py --unknown`). That call is the crate's
//! only `unsafe` block.

use std::ffi::{c_char, c_void};

type EnvoyFilterPtr = *mut c_void;
type EnvoyConfigPtr = *mut c_void;
type ModulePtr = *const c_void;

/// `envoy_dynamic_module_type_envoy_buffer` / `_module_buffer`: a pointer and a length.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Buffer {
    ptr: *const c_char,
    length: usize,
}

/// `envoy_dynamic_module_type_module_http_header`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

/// `..._status` of every hook: `Continue` is 0.
const CONTINUE: u32 = 0;

/// Envoy 1.40's ABI version string.
const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// What config_new and filter_new hand Envoy: a non-null pointer is all Envoy needs (null means
/// "refused"); nothing is ever read through it.
static NOTHING: u8 = 0;

fn nothing() -> ModulePtr {
    std::ptr::addr_of!(NOTHING).cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    ABI_VERSION.as_ptr().cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config_envoy: EnvoyConfigPtr,
    _name: Buffer,
    _config: Buffer,
) -> ModulePtr {
    nothing()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(_config: ModulePtr) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    _config: ModulePtr,
    _filter_envoy: EnvoyFilterPtr,
) -> ModulePtr {
    nothing()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(_filter: ModulePtr) {}

#[cfg(not(feature = "deny"))]
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
    _end_of_stream: bool,
) -> u32 {
    CONTINUE
}

#[cfg(feature = "deny")]
mod deny {
    use super::{Buffer, EnvoyFilterPtr, HttpHeader, ModulePtr};

    extern "C" {
        fn envoy_dynamic_module_callback_http_send_response(
            filter: EnvoyFilterPtr,
            status_code: u32,
            headers: *mut HttpHeader,
            headers_size: usize,
            body: Buffer,
            details: Buffer,
        );
    }

    /// `..._request_headers_status`: `StopIteration`.
    const STOP_ITERATION: u32 = 1;

    /// keygate's default reply for INVALID_API_KEY, as `core::reply` renders it.
    const UNKNOWN_KEY_BODY: &[u8] = br#"{"code":"INVALID_API_KEY","message":"The API key is unknown, revoked or its secret is wrong."}"#;
    const UNKNOWN_KEY_HEADERS: [(&str, &str); 3] = [
        ("content-type", "application/json"),
        ("x-keygate-code", "INVALID_API_KEY"),
        ("www-authenticate", "ApiKey realm=\"keygate\""),
    ];

    fn buffer(bytes: &[u8]) -> Buffer {
        Buffer {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }

    #[no_mangle]
    pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
        filter_envoy: EnvoyFilterPtr,
        _filter: ModulePtr,
        _end_of_stream: bool,
    ) -> u32 {
        let mut headers = UNKNOWN_KEY_HEADERS.map(|(name, value)| HttpHeader {
            key_ptr: name.as_ptr().cast(),
            key_length: name.len(),
            value_ptr: value.as_ptr().cast(),
            value_length: value.len(),
        });
        // SAFETY: `filter_envoy` is the filter pointer Envoy passed to this running hook;
        // `headers` (pointing into static strings) and the static body outlive the call, and
        // Envoy copies them before it returns; an empty details buffer is allowed.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                filter_envoy,
                401,
                headers.as_mut_ptr(),
                headers.len(),
                buffer(UNKNOWN_KEY_BODY),
                buffer(&[]),
            );
        }
        STOP_ITERATION
    }
}

// The rest of the hooks Envoy 1.40 requires: each does nothing and lets the stream go on.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
    _end_of_stream: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
    _end_of_stream: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
    _end_of_stream: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
    _response_code: u32,
    _details: Buffer,
    _reset_imminent: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
    _event_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
    _callout_id: u64,
    _result: u32,
    _headers: *mut HttpHeader,
    _headers_size: usize,
    _body_chunks: *mut Buffer,
    _body_chunks_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
    _stream_id: u64,
    _headers: *mut HttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
    _stream_id: u64,
    _data: *const Buffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
    _stream_id: u64,
    _trailers: *mut HttpHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
    _stream_id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
) {
}
