//! Key-set documents fetched in parts. A single HTTP answer of a hundred megabytes never reaches
//! the filter (Envoy resets a callout long before that), so full mode asks for the document in
//! ranges of `PART_BYTES` (`Range: bytes=a-b`, which nginx, S3 and CDNs all serve) and puts the
//! parts together before validating the whole. A server that ignores `Range` answers 200 with the
//! whole document, exactly as before. A part that gets no answer is asked for again on its own; a
//! document that changes between parts (another ETag or size) fails this fetch, and the next
//! period starts over.

use super::service::FetchResponse;

/// Bytes asked for per request: far below any callout limit, few enough requests for 1M keys.
pub const PART_BYTES: u64 = 8 * 1024 * 1024;
/// The largest document put together (the set is validated as a whole, in one VM's memory).
pub const MAX_DOCUMENT_BYTES: u64 = 512 * 1024 * 1024;
/// Tries of one part that gets no answer, before the fetch fails.
const PART_TRIES: u32 = 3;

/// The `range` header asking for the part that starts at `offset`.
pub fn range_header(offset: u64) -> (&'static str, String) {
    (
        "range",
        format!("bytes={offset}-{}", offset + PART_BYTES - 1),
    )
}

/// What the fetcher does after an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum PartStep {
    /// Ask for the part starting at `offset` (the next one, or the same one again).
    Fetch { offset: u64 },
    /// The answer to judge as one fetch: the whole document as a 200, or a 304 / error as is.
    Complete(FetchResponse),
    /// The fetch failed in the middle of its parts.
    Failed(PartError),
}

/// Why a document fetched in parts could not be put together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartError {
    /// A 206 without a `content-range` of the form `bytes start-end/total`.
    NoContentRange,
    TooLarge {
        total: u64,
    },
    /// The first answer is not the range asked for.
    FirstPartRange {
        start: u64,
        end: u64,
    },
    /// A later answer is not the range asked for (the one at `offset`).
    PartRange {
        offset: u64,
        start: u64,
        end: u64,
    },
    /// The part at `offset` got no answer, `PART_TRIES` times.
    NoAnswer {
        offset: u64,
    },
    /// Another ETag or size than the first part's.
    DocumentChanged,
    Status {
        status: u32,
        offset: u64,
    },
    /// The fetch ended before any part came.
    NoPart,
}

impl std::fmt::Display for PartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartError::NoContentRange => f.write_str("a 206 answer without a valid content-range"),
            PartError::TooLarge { total } => write!(
                f,
                "the document has {total} bytes, over the limit of {MAX_DOCUMENT_BYTES}"
            ),
            PartError::FirstPartRange { start, end } => {
                write!(f, "part 0 came back as bytes {start}-{end}")
            }
            PartError::PartRange { offset, start, end } => write!(
                f,
                "the part at byte {offset} came back as bytes {start}-{end}"
            ),
            PartError::NoAnswer { offset } => write!(
                f,
                "no answer for the part at byte {offset} after {PART_TRIES} tries"
            ),
            PartError::DocumentChanged => {
                f.write_str("the document changed while it was fetched in parts")
            }
            PartError::Status { status, offset } => {
                write!(f, "status {status} for the part at byte {offset}")
            }
            PartError::NoPart => f.write_str("no part received"),
        }
    }
}

impl std::error::Error for PartError {}

/// A document being put together.
#[derive(Debug)]
struct Assembly {
    etag: Option<String>,
    total: u64,
    /// The parts so far, unless they are handed on one at a time (`PartedFetch::streamed`).
    body: Vec<u8>,
    received: u64,
    tries: u32,
}

/// The parts received so far of this VM's fetch in flight.
#[derive(Debug, Default)]
pub struct PartedFetch {
    assembly: Option<Assembly>,
    /// Hand each part on (`take_part`) instead of putting the document together.
    streamed: bool,
    part: Option<Vec<u8>>,
}

/// `bytes start-end/total` of a `content-range` header.
fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (start.parse().ok()?, end.parse().ok()?, total.parse().ok()?);
    (start <= end && end < total).then_some((start, end, total))
}

