//! An Envoy 1.40 dynamic module (ABI `v0.2.0`) whose HTTP filter does nothing: the benchmark's
//! floor for any dynamic-module filter, next to bench/empty-filter's floor for wasm filters.
//!
//! It exports every `envoy_dynamic_module_on_*` hook Envoy 1.40 resolves when it loads a filter
//! config (a missing one refuses the config). Config and stream are one static byte each: no
//! allocation per config or per request. The hooks and the few callbacks are declared by hand
//! from the facts in DYNAMIC-MODULES.md (the same ABI as src/host/envoy_module/ffi.rs, which this
//! crate does not link).
//!
//! Two other builds of the same crate, each a measuring stick for keygate-native:
//! - `--features deny` (build/libbench_deny.so): the request hook answers every request with the
//!   401 keygate sends for an unknown key (same status, headers and body) through
//!   `http_send_response`, and does nothing else: the floor of a dynamic module's local reply,
//!   the yardstick of keygate-native's 401 path (`bench/ab.py --unknown`).
//! - `--features calls` (build/libbench_calls.so): the request hook makes the Envoy callbacks
//!   keygate-native makes for a valid key with credential stripping off (read all request
//!   headers, publish the access-log filter state, count the request, add three scope headers),
//!   with fixed values and no other work: what those callbacks cost Envoy, apart from keygate's
//!   own code. Its filter config may name the steps to make (`headers`, `state`, `counter`,
//!   `scope`; by default all), so that one run can add them one at a time.
//!
//! Every `unsafe` block is in `mod envoy`, each with its `SAFETY` comment.

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

impl Buffer {
    #[cfg(any(feature = "deny", feature = "calls"))]
    fn of(bytes: &[u8]) -> Buffer {
        Buffer {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }
}

/// `envoy_dynamic_module_type_{module,envoy}_http_header`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

impl HttpHeader {
    #[cfg(any(feature = "deny", feature = "calls"))]
    fn of(name: &str, value: &str) -> HttpHeader {
        HttpHeader {
            key_ptr: name.as_ptr().cast(),
            key_length: name.len(),
            value_ptr: value.as_ptr().cast(),
            value_length: value.len(),
        }
    }
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

/// The callbacks the `deny` and `calls` builds make, as safe functions: the crate's only
/// `unsafe` code. Each build uses some of them.
#[cfg(any(feature = "deny", feature = "calls"))]
#[allow(dead_code)]
mod envoy {
    use super::{Buffer, EnvoyConfigPtr, EnvoyFilterPtr, HttpHeader};

    extern "C" {
        fn envoy_dynamic_module_callback_http_send_response(
            filter: EnvoyFilterPtr,
            status_code: u32,
            headers: *mut HttpHeader,
            headers_size: usize,
            body: Buffer,
            details: Buffer,
        );
        fn envoy_dynamic_module_callback_http_get_headers_size(
            filter: EnvoyFilterPtr,
            header_type: u32,
        ) -> usize;
        fn envoy_dynamic_module_callback_http_get_headers(
            filter: EnvoyFilterPtr,
            header_type: u32,
            result_headers: *mut HttpHeader,
        ) -> bool;
        fn envoy_dynamic_module_callback_http_add_header(
            filter: EnvoyFilterPtr,
            header_type: u32,
            key: Buffer,
            value: Buffer,
        ) -> bool;
        fn envoy_dynamic_module_callback_http_set_header(
            filter: EnvoyFilterPtr,
            header_type: u32,
            key: Buffer,
            value: Buffer,
        ) -> bool;
        fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
            filter: EnvoyFilterPtr,
            key: Buffer,
            value: Buffer,
        ) -> bool;
        fn envoy_dynamic_module_callback_http_filter_config_define_counter(
            config: EnvoyConfigPtr,
            name: Buffer,
            label_names: *mut Buffer,
            label_names_length: usize,
            counter_id: *mut usize,
        ) -> u32;
        fn envoy_dynamic_module_callback_http_filter_increment_counter(
            filter: EnvoyFilterPtr,
            id: usize,
            label_values: *mut Buffer,
            label_values_length: usize,
            value: u64,
        ) -> u32;
    }

