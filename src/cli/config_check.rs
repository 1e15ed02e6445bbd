//! `keygate config check`: runs a keygate plugin configuration — given as the JSON itself, or
//! found in every keygate wasm filter of an Envoy config — through `Config::parse`, the code the
//! filter runs in `on_configure`.

use serde_json::{Map, Value};
use yaml_rust2::{Yaml, YamlLoader};

use crate::core::config::{Config, ConfigError};

/// `typed_config` type of Envoy's HTTP wasm filter.
pub const WASM_FILTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// The only `configuration` type whose bytes reach the plugin unchanged as JSON text.
pub const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";

/// What a valid configuration holds, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub name: String,
    pub credential_sources: usize,
    pub keys: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Valid(Summary),
    /// The error the filter would log before refusing the configuration.
    Invalid(ConfigError),
    /// A wasm filter that is not keygate's, or a file that is not an Envoy config: not checked.
    NotKeygate(String),
}

/// One checked plugin configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Where in the file: empty for a plugin JSON file, else the path of the filter's
    /// `typed_config` (`static_resources.listeners[0]…http_filters[0].typed_config`).
    pub location: String,
    /// The Envoy filter's `name`, when it has one.
    pub filter_name: Option<String>,
    pub outcome: Outcome,
}

/// The same parse the filter's `on_configure` runs.
pub fn check_plugin_json(bytes: &[u8]) -> Outcome {
    match Config::parse(bytes) {
        Ok((config, keys)) => Outcome::Valid(Summary {
            name: config.name,
            credential_sources: config.sources.len(),
            keys: keys.len(),
        }),
        Err(err) => Outcome::Invalid(err),
    }
}

/// Checks a file's text: a plugin configuration (a JSON object with `credentials`) or an Envoy
/// config (YAML or JSON), in which every keygate wasm filter is checked. `Err` when the file is
/// neither, or holds no keygate filter.
pub fn check_text(text: &str) -> Result<Vec<Finding>, String> {
    if text.trim_start().starts_with('{') {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(top)) if !looks_like_envoy(&top) => {
                return Ok(vec![plugin_finding(text.as_bytes())])
            }
            Ok(envoy) => return findings_in_envoy(&[envoy]),
            // Not JSON: report it as the filter would, with line and column.
            Err(_) => return Ok(vec![plugin_finding(text.as_bytes())]),
        }
    }
    let docs = YamlLoader::load_from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let docs: Vec<Value> = docs.iter().map(yaml_to_json).collect();
    // A docker compose file (services:) sits next to the Envoy configs it runs.
    if let [Value::Object(top)] = docs.as_slice() {
        if top.contains_key("services") && !is_envoy_top_level(top) {
            return Ok(vec![Finding {
                location: String::new(),
                filter_name: None,
                outcome: Outcome::NotKeygate("a docker compose file, not an Envoy config".into()),
            }]);
        }
    }
    findings_in_envoy(&docs)
}

fn plugin_finding(bytes: &[u8]) -> Finding {
    Finding {
        location: String::new(),
        filter_name: None,
        outcome: check_plugin_json(bytes),
    }
}

fn is_envoy_top_level(top: &Map<String, Value>) -> bool {
    // `resources`: an xDS file, e.g. the ECDS file of a `config_discovery`.
    [
        "static_resources",
        "dynamic_resources",
        "admin",
        "node",
        "resources",
    ]
    .iter()
    .any(|k| top.contains_key(*k))
}

fn looks_like_envoy(top: &Map<String, Value>) -> bool {
    !top.contains_key("credentials") && is_envoy_top_level(top)
}

fn findings_in_envoy(docs: &[Value]) -> Result<Vec<Finding>, String> {
    let mut findings = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let root = if docs.len() > 1 {
            format!("(document {})", i + 1)
        } else {
            String::new()
        };
        walk(doc, &root, None, &mut findings);
    }
    if !findings
        .iter()
        .any(|f| !matches!(f.outcome, Outcome::NotKeygate(_)))
    {
        return Err(format!(
            "no keygate filter found (looked for HTTP filters of type {WASM_FILTER_TYPE} \
             with root_id \"keygate\" or a keygate .wasm file)"
        ));
    }
    Ok(findings)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Depth-first through the config; `name` is the `name` of the enclosing filter entry.
