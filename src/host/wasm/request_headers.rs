//! Reads the request headers in one host call and keeps the host's buffer as it came.
//!
//! The SDK's `get_map_bytes` copies every name into a `String` and every value into a `Vec`:
//! two allocations per header on every request. Here the serialized map the host wrote into
//! the VM stays one buffer, and the core reads names and values as ranges of it.

use proxy_wasm::types::MapType;

use super::raw::header_map_bytes;

use crate::core::request::Headers;

/// The request headers, or none if the host has none to give.
pub fn read() -> Headers {
    let Some(bytes) = header_map_bytes(MapType::HttpRequestHeaders) else {
        return Headers::default();
    };
    let ranges = pair_ranges(&bytes);
    Headers::from_buffer(bytes, ranges)
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