    /// `envoy_dynamic_module_type_http_header_type`: the request headers.
    const REQUEST_HEADER: u32 = 0;
    /// `envoy_dynamic_module_type_metrics_result_Success`.
    const METRICS_SUCCESS: u32 = 0;

    /// Answers the request locally. `filter` must be the filter pointer of the running hook.
    pub fn send_response(filter: EnvoyFilterPtr, status: u32, headers: &[HttpHeader], body: &[u8]) {
        let mut headers = headers.to_vec();
        // SAFETY: `filter` is the filter pointer Envoy passed to the running hook (the caller's
        // promise); `headers`, the static strings they point into and `body` outlive the call,
        // and Envoy copies them before it returns; an empty details buffer is allowed.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                filter,
                status,
                headers.as_mut_ptr(),
                headers.len(),
                Buffer::of(body),
                Buffer::of(&[]),
            );
        }
    }

    /// Reads the request headers' entries into `into` (its first ones; a map with more entries
    /// than `into` holds is not read) and returns how many Envoy has. `filter` as above.
    pub fn read_request_headers(filter: EnvoyFilterPtr, into: &mut [HttpHeader]) -> usize {
        // SAFETY: `filter` is the running hook's filter pointer; no pointer is written.
        let count =
            unsafe { envoy_dynamic_module_callback_http_get_headers_size(filter, REQUEST_HEADER) };
        if count <= into.len() {
            // SAFETY: `into` holds at least `count` entries, the number Envoy just reported for
            // this map, which nothing changes between the two calls (same hook, same thread).
            unsafe {
                envoy_dynamic_module_callback_http_get_headers(
                    filter,
                    REQUEST_HEADER,
                    into.as_mut_ptr(),
                );
            }
        }
        count
    }

    /// Adds a request header (`replace`: sets it, replacing its values). `filter` as above.
    pub fn write_request_header(filter: EnvoyFilterPtr, name: &str, value: &str, replace: bool) {
        let write = if replace {
            envoy_dynamic_module_callback_http_set_header
        } else {
            envoy_dynamic_module_callback_http_add_header
        };
        // SAFETY: `filter` is the running hook's filter pointer; both buffers live for the call
        // and Envoy copies them.
        unsafe {
            write(
                filter,
                REQUEST_HEADER,
                Buffer::of(name.as_bytes()),
                Buffer::of(value.as_bytes()),
            );
        }
    }

    /// Whether a header entry `read_request_headers` filled is named `name`.
    pub fn names(header: &HttpHeader, name: &str) -> bool {
        if header.key_ptr.is_null() || header.key_length != name.len() {
            return false;
        }
        // SAFETY: Envoy filled the entry in this hook with a pointer into its header map and
        // the name's length; callers check names before the hook's first edit of the map, so
        // the pointer is still valid.
        let key =
            unsafe { std::slice::from_raw_parts(header.key_ptr.cast::<u8>(), header.key_length) };
        key == name.as_bytes()
    }

    /// Whether a header entry `read_request_headers` filled has the value `value`.
    pub fn has_value(header: &HttpHeader, value: &str) -> bool {
        if header.value_ptr.is_null() || header.value_length != value.len() {
            return false;
        }
        // SAFETY: as in `names`: Envoy's pointer and length, read before any edit of the map.
        let got = unsafe {
            std::slice::from_raw_parts(header.value_ptr.cast::<u8>(), header.value_length)
        };
        got == value.as_bytes()
    }

    /// The filter config's bytes, valid during `config_new`.
    pub fn config_bytes<'a>(config: Buffer) -> &'a [u8] {
        if config.ptr.is_null() || config.length == 0 {
            return &[];
        }
        // SAFETY: Envoy passes `config_new` the filter_config bytes, valid for that call; the
        // caller reads them before it returns.
        unsafe { std::slice::from_raw_parts(config.ptr.cast(), config.length) }
    }

    /// Sets a filter-state value of the stream. `filter` as above.
    pub fn set_filter_state(filter: EnvoyFilterPtr, key: &str, value: &[u8]) {
        // SAFETY: `filter` is the running hook's filter pointer; both buffers live for the call
        // and Envoy copies them.
        unsafe {
            envoy_dynamic_module_callback_http_set_filter_state_bytes(
                filter,
                Buffer::of(key.as_bytes()),
                Buffer::of(value),
            );
        }
    }

    /// Defines a counter without labels. `config` must be the config pointer of the running
    /// `config_new` hook.
    pub fn define_counter(config: EnvoyConfigPtr, name: &str) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: `config` is the running `config_new` hook's config pointer (the caller's
        // promise); the name buffer lives for the call and Envoy copies it; no labels (null,
        // 0); `id` is a live local.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_define_counter(
                config,
                Buffer::of(name.as_bytes()),
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        };
        (result == METRICS_SUCCESS).then_some(id)
    }

    /// Adds one to a counter `define_counter` returned. `filter` as above.
    pub fn increment_counter(filter: EnvoyFilterPtr, id: usize) {
        // SAFETY: `filter` is the running hook's filter pointer; `id` came from
        // `define_counter` on this filter's config; no labels (null, 0).
        unsafe {
            envoy_dynamic_module_callback_http_filter_increment_counter(
                filter,
                id,
                std::ptr::null_mut(),
                0,
                1,
            );
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    ABI_VERSION.as_ptr().cast()
}

/// The `calls` build: what each filter config makes (its filter config names the steps, as
/// words: `headers`, `state`, `counter`, `scope`; none of them: all four) and its counter id.
/// One slot per config, in a static table so that the config pointer Envoy holds is the slot's
/// address, and the hooks find the slot from it with arithmetic only. A config past the table's
/// end makes all four calls without a counter.
#[cfg(feature = "calls")]
mod calls {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    pub const HEADERS: u64 = 1;
    pub const STATE: u64 = 2;
    pub const COUNTER: u64 = 4;
    pub const SCOPE: u64 = 8;
    const ALL: u64 = HEADERS | STATE | COUNTER | SCOPE;
    /// The counter id sits above the step bits; all ones: no counter.
    const NO_COUNTER: u64 = u64::MAX >> 8;

    static SLOTS: [AtomicU64; 64] = [const { AtomicU64::new(ALL | (NO_COUNTER << 8)) }; 64];
    static NEXT: AtomicUsize = AtomicUsize::new(0);

    pub fn steps_of(config: &[u8]) -> u64 {
        let has = |word: &[u8]| config.windows(word.len()).any(|w| w == word);
        let steps = [
            (&b"headers"[..], HEADERS),
            (b"state", STATE),
            (b"counter", COUNTER),
            (b"scope", SCOPE),
        ]
        .iter()
        .filter(|(word, _)| has(word))
        .fold(0, |acc, (_, bit)| acc | bit);
        if steps == 0 {
            ALL
        } else {
            steps
        }
    }

    /// A new config's slot, as the pointer Envoy keeps.
    pub fn new_slot(steps: u64, counter: Option<usize>) -> *const std::ffi::c_void {
        let counter = counter.map_or(NO_COUNTER, |id| (id as u64).min(NO_COUNTER));
        let index = NEXT.fetch_add(1, Ordering::Relaxed);
        match SLOTS.get(index) {
            Some(slot) => {
                slot.store(steps | (counter << 8), Ordering::Relaxed);
                std::ptr::addr_of!(*slot).cast()
            }
            None => super::nothing(),
        }
    }

    /// The steps and counter of the config whose slot `ptr` is.
    pub fn of(ptr: *const std::ffi::c_void) -> (u64, Option<usize>) {
        let base = SLOTS.as_ptr() as usize;
        let index = (ptr as usize).wrapping_sub(base) / std::mem::size_of::<AtomicU64>();
        let value = SLOTS
            .get(index)
            .map_or(ALL | (NO_COUNTER << 8), |s| s.load(Ordering::Relaxed));
        let counter = value >> 8;
        (
            value & 0xff,
            (counter != NO_COUNTER).then_some(counter as usize),
        )
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config_envoy: EnvoyConfigPtr,
    _name: Buffer,
    _config: Buffer,
) -> ModulePtr {
    #[cfg(feature = "calls")]
    {
        let steps = calls::steps_of(envoy::config_bytes(_config));
        let counter = if steps & calls::COUNTER != 0 {
            envoy::define_counter(_config_envoy, "bench_calls.allowed")
        } else {
            None
        };
        return calls::new_slot(steps, counter);
    }
    #[allow(unreachable_code)]
    nothing()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(_config: ModulePtr) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    _config: ModulePtr,
    _filter_envoy: EnvoyFilterPtr,
) -> ModulePtr {
    // The `calls` build hands each stream its config's slot (no allocation per request).
    #[cfg(feature = "calls")]
    return _config;
    #[allow(unreachable_code)]
    nothing()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(_filter: ModulePtr) {}

/// keygate's default reply for INVALID_API_KEY, as `core::reply` renders it.
#[cfg(feature = "deny")]
const UNKNOWN_KEY_BODY: &[u8] = br#"{"code":"INVALID_API_KEY","message":"The API key is unknown, revoked or its secret is wrong."}"#;

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    _filter_envoy: EnvoyFilterPtr,
    _filter: ModulePtr,
    _end_of_stream: bool,
) -> u32 {
    #[cfg(feature = "deny")]
    {
        let headers = [
            HttpHeader::of("content-type", "application/json"),
            HttpHeader::of("x-keygate-code", "INVALID_API_KEY"),
            HttpHeader::of("www-authenticate", "ApiKey realm=\"keygate\""),
        ];
        envoy::send_response(_filter_envoy, 401, &headers, UNKNOWN_KEY_BODY);
        // `..._request_headers_status`: `StopIteration`.
        return 1;
    }
    #[cfg(all(feature = "calls", not(feature = "deny")))]
    {
        // keygate-native's callbacks for a valid bench key (1,000 keys, stripping off), with
        // the values it would publish for key bench-0000007: read the request headers, publish
        // the access-log entry, count, and set the three scope headers as keygate-native does:
        // added when the request lacks them, left alone when it carries them once with this
        // very value (a chain's earlier copy set them), else set (so a chain does not grow the
        // map).
        let (steps, counter) = calls::of(_filter);
        let mut headers = [HttpHeader::of("", ""); 32];
        let mut count = 0;
        if steps & calls::HEADERS != 0 {
            count = envoy::read_request_headers(_filter_envoy, &mut headers);
        }
        if steps & calls::STATE != 0 {
            envoy::set_filter_state(
                _filter_envoy,
                "wasm.keygate",
                br#"{"auth":"api_key","key_id":"bench-0000007","tenant":"tenant-7"}"#,
            );
        }
        if let Some(id) = counter {
            envoy::increment_counter(_filter_envoy, id);
        }
        if steps & calls::SCOPE != 0 {
            let scope = [
                ("x-keygate-auth", "api_key"),
                ("x-keygate-key-id", "bench-0000007"),
                ("x-keygate-tenant", "tenant-7"),
            ];
            // Which ones the request carries, all checked before the first edit: an edit may
            // free what the entries read above point to.
            let read = headers.get(..count).unwrap_or_default();
            let carried = scope.map(|(name, value)| {
                let mut named = read.iter().filter(|h| envoy::names(h, name));
                let first = named.next();
                let same =
                    first.is_some_and(|h| envoy::has_value(h, value)) && named.next().is_none();
                (first.is_some(), same)
            });
            for ((name, value), (present, same)) in scope.into_iter().zip(carried) {
                if !same {
                    envoy::write_request_header(_filter_envoy, name, value, present);
                }
            }
        }
    }
    #[allow(unreachable_code)]
    CONTINUE
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
