//! A key-set document read part by part as its ranges arrive, so the VM that converts it never
//! holds the whole document: each part's complete records are handed on at once, and the one
//! record (or field) cut by the part's end is carried over to the next part. The document is
//! `{"serial": N, "keys": [records]}` exactly as `KeySet::from_document` reads it: the same two
//! fields, each at most once, `keys` required, nothing after the closing brace.

use crate::core::config_error::ConfigError;
use crate::core::keyset::KeyRecordSpec;

/// A record longer than this is refused (one record is a few hundred bytes; without a bound a
/// document that never closes a brace would be carried over whole).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Serial,
    Keys,
}

/// Where the reader is between tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    /// After `{`: a field name or `}`.
    FirstField,
    /// After `,`: a field name.
    NextField,
    Colon(Field),
    Value(Field),
    /// After `[`: a record or `]`.
    FirstRecord,
    /// After a record: `,` or `]`.
    AfterRecord,
    /// After `,` in the array: a record.
    NextRecord,
    AfterField,
    End,
}

/// One document being read.
#[derive(Debug)]
pub struct DocumentStream {
    state: State,
    /// The start of a token the last part cut.
    carry: Vec<u8>,
    records: usize,
    serial: Option<Option<u64>>,
    keys_seen: bool,
}

impl Default for DocumentStream {
    fn default() -> DocumentStream {
        DocumentStream {
            state: State::Start,
            carry: Vec::new(),
            records: 0,
            serial: None,
            keys_seen: false,
        }
    }
}

fn syntax(message: impl Into<String>) -> ConfigError {
    ConfigError::new("document", message)
}

/// The end (exclusive) of the string starting with the quote at `start`, if `bytes` holds it.
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut escaped = false;
    for (at, b) in bytes.iter().enumerate().skip(start + 1) {
        match (escaped, *b) {
            (true, _) => escaped = false,
            (false, b'\\') => escaped = true,
            (false, b'"') => return Some(at + 1),
            _ => {}
        }
    }
    None
}

