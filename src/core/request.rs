//! The read-only view of one request that the core decides on. The adapter fills it from the host.

/// What Envoy's `jwt_authn` filter (placed before keygate) concluded about the session cookie.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SessionEvidence {
    /// No session verification ran or nothing was recorded.
    #[default]
    Absent,
    /// A verified session; the subject claim when there is one.
    Verified { subject: Option<String> },
    /// Verification failed; `expired` when the token's lifetime was the reason.
    Failed { expired: bool },
}

/// The request's headers in one buffer, each name and value a byte range of it. The adapter
/// hands over the host's serialized header map as it came, so reading a request costs one
/// allocation for the buffer and one for the ranges, not two per header.
#[derive(Debug, Clone, Default)]
pub struct Headers {
    bytes: Vec<u8>,
    spans: Vec<Span>,
}

/// Where one header's name and value lie in `Headers::bytes` (start and end offsets).
#[derive(Debug, Clone, Copy)]
struct Span {
    name: (u32, u32),
    value: (u32, u32),
}

impl Headers {
    /// Headers over `bytes`, one `[name start, name end, value start, value end]` per header.
    /// A range that is reversed or outside the buffer is dropped rather than trusted.
    pub fn from_buffer(bytes: Vec<u8>, ranges: impl IntoIterator<Item = [usize; 4]>) -> Headers {
        let in_bounds = |start: usize, end: usize| start <= end && end <= bytes.len();
        let offset = |n: usize| u32::try_from(n).ok();
        let ranges = ranges.into_iter();
        // Sized once: the filter below hides the count from `collect`, which would grow the
        // vector from 4 entries (two reallocations for a typical request).
        let (fewest, most) = ranges.size_hint();
        let mut spans = Vec::with_capacity(most.unwrap_or(fewest));
        spans.extend(
            ranges
                .filter(|[ns, ne, vs, ve]| in_bounds(*ns, *ne) && in_bounds(*vs, *ve))
                .filter_map(|[ns, ne, vs, ve]| {
                    Some(Span {
                        name: (offset(ns)?, offset(ne)?),
                        value: (offset(vs)?, offset(ve)?),
                    })
                }),
        );
        Headers { bytes, spans }
    }

    /// Appends one header.
    pub fn push(&mut self, name: &str, value: &[u8]) {
        let mut range = |part: &[u8]| -> Option<(u32, u32)> {
            let start = u32::try_from(self.bytes.len()).ok()?;
            self.bytes.extend_from_slice(part);
            Some((start, u32::try_from(self.bytes.len()).ok()?))
        };
        if let (Some(name), Some(value)) = (range(name.as_bytes()), range(value)) {
            self.spans.push(Span { name, value });
        }
    }

    /// Every header as (name, value), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let part = |(start, end): (u32, u32)| self.bytes.get(start as usize..end as usize);
        self.spans
            .iter()
            .filter_map(move |s| Some((part(s.name)?, part(s.value)?)))
    }

    /// Every header name, in order (a repeated header yields its name again).
    pub fn names(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.spans
            .iter()
            .filter_map(|s| self.bytes.get(s.name.0 as usize..s.name.1 as usize))
    }

    /// Every value of the header `name` (ASCII case ignored), in order. A header whose name has
    /// another length is passed over without reading its bytes: most lookups are misses.
    pub fn values<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        let part = |(start, end): (u32, u32)| self.bytes.get(start as usize..end as usize);
        self.spans
            .iter()
            .filter(move |s| (s.name.1.wrapping_sub(s.name.0)) as usize == name.len())
            .filter(move |s| part(s.name).is_some_and(|n| n.eq_ignore_ascii_case(name)))
            .filter_map(move |s| part(s.value))
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(pairs: I) -> Headers {
        let mut headers = Headers::default();
        for (name, value) in pairs {
            headers.push(name.as_ref(), value.as_ref());
        }
        headers
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>> From<Vec<(N, V)>> for Headers {
    fn from(pairs: Vec<(N, V)>) -> Headers {
        pairs.into_iter().collect()
    }
}

/// One request as the core sees it. Header names are lower case (Envoy normalizes them).
#[derive(Debug, Clone, Default)]
pub struct RequestView {
    pub headers: Headers,
    /// Seconds since the Unix epoch, from the host clock. Only key validity windows read it, so
    /// the adapter leaves it 0 when no key has one (and reads the clock otherwise).
    pub now: i64,
    /// The policy name the matched route carries in `filter_metadata.keygate.policy`.
    pub route_policy: Option<String>,
    pub session: SessionEvidence,
}

impl RequestView {
    /// Every value of a header, in order (a repeated header yields several values).
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers.values(name.as_bytes())
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.header_values(name).next().is_some()
    }

    /// The first value of a header as text, if it is valid UTF-8.
    pub fn header_str<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.header_values(name)
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn method(&self) -> &str {
        self.header_str(":method").unwrap_or("")
    }

    pub fn path_with_query(&self) -> &str {
        self.header_str(":path").unwrap_or("")
    }

    pub fn path(&self) -> &str {
        let p = self.path_with_query();
        p.split_once('?').map_or(p, |(path, _)| path)
    }

    /// Decoded values of a query parameter. `None` inside the iterator marks a value that is not
    /// valid UTF-8 after percent-decoding.
    pub fn query_values(&self, param: &str) -> Vec<Option<String>> {
        let Some((_, query)) = self.path_with_query().split_once('?') else {
            return Vec::new();
        };
        let query = query.split_once('#').map_or(query, |(q, _)| q);
        query
            .split('&')
            .filter_map(|pair| {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(name).as_deref() == Some(param)).then(|| percent_decode(value))
            })
            .collect()
    }

    /// Values of a cookie across every `cookie` header.
    pub fn cookie_values(&self, cookie: &str) -> Vec<&[u8]> {
        let mut out = Vec::new();
        for header in self.header_values("cookie") {
            for part in header.split(|b| *b == b';') {
                let mut name_and_value = trim_ascii(part).splitn(2, |b| *b == b'=');
                if let (Some(name), Some(value)) = (name_and_value.next(), name_and_value.next()) {
                    if name == cookie.as_bytes() {
                        out.push(trim_ascii(value));
                    }
                }
            }
        }
        out
    }
}

