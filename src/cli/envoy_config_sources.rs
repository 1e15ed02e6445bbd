//! Where `keygate config check` finds keygate configurations: the file it is given, and the
//! files that file points Envoy at. Envoy's extension config discovery (ECDS, an HTTP filter's
//! `config_discovery`) with a `path_config_source` loads the filter's config from another file;
//! the check follows it there, so a config whose keygate filter lives in an ECDS file is checked
//! as Envoy would load it. Config sources served by a management server cannot be followed
//! offline: they are reported, not checked.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use yaml_rust2::YamlLoader;

use super::config_check::{
    check_plugin_json, check_text, yaml_to_json, Finding, Outcome, WASM_FILTER_TYPE,
};
use crate::core::config::ConfigError;

/// One file's result, in the order the files were reached.
#[derive(Debug)]
pub struct FileReport {
    pub file: PathBuf,
    /// For a followed file: the referencing file and the path of the reference in it.
    pub referenced_from: Option<(PathBuf, String)>,
    pub result: Result<Vec<Finding>, String>,
}

/// A `config_discovery` of an HTTP filter that may be keygate's.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    /// The path of the reference inside its file.
    location: String,
    /// The file, or `None` for a source the check cannot read (ADS, an API server).
    path: Option<String>,
    /// The HTTP filter's `name`: Envoy serves it the ECDS resource of that name.
    filter_name: Option<String>,
}

/// Checks `file` and every file it points at through `config_discovery`, recursively (each file
/// once). Relative paths in references are resolved from `working_dir`, the directory Envoy
/// runs in (Envoy resolves them from its own working directory).
pub fn check_file(file: &Path, working_dir: &Path) -> Vec<FileReport> {
    let mut reports = Vec::new();
    // Per report: its only problem is that it holds no keygate filter (decided at the end).
    let mut lacks_keygate_only = Vec::new();
    let mut queue: Vec<(PathBuf, Option<(PathBuf, Reference)>)> = vec![(file.to_path_buf(), None)];
    let mut seen: Vec<PathBuf> = Vec::new();
    while let Some((path, via)) = queue.pop() {
        if seen.contains(&path) {
            continue;
        }
        seen.push(path.clone());
        let referenced_from = via
            .as_ref()
            .map(|(from, reference)| (from.clone(), reference.location.clone()));
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) => {
                reports.push(FileReport {
                    file: path,
                    referenced_from,
                    result: Err(format!("cannot read: {err}")),
                });
                lacks_keygate_only.push(false);
                continue;
            }
        };
        let docs = documents(&text);
        let mut result = match docs.as_deref().and_then(not_envoy) {
            Some(other) => other,
            None => check_text(&text),
        };
        // check_text refuses a file it can parse only when it holds no keygate filter.
        lacks_keygate_only.push(result.is_err() && docs.is_some());
        let docs = docs.unwrap_or_default();
        if let (Ok(findings), Some((_, reference))) = (&mut result, &via) {
            findings.extend(missing_resource(&docs, reference));
        }
        let mut followed = Vec::new();
        for reference in references_in(&docs) {
            match &reference.path {
                Some(target) => {
                    followed.push((working_dir.join(target), Some((path.clone(), reference))))
                }
                None => {
                    if let Ok(findings) = &mut result {
                        findings.push(Finding {
                            location: reference.location.clone(),
                            filter_name: reference.filter_name.clone(),
                            outcome: Outcome::NotKeygate(
                                "a filter config served by a management server: only \
                                 path_config_source files can be checked offline"
                                    .into(),
                            ),
                        });
                    }
                }
            }
        }
        reports.push(FileReport {
            file: path,
            referenced_from,
            result,
        });
        // Depth-first, in the order the references appear.
        queue.extend(followed.into_iter().rev());
    }
    require_a_keygate_filter(&mut reports, &lacks_keygate_only);
    reports
}

