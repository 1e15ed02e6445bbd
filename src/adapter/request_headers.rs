//! Reads the request headers in one host call and keeps the host's buffer as it came.
//!
//! The SDK's `get_map_bytes` copies every name into a `String` and every value into a `Vec`:
//! two allocations per header on every request. Here the serialized map the host wrote into
//! the VM stays one buffer, and the core reads names and values as ranges of it.

use proxy_wasm::types::{MapType, Status};

use crate::core::request::Headers;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
}

/// The request headers, or none if the host has none to give.
pub fn read() -> Headers {
    let Some(bytes) = header_map_bytes(MapType::HttpRequestHeaders) else {
        return Headers::default();
    };
    let ranges = pair_ranges(&bytes);
    Headers::from_buffer(bytes, ranges)
}

fn header_map_bytes(map_type: MapType) -> Option<Vec<u8>> {
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

/// Name and value ranges of the proxy-wasm serialized map: a little-endian `u32` count, then a
/// `u32` name length and value length per pair, then each name and value followed by a NUL.
/// A malformed buffer yields the pairs read before the fault.
fn pair_ranges(bytes: &[u8]) -> Vec<[usize; 4]> {
    let word = |at: usize| -> Option<usize> {
        let le: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(le)).ok()
    };
    let Some(count) = word(0) else {
        return Vec::new();
    };
    let mut ranges = Vec::with_capacity(count.min(bytes.len() / 8));
    let mut data = count.saturating_mul(8).saturating_add(4);
    for i in 0..count {
        let lengths = i
            .checked_mul(8)
            .and_then(|at| Some((word(at + 4)?, word(at + 8)?)));
        let Some((name_len, value_len)) = lengths else {
            break;
        };
        let name = data;
        let Some(value) = name.checked_add(name_len).and_then(|n| n.checked_add(1)) else {
            break;
        };
        match value.checked_add(value_len).and_then(|v| v.checked_add(1)) {
            Some(next) if next <= bytes.len() => data = next,
            _ => break,
        }
        ranges.push([name, name + name_len, value, value + value_len]);
    }
    ranges
}
