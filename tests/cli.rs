//! The `keygate` command-line tool, driven as a user would: the built binary, its exit status,
//! stdout and stderr. What it writes is read back with the filter's own parsers.

// Helpers outside `#[test]` functions are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use keygate::core::checksum::Checksum;
use keygate::core::config::Config;
use keygate::core::decision::{decide, Decision};
use keygate::core::digest::sha256;
use keygate::core::keyset::{KeyRecordSpec, KeySet};
use keygate::core::request::RequestView;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_keygate");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(ROOT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keygate-cli-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A new key: (the labeled lines of stderr as (label, value), the record from stdout).
struct NewKey {
    shown: Vec<(String, String)>,
    record: Value,
    stdout: String,
}

impl NewKey {
    fn value(&self, label: &str) -> &str {
        &self.shown.iter().find(|(l, _)| l == label).unwrap().1
    }
}

fn key_new(args: &[&str]) -> NewKey {
    let mut all = vec!["key", "new"];
    all.extend_from_slice(args);
    let out = run(&all, "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let shown = stderr
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(": "))
        .map(|(l, v)| (l.to_string(), v.to_string()))
        .collect();
    let stdout = text(&out.stdout);
    NewKey {
        shown,
        record: serde_json::from_str(&stdout).unwrap(),
        stdout,
    }
}

fn key_hash(args: &[&str], key: &str) -> Output {
    let mut all = vec!["key", "hash"];
    all.extend_from_slice(args);
    run(&all, &format!("{key}\n"))
}

fn request(headers: &[(&str, &str)]) -> RequestView {
    RequestView {
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        ..Default::default()
    }
}

#[test]
fn every_command_answers_help() {
    let commands: [&[&str]; 11] = [
        &[],
        &["key"],
        &["key", "new"],
        &["key", "hash"],
        &["keyset"],
        &["keyset", "build"],
        &["keyset", "add"],
        &["keyset", "revoke"],
        &["keyset", "check"],
        &["config"],
        &["config", "check"],
    ];
    for command in commands {
        let mut args = command.to_vec();
        args.push("--help");
        let out = run(&args, "");
        assert!(out.status.success(), "{args:?}");
        let usage = format!("Usage: keygate {}", command.join(" "));
        assert!(
            text(&out.stdout).contains(usage.trim_end()),
            "{args:?}: {}",
            text(&out.stdout)
        );
    }
}

#[test]
fn key_new_shows_the_key_once_on_stderr_and_prints_only_its_digest_on_stdout() {
    let key = key_new(&[
        "--profile",
        "compresr",
        "--checksum",
        "crc32",
        "--tenant",
        "acme",
    ]);
    let token = key.value("key");
    assert!(token.starts_with("cmp_"));
    assert!(Checksum::Crc32.verify(token));
    assert!(
        !key.stdout.contains(token),
        "the secret must not reach stdout"
    );
    assert_eq!(key.record["tenant"], "acme");
    assert_eq!(
        key.record["secret_sha256"],
        hex::encode(sha256(token.as_bytes()))
    );
    let again = key_new(&["--profile", "compresr"]);
    assert_ne!(
        again.value("key"),
        token,
        "keys come from the OS random source"
    );
    assert_ne!(again.record["id"], key.record["id"]);
}

#[test]
fn key_hash_reads_stdin_and_agrees_with_the_record_for_every_format() {
    let opaque = key_new(&["--profile", "caibo-live", "--checksum", "crc32"]);
    assert_eq!(opaque.record["environment"], "live");
    let out = key_hash(&["--checksum", "crc32"], opaque.value("key"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), opaque.record["secret_sha256"]);

    let abaco = key_new(&["--profile", "abaco", "--id", "abk_partner7"]);
    assert!(abaco.value("key").starts_with("abk_partner7:"));
    let out = key_hash(&["--format", "id-secret"], abaco.value("key"));
    assert_eq!(text(&out.stdout).trim(), abaco.record["secret_sha256"]);

    let makepay = key_new(&["--profile", "makepay", "--tenant", "team-3"]);
    assert_eq!(makepay.value("key id"), makepay.record["id"]);
    assert_eq!(makepay.record["product"], "makepay");
    let out = key_hash(&["--format", "pair"], makepay.value("key secret"));
    assert_eq!(text(&out.stdout).trim(), makepay.record["secret_sha256"]);
}

