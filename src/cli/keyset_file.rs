//! Key-set files: the `{"keys": [...]}` document the filter parses (`KeySet::from_json`), kept
//! one record per line so a change is one line in a diff. Records are carried as JSON values,
//! so fields this tool does not know (added to the record format later) survive an edit.

use std::fs;
use std::io;
use std::path::Path;

use serde_json::Value;

use crate::core::config::validate_header_safe_fields;
use crate::core::keyset::KeySet;

/// Reads key records from JSON text: one record, an array of records, a `{"keys": [...]}`
/// document, or several of these one after another (e.g. the outputs of `keygate key new`).
pub fn parse_records(text: &str) -> Result<Vec<Value>, String> {
    let mut records = Vec::new();
    for (n, item) in serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .enumerate()
    {
        let item = item.map_err(|e| format!("not JSON: {e}"))?;
        match item {
            Value::Array(items) => records.extend(items),
            Value::Object(mut object) if object.contains_key("keys") => {
                if object.len() != 1 {
                    return Err(format!(
                        "value {}: a key-set document has only \"keys\"",
                        n + 1
                    ));
                }
                match object.remove("keys") {
                    Some(Value::Array(items)) => records.extend(items),
                    _ => return Err(format!("value {}: \"keys\" must be an array", n + 1)),
                }
            }
            Value::Object(object) => records.push(Value::Object(object)),
            other => {
                return Err(format!(
                    "value {}: expected a key record, an array of them or {{\"keys\": [...]}}, not {other}",
                    n + 1
                ))
            }
        }
    }
    Ok(records)
}

/// Validates records with the filter's own key-set parser: ids and digests unique, digests
/// 64 hex characters, times, origins, header-safe fields, no unknown fields (no `secret`).
pub fn validate(records: &[Value]) -> Result<KeySet, String> {
    let doc = serde_json::json!({ "keys": records }).to_string();
    let keys = KeySet::from_json(doc.as_bytes()).map_err(|e| e.to_string())?;
    validate_header_safe_fields(&keys).map_err(|e| e.to_string())?;
    Ok(keys)
}

/// The key-set document, one record per line.
pub fn render(records: &[Value]) -> String {
    if records.is_empty() {
        return "{\"keys\": []}\n".to_string();
    }
    let lines: Vec<String> = records.iter().map(|r| format!("  {r}")).collect();
    format!("{{\"keys\": [\n{}\n]}}\n", lines.join(",\n"))
}

/// Loads a key-set file; a missing file is an empty set when `missing_ok`.
pub fn load(path: &Path, missing_ok: bool) -> Result<Vec<Value>, String> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let records = parse_records(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            validate(&records).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(records)
        }
        Err(err) if missing_ok && err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(format!("{}: {err}", path.display())),
    }
}

/// Writes the document next to `path` and renames it over, so a reader (or a key service
/// serving the file) never sees half a key set.
pub fn save(path: &Path, records: &[Value]) -> Result<(), String> {
    validate(records)?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    fs::write(&tmp, render(records))
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|err| {
            let _ = fs::remove_file(&tmp);
            format!("{}: {err}", path.display())
        })
}

/// What `revoke` does to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoke {
    /// `"enabled": false`: the key answers INVALID_API_KEY and the record stays for audit.
    Disable,
    /// The record is removed.
    Remove,
}

/// Revokes every key in `ids`; an id that is not in the set is an error (nothing changes).
pub fn revoke(records: &mut Vec<Value>, ids: &[String], how: Revoke) -> Result<(), String> {
    let id_of = |r: &Value| r.get("id").and_then(Value::as_str).map(str::to_string);
    for id in ids {
        if !records.iter().any(|r| id_of(r).as_deref() == Some(id)) {
            return Err(format!("no key with id '{id}' in the key set"));
        }
    }
    match how {
        Revoke::Remove => {
            records.retain(|r| !id_of(r).is_some_and(|id| ids.contains(&id)));
        }
        Revoke::Disable => {
            for record in records.iter_mut() {
                if id_of(record).is_some_and(|id| ids.contains(&id)) {
                    if let Value::Object(fields) = record {
                        fields.insert("enabled".into(), Value::from(false));
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, fill: char) -> Value {
        serde_json::json!({"id": id, "secret_sha256": fill.to_string().repeat(64), "tenant": "t"})
    }

    #[test]
    fn records_are_read_from_objects_arrays_documents_and_streams() {
        let text = format!(
            "{}\n{}\n[{}]\n{{\"keys\": [{}]}}",
            record("a", '1'),
            record("b", '2'),
            record("c", '3'),
            record("d", '4')
        );
        let records = parse_records(&text).unwrap();
        let ids: Vec<&str> = records.iter().filter_map(|r| r["id"].as_str()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        assert!(parse_records("42").is_err());
        assert!(parse_records(r#"{"keys": [], "extra": 1}"#).is_err());
    }

    #[test]
    fn rendered_document_is_what_the_filter_parses_one_record_per_line() {
        let records = vec![record("a", '1'), record("b", '2')];
        let text = render(&records);
        assert_eq!(text.lines().count(), 4);
        let keys = KeySet::from_json(text.as_bytes()).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(render(&[]), "{\"keys\": []}\n");
        assert!(KeySet::from_json(render(&[]).as_bytes())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn validation_uses_the_filters_rules() {
        let err = validate(&[record("a", '1'), record("a", '2')]).unwrap_err();
        assert!(err.starts_with("keys[1].id"), "{err}");
        let mut with_secret = record("a", '1');
        with_secret["secret"] = "plaintext".into();
        assert!(validate(&[with_secret])
            .unwrap_err()
            .contains("unknown field `secret`"));
    }

    #[test]
    fn unknown_fields_keep_their_place_through_a_round_trip() {
        let text = r#"{"keys": [{"secret_sha256": "1111111111111111111111111111111111111111111111111111111111111111", "id": "z", "tenant": "t"}]}"#;
        let records = parse_records(text).unwrap();
        assert!(render(&records).contains(r#"{"secret_sha256":"1111"#));
    }

    #[test]
    fn revoke_disables_or_removes_and_refuses_unknown_ids() {
        let mut records = vec![record("a", '1'), record("b", '2')];
        revoke(&mut records, &["a".into()], Revoke::Disable).unwrap();
        assert_eq!(records[0]["enabled"], false);
        assert!(records[1].get("enabled").is_none());
        revoke(&mut records, &["b".into()], Revoke::Remove).unwrap();
        assert_eq!(records.len(), 1);
        let before = records.clone();
        assert!(revoke(&mut records, &["a".into(), "nope".into()], Revoke::Remove).is_err());
        assert_eq!(records, before);
    }

    #[test]
    fn save_replaces_the_file_and_load_reads_it_back() {
        let dir = std::env::temp_dir().join(format!("keygate-keyset-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.json");
        assert!(load(&path, true).unwrap().is_empty());
        assert!(load(&path, false).is_err());
        save(&path, &[record("a", '1')]).unwrap();
        save(&path, &[record("a", '1'), record("b", '2')]).unwrap();
        assert_eq!(load(&path, false).unwrap().len(), 2);
        assert!(save(&path, &[record("a", '1'), record("a", '2')]).is_err());
        assert_eq!(
            load(&path, false).unwrap().len(),
            2,
            "a refused save changes nothing"
        );
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file is left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