impl PartedFetch {
    /// A fetch whose parts are handed on one at a time: after each `accept`, `take_part` has
    /// the part that came (a `Complete` 200 of parts then has an empty body).
    pub fn streamed() -> PartedFetch {
        PartedFetch {
            streamed: true,
            ..PartedFetch::default()
        }
    }

    /// The part the last answer brought.
    pub fn take_part(&mut self) -> Option<Vec<u8>> {
        self.part.take()
    }

    /// Forgets a fetch (a new one starts, or the answer never came).
    pub fn reset(&mut self) {
        self.assembly = None;
        self.part = None;
    }

    /// Takes the answer to the last part asked for.
    pub fn accept(&mut self, response: FetchResponse, content_range: Option<&str>) -> PartStep {
        let step = match self.assembly.take() {
            None => self.first(response, content_range),
            Some(assembly) => self.next(assembly, response, content_range),
        };
        if !matches!(step, PartStep::Fetch { .. }) {
            self.assembly = None;
        }
        if matches!(step, PartStep::Failed(_)) {
            self.part = None;
        }
        step
    }

    fn first(&mut self, response: FetchResponse, content_range: Option<&str>) -> PartStep {
        if response.status != Some(206) {
            return PartStep::Complete(response);
        }
        let Some((start, end, total)) = content_range.and_then(parse_content_range) else {
            return PartStep::Failed(PartError::NoContentRange);
        };
        if total > MAX_DOCUMENT_BYTES {
            return PartStep::Failed(PartError::TooLarge { total });
        }
        if start != 0 || response.body.len() as u64 != end - start + 1 {
            return PartStep::Failed(PartError::FirstPartRange { start, end });
        }
        let received = response.body.len() as u64;
        let body = if self.streamed {
            self.part = Some(response.body);
            Vec::new()
        } else {
            // The whole size at once: growing by doubling would leave a far larger peak
            // behind (WebAssembly memory never shrinks).
            let mut body = Vec::with_capacity(total as usize);
            body.extend_from_slice(&response.body);
            body
        };
        self.assembly = Some(Assembly {
            etag: response.etag,
            total,
            body,
            received,
            tries: 0,
        });
        self.progress()
    }

    fn next(
        &mut self,
        mut assembly: Assembly,
        response: FetchResponse,
        content_range: Option<&str>,
    ) -> PartStep {
        let offset = assembly.received;
        match response.status {
            None if assembly.tries + 1 < PART_TRIES => {
                assembly.tries += 1;
                self.assembly = Some(assembly);
                PartStep::Fetch { offset }
            }
            None => PartStep::Failed(PartError::NoAnswer { offset }),
            // The server sent the whole document after all.
            Some(200) => PartStep::Complete(response),
            Some(206) => {
                let Some((start, end, total)) = content_range.and_then(parse_content_range) else {
                    return PartStep::Failed(PartError::NoContentRange);
                };
                if total != assembly.total || response.etag != assembly.etag {
                    return PartStep::Failed(PartError::DocumentChanged);
                }
                if start != offset || response.body.len() as u64 != end - start + 1 {
                    return PartStep::Failed(PartError::PartRange { offset, start, end });
                }
                assembly.received += response.body.len() as u64;
                if self.streamed {
                    self.part = Some(response.body);
                } else {
                    assembly.body.extend_from_slice(&response.body);
                }
                assembly.tries = 0;
                self.assembly = Some(assembly);
                self.progress()
            }
            Some(status) => PartStep::Failed(PartError::Status { status, offset }),
        }
    }