#[test]
fn key_hash_refuses_a_mistyped_key_and_never_takes_the_key_as_an_argument() {
    let key = key_new(&["--profile", "compresr", "--checksum", "crc32"]);
    let token = key.value("key");
    let mut typo = token.to_string();
    let at = token.len() / 2;
    typo.replace_range(
        at..at + 1,
        if &token[at..at + 1] == "Q" { "R" } else { "Q" },
    );
    let out = key_hash(&["--checksum", "crc32"], &typo);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("fails its checksum"));
    assert!(out.stdout.is_empty());

    let out = run(&["key", "hash", token], "");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a key on the command line is refused"
    );
    let out = key_hash(&[], "two words");
    assert_eq!(out.status.code(), Some(1));
    let out = run(&["key", "hash"], "");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn key_new_refuses_ids_and_fields_the_filter_would_refuse() {
    for args in [
        &["--profile", "abaco", "--id", "partner7"][..],
        &["--format", "id-secret", "--id", "a:b"],
        &["--origin", "merchant.example"],
        &["--expires-at", "next tuesday"],
        &["--tenant", "acme\r\nx-evil: 1"],
    ] {
        let mut all = vec!["key", "new"];
        all.extend_from_slice(args);
        let out = run(&all, "");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            !text(&out.stderr).contains("key: "),
            "no key is shown when none is made"
        );
    }
}