/// Files that load keygate without an Envoy config of their own: Kubernetes manifests (Istio's
/// WasmPlugin, Envoy Gateway's EnvoyExtensionPolicy) whose plugin config is checked, and a
/// Docker Compose file, skipped. `None`: an Envoy config or a plugin JSON file.
fn not_envoy(docs: &[Value]) -> Option<Result<Vec<Finding>, String>> {
    let manifests: Vec<(usize, &Value)> = docs
        .iter()
        .enumerate()
        .filter(|(_, d)| d.get("apiVersion").is_some() && d.get("kind").is_some())
        .collect();
    if !manifests.is_empty() {
        let mut findings = Vec::new();
        for (i, doc) in manifests {
            let root = if docs.len() > 1 {
                format!("(document {}).", i + 1)
            } else {
                String::new()
            };
            findings.extend(manifest_findings(doc, &root));
        }
        if findings.is_empty() {
            return Some(Err(
                "no keygate plugin found (looked for an Istio WasmPlugin and \
                             an Envoy Gateway EnvoyExtensionPolicy wasm entry)"
                    .into(),
            ));
        }
        return Some(Ok(findings));
    }
    let compose = matches!(docs, [doc] if doc.get("services").is_some()
        && ["static_resources", "dynamic_resources", "resources", "credentials"]
            .iter()
            .all(|k| doc.get(*k).is_none()));
    compose.then(|| {
        Ok(vec![Finding {
            location: String::new(),
            filter_name: None,
            outcome: Outcome::NotKeygate("a Docker Compose file, not an Envoy config".into()),
        }])
    })
}

/// keygate's plugin config in one manifest: Istio hands `spec.pluginConfig`, Envoy Gateway a
/// wasm entry's `config`, to the plugin as JSON text.
fn manifest_findings(doc: &Value, root: &str) -> Vec<Finding> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    let name = doc
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str);
    let spec = doc.get("spec");
    let field = |key: &str| spec.and_then(|s| s.get(key));
    let mut plugins: Vec<(String, Option<&Value>)> = Vec::new();
    match doc.get("kind").and_then(Value::as_str) {
        Some("WasmPlugin") => {
            let keygate =
                text(field("pluginName")) == "keygate" || text(field("url")).contains("keygate");
            if keygate {
                plugins.push((format!("{root}spec.pluginConfig"), field("pluginConfig")));
            }
        }
        Some("EnvoyExtensionPolicy") => {
            let entries = field("wasm")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for (i, entry) in entries.iter().enumerate() {
                let image = entry
                    .get("code")
                    .and_then(|c| c.get("image"))
                    .and_then(|i| i.get("url"));
                let keygate =
                    text(entry.get("rootID")) == "keygate" || text(image).contains("keygate");
                if keygate {
                    plugins.push((format!("{root}spec.wasm[{i}].config"), entry.get("config")));
                }
            }
        }
        _ => {}
    }
    plugins
        .into_iter()
        .map(|(location, config)| Finding {
            outcome: match config {
                Some(config @ Value::Object(_)) => check_plugin_json(config.to_string().as_bytes()),
                Some(_) => Outcome::Invalid(ConfigError::new(
                    location.as_str(),
                    "must be keygate's plugin config, an object",
                )),
                None => Outcome::Invalid(ConfigError::new(
                    location.as_str(),
                    "missing: keygate refuses to start without a plugin configuration",
                )),
            },
            location,
            filter_name: name.map(str::to_string),
        })
        .collect()
}