fn walk(node: &Value, path: &str, name: Option<&str>, out: &mut Vec<Finding>) {
    match node {
        Value::Object(fields) => {
            if fields.get("@type").and_then(Value::as_str) == Some(WASM_FILTER_TYPE) {
                out.push(check_wasm_filter(fields, path, name));
                return;
            }
            let own_name = fields.get("name").and_then(Value::as_str);
            for (key, child) in fields {
                walk(child, &join(path, key), own_name, out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, &format!("{path}[{i}]"), None, out);
            }
        }
        _ => {}
    }
}

fn text_at<'a>(node: &'a Map<String, Value>, keys: &[&str]) -> Option<&'a str> {
    let (last, parents) = keys.split_last()?;
    let mut at = node;
    for key in parents {
        at = at.get(*key)?.as_object()?;
    }
    at.get(*last)?.as_str()
}

/// A wasm filter's `typed_config`: keygate's when its root_id is `keygate` or its code file is
/// keygate's. Mirrors what Envoy hands the plugin: the `value` of a StringValue `configuration`.
fn check_wasm_filter(typed_config: &Map<String, Value>, path: &str, name: Option<&str>) -> Finding {
    let finding = |outcome| Finding {
        location: path.to_string(),
        filter_name: name.map(str::to_string),
        outcome,
    };
    let root_id = text_at(typed_config, &["config", "root_id"]);
    let file = text_at(
        typed_config,
        &["config", "vm_config", "code", "local", "filename"],
    );
    if !is_keygate_filter(typed_config) {
        return finding(Outcome::NotKeygate(format!(
            "a wasm filter that is not keygate's (root_id {}, code {})",
            root_id.map_or("unset".into(), |r| format!("\"{r}\"")),
            file.map_or("not a local file".into(), |f| format!("\"{f}\""))
        )));
    }
    let at = "config.configuration";
    let Some(configuration) = typed_config
        .get("config")
        .and_then(|c| c.get("configuration"))
    else {
        return finding(Outcome::Invalid(ConfigError::new(
            at,
            "missing: keygate refuses to start without a plugin configuration",
        )));
    };
    if configuration.get("@type").and_then(Value::as_str) != Some(STRING_VALUE_TYPE) {
        return finding(Outcome::Invalid(ConfigError::new(
            format!("{at}.@type"),
            format!("must be {STRING_VALUE_TYPE} holding the plugin JSON as its value"),
        )));
    }
    match configuration.get("value") {
        Some(Value::String(json)) => finding(check_plugin_json(json.as_bytes())),
        None => finding(Outcome::Invalid(ConfigError::new(
            format!("{at}.value"),
            "missing: keygate refuses to start without a plugin configuration",
        ))),
        Some(_) => finding(Outcome::Invalid(ConfigError::new(
            format!("{at}.value"),
            "must be a string holding the plugin JSON",
        ))),
    }
}

/// Whether a wasm filter's `typed_config` runs keygate: its root_id is `keygate` or its code
/// file is keygate's.
pub(crate) fn is_keygate_filter(typed_config: &Map<String, Value>) -> bool {
    let root_id = text_at(typed_config, &["config", "root_id"]);
    let file = text_at(
        typed_config,
        &["config", "vm_config", "code", "local", "filename"],
    );
    root_id == Some("keygate") || file.is_some_and(|f| f.contains("keygate"))
}

/// An HTTP filter entry named like keygate whose wasm config comes by extension config
/// discovery (`config_discovery`): where Envoy reads it from.
pub(crate) fn discovered_keygate_source(entry: &Map<String, Value>) -> Option<String> {
    let discovery = entry.get("config_discovery")?;
    let named_keygate = entry
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| n.contains("keygate"));
    let wasm = discovery
        .get("type_urls")
        .and_then(Value::as_array)
        .is_some_and(|urls| urls.iter().any(|u| u.as_str() == Some(WASM_FILTER_TYPE)));
    if !(named_keygate && wasm) {
        return None;
    }
    let file = discovery
        .get("config_source")
        .and_then(|c| c.get("path_config_source"))
        .and_then(|p| p.get("path"))
        .and_then(Value::as_str);
    Some(match file {
        Some(file) => format!("keygate's config is discovered from {file}: check that file"),
        None => "keygate's config is discovered from a config source: check what it serves".into(),
    })
}

