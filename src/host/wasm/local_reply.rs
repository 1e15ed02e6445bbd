//! Local replies from header maps serialized once, at configure time: a denial then costs one
//! host call and no allocation for its headers (the SDK's `send_http_response` serializes the
//! pairs into a new buffer on every call).

use std::collections::HashMap;

use super::raw;
use crate::core::codes::ErrorCode;
use crate::core::reply::{LocalReply, Replies};

/// Each code's reply headers in the proxy-wasm map encoding.
#[derive(Default)]
pub struct PreparedHeaders {
    by_code: HashMap<ErrorCode, Vec<u8>>,
}

impl PreparedHeaders {
    pub fn prepare(replies: &Replies) -> PreparedHeaders {
        let by_code = ErrorCode::ALL
            .iter()
            .filter_map(|code| {
                let reply = replies.rendered(*code)?;
                Some((*code, serialize(pairs(reply))))
            })
            .collect();
        PreparedHeaders { by_code }
    }

    pub fn get(&self, code: ErrorCode) -> Option<&[u8]> {
        self.by_code.get(&code).map(Vec::as_slice)
    }
}

pub fn pairs(reply: &LocalReply) -> impl Iterator<Item = (&str, &str)> + Clone {
    reply.headers.iter().map(|(n, v)| (*n, v.as_str()))
}

/// The proxy-wasm map encoding: a little-endian `u32` count, a `u32` name and value length per
/// pair, then each name and value followed by a NUL.
pub fn serialize<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)> + Clone) -> Vec<u8> {
    let (count, bytes) = pairs.clone().fold((0usize, 0usize), |(n, b), (k, v)| {
        (n + 1, b + k.len() + v.len() + 2)
    });
    let mut out = Vec::with_capacity(4 + count * 8 + bytes);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for (name, value) in pairs.clone() {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    }
    for (name, value) in pairs {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

pub fn send(status: u32, serialized_headers: &[u8], body: &[u8]) {
    raw::send_local_response(status, serialized_headers, body);
}