/// Envoy hands a filter the ECDS resource named like the filter: a file without it leaves the
/// filter unconfigured (the listener never warms).
fn missing_resource(docs: &[Value], reference: &Reference) -> Option<Finding> {
    let wanted = reference.filter_name.as_deref()?;
    let named: Vec<&str> = docs
        .iter()
        .filter_map(|d| d.get("resources")?.as_array())
        .flatten()
        .filter_map(|r| r.get("name")?.as_str())
        .collect();
    if named.contains(&wanted) {
        return None;
    }
    Some(Finding {
        location: "resources".into(),
        filter_name: None,
        outcome: Outcome::Invalid(ConfigError::new(
            "resources",
            format!(
                "no resource named \"{wanted}\": the filter that points here ({}) gets only \
                 the resource of its own name (found: {})",
                reference.location,
                if named.is_empty() {
                    "none".to_string()
                } else {
                    named.join(", ")
                }
            ),
        )),
    })
}

fn is_keygate(finding: &Finding) -> bool {
    !matches!(finding.outcome, Outcome::NotKeygate(_))
}

/// Some file reached must hold a keygate filter; a followed file holding another wasm filter is
/// fine when keygate is found elsewhere. When none holds one, the file given says so.
fn require_a_keygate_filter(reports: &mut [FileReport], lacks_keygate_only: &[bool]) {
    let found = reports
        .iter()
        .any(|r| r.result.as_ref().is_ok_and(|f| f.iter().any(is_keygate)));
    let followed = reports.len() > 1;
    for (i, (report, lacks)) in reports.iter_mut().zip(lacks_keygate_only).enumerate() {
        if !lacks {
            continue;
        }
        if found || i > 0 {
            report.result = Ok(Vec::new());
        } else if followed {
            report.result = Err(
                "no keygate filter found, neither here nor in the files its config_discovery \
                 points at"
                    .into(),
            );
        }
    }
}

/// The file's documents in the JSON data model, `None` when it is neither JSON nor YAML.
fn documents(text: &str) -> Option<Vec<Value>> {
    if text.trim_start().starts_with('{') {
        if let Ok(value) = serde_json::from_str::<Value>(text) {
            return Some(vec![value]);
        }
    }
    let docs = YamlLoader::load_from_str(text).ok()?;
    Some(docs.iter().map(yaml_to_json).collect())
}