    /// The next part to ask for, or the whole document once every part is in.
    fn progress(&mut self) -> PartStep {
        match &self.assembly {
            Some(a) if a.received < a.total => PartStep::Fetch { offset: a.received },
            _ => match self.assembly.take() {
                Some(a) => PartStep::Complete(FetchResponse {
                    status: Some(200),
                    etag: a.etag,
                    content_range: None,
                    body: a.body,
                }),
                None => PartStep::Failed(PartError::NoPart),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(doc: &[u8], start: usize, etag: &str) -> (FetchResponse, String) {
        let end = (start + PART_BYTES as usize).min(doc.len()) - 1;
        (
            FetchResponse {
                status: Some(206),
                etag: Some(etag.to_string()),
                content_range: None,
                body: doc[start..=end].to_vec(),
            },
            format!("bytes {start}-{end}/{}", doc.len()),
        )
    }

    fn document(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn a_document_in_three_parts_is_put_together_byte_for_byte() {
        let doc = document(2 * PART_BYTES as usize + 17);
        let mut fetch = PartedFetch::default();
        let mut offset = 0;
        loop {
            let (response, range) = part(&doc, offset, "\"v1\"");
            match fetch.accept(response, Some(&range)) {
                PartStep::Fetch { offset: next } => offset = next as usize,
                PartStep::Complete(whole) => {
                    assert_eq!(whole.status, Some(200));
                    assert_eq!(whole.etag.as_deref(), Some("\"v1\""));
                    assert!(whole.body == doc);
                    break;
                }
                PartStep::Failed(why) => panic!("{why}"),
            }
        }
        assert_eq!(offset, 2 * PART_BYTES as usize);
    }

    #[test]
    fn a_small_document_is_complete_after_its_first_and_only_part() {
        let doc = document(100);
        let (response, range) = part(&doc, 0, "\"v1\"");
        let PartStep::Complete(whole) = PartedFetch::default().accept(response, Some(&range))
        else {
            panic!("expected the whole document");
        };
        assert_eq!(whole.body, doc);
    }

    #[test]
    fn plain_answers_pass_through_unchanged() {
        for status in [Some(200), Some(304), Some(404), None] {
            let response = FetchResponse {
                status,
                etag: None,
                content_range: None,
                body: b"{}".to_vec(),
            };
            let PartStep::Complete(same) = PartedFetch::default().accept(response, None) else {
                panic!("expected the answer as is");
            };
            assert_eq!(same.status, status);
        }
    }

    #[test]
    fn a_part_without_answer_is_asked_again_then_the_fetch_fails() {
        let doc = document(PART_BYTES as usize + 10);
        let mut fetch = PartedFetch::default();
        let (response, range) = part(&doc, 0, "\"v1\"");
        let second = PartStep::Fetch { offset: PART_BYTES };
        assert_eq!(fetch.accept(response, Some(&range)), second);
        let lost = || FetchResponse::default();
        assert_eq!(fetch.accept(lost(), None), second);
        assert_eq!(fetch.accept(lost(), None), second);
        assert_eq!(
            fetch.accept(lost(), None),
            PartStep::Failed(PartError::NoAnswer { offset: PART_BYTES })
        );
    }

    #[test]
    fn a_document_replaced_between_parts_fails_the_fetch() {
        let doc = document(PART_BYTES as usize + 10);
        let mut fetch = PartedFetch::default();
        let (response, range) = part(&doc, 0, "\"v1\"");
        fetch.accept(response, Some(&range));
        let (response, range) = part(&doc, PART_BYTES as usize, "\"v2\"");
        assert_eq!(
            fetch.accept(response, Some(&range)),
            PartStep::Failed(PartError::DocumentChanged)
        );
    }

    #[test]
    fn bad_content_ranges_and_oversized_documents_fail() {
        let over = format!("bytes 0-9/{}", MAX_DOCUMENT_BYTES + 1);
        for (range, error) in [
            (None, PartError::NoContentRange),
            (Some("bytes x-y/z"), PartError::NoContentRange),
            (
                Some("bytes 5-9/10"),
                PartError::FirstPartRange { start: 5, end: 9 },
            ),
            (
                Some(over.as_str()),
                PartError::TooLarge {
                    total: MAX_DOCUMENT_BYTES + 1,
                },
            ),
        ] {
            let response = FetchResponse {
                status: Some(206),
                etag: None,
                content_range: None,
                body: vec![0; 10],
            };
            let step = PartedFetch::default().accept(response, range);
            assert_eq!(step, PartStep::Failed(error), "{range:?}");
        }
    }

    #[test]
    fn range_header_asks_for_one_part() {
        assert_eq!(
            range_header(PART_BYTES),
            (
                "range",
                format!("bytes={}-{}", PART_BYTES, 2 * PART_BYTES - 1)
            )
        );
    }
}