/// The end (exclusive) of the object starting with the brace at `start`, if `bytes` holds it.
fn object_end(bytes: &[u8], start: usize) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (at, b) in bytes.iter().enumerate().skip(start) {
        if in_string {
            match (escaped, *b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match *b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some(at + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// The end (exclusive) of a bare value (number, `null`) starting at `start`, if `bytes` holds it.
fn bare_end(bytes: &[u8], start: usize) -> Option<usize> {
    bytes
        .iter()
        .skip(start)
        .position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())
        .map(|len| start + len)
}

impl DocumentStream {
    /// Reads the next part; `record` gets each complete record with its position in `keys`.
    /// The first error ends the document.
    pub fn feed(
        &mut self,
        part: &[u8],
        mut record: impl FnMut(usize, KeyRecordSpec) -> Result<(), ConfigError>,
    ) -> Result<(), ConfigError> {
        let joined;
        let bytes: &[u8] = if self.carry.is_empty() {
            part
        } else {
            let mut carry = std::mem::take(&mut self.carry);
            carry.extend_from_slice(part);
            joined = carry;
            &joined
        };
        let mut at = 0;
        while let Some(&b) = bytes.get(at) {
            if b.is_ascii_whitespace() {
                at += 1;
                continue;
            }
            let unexpected = || syntax(format!("unexpected '{}' at this point", b as char));
            // The end of the token that starts here, or `None` when the part cut it.
            let end = match (self.state, b) {
                (State::Start, b'{') => {
                    self.state = State::FirstField;
                    Some(at + 1)
                }
                (State::FirstField | State::NextField, b'"') => {
                    let end = string_end(bytes, at);
                    if let Some(end) = end {
                        let name = bytes.get(at + 1..end - 1).unwrap_or_default();
                        self.state = State::Colon(self.field(name)?);
                    }
                    end
                }
                (State::FirstField | State::AfterField, b'}') => {
                    self.state = State::End;
                    Some(at + 1)
                }
                (State::Colon(field), b':') => {
                    self.state = State::Value(field);
                    Some(at + 1)
                }
                (State::Value(Field::Keys), b'[') => {
                    self.state = State::FirstRecord;
                    Some(at + 1)
                }
                (State::Value(Field::Serial), _) => {
                    let end = bare_end(bytes, at);
                    if let Some(end) = end {
                        self.serial = Some(parse_serial(bytes.get(at..end).unwrap_or_default())?);
                        self.state = State::AfterField;
                    }
                    end
                }
                (State::FirstRecord | State::AfterRecord, b']') => {
                    self.state = State::AfterField;
                    Some(at + 1)
                }
                (State::AfterRecord, b',') => {
                    self.state = State::NextRecord;
                    Some(at + 1)
                }
                (State::FirstRecord | State::NextRecord, b'{') => {
                    let end = object_end(bytes, at);
                    if let Some(end) = end {
                        let path = format!("keys[{}]", self.records);
                        let spec = serde_json::from_slice::<KeyRecordSpec>(
                            bytes.get(at..end).unwrap_or_default(),
                        )
                        .map_err(|e| ConfigError::new(&path, e.to_string()))?;
                        record(self.records, spec)?;
                        self.records += 1;
                        self.state = State::AfterRecord;
                    }
                    end
                }
                (State::FirstRecord | State::NextRecord, _) => {
                    return Err(ConfigError::new(
                        format!("keys[{}]", self.records),
                        "expected a key record object",
                    ))
                }
                (State::AfterField, b',') => {
                    self.state = State::NextField;
                    Some(at + 1)
                }
                _ => return Err(unexpected()),
            };
            match end {
                Some(end) => at = end,
                None => {
                    let rest = bytes.get(at..).unwrap_or_default();
                    if rest.len() > MAX_RECORD_BYTES {
                        return Err(ConfigError::new(
                            format!("keys[{}]", self.records),
                            format!("a value over {MAX_RECORD_BYTES} bytes"),
                        ));
                    }
                    self.carry = rest.to_vec();
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn field(&mut self, name: &[u8]) -> Result<Field, ConfigError> {
        match name {
            b"serial" if self.serial.is_some() => Err(syntax("duplicate field `serial`")),
            b"serial" => Ok(Field::Serial),
            b"keys" if self.keys_seen => Err(syntax("duplicate field `keys`")),
            b"keys" => {
                self.keys_seen = true;
                Ok(Field::Keys)
            }
            other => Err(syntax(format!(
                "unknown field `{}`, expected `serial` or `keys`",
                String::from_utf8_lossy(other)
            ))),
        }
    }

    /// The document is complete: its serial (if it has one) and how many records it held.
    pub fn finish(&self) -> Result<(Option<u64>, usize), ConfigError> {
        if self.state != State::End || !self.carry.is_empty() {
            return Err(syntax("the document ends before its closing brace"));
        }
        if !self.keys_seen {
            return Err(syntax("missing field `keys`"));
        }
        Ok((self.serial.flatten(), self.records))
    }
}

fn parse_serial(text: &[u8]) -> Result<Option<u64>, ConfigError> {
    if text == b"null" {
        return Ok(None);
    }
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .map(Some)
        .ok_or_else(|| ConfigError::new("serial", "expected a whole number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `doc` in parts of `part` bytes; the ids in order, then the serial.
    fn read(doc: &str, part: usize) -> Result<(Vec<String>, Option<u64>), ConfigError> {
        let mut stream = DocumentStream::default();
        let mut ids = Vec::new();
        for chunk in doc.as_bytes().chunks(part.max(1)) {
            stream.feed(chunk, |at, spec| {
                assert_eq!(at, ids.len());
                ids.push(spec.id);
                Ok(())
            })?;
        }
        let (serial, count) = stream.finish()?;
        assert_eq!(count, ids.len());
        Ok((ids, serial))
    }

    const DOC: &str = r#" { "serial" : 42 , "keys": [
        {"id": "a", "secret_sha256": "x", "tenant": "t{,}\"]"},
        {"id":"b","secret_sha256":"y","rate_limit":{"requests":1,"per_seconds":1}} ] } "#;

    #[test]
    fn every_record_is_read_whatever_the_part_boundaries_cut() {
        for part in 1..=DOC.len() {
            let (ids, serial) = read(DOC, part).unwrap();
            assert_eq!(ids, ["a", "b"], "parts of {part} bytes");
            assert_eq!(serial, Some(42));
        }
    }

    #[test]
    fn the_serial_may_come_after_the_keys_or_be_null_or_absent() {
        assert_eq!(read(r#"{"keys":[],"serial":7}"#, 3).unwrap().1, Some(7));
        assert_eq!(read(r#"{"keys":[],"serial":null}"#, 3).unwrap().1, None);
        assert_eq!(read(r#"{"keys":[]}"#, 3).unwrap(), (vec![], None));
    }

    #[test]
    fn a_document_that_is_cut_short_or_malformed_is_refused_naming_the_problem() {
        let refused = |doc: &str| read(doc, 4).unwrap_err().to_string();
        assert!(
            refused(r#"{"serial":1,"keys":[{"id":"a","secret_sha256":"x"}"#)
                .contains("ends before its closing brace")
        );
        assert!(refused(r#"{"serial":1}"#).contains("missing field `keys`"));
        assert!(refused(r#"{"keys":[],"keys":[]}"#).contains("duplicate field `keys`"));
        assert!(refused(r#"{"keyz":[]}"#).contains("unknown field `keyz`"));
        assert!(refused(r#"{"keys":[]} x"#).contains("unexpected 'x'"));
        assert!(refused(r#"{"keys":["a"]}"#).contains("keys[0]"));
        assert!(refused(r#"{"serial":"1","keys":[]}"#).contains("serial"));
        let unknown = refused(r#"{"keys":[{"id":"a","secret_sha256":"x"},{"id":"b","nope":1}]}"#);
        assert!(
            unknown.contains("keys[1]") && unknown.contains("nope"),
            "{unknown}"
        );
    }

    #[test]
    fn the_first_record_the_caller_refuses_ends_the_document() {
        let mut stream = DocumentStream::default();
        let refused = stream.feed(
            br#"{"keys":[{"id":"a","secret_sha256":"x"},{"id":"b","secret_sha256":"y"}]}"#,
            |at, _| match at {
                1 => Err(ConfigError::new("keys[1].id", "no")),
                _ => Ok(()),
            },
        );
        assert_eq!(refused.unwrap_err().to_string(), "keys[1].id: no");
    }
}