/// Every `config_discovery` in the documents that may deliver a wasm filter.
fn references_in(docs: &[Value]) -> Vec<Reference> {
    let mut out = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let root = if docs.len() > 1 {
            format!("(document {})", i + 1)
        } else {
            String::new()
        };
        walk(doc, &root, None, &mut out);
    }
    out
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Depth-first; `name` is the `name` of the enclosing filter entry.
fn walk(node: &Value, path: &str, name: Option<&str>, out: &mut Vec<Reference>) {
    match node {
        Value::Object(fields) => {
            let own_name = fields.get("name").and_then(Value::as_str);
            for (key, child) in fields {
                let at = join(path, key);
                match (key.as_str(), child) {
                    ("config_discovery", Value::Object(discovery)) => {
                        out.extend(reference(discovery, &at, own_name));
                    }
                    _ => walk(child, &at, own_name.or(name), out),
                }
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

/// A `config_discovery` whose `type_urls` admit Envoy's wasm filter (no `type_urls`: any).
fn reference(discovery: &Map<String, Value>, at: &str, name: Option<&str>) -> Option<Reference> {
    if let Some(Value::Array(types)) = discovery.get("type_urls") {
        if !types.iter().any(|t| t.as_str() == Some(WASM_FILTER_TYPE)) {
            return None;
        }
    }
    let source = discovery.get("config_source")?;
    // `config_source.path` is the deprecated spelling of `path_config_source.path`.
    let (path, location) = match source.get("path_config_source").and_then(|p| p.get("path")) {
        Some(path) => (Some(path), "config_source.path_config_source.path"),
        None => match source.get("path") {
            Some(path) => (Some(path), "config_source.path"),
            None => (None, "config_source"),
        },
    };
    Some(Reference {
        location: join(at, location),
        path: path.and_then(Value::as_str).map(str::to_string),
        filter_name: name.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOT_RELOAD: &str = include_str!("../../envoy/hot-reload.yaml");
    const ECDS: &str = include_str!("../../envoy/hot-reload/keygate.yaml");
    const ROOT: &str = env!("CARGO_MANIFEST_DIR");

    #[test]
    fn an_ecds_path_config_source_is_found_with_its_location() {
        let refs = references_in(&documents(HOT_RELOAD).unwrap());
        assert_eq!(
            refs,
            vec![Reference {
                location: "static_resources.listeners[0].filter_chains[0].filters[0]\
                           .typed_config.http_filters[0].config_discovery.config_source\
                           .path_config_source.path"
                    .into(),
                path: Some("envoy/hot-reload/keygate.yaml".into()),
                filter_name: Some("keygate".into()),
            }]
        );
    }

    #[test]
    fn a_discovery_of_another_filter_type_is_not_followed() {
        let other = HOT_RELOAD.replace(
            "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        );
        assert!(references_in(&documents(&other).unwrap()).is_empty());
    }

    #[test]
    fn a_management_server_source_is_reported_as_unreadable() {
        let ads = HOT_RELOAD.replace(
            "path_config_source: { path: envoy/hot-reload/keygate.yaml }",
            "ads: {}",
        );
        let refs = references_in(&documents(&ads).unwrap());
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].path, None);
        assert!(refs[0].location.ends_with("config_discovery.config_source"));
    }

    /// A scratch copy of envoy/hot-reload.yaml and its ECDS file, edited by `edit`.
    fn scratch(name: &str, edit: impl Fn(&str) -> String) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("keygate-sources-{name}-{}", std::process::id()));
        fs::create_dir_all(dir.join("envoy/hot-reload")).unwrap();
        fs::write(dir.join("envoy/hot-reload.yaml"), HOT_RELOAD).unwrap();
        fs::write(dir.join("envoy/hot-reload/keygate.yaml"), edit(ECDS)).unwrap();
        dir
    }

    #[test]
    fn the_shipped_hot_reload_config_is_checked_in_its_ecds_file() {
        let reports = check_file(
            &Path::new(ROOT).join("envoy/hot-reload.yaml"),
            Path::new(ROOT),
        );
        assert_eq!(reports.len(), 2);
        assert!(matches!(&reports[0].result, Ok(f) if f.is_empty()));
        let ecds = &reports[1];
        assert_eq!(
            ecds.file,
            Path::new(ROOT).join("envoy/hot-reload/keygate.yaml")
        );
        let (from, at) = ecds.referenced_from.clone().unwrap();
        assert_eq!(from, Path::new(ROOT).join("envoy/hot-reload.yaml"));
        assert!(at.ends_with("path_config_source.path"));
        let findings = ecds.result.as_ref().unwrap();
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].location, "resources[0].typed_config");
        assert!(
            matches!(&findings[0].outcome, Outcome::Valid(s) if s.name == "hot" && s.keys == 2)
        );
    }

    #[test]
    fn a_bad_plugin_config_in_the_ecds_file_is_reported_in_that_file() {
        let dir = scratch("bad", |ecds| {
            ecds.replace("\"secret_sha256\": \"7891", "\"secret_sha256\": \"zz91")
        });
        let reports = check_file(&dir.join("envoy/hot-reload.yaml"), &dir);
        let findings = reports[1].result.as_ref().unwrap();
        match &findings[0].outcome {
            Outcome::Invalid(err) => {
                assert!(err.path.starts_with("keys[0]"), "{err}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(findings[0].location, "resources[0].typed_config");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_ecds_file_without_the_filters_resource_name_is_refused() {
        let dir = scratch("name", |ecds| {
            ecds.replacen("  name: keygate", "  name: keygate-v2", 1)
        });
        let reports = check_file(&dir.join("envoy/hot-reload.yaml"), &dir);
        let findings = reports[1].result.as_ref().unwrap();
        let refused: Vec<_> = findings
            .iter()
            .filter_map(|f| match &f.outcome {
                Outcome::Invalid(err) => Some(err.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(refused.len(), 1, "{findings:?}");
        assert!(
            refused[0].contains("no resource named \"keygate\""),
            "{}",
            refused[0]
        );
        assert!(refused[0].contains("found: keygate-v2"), "{}", refused[0]);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_ecds_file_is_an_error_naming_the_reference() {
        let dir = scratch("missing", |ecds| ecds.to_string());
        fs::remove_file(dir.join("envoy/hot-reload/keygate.yaml")).unwrap();
        let reports = check_file(&dir.join("envoy/hot-reload.yaml"), &dir);
        assert!(matches!(&reports[1].result, Err(e) if e.starts_with("cannot read")));
        assert!(reports[1]
            .referenced_from
            .as_ref()
            .unwrap()
            .1
            .contains("config_discovery"));
        // Nothing else holds keygate: the file given says so too.
        assert!(matches!(&reports[0].result, Err(e) if e.contains("neither here nor")));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_ecds_file_holding_another_filter_is_no_keygate_filter() {
        let dir = scratch("other", |ecds| {
            ecds.replace("root_id: keygate", "root_id: other")
                .replace("keygate.wasm", "other.wasm")
        });
        let reports = check_file(&dir.join("envoy/hot-reload.yaml"), &dir);
        assert!(matches!(&reports[0].result, Err(e) if e.contains("no keygate filter found")));
        assert!(reports[1].result.is_ok());
        fs::remove_dir_all(dir).unwrap();
    }

    const ISTIO: &str = include_str!("../../docs/kubernetes/istio-wasmplugin.yaml");
    const GATEWAY: &str = include_str!("../../docs/kubernetes/envoy-gateway-extensionpolicy.yaml");
    const COMPOSE: &str = include_str!("../../envoy/docker-compose.yaml");

    fn only_finding(text: &str) -> Result<Vec<Finding>, String> {
        not_envoy(&documents(text).unwrap()).unwrap()
    }

    #[test]
    fn the_kubernetes_examples_carry_a_valid_keygate_config() {
        for (text, location) in [
            (ISTIO, "spec.pluginConfig"),
            (GATEWAY, "spec.wasm[0].config"),
        ] {
            let findings = only_finding(text).unwrap();
            assert_eq!(findings.len(), 1);
            assert_eq!(findings[0].location, location);
            assert_eq!(findings[0].filter_name.as_deref(), Some("keygate"));
            assert!(matches!(&findings[0].outcome, Outcome::Valid(s) if s.name == "demo"));
        }
    }

    #[test]
    fn a_bad_or_missing_manifest_config_is_refused_naming_where() {
        let bad = ISTIO.replace("\"prefixes\": [\"cmp_\"]", "\"prefixes\": [\"\"]");
        assert_ne!(bad, ISTIO);
        let findings = only_finding(&bad).unwrap();
        assert!(
            matches!(&findings[0].outcome, Outcome::Invalid(_)),
            "{findings:?}"
        );
        let start = GATEWAY.find("    config:").unwrap();
        let findings = only_finding(&GATEWAY[..start]).unwrap();
        match &findings[0].outcome {
            Outcome::Invalid(err) => assert_eq!(err.path, "spec.wasm[0].config"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_manifest_without_keygate_and_a_compose_file_are_told_apart() {
        let other = ISTIO
            .replace("pluginName: keygate", "pluginName: other")
            .replace("keygate-wasm", "other-wasm");
        assert!(only_finding(&other)
            .unwrap_err()
            .contains("no keygate plugin"));
        let compose = only_finding(COMPOSE).unwrap();
        assert!(matches!(&compose[0].outcome, Outcome::NotKeygate(why) if why.contains("Compose")));
        assert!(not_envoy(&documents(HOT_RELOAD).unwrap()).is_none());
    }
}