pub fn trim_ascii(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// Decodes `%XX` escapes and `+` in a query component; `None` if the result is not UTF-8 or an
/// escape is broken.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        match byte {
            b'%' => {
                let hex = text.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::test_support::request_with as view;

    #[test]
    fn query_values_are_percent_decoded_by_name() {
        let req = view(&[(
            ":path",
            "/p?organization%49d=org%2D1&x=1&organizationId=b+c",
        )]);
        assert_eq!(
            req.query_values("organizationId"),
            vec![Some("org-1".to_string()), Some("b c".to_string())]
        );
        assert_eq!(req.path(), "/p");
    }

    #[test]
    fn cookies_are_found_across_headers() {
        let req = view(&[("cookie", "a=1; accessToken=xyz"), ("cookie", "b=2")]);
        assert_eq!(req.cookie_values("accessToken"), vec![b"xyz".as_slice()]);
        assert!(req.cookie_values("zzz").is_empty());
    }

    #[test]
    fn malformed_cookies_and_escapes_are_skipped_without_panicking() {
        let req = view(&[(
            "cookie",
            "=; ==x; a; ;accessToken; accessToken==v; =accessToken",
        )]);
        assert_eq!(req.cookie_values("accessToken"), vec![b"=v".as_slice()]);
        for broken in ["%", "%4", "a%", "%\u{e9}1", "%1\u{e9}", "%zz", "%ff"] {
            assert_eq!(percent_decode(broken), None, "{broken:?}");
        }
        assert_eq!(
            percent_decode("%41+%e2%82%ac").as_deref(),
            Some("A \u{20ac}")
        );
    }

    #[test]
    fn headers_over_one_buffer_drop_ranges_outside_it() {
        let bytes = b"x-api-keyk1:pathy".to_vec();
        let headers = Headers::from_buffer(
            bytes,
            [
                [0, 9, 9, 11],
                [11, 16, 16, 17],
                [16, 17, 12, 99],
                [5, 2, 0, 1],
            ],
        );
        let got: Vec<_> = headers.iter().collect();
        assert_eq!(
            got,
            vec![
                (b"x-api-key".as_slice(), b"k1".as_slice()),
                (b":path".as_slice(), b"y".as_slice())
            ]
        );
        let req = RequestView {
            headers,
            ..Default::default()
        };
        assert_eq!(req.header_str("x-api-key"), Some("k1"));
        assert_eq!(req.path(), "y");
    }

    #[test]
    fn header_lookup_ignores_case() {
        let req = view(&[("X-Api-Key", "v")]);
        assert_eq!(req.header_str("x-api-key"), Some("v"));
    }

    #[test]
    fn header_values_are_every_value_of_that_name_only_in_order() {
        let req = view(&[
            ("x-api-key", "a"),
            ("x-api-keys", "not this one"),
            ("x-api-ke", "nor this"),
            ("X-API-KEY", "b"),
            ("x-api-kez", "nor this"),
        ]);
        let got: Vec<_> = req.header_values("x-api-key").collect();
        assert_eq!(got, vec![b"a".as_slice(), b"b".as_slice()]);
        assert!(!req.has_header("x-api-k"));
        assert!(!req.has_header(""));
    }
}
