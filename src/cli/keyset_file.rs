//! Key-set files: the `{"serial": N, "keys": [...]}` document the filter parses
//! (`KeySet::from_document`), kept one record per line so a change is one line in a diff.
//! Records are carried as JSON values, so fields this tool does not know (added to the record
//! format later) survive an edit. Every write raises `serial`: a filter refuses a document whose
//! serial is not above the one it has, so an old copy served again cannot undo a revocation.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::random::{OsRandom, RandomSource};
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
                object.remove("serial");
                if object.len() != 1 {
                    return Err(format!(
                        "value {}: a key-set document has only \"serial\" and \"keys\"",
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
    KeySet::from_json(doc.as_bytes()).map_err(|e| e.to_string())
}

/// The key-set document, one record per line.
pub fn render(records: &[Value], serial: u64) -> String {
    if records.is_empty() {
        return format!("{{\"serial\": {serial}, \"keys\": []}}\n");
    }
    let lines: Vec<String> = records.iter().map(|r| format!("  {r}")).collect();
    format!(
        "{{\"serial\": {serial}, \"keys\": [\n{}\n]}}\n",
        lines.join(",\n")
    )
}

/// The serial of the next document: above the current one, and at least the Unix time, so a
/// set rebuilt from scratch still outranks every earlier one.
pub fn next_serial(current: Option<u64>) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    current.map_or(now, |c| c.saturating_add(1).max(now))
}

/// The `serial` of the key-set document at `path`, if it is one and has one.
pub fn read_serial(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    let doc: Value = serde_json::from_str(&text).ok()?;
    doc.get("serial").and_then(Value::as_u64)
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

/// Writes the document with the next serial next to `path` and renames it over, so a reader (or
/// a key service serving the file) never sees half a key set. The temporary file is created new
/// (a planted file or symlink makes the write fail instead of being followed), readable only by
/// its owner while written, and the result keeps the permissions of the file it replaces.
pub fn save(path: &Path, records: &[Value]) -> Result<u64, String> {
    validate(records)?;
    let serial = next_serial(read_serial(path));
    let mut nonce = [0u8; 8];
    OsRandom::open()
        .and_then(|mut rng| rng.fill(&mut nonce))
        .map_err(|e| format!("reading random bytes: {e}"))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}-{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id(),
        hex::encode(nonce)
    ));
    let written = write_new_file(&tmp, render(records, serial).as_bytes())
        .and_then(|()| keep_permissions(path, &tmp))
        .and_then(|()| fs::rename(&tmp, path));
    written.map(|()| serial).map_err(|err| {
        // Only a file this call created is removed: a name that was already taken is left alone.
        if err.kind() != io::ErrorKind::AlreadyExists {
            let _ = fs::remove_file(&tmp);
        }
        format!("{}: {err}", path.display())
    })
}

fn write_new_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The replaced file's permissions, or those of a readable document for a new file (a key set
/// holds digests, not secrets, and a key service must be able to read it).
fn keep_permissions(original: &Path, tmp: &Path) -> io::Result<()> {
    match fs::metadata(original) {
        Ok(meta) => fs::set_permissions(tmp, meta.permissions()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(tmp, fs::Permissions::from_mode(0o644))
            }
            #[cfg(not(unix))]
            Ok(())
        }
        Err(err) => Err(err),
    }
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
        let text = render(&records, 7);
        assert_eq!(text.lines().count(), 4);
        let (keys, serial) = KeySet::from_document(text.as_bytes()).unwrap();
        assert_eq!((keys.len(), serial), (2, Some(7)));
        assert_eq!(render(&[], 3), "{\"serial\": 3, \"keys\": []}\n");
        assert!(KeySet::from_json(render(&[], 3).as_bytes())
            .unwrap()
            .is_empty());
        assert_eq!(parse_records(&text).unwrap().len(), 2);
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
        assert!(render(&records, 1).contains(r#"{"secret_sha256":"1111"#));
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
        let first = save(&path, &[record("a", '1')]).unwrap();
        let second = save(&path, &[record("a", '1'), record("b", '2')]).unwrap();
        assert!(second > first, "every write raises the serial");
        assert_eq!(read_serial(&path), Some(second));
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

    #[cfg(unix)]
    #[test]
    fn save_keeps_the_files_permissions_and_never_follows_a_planted_link() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("keygate-perm-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.json");
        save(&path, &[record("a", '1')]).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        save(&path, &[record("a", '1'), record("b", '2')]).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );

        // A temporary name taken by a link is refused, and the link's target is untouched.
        let target = dir.join("target.txt");
        fs::write(&target, "untouched").unwrap();
        let taken = dir.join(".keys.json.tmp-1-00");
        symlink(&target, &taken).unwrap();
        let err = write_new_file(&taken, b"overwritten").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read_to_string(&target).unwrap(), "untouched");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_next_serial_is_above_the_current_one_and_the_clock() {
        assert!(next_serial(None) > 1_700_000_000);
        assert_eq!(next_serial(Some(u64::MAX - 1)), u64::MAX);
        let far = 9_000_000_000;
        assert_eq!(next_serial(Some(far)), far + 1);
    }
}