#[test]
fn secret_file_gets_the_key_and_stderr_does_not() {
    let dir = scratch("secret-file");
    let path = dir.join("team-3.secret");
    let out = run(
        &[
            "key",
            "new",
            "--profile",
            "makepay",
            "--secret-file",
            path.to_str().unwrap(),
        ],
        "",
    );
    assert!(out.status.success());
    let saved = fs::read_to_string(&path).unwrap();
    assert!(saved.contains("key secret: mksec_"));
    assert!(!text(&out.stderr).contains("mksec_"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let again = run(
        &[
            "key",
            "new",
            "--profile",
            "makepay",
            "--secret-file",
            path.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(
        again.status.code(),
        Some(1),
        "an existing file is never overwritten"
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), saved);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn keyset_build_add_and_revoke_maintain_a_document_the_filter_parses() {
    let dir = scratch("keyset");
    let keyset = dir.join("keys.json");
    let path = keyset.to_str().unwrap();
    let a = key_new(&[
        "--profile",
        "compresr",
        "--id",
        "cmp-a",
        "--checksum",
        "crc32",
    ]);
    let b = key_new(&[
        "--profile",
        "compresr",
        "--id",
        "cmp-b",
        "--checksum",
        "crc32",
    ]);
    let out = run(
        &["keyset", "build", "-o", path],
        &format!("{}{}", a.stdout, b.stdout),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let keys = KeySet::from_json(&fs::read(&keyset).unwrap()).unwrap();
    assert_eq!(keys.len(), 2);

    let c = key_new(&[
        "--profile",
        "compresr",
        "--id",
        "cmp-c",
        "--checksum",
        "crc32",
    ]);
    let out = run(&["keyset", "add", path], &c.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = fs::read_to_string(&keyset).unwrap();
    assert_eq!(before.lines().count(), 5, "one record per line:\n{before}");
    let keys = KeySet::from_json(before.as_bytes()).unwrap();
    let record = keys.by_digest(&sha256(c.value("key").as_bytes())).unwrap();
    assert_eq!(record.id, "cmp-c");

    // Adding the same key again is refused by the filter's rules and changes nothing.
    let out = run(&["keyset", "add", path], &c.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("keys[3].id: duplicate key id (also keys[2])"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(fs::read_to_string(&keyset).unwrap(), before);

    let out = run(&["keyset", "revoke", path, "cmp-a"], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let keys = KeySet::from_json(&fs::read(&keyset).unwrap()).unwrap();
    assert!(!keys.by_id("cmp-a").unwrap().enabled());
    assert!(keys.by_id("cmp-b").unwrap().enabled());

    let out = run(&["keyset", "revoke", path, "cmp-b", "--remove"], "");
    assert!(out.status.success());
    let keys = KeySet::from_json(&fs::read(&keyset).unwrap()).unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.by_id("cmp-b").is_none());

    let out = run(&["keyset", "revoke", path, "cmp-zzz"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no key with id 'cmp-zzz'"));

    let out = run(&["keyset", "check", path], "");
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), format!("{path}: ok: 2 keys"));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn keyset_check_names_the_refused_field() {
    let dir = scratch("keyset-check");
    let bad = dir.join("bad.json");
    fs::write(
        &bad,
        r#"{"keys": [{"id": "a", "secret_sha256": "abcd", "secret": "plaintext"}]}"#,
    )
    .unwrap();
    let out = run(&["keyset", "check", bad.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("error:")
            && text(&out.stdout).contains("unknown field `secret`"),
        "{}",
        text(&out.stdout)
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_key_made_and_added_by_the_tool_passes_the_filter_and_a_typo_is_refused_before_lookup() {
    let dir = scratch("end-to-end");
    let keyset = dir.join("keys.json");
    let key = key_new(&[
        "--format",
        "id-secret",
        "--prefix",
        "abk_",
        "--checksum",
        "crc32",
        "--user",
        "owner@company-7",
    ]);
    let out = run(&["keyset", "add", keyset.to_str().unwrap()], &key.stdout);
    assert!(out.status.success());
    let keys: Value = serde_json::from_slice(&fs::read(&keyset).unwrap()).unwrap();
    let config = serde_json::json!({
        "credentials": [{"in": "bearer", "format": "id_secret", "prefixes": ["abk_"],
                          "checksum": "crc32"}],
        "keys": keys["keys"],
    });
    let (config, keys) = Config::parse(config.to_string().as_bytes()).unwrap();
    let token = key.value("key");
    let bearer = format!("Bearer {token}");
    assert!(matches!(
        decide(&config, &keys, &request(&[("authorization", &bearer)])),
        Decision::Allow { .. }
    ));
    let last = bearer.len() - 1;
    let typo = format!(
        "{}{}",
        &bearer[..last],
        if bearer.ends_with('0') { "1" } else { "0" }
    );
    assert_eq!(
        decide(&config, &keys, &request(&[("authorization", &typo)])),
        Decision::Deny {
            code: keygate::core::codes::ErrorCode::ApiKeyChecksumMismatch,
            key_id: None
        }
    );
    fs::remove_dir_all(dir).unwrap();
}

/// Every field of the key record format, in order, from the filter's parser itself (the list
/// its unknown-field error names), so a field added to the format is seen here.
fn record_format_fields() -> Vec<String> {
    let err = serde_json::from_str::<KeyRecordSpec>(r#"{"?": 0}"#)
        .unwrap_err()
        .to_string();
    // unknown field `?`, expected one of `id`, `secret_sha256`, ...
    let fields: Vec<String> = err
        .split('`')
        .skip(3)
        .step_by(2)
        .map(String::from)
        .collect();
    assert_eq!(fields.first().map(String::as_str), Some("id"), "{err}");
    fields
}

#[test]
fn a_record_made_with_every_flag_round_trips_through_the_filters_parser_field_by_field() {
    let key = key_new(&[
        "--format",
        "id-secret",
        "--prefix",
        "abk_",
        "--id",
        "abk_every7",
        "--tenant",
        "acct-42",
        "--organization",
        "org-1",
        "--organization",
        "org-2",
        "--environment",
        "live",
        "--product",
        "makepay",
        "--permission",
        "read",
        "--permission",
        "write",
        "--origin",
        "https://Merchant.example/",
        "--user",
        "owner@company-7",
        "--expires-at",
        "2030-01-01T00:00:00Z",
        "--not-after",
        "1900000000",
        "--disabled",
        "--rate-limit",
        "600/60",
        "--burst",
        "120",
        "--monthly-budget",
        "100000",
    ]);
    // Every field of the format is written, in the format's order, but the one that billing
    // sets and no flag does.
    let without_a_flag = ["budget_exhausted"];
    let written: Vec<&String> = key.record.as_object().unwrap().keys().collect();
    let expected: Vec<String> = record_format_fields()
        .into_iter()
        .filter(|f| !without_a_flag.contains(&f.as_str()))
        .collect();
    assert_eq!(written, expected.iter().collect::<Vec<_>>());
    // The parser reads every field back as written ...
    let spec: KeyRecordSpec = serde_json::from_str(&key.stdout).unwrap();
    assert_eq!(serde_json::to_value(&spec).unwrap(), key.record);
    // ... and the filter's key set holds each one as the flag said.
    let doc = serde_json::json!({ "keys": [key.record] }).to_string();
    let set = KeySet::from_json(doc.as_bytes()).unwrap();
    let record = set.by_id("abk_every7").unwrap();
    let (_, secret) = key.value("key").split_once(':').unwrap();
    assert_eq!(record.digest, sha256(secret.as_bytes()));
    assert_eq!(record.fields.tenant.as_deref(), Some("acct-42"));
    assert_eq!(record.fields.organizations, ["org-1", "org-2"]);
    assert_eq!(record.fields.environment.as_deref(), Some("live"));
    assert_eq!(record.fields.product.as_deref(), Some("makepay"));
    assert_eq!(record.fields.permissions, ["read", "write"]);
    assert_eq!(record.fields.origins, ["https://merchant.example"]);
    assert_eq!(record.fields.user.as_deref(), Some("owner@company-7"));
    assert_eq!(record.expires_at(), Some(1_893_456_000));
    assert_eq!(record.not_after(), Some(1_900_000_000));
    assert!(!record.enabled());
    let limit = record.rate_limit().unwrap();
    assert_eq!(
        (limit.requests, limit.per_seconds, limit.burst),
        (600, 60, 120)
    );
    assert_eq!(record.fields.monthly_budget, Some(100_000));
    assert!(!record.fields.budget_exhausted);
}

fn shipped_envoy_configs() -> Vec<PathBuf> {
    let mut configs: Vec<PathBuf> = fs::read_dir(Path::new(ROOT).join("envoy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        // By file name: the checkout's own path may contain "compose".
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("compose"))
        })
        .collect();
    configs.sort();
    configs
}

#[test]
fn config_check_accepts_every_shipped_config() {
    let configs = shipped_envoy_configs();
    assert!(configs.len() >= 7);
    let mut args = vec!["config", "check", "--strict"];
    args.extend(configs.iter().map(|p| p.to_str().unwrap()));
    let out = run(&args, "");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for config in &configs {
        assert!(
            stdout.contains(&format!("{}: ", config.display())),
            "{stdout}"
        );
    }
    assert!(stdout.ends_with(&format!("{} valid, 0 refused\n", configs.len())));
}

/// The bad configs shared with the unit tests (src/cli/config_check.rs) and the end-to-end test
/// that has Envoy itself refuse them (tests/e2e/test_config_refusal.py).
fn bad_configs() -> Vec<(String, String, String)> {
    let demo = fs::read_to_string(Path::new(ROOT).join("envoy/demo.yaml")).unwrap();
    let fixtures: Vec<Value> = serde_json::from_str(
        &fs::read_to_string(Path::new(ROOT).join("tests/fixtures/bad_configs.json")).unwrap(),
    )
    .unwrap();
    fixtures
        .iter()
        .map(|f| {
            let old = f["old"].as_str().unwrap();
            assert!(
                demo.contains(old),
                "fixture {} no longer matches",
                f["name"]
            );
            (
                f["name"].as_str().unwrap().to_string(),
                demo.replacen(old, f["new"].as_str().unwrap(), 1),
                f["error"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn config_check_refuses_every_config_the_filter_refuses_naming_the_field() {
    let dir = scratch("bad-configs");
    let fixtures = bad_configs();
    assert!(fixtures.len() >= 6);
    for (name, yaml, error) in fixtures {
        let path = dir.join(format!("{name}.yaml"));
        fs::write(&path, &yaml).unwrap();
        let out = run(&["config", "check", path.to_str().unwrap()], "");
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{name}: {stdout}");
        assert!(
            stdout.contains(&format!(
                "{}: static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config (filter \"keygate\"): error: ",
                path.display()
            )),
            "{name}: {stdout}"
        );
        assert!(
            stdout.contains(&error),
            "{name}: expected {error}: {stdout}"
        );
        assert!(stdout.ends_with("0 valid, 1 refused\n"), "{name}: {stdout}");
    }
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn config_check_reads_a_plugin_json_file_and_reports_every_file() {
    let dir = scratch("plugin-json");
    let good = dir.join("good.json");
    fs::write(
        &good,
        r#"{"name": "g", "credentials": [{"in": "header", "checksum": "crc32"}]}"#,
    )
    .unwrap();
    let bad = dir.join("bad.json");
    fs::write(
        &bad,
        "{\"credentials\": [\n  {\"in\": \"header\", \"checksum\": \"md5\"}]}",
    )
    .unwrap();
    let out = run(
        &[
            "config",
            "check",
            good.to_str().unwrap(),
            bad.to_str().unwrap(),
        ],
        "",
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains(&format!(
        "{}: ok: keygate \"g\", 1 credential source(s), 0 inline key(s)",
        good.display()
    )));
    assert!(
        stdout.contains(&format!("{}: error: line 2 column", bad.display()))
            && stdout.contains("unknown variant `md5`"),
        "{stdout}"
    );
    assert!(stdout.ends_with("1 valid, 1 refused\n"));
    fs::remove_dir_all(dir).unwrap();
}

/// One edit of a shipped config per boundary rule (tests/fixtures/boundary_configs.json, shared
/// with the unit tests of src/cli/boundary_lint.rs): each must fail `config check --strict`
/// naming the rule, the file, the location and a fix, and pass without --strict.
#[test]
fn config_check_strict_catches_every_boundary_fixture() {
    let dir = scratch("boundary");
    let fixtures: Vec<Value> = serde_json::from_str(
        &fs::read_to_string(Path::new(ROOT).join("tests/fixtures/boundary_configs.json")).unwrap(),
    )
    .unwrap();
    assert!(fixtures.len() >= 6);
    for f in &fixtures {
        let name = f["name"].as_str().unwrap();
        let base = fs::read_to_string(
            Path::new(ROOT)
                .join("envoy")
                .join(f["config"].as_str().unwrap()),
        )
        .unwrap();
        let old = f["old"].as_str().unwrap();
        assert!(base.contains(old), "fixture {name} no longer matches");
        let path = dir.join(format!("{name}.yaml"));
        fs::write(&path, base.replacen(old, f["new"].as_str().unwrap(), 1)).unwrap();
        let file = path.to_str().unwrap();
        let strict = run(&["config", "check", "--strict", file], "");
        let stdout = text(&strict.stdout);
        assert_eq!(strict.status.code(), Some(1), "{name}: {stdout}");
        let expected = format!(
            "{file}: warning[{}]: {}: ",
            f["rule"].as_str().unwrap(),
            f["location"].as_str().unwrap()
        );
        assert!(stdout.contains(&expected), "{name}: {stdout}");
        assert!(stdout.contains(". Fix: "), "{name}: {stdout}");
        assert!(text(&strict.stderr).contains("boundary warning(s) (--strict)"));
        let lenient = run(&["config", "check", file], "");
        assert!(
            lenient.status.success(),
            "{name}: {}",
            text(&lenient.stdout)
        );
    }
    fs::remove_dir_all(dir).unwrap();
}