/// YAML to the JSON data model; only the tree's shape and strings matter here.
pub fn yaml_to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::String(s) | Yaml::Real(s) => Value::from(s.as_str()),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Boolean(b) => Value::from(*b),
        Yaml::Array(items) => Value::Array(items.iter().map(yaml_to_json).collect()),
        Yaml::Hash(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (yaml_key(k), yaml_to_json(v)))
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::Null | Yaml::BadValue => Value::Null,
    }
}

fn yaml_key(key: &Yaml) -> String {
    match key {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = include_str!("../../envoy/demo.yaml");
    const BAD_CONFIGS: &str = include_str!("../../tests/fixtures/bad_configs.json");

    /// The fixtures shared with tests/cli.rs and tests/e2e/test_config_refusal.py: edits of
    /// envoy/demo.yaml that the filter's on_configure refuses.
    fn bad_configs() -> Vec<(String, String)> {
        let fixtures: Vec<Value> = serde_json::from_str(BAD_CONFIGS).unwrap();
        fixtures
            .iter()
            .map(|f| {
                let old = f["old"].as_str().unwrap();
                assert!(
                    DEMO.contains(old),
                    "fixture {} no longer matches",
                    f["name"]
                );
                (
                    DEMO.replacen(old, f["new"].as_str().unwrap(), 1),
                    f["error"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn the_shipped_demo_config_is_valid() {
        let findings = check_text(DEMO).unwrap();
        assert_eq!(findings.len(), 1);
        let f = &findings[0];
        assert_eq!(
            f.location,
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config"
        );
        assert_eq!(f.filter_name.as_deref(), Some("keygate"));
        assert_eq!(
            f.outcome,
            Outcome::Valid(Summary {
                name: "demo".into(),
                credential_sources: 3,
                keys: 7
            })
        );
    }

    #[test]
    fn every_shared_bad_config_is_refused_naming_the_field() {
        let fixtures = bad_configs();
        assert!(fixtures.len() >= 6);
        for (text, error) in fixtures {
            let findings = check_text(&text).unwrap();
            match &findings[0].outcome {
                Outcome::Invalid(err) => assert!(err.to_string().contains(&error), "{err}"),
                other => panic!("expected {error}, got {other:?}"),
            }
        }
    }

    #[test]
    fn plugin_json_is_checked_directly() {
        let ok = check_text(r#"{"name": "x", "credentials": [{"in": "header"}]}"#).unwrap();
        assert!(matches!(ok[0].outcome, Outcome::Valid(ref s) if s.name == "x"));
        let bad = check_text(r#"{"credentials": [], }"#).unwrap();
        match &bad[0].outcome {
            Outcome::Invalid(err) => assert!(err.path.starts_with("line 1"), "{err}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_wasm_filter_that_is_not_keygate_is_skipped_and_none_at_all_is_an_error() {
        let other = DEMO
            .replace("root_id: keygate", "root_id: other")
            .replace("build/keygate.wasm", "build/other.wasm");
        let err = check_text(&other).unwrap_err();
        assert!(err.contains("no keygate filter found"), "{err}");
        assert!(check_text("static_resources: {}\n").is_err());
    }

    #[test]
    fn a_missing_or_mistyped_configuration_is_refused() {
        let bytes_value = DEMO.replace(
            "type.googleapis.com/google.protobuf.StringValue",
            "type.googleapis.com/google.protobuf.BytesValue",
        );
        match &check_text(&bytes_value).unwrap()[0].outcome {
            Outcome::Invalid(err) => assert_eq!(err.path, "config.configuration.@type"),
            other => panic!("{other:?}"),
        }
        let start = DEMO.find("                configuration:").unwrap();
        let end = DEMO
            .find("          - name: envoy.filters.http.router")
            .unwrap();
        let without = format!("{}{}", &DEMO[..start], &DEMO[end..]);
        match &check_text(&without).unwrap()[0].outcome {
            Outcome::Invalid(err) => assert_eq!(err.path, "config.configuration"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn envoy_config_in_json_and_several_documents_are_walked() {
        let docs = YamlLoader::load_from_str(DEMO).unwrap();
        let json = yaml_to_json(&docs[0]).to_string();
        let findings = check_text(&json).unwrap();
        assert!(matches!(findings[0].outcome, Outcome::Valid(_)));
        let two = format!("{DEMO}\n---\n{DEMO}");
        let findings = check_text(&two).unwrap();
        assert_eq!(findings.len(), 2);
        assert!(findings[1]
            .location
            .starts_with("(document 2).static_resources"));
    }

    #[test]
    fn a_compose_file_is_skipped() {
        let compose = check_text(include_str!("../../envoy/docker-compose.yaml")).unwrap();
        assert!(matches!(compose[0].outcome, Outcome::NotKeygate(_)));
    }

    #[test]
    fn broken_yaml_is_reported() {
        let err = check_text("static_resources: [unclosed\n").unwrap_err();
        assert!(err.starts_with("not valid YAML"), "{err}");
    }
}

/// Warnings for keygate filters that would share state by accident: two filters with the same
/// `vm_id` and the same plugin `name` share their stats (`keygate.<name>.*`) and the namespace of
/// their rate-limit and budget counters and key-service data. Keys are told apart by their
/// secret or their key service, but the two filters' numbers still merge: give each a `name`.
pub fn shared_namespace_warnings(text: &str) -> Vec<String> {
    let docs: Vec<Value> = if text.trim_start().starts_with('{') {
        serde_json::from_str::<Value>(text).into_iter().collect()
    } else {
        YamlLoader::load_from_str(text)
            .map(|docs| docs.iter().map(yaml_to_json).collect())
            .unwrap_or_default()
    };
    fn collect(node: &Value, path: &str, out: &mut Vec<(String, String, String)>) {
        match node {
            Value::Object(fields) => {
                if fields.get("@type").and_then(Value::as_str) == Some(WASM_FILTER_TYPE) {
                    let root_id = text_at(fields, &["config", "root_id"]);
                    let file = text_at(
                        fields,
                        &["config", "vm_config", "code", "local", "filename"],
                    );
                    if root_id == Some("keygate") || file.is_some_and(|f| f.contains("keygate")) {
                        let vm_id =
                            text_at(fields, &["config", "vm_config", "vm_id"]).unwrap_or("");
                        let name = text_at(fields, &["config", "configuration", "value"])
                            .and_then(|json| serde_json::from_str::<Value>(json).ok())
                            .and_then(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
                            .unwrap_or_else(|| "keygate".to_string());
                        out.push((path.to_string(), vm_id.to_string(), name));
                    }
                    return;
                }
                for (key, child) in fields {
                    collect(child, &join(path, key), out);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    collect(child, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let mut filters = Vec::new();
    for doc in &docs {
        collect(doc, "", &mut filters);
    }
    let mut warnings = Vec::new();
    for (i, (path, vm_id, name)) in filters.iter().enumerate() {
        let first = filters
            .iter()
            .take(i)
            .find(|(_, v, n)| v == vm_id && n == name);
        if let Some((first_path, _, _)) = first {
            warnings.push(format!(
                "{path}: keygate \"{name}\" in vm_id \"{vm_id}\" is also at {first_path}: the two \
                 filters share stats and the namespace of their limit counters; give each its own \
                 \"name\" in the plugin configuration"
            ));
        }
    }
    warnings
}

#[cfg(test)]
mod shared_namespace_tests {
    use super::*;

    fn filter(vm_id: &str, plugin_json: &str) -> String {
        format!(
            r#"{{"name": "keygate", "typed_config": {{"@type": "{WASM_FILTER_TYPE}", "config": {{
                "root_id": "keygate", "vm_config": {{"vm_id": "{vm_id}"}},
                "configuration": {{"@type": "{STRING_VALUE_TYPE}", "value": {plugin_json:?}}}}}}}}}"#
        )
    }

    #[test]
    fn two_filters_with_one_vm_id_and_the_default_name_are_warned_about() {
        let plain = r#"{"credentials": [{"in": "header"}]}"#;
        let named = r#"{"name": "tenant-b", "credentials": [{"in": "header"}]}"#;
        let config = |a: &str, b: &str, vm_b: &str| {
            format!(
                r#"{{"static_resources": {{"filters": [{}, {}]}}}}"#,
                filter("shared", a),
                filter(vm_b, b)
            )
        };
        let warnings = shared_namespace_warnings(&config(plain, plain, "shared"));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("keygate \"keygate\" in vm_id \"shared\""));
        assert!(shared_namespace_warnings(&config(plain, named, "shared")).is_empty());
        assert!(shared_namespace_warnings(&config(plain, plain, "other")).is_empty());
    }
}
