//! The raw proxy-wasm host calls the SDK wraps at a cost keygate avoids on the request path
//! (a copy per header, a new buffer per reply or property). All of the wasm host's `unsafe`
//! is here, each block with the reason it is sound.

use proxy_wasm::types::{MapType, Status};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> Status;
}

/// The serialized header map as the host wrote it, owned by this VM; none if the host has
/// none to give.
pub fn header_map_bytes(map_type: MapType) -> Option<Vec<u8>> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: on success the host wrote a pointer to `size` bytes it allocated through the SDK's
    // `proxy_on_memory_allocate` (a boxed slice of exactly `size` bytes), which this VM now owns;
    // the SDK's own `get_map_bytes` takes ownership the same way.
    unsafe {
        match proxy_get_header_map_pairs(map_type, &mut data, &mut size) {
            Status::Ok if !data.is_null() => Some(Vec::from_raw_parts(data, size, size)),
            _ => None,
        }
    }
}

/// Sets the property `path` (Envoy stores it as filter state `wasm.<path>`).
pub fn set_property(path: &[u8], value: &[u8]) {
    // SAFETY: both pointers refer to live buffers of the given sizes for the whole call; the
    // host only reads them.
    let _ = unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) };
}

/// Sends a local reply whose headers are already in the proxy-wasm map encoding.
pub fn send_local_response(status: u32, serialized_headers: &[u8], body: &[u8]) {
    // SAFETY: every pointer refers to a live buffer of the given size for the whole call; the
    // host only reads them (no details string: a null pointer with size 0).
    let _ = unsafe {
        proxy_send_local_response(
            status,
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            serialized_headers.as_ptr(),
            serialized_headers.len(),
            -1,
        )
    };
}
