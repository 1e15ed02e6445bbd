//! The C ABI edge with Envoy 1.40's dynamic-module host (ABI `v0.2.0`): the hooks Envoy calls,
//! the few callbacks keygate calls, and every `unsafe` block of the native module.
//!
//! Declared by hand from `source/extensions/dynamic_modules/abi/abi.h` and checked against the
//! symbols the Envoy 1.40.0 binary exports (`nm -D`). Envoy checks neither the hooks' nor the
//! callbacks' signatures, so a new Envoy minor needs this file re-read against its header.
//!
//! Each hook runs its body under `catch_unwind`: a panic that crossed into Envoy would abort
//! the whole process. A panic while a request is being decided answers 503 KEYSET_UNAVAILABLE.

use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::core::keysource::host::CalloutError;
use crate::core::keysource::service::FetchResponse;
use crate::core::request::Headers;

use super::{FilterConfig, Stream};

// --- ABI types (abi.h "Common Types" and "HTTP Filter Types") ----------------------------------

/// `envoy_dynamic_module_type_envoy_buffer` and `_module_buffer`: a pointer and a length.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Buffer {
    ptr: *const c_char,
    length: usize,
}

impl Buffer {
    fn of(bytes: &[u8]) -> Buffer {
        Buffer {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }

    fn null() -> Buffer {
        Buffer {
            ptr: std::ptr::null(),
            length: 0,
        }
    }

    /// The bytes of an Envoy-owned buffer.
    ///
    /// # Safety
    /// `ptr` must point to `length` readable bytes that stay valid and unchanged for `'a`.
    unsafe fn bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() || self.length == 0 {
            return &[];
        }
        std::slice::from_raw_parts(self.ptr.cast(), self.length)
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
    const EMPTY: HttpHeader = HttpHeader {
        key_ptr: std::ptr::null(),
        key_length: 0,
        value_ptr: std::ptr::null(),
        value_length: 0,
    };
}

/// Request headers read through a stack array (32 bytes each); more spill to the heap.
const INLINE_HEADERS: usize = 32;

/// `envoy_dynamic_module_type_http_header_type`.
const REQUEST_HEADER: u32 = 0;
const RESPONSE_HEADER: u32 = 2;
/// `envoy_dynamic_module_type_metadata_source`.
const METADATA_DYNAMIC: u32 = 0;
const METADATA_ROUTE: u32 = 1;
/// `..._request_headers_status`: `Continue` and `StopIteration`. Every other status enum of the
/// hooks keygate does not use starts with `Continue = 0` too.
const CONTINUE: u32 = 0;
const STOP_ITERATION: u32 = 1;

/// `envoy_dynamic_module_type_log_level`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum LogLevel {
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

type EnvoyFilterPtr = *mut c_void;
type EnvoyConfigPtr = *mut c_void;
type ModuleFilterPtr = *const c_void;
type ModuleConfigPtr = *const c_void;

// --- Callbacks Envoy exports (only the ones keygate uses) --------------------------------------

extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: Buffer);
    fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;
    fn envoy_dynamic_module_callback_http_get_headers_size(
        filter: EnvoyFilterPtr,
        header_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: EnvoyFilterPtr,
        header_type: u32,
        result_headers: *mut HttpHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: EnvoyFilterPtr,
        header_type: u32,
        key: Buffer,
        value: Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_add_header(
        filter: EnvoyFilterPtr,
        header_type: u32,
        key: Buffer,
        value: Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter: EnvoyFilterPtr,
        status_code: u32,
        headers: *mut HttpHeader,
        headers_size: usize,
        body: Buffer,
        details: Buffer,
    );
    fn envoy_dynamic_module_callback_http_get_metadata_string(
        filter: EnvoyFilterPtr,
        source: u32,
        namespace: Buffer,
        key: Buffer,
        result: *mut Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_metadata_keys_count(
        filter: EnvoyFilterPtr,
        source: u32,
        namespace: Buffer,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_metadata_keys(
        filter: EnvoyFilterPtr,
        source: u32,
        namespace: Buffer,
        result: *mut Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_clear_route_cache(filter: EnvoyFilterPtr);
    fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter: EnvoyFilterPtr,
        key: Buffer,
        value: Buffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: EnvoyFilterPtr,
        callout_id: *mut u64,
        cluster_name: Buffer,
        headers: *mut HttpHeader,
        headers_size: usize,
        body: Buffer,
        timeout_milliseconds: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: EnvoyFilterPtr);
    fn envoy_dynamic_module_callback_http_filter_scheduler_new(
        filter: EnvoyFilterPtr,
    ) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        config: EnvoyConfigPtr,
    ) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: EnvoyConfigPtr,
        callout_id: *mut u64,
        cluster_name: Buffer,
        headers: *mut HttpHeader,
        headers_size: usize,
        body: Buffer,
        timeout_milliseconds: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: EnvoyConfigPtr,
        name: Buffer,
        label_names: *mut Buffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: EnvoyConfigPtr,
        name: Buffer,
        label_names: *mut Buffer,
        label_names_length: usize,
        gauge_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: EnvoyConfigPtr,
        id: usize,
        label_values: *mut Buffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config: EnvoyConfigPtr,
        id: usize,
        label_values: *mut Buffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: EnvoyFilterPtr,
        id: usize,
        label_values: *mut Buffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
}

/// `envoy_dynamic_module_type_metrics_result_Success`.
const METRICS_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_http_callout_init_result_Success` and `_http_callout_result_Success`.
const CALLOUT_SUCCESS: u32 = 0;
/// Names of `envoy_dynamic_module_type_http_callout_init_result`, in order.
const CALLOUT_INIT_ERRORS: [&str; 5] = [
    "success",
    "missing required headers",
    "cluster not found",
    "duplicate callout id",
    "cannot create request",
];

pub fn log(level: LogLevel, message: &str) {
    // SAFETY: the message buffer points into `message`, alive for the call; Envoy copies it.
    unsafe { envoy_dynamic_module_callback_log(level as u32, Buffer::of(message.as_bytes())) }
}

pub fn log_enabled(level: LogLevel) -> bool {
    // SAFETY: takes a plain integer; no pointers cross.
    unsafe { envoy_dynamic_module_callback_log_enabled(level as u32) }
}

/// The filter configuration Envoy is creating, valid during `config_new` only.
pub struct ConfigHandle(EnvoyConfigPtr);

/// Envoy's filter configuration, kept for the config's whole life: it posts work to the main
/// thread (`schedule`) and makes HTTP calls from there (`http_callout`).
pub struct MainThread {
    config: EnvoyConfigPtr,
    scheduler: *mut c_void,
}

// SAFETY: Envoy's config scheduler may be committed from any thread (abi.h: "used to dispatch
// HTTP filter configuration operations to the main thread from any thread"). The config pointer
// itself is only used by `http_callout`, which runs in the main-thread hooks.
unsafe impl Send for MainThread {}
// SAFETY: as for `Send`: the only call made from workers is the thread-safe commit.
unsafe impl Sync for MainThread {}

impl MainThread {
    /// Asks Envoy to call `on_http_filter_config_scheduled` with `event_id` on the main thread.
    pub fn schedule(&self, event_id: u64) {
        // SAFETY: `scheduler` came from `scheduler_new` and is deleted only in `Drop`, after
        // Envoy destroyed the config (no worker holds a stream of it any more).
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
                self.scheduler,
                event_id,
            )
        }
    }

    /// Adds one to a counter defined on this config. Call only from a main-thread hook.
    pub fn increment_counter(&self, id: Option<usize>) {
        self.update_metric(
            envoy_dynamic_module_callback_http_filter_config_increment_counter,
            id,
            1,
        );
    }

    /// Sets a gauge defined on this config. Call only from a main-thread hook.
    pub fn set_gauge(&self, id: Option<usize>, value: u64) {
        self.update_metric(
            envoy_dynamic_module_callback_http_filter_config_set_gauge,
            id,
            value,
        );
    }

    fn update_metric(&self, update: UpdateMetric, id: Option<usize>, value: u64) {
        let Some(id) = id else { return };
        // SAFETY: `self.config` is the live config pointer that defined `id`; no labels.
        unsafe {
            update(self.config, id, std::ptr::null_mut(), 0, value);
        }
    }
}

/// Envoy's config counter-increment and gauge-set callbacks (the same signature).
type UpdateMetric = unsafe extern "C" fn(EnvoyConfigPtr, usize, *mut Buffer, usize, u64) -> u32;

/// Where a callout goes out from: the main thread (full mode's fetches) or a stream (lookup on
/// miss). Its answer comes to that one's `callout_done` hook with the returned id.
#[derive(Clone, Copy)]
pub enum CalloutOrigin<'a> {
    /// Only from a main-thread hook; the answer comes to
    /// `on_http_filter_config_http_callout_done`.
    MainThread(&'a MainThread),
    /// From the stream's running hook; the answer comes to its `http_callout_done`.
    Stream(&'a FilterHandle),
}

impl CalloutOrigin<'_> {
    /// Sends a GET to `cluster`.
    pub fn http_callout(
        self,
        cluster: &str,
        headers: &[(&str, String)],
        timeout_ms: u64,
    ) -> Result<u64, CalloutError> {
        let (send, owner) = match self {
            CalloutOrigin::MainThread(main) => (
                envoy_dynamic_module_callback_http_filter_config_http_callout as SendCallout,
                main.config,
            ),
            CalloutOrigin::Stream(filter) => (
                envoy_dynamic_module_callback_http_filter_http_callout as SendCallout,
                filter.0,
            ),
        };
        let mut raw = module_headers(headers);
        let mut id = 0u64;
        // SAFETY: `owner` is the live pointer `send` takes, in a hook where it may call out (the
        // variant's promise); `raw`, the strings it points into and `cluster` outlive the call,
        // and Envoy copies them; `id` is a live local.
        let result = unsafe {
            send(
                owner,
                &mut id,
                Buffer::of(cluster.as_bytes()),
                raw.as_mut_ptr(),
                raw.len(),
                Buffer::null(),
                timeout_ms,
            )
        };
        callout_result(result, id, cluster)
    }
}

/// Envoy's callout callbacks, for a config or a filter (the same signature: both pointers are
/// `*mut c_void`).
type SendCallout =
    unsafe extern "C" fn(*mut c_void, *mut u64, Buffer, *mut HttpHeader, usize, Buffer, u64) -> u32;

/// Envoy's counter- and gauge-definition callbacks (the same signature).
type DefineMetric =
    unsafe extern "C" fn(EnvoyConfigPtr, Buffer, *mut Buffer, usize, *mut usize) -> u32;

impl Drop for MainThread {
    fn drop(&mut self) {
        if !self.scheduler.is_null() {
            // SAFETY: created by `scheduler_new`, deleted once here.
            unsafe {
                envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.scheduler)
            }
        }
    }
}

/// Envoy's header entries pointing into `headers`, which must outlive their use.
fn module_headers<V: AsRef<str>>(headers: &[(&str, V)]) -> Vec<HttpHeader> {
    headers
        .iter()
        .map(|(name, value)| {
            let value = value.as_ref();
            HttpHeader {
                key_ptr: name.as_ptr().cast(),
                key_length: name.len(),
                value_ptr: value.as_ptr().cast(),
                value_length: value.len(),
            }
        })
        .collect()
}

fn callout_result(result: u32, id: u64, cluster: &str) -> Result<u64, CalloutError> {
    if result == CALLOUT_SUCCESS {
        return Ok(id);
    }
    let why = usize::try_from(result)
        .ok()
        .and_then(|i| CALLOUT_INIT_ERRORS.get(i))
        .unwrap_or(&"unknown error");
    Err(CalloutError {
        cluster: cluster.to_string(),
        why: why.to_string(),
    })
}

impl ConfigHandle {
    /// Defines a gauge; `MainThread::set_gauge` sets it.
    pub fn define_gauge(&self, name: &str) -> Option<usize> {
        self.define_metric(
            envoy_dynamic_module_callback_http_filter_config_define_gauge,
            name,
        )
    }

    /// Defines a counter; its id is what `FilterHandle::increment_counter` and
    /// `MainThread::increment_counter` take.
    pub fn define_counter(&self, name: &str) -> Option<usize> {
        self.define_metric(
            envoy_dynamic_module_callback_http_filter_config_define_counter,
            name,
        )
    }

    fn define_metric(&self, define: DefineMetric, name: &str) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: `self.0` is the config pointer of the running `config_new` hook; the name
        // buffer lives for the call (Envoy copies it); no labels; `id` is a live local.
        let result = unsafe {
            define(
                self.0,
                Buffer::of(name.as_bytes()),
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        };
        (result == METRICS_SUCCESS).then_some(id)
    }

    /// Keeps what the main-thread work of this config needs after `config_new` returns.
    pub fn main_thread(&self) -> MainThread {
        // SAFETY: `self.0` is the config pointer of the running `config_new` hook.
        let scheduler =
            unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.0) };
        MainThread {
            config: self.0,
            scheduler,
        }
    }
}

/// One stream's Envoy filter, valid during the hook that received it.
pub struct FilterHandle(EnvoyFilterPtr);

impl FilterHandle {
    /// The request headers, copied into one buffer the core reads by ranges. Envoy's header
    /// views go into a stack array when they fit (most requests), so reading costs one
    /// allocation for the bytes and one for the core's ranges.
    pub fn request_headers(&self) -> Headers {
        // SAFETY: `self.0` is the filter pointer of the running hook.
        let count =
            unsafe { envoy_dynamic_module_callback_http_get_headers_size(self.0, REQUEST_HEADER) };
        if count == 0 {
            return Headers::default();
        }
        let mut inline = [HttpHeader::EMPTY; INLINE_HEADERS];
        let mut spilled = Vec::new();
        let raw: &mut [HttpHeader] = match inline.get_mut(..count) {
            Some(inline) => inline,
            None => {
                spilled.resize(count, HttpHeader::EMPTY);
                &mut spilled
            }
        };
        // SAFETY: `raw` holds `count` entries, the number Envoy just reported for this map, and
        // nothing changes the map between the two calls (same hook, same thread).
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_headers(self.0, REQUEST_HEADER, raw.as_mut_ptr())
        };
        if !ok {
            return Headers::default();
        }
        let total: usize = raw.iter().map(|h| h.key_length + h.value_length).sum();
        let mut bytes = Vec::with_capacity(total);
        for header in raw.iter_mut() {
            // SAFETY: Envoy filled each entry with pointers into its header map, valid until
            // this hook returns or a header is set; both happen after this copy.
            let (name, value) = unsafe {
                (
                    Buffer {
                        ptr: header.key_ptr,
                        length: header.key_length,
                    }
                    .bytes(),
                    Buffer {
                        ptr: header.value_ptr,
                        length: header.value_length,
                    }
                    .bytes(),
                )
            };
            bytes.extend_from_slice(name);
            bytes.extend_from_slice(value);
            // The ranges below are laid out from these lengths: make them the copied ones (a
            // null pointer reads as empty).
            header.key_length = name.len();
            header.value_length = value.len();
        }
        let mut end = 0;
        let ranges = raw.iter().map(|header| {
            let name_start = end;
            let value_start = name_start + header.key_length;
            end = value_start + header.value_length;
            [name_start, value_start, value_start, end]
        });
        Headers::from_buffer(bytes, ranges)
    }

    fn set_header(&self, header_type: u32, name: &str, value: Option<&str>) {
        let value = value.map_or(Buffer::null(), |v| Buffer::of(v.as_bytes()));
        // SAFETY: `self.0` is the filter pointer of the running hook; both buffers live for the
        // call and Envoy copies them; a null value buffer asks Envoy to remove the header.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.0,
                header_type,
                Buffer::of(name.as_bytes()),
                value,
            );
        }
    }

    /// Sets a request header, or removes it when `value` is `None`.
    pub fn set_request_header(&self, name: &str, value: Option<&str>) {
        self.set_header(REQUEST_HEADER, name, value);
    }

    /// Adds a request header next to any of the same name. Cheaper than a set, which first
    /// scans Envoy's header map to remove the old values: for a header the request lacks.
    pub fn add_request_header(&self, name: &str, value: &str) {
        // SAFETY: `self.0` is the filter pointer of the running hook; both buffers live for the
        // call and Envoy copies them.
        unsafe {
            envoy_dynamic_module_callback_http_add_header(
                self.0,
                REQUEST_HEADER,
                Buffer::of(name.as_bytes()),
                Buffer::of(value.as_bytes()),
            );
        }
    }

    pub fn set_response_header(&self, name: &str, value: &str) {
        self.set_header(RESPONSE_HEADER, name, Some(value));
    }

    /// Answers the request locally.
    pub fn send_response(&self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let mut raw = module_headers(headers);
        // SAFETY: `self.0` is the filter pointer of the running hook; `raw`, its strings and
        // `body` outlive the call and Envoy copies them; null details are allowed.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.0,
                status,
                raw.as_mut_ptr(),
                raw.len(),
                Buffer::of(body),
                Buffer::null(),
            );
        }
    }

    /// A string value of the route's metadata (`filter_metadata[namespace][key]`).
    pub fn route_metadata_string(&self, namespace: &str, key: &str) -> Option<String> {
        let mut result = Buffer::null();
        // SAFETY: `self.0` is the filter pointer of the running hook; the name buffers live for
        // the call; on success `result` points into the route's metadata, alive for the hook,
        // and is copied before the hook goes on.
        unsafe {
            let found = envoy_dynamic_module_callback_http_get_metadata_string(
                self.0,
                METADATA_ROUTE,
                Buffer::of(namespace.as_bytes()),
                Buffer::of(key.as_bytes()),
                &mut result,
            );
            found.then(|| String::from_utf8_lossy(result.bytes()).into_owned())
        }
    }

    /// The top-level keys of one namespace of the stream's dynamic metadata.
    pub fn dynamic_metadata_keys(&self, namespace: &str) -> Vec<String> {
        let ns = Buffer::of(namespace.as_bytes());
        // SAFETY: `self.0` is the filter pointer of the running hook; `ns` lives for the call.
        let count = unsafe {
            envoy_dynamic_module_callback_http_get_metadata_keys_count(self.0, METADATA_DYNAMIC, ns)
        };
        if count == 0 {
            return Vec::new();
        }
        let mut keys = vec![Buffer::null(); count];
        // SAFETY: `keys` holds the `count` entries Envoy just reported for this namespace, which
        // nothing changes in between; each filled entry points into the metadata, alive for the
        // hook, and is copied right away.
        unsafe {
            if !envoy_dynamic_module_callback_http_get_metadata_keys(
                self.0,
                METADATA_DYNAMIC,
                ns,
                keys.as_mut_ptr(),
            ) {
                return Vec::new();
            }
            keys.iter()
                .map(|k| String::from_utf8_lossy(k.bytes()).into_owned())
                .collect()
        }
    }

    /// Resumes a request paused by `request_headers` returning StopIteration.
    pub fn continue_decoding(&self) {
        // SAFETY: `self.0` is the filter pointer of the running hook.
        unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(self.0) }
    }

    /// A handle that wakes this stream on its own worker from any thread (`None`: Envoy gave
    /// no scheduler).
    pub fn waker(&self) -> Option<StreamWaker> {
        // SAFETY: `self.0` is the filter pointer of the running hook; the scheduler Envoy returns
        // is owned by the `StreamWaker` and deleted once, in its `Drop`.
        let scheduler = unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(self.0) };
        (!scheduler.is_null()).then_some(StreamWaker { scheduler })
    }

    /// Stores `value` as the stream's filter state `key` (a string Envoy's access log prints
    /// with `%FILTER_STATE(key:PLAIN)%`).
    pub fn set_filter_state(&self, key: &str, value: &[u8]) {
        // SAFETY: `self.0` is the filter pointer of the running hook; both buffers are live
        // for the whole call and Envoy copies them before it returns.
        let _ = unsafe {
            envoy_dynamic_module_callback_http_set_filter_state_bytes(
                self.0,
                Buffer::of(key.as_bytes()),
                Buffer::of(value),
            )
        };
    }

    pub fn clear_route_cache(&self) {
        // SAFETY: `self.0` is the filter pointer of the running hook.
        unsafe { envoy_dynamic_module_callback_http_clear_route_cache(self.0) }
    }

    pub fn increment_counter(&self, id: usize) {
        // SAFETY: `self.0` is the filter pointer of the running hook, created from the config
        // that defined `id`; no labels.
        unsafe {
            envoy_dynamic_module_callback_http_filter_increment_counter(
                self.0,
                id,
                std::ptr::null_mut(),
                0,
                1,
            );
        }
    }
}

/// Wakes one stream: Envoy calls `on_http_filter_scheduled` on the stream's worker, or drops the
/// event if the stream is gone by then.
pub struct StreamWaker {
    scheduler: *mut c_void,
}

// SAFETY: Envoy's filter scheduler may be committed and deleted from any thread (abi.h: it
// dispatches to the stream's worker thread; it holds a weak reference to the filter and its
// dispatcher, not the filter itself), so a waker may be handed to the worker whose lookup answers.
unsafe impl Send for StreamWaker {}

impl StreamWaker {
    pub fn wake(self, event_id: u64) {
        // SAFETY: `scheduler` came from `scheduler_new` and is deleted only in `Drop`, after this.
        unsafe {
            envoy_dynamic_module_callback_http_filter_scheduler_commit(self.scheduler, event_id)
        }
    }
}

impl Drop for StreamWaker {
    fn drop(&mut self) {
        // SAFETY: created by `scheduler_new`, deleted once here; an event committed before is
        // still delivered (Envoy's posted callback holds its own weak reference to the filter).
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(self.scheduler) }
    }
}

// --- Hooks Envoy calls -------------------------------------------------------------------------

/// Envoy 1.40 logs a warning, and still loads the module, when this differs from its own.
const ABI_VERSION: &[u8] = b"v0.2.0\0";

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    ABI_VERSION.as_ptr().cast()
}

/// The filter configuration as the module holds it: boxed so its address is stable.
type ConfigBox = Box<FilterConfig>;

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: EnvoyConfigPtr,
    _name: Buffer,
    config: Buffer,
) -> ModuleConfigPtr {
    // SAFETY: Envoy passes the filter_config bytes, valid for this call; they are parsed (copied)
    // before it returns.
    let bytes = unsafe { config.bytes() };
    let handle = ConfigHandle(config_envoy);
    match catch_unwind(AssertUnwindSafe(|| super::config_new(&handle, bytes))) {
        Ok(Some(config)) => Box::into_raw(ConfigBox::new(config)) as ModuleConfigPtr,
        Ok(None) => std::ptr::null(),
        Err(_) => {
            log(
                LogLevel::Critical,
                "keygate: configuration: internal error (panic); configuration refused",
            );
            std::ptr::null()
        }
    }
}

/// Frees what a `Box::into_raw` handed Envoy, under a guard: a panicking `Drop` must not
/// unwind into Envoy.
///
/// # Safety
/// `ptr` must be null or come from `Box::<T>::into_raw`, and be given back only once.
unsafe fn drop_boxed<T>(ptr: *const c_void) {
    if ptr.is_null() {
        return;
    }
    // SAFETY: the caller's promise: a pointer from `Box::<T>::into_raw`, given back once.
    let boxed = unsafe { Box::from_raw(ptr as *mut T) };
    let _ = catch_unwind(AssertUnwindSafe(move || drop(boxed)));
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ModuleConfigPtr) {
    // SAFETY: `config` is null or came from `Box::into_raw` in `config_new`, and Envoy destroys
    // each config once, after every filter made from it.
    unsafe { drop_boxed::<FilterConfig>(config) }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: ModuleConfigPtr,
    _filter_envoy: EnvoyFilterPtr,
) -> ModuleFilterPtr {
    if config.is_null() {
        return std::ptr::null();
    }
    // SAFETY: `config` is a live pointer from `config_new`: Envoy keeps the config alive while
    // it creates filters from it. `FilterConfig` is `Sync`, and this is a shared borrow.
    let config = unsafe { &*(config as *const FilterConfig) };
    match catch_unwind(AssertUnwindSafe(|| Box::new(super::stream_new(config)))) {
        Ok(stream) => Box::into_raw(stream) as ModuleFilterPtr,
        Err(_) => std::ptr::null(),
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(stream: ModuleFilterPtr) {
    // SAFETY: `stream` is null or came from `Box::into_raw` in `filter_new`; Envoy destroys it
    // once and calls no other hook for it afterwards.
    unsafe { drop_boxed::<Stream>(stream) }
}

/// Borrows the stream a hook is for. Only shared borrows are made: sending a local reply runs
/// this filter's response hooks re-entrantly, so `Stream` keeps its mutable parts in cells.
///
/// # Safety
/// `stream` must be null or a live pointer from `filter_new` (Envoy calls hooks only between
/// `filter_new` and `filter_destroy`, on the stream's own worker thread).
unsafe fn stream_ref<'a>(stream: ModuleFilterPtr) -> Option<&'a Stream> {
    (stream as *const Stream).as_ref()
}

/// Runs a later hook of a stream (not its request hook) under a guard: after a panic the
/// request fails closed (`on_panic`) unless it was answered already. No stream: nothing to do.
fn guard_stream_hook(
    filter: FilterHandle,
    stream: Option<&Stream>,
    hook: impl FnOnce(&FilterHandle, &Stream),
) {
    let Some(stream) = stream else {
        return;
    };
    if catch_unwind(AssertUnwindSafe(|| hook(&filter, stream))).is_err() {
        let _ = catch_unwind(AssertUnwindSafe(|| super::on_panic(&filter, stream)));
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy: EnvoyFilterPtr,
    stream: ModuleFilterPtr,
    _end_of_stream: bool,
) -> u32 {
    let filter = FilterHandle(filter_envoy);
    // SAFETY: see `stream_ref`; the pointer is the one Envoy got from `filter_new`.
    let Some(stream) = (unsafe { stream_ref(stream) }) else {
        // No stream state (`filter_new` failed): fail closed.
        let _ = catch_unwind(AssertUnwindSafe(|| super::send_unconfigured_reply(&filter)));
        return STOP_ITERATION;
    };
    match catch_unwind(AssertUnwindSafe(|| {
        super::on_request_headers(&filter, stream)
    })) {
        Ok(true) => CONTINUE,
        Ok(false) => STOP_ITERATION,
        Err(_) => {
            // Fail closed. The reply is prepared at configure time, so this path allocates
            // little and is very unlikely to panic again; if it does, the stream just stays
            // stopped rather than taking Envoy down.
            let _ = catch_unwind(AssertUnwindSafe(|| super::on_panic(&filter, stream)));
            STOP_ITERATION
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter_envoy: EnvoyFilterPtr,
    stream: ModuleFilterPtr,
    _end_of_stream: bool,
) -> u32 {
    let filter = FilterHandle(filter_envoy);
    // SAFETY: see `stream_ref`.
    if let Some(stream) = unsafe { stream_ref(stream) } {
        // A panic here only loses the RateLimit-* headers; the decision was made already.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            super::on_response_headers(&filter, stream)
        }));
    }
    CONTINUE
}

/// On the stream's worker: the lookup this stream waited for has answered.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    filter_envoy: EnvoyFilterPtr,
    stream: ModuleFilterPtr,
    event_id: u64,
) {
    // SAFETY: see `stream_ref`.
    let stream = unsafe { stream_ref(stream) };
    guard_stream_hook(FilterHandle(filter_envoy), stream, |filter, stream| {
        super::on_stream_scheduled(filter, stream, event_id)
    });
}

// Hooks Envoy 1.40 requires every module to export; keygate does nothing in them. Their bodies
// cannot panic, so they need no guard.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _filter_envoy: EnvoyFilterPtr,
    _stream: ModuleFilterPtr,
    _end_of_stream: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    _filter_envoy: EnvoyFilterPtr,
    _stream: ModuleFilterPtr,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _filter_envoy: EnvoyFilterPtr,
    _stream: ModuleFilterPtr,
    _end_of_stream: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _filter_envoy: EnvoyFilterPtr,
    _stream: ModuleFilterPtr,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter_envoy: EnvoyFilterPtr,
    _stream: ModuleFilterPtr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _filter_envoy: EnvoyFilterPtr,
    _stream: ModuleFilterPtr,
    _response_code: u32,
    _details: Buffer,
    _reset_imminent: bool,
) -> u32 {
    CONTINUE
}

/// Status, ETag, `content-range` and body of a callout's answer; no status when there was none.
///
/// # Safety
/// `headers` and `body_chunks` must be null or point to `headers_size` headers and
/// `body_chunks_size` buffers owned by Envoy, valid for the running hook.
unsafe fn fetch_response(
    result: u32,
    headers: *const HttpHeader,
    headers_size: usize,
    body_chunks: *const Buffer,
    body_chunks_size: usize,
) -> FetchResponse {
    let mut response = FetchResponse::default();
    if result != CALLOUT_SUCCESS {
        return response;
    }
    if !headers.is_null() {
        for h in std::slice::from_raw_parts(headers, headers_size) {
            let name = Buffer {
                ptr: h.key_ptr,
                length: h.key_length,
            }
            .bytes();
            let value = Buffer {
                ptr: h.value_ptr,
                length: h.value_length,
            }
            .bytes();
            let value = String::from_utf8_lossy(value);
            match name {
                b":status" => response.status = value.parse().ok(),
                b"etag" => response.etag = Some(value.into_owned()),
                b"content-range" => response.content_range = Some(value.into_owned()),
                _ => {}
            }
        }
    }
    if !body_chunks.is_null() {
        for chunk in std::slice::from_raw_parts(body_chunks, body_chunks_size) {
            response.body.extend_from_slice(chunk.bytes());
        }
    }
    response
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    filter_envoy: EnvoyFilterPtr,
    stream: ModuleFilterPtr,
    callout_id: u64,
    result: u32,
    headers: *mut HttpHeader,
    headers_size: usize,
    body_chunks: *mut Buffer,
    body_chunks_size: usize,
) {
    // SAFETY: see `stream_ref`.
    let stream = unsafe { stream_ref(stream) };
    guard_stream_hook(FilterHandle(filter_envoy), stream, |filter, stream| {
        // SAFETY: Envoy passes the answer's headers and body chunks with their counts,
        // owned by Envoy and valid until this hook returns (null when there was no answer).
        let response =
            unsafe { fetch_response(result, headers, headers_size, body_chunks, body_chunks_size) };
        super::on_callout_done(filter, stream, callout_id, response)
    });
}

/// Borrows the config a main-thread hook is for.
///
/// # Safety
/// `config` must be null or a live pointer from `config_new` (Envoy calls the config's hooks
/// only before `config_destroy`).
unsafe fn config_ref<'a>(config: ModuleConfigPtr) -> Option<&'a FilterConfig> {
    (config as *const FilterConfig).as_ref()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _config_envoy: EnvoyConfigPtr,
    config: ModuleConfigPtr,
    event_id: u64,
) {
    // SAFETY: see `config_ref`.
    if let Some(config) = unsafe { config_ref(config) } {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            super::on_config_scheduled(config, event_id)
        }));
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _config_envoy: EnvoyConfigPtr,
    config: ModuleConfigPtr,
    callout_id: u64,
    result: u32,
    headers: *mut HttpHeader,
    headers_size: usize,
    body_chunks: *mut Buffer,
    body_chunks_size: usize,
) {
    // SAFETY: see `config_ref`.
    let Some(config) = (unsafe { config_ref(config) }) else {
        return;
    };
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `on_http_filter_http_callout_done`.
        let response =
            unsafe { fetch_response(result, headers, headers_size, body_chunks, body_chunks_size) };
        super::on_fetch_done(config, callout_id, response)
    }));
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter_envoy: EnvoyFilterPtr,
    _stream: ModuleFilterPtr,
    _stream_id: u64,
    _headers: *mut HttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter_envoy: EnvoyFilterPtr,
    _stream: ModuleFilterPtr,
    _stream_id: u64,
    _data: *const Buffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter_envoy: EnvoyFilterPtr,
    _stream: ModuleFilterPtr,
    _stream_id: u64,
    _trailers: *mut HttpHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter_envoy: EnvoyFilterPtr,
    _stream: ModuleFilterPtr,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter_envoy: EnvoyFilterPtr,
    _stream: ModuleFilterPtr,
    _stream_id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter_envoy: EnvoyFilterPtr,
    _stream: ModuleFilterPtr,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter_envoy: EnvoyFilterPtr,
    _stream: ModuleFilterPtr,
) {
}
