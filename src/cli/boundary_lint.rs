//! The boundary linter of `keygate config check`: keygate decides on what Envoy hands it, so an
//! Envoy config around a correct keygate config can still open a door (a public route that
//! also serves protected paths, an upstream that reads a path or header differently, a browser
//! origin that reads session responses). Each rule names where it found the problem and the fix.
//!
//! A new rule is one `Rule` variant (id, fix) and the check that emits it.

use serde_json::{Map, Value};
use yaml_rust2::YamlLoader;

use super::config_check::{
    discovered_keygate_source, is_keygate_filter, yaml_to_json, WASM_FILTER_TYPE,
};

/// `typed_config` type of Envoy's HTTP connection manager.
pub const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// The comment that accepts a rule for a whole file, after a deliberate choice:
/// `# keygate config check: accept query-credential`.
pub const ACCEPT_MARKER: &str = "keygate config check: accept ";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    PathNormalization,
    UnderscoreHeaders,
    CredentialedAnyOrigin,
    FailOpen,
    QueryCredential,
    PublicRoutePrefix,
}

impl Rule {
    pub const ALL: [Rule; 6] = [
        Rule::PathNormalization,
        Rule::UnderscoreHeaders,
        Rule::CredentialedAnyOrigin,
        Rule::FailOpen,
        Rule::QueryCredential,
        Rule::PublicRoutePrefix,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Rule::PathNormalization => "path-normalization",
            Rule::UnderscoreHeaders => "underscore-headers",
            Rule::CredentialedAnyOrigin => "credentialed-any-origin",
            Rule::FailOpen => "fail-open",
            Rule::QueryCredential => "query-credential",
            Rule::PublicRoutePrefix => "public-route-prefix",
        }
    }

    pub fn fix(self) -> &'static str {
        match self {
            Rule::PathNormalization => {
                "set normalize_path: true, merge_slashes: true and \
                 path_with_escaped_slashes_action: REJECT_REQUEST (or UNESCAPE_AND_REDIRECT) on \
                 this connection manager"
            }
            Rule::UnderscoreHeaders => {
                "set common_http_protocol_options: { headers_with_underscores_action: \
                 REJECT_REQUEST } on this connection manager"
            }
            Rule::CredentialedAnyOrigin => {
                "list the exact origins of your own web apps in allow_origin_string_match, or \
                 drop allow_credentials"
            }
            Rule::FailOpen => "set failure_policy: FAIL_CLOSED in the filter's config",
            Rule::QueryCredential => {
                "read the key from a header; if a query key is unavoidable, keep query strings \
                 out of access logs and add the comment \
                 `# keygate config check: accept query-credential` to the file"
            }
            Rule::PublicRoutePrefix => {
                "match the public route with `path` (exact) or `path_separated_prefix`, or a \
                 prefix ending in '/' that no protected route starts with"
            }
        }
    }

    pub fn from_id(id: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.id() == id)
    }
}

/// One boundary problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub rule: Rule,
    /// JSON/YAML path in the file (`static_resources.listeners[0]…`).
    pub location: String,
    pub problem: String,
    /// The file accepts this rule with an `ACCEPT_MARKER` comment: reported, not counted.
    pub accepted: bool,
}

/// Every boundary warning for a file's text: an Envoy config (YAML or JSON) or a plugin JSON.
pub fn lint_text(text: &str) -> Result<Vec<Warning>, String> {
    let docs: Vec<Value> = if text.trim_start().starts_with('{') {
        vec![serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?]
    } else {
        YamlLoader::load_from_str(text)
            .map_err(|e| format!("not valid YAML: {e}"))?
            .iter()
            .map(yaml_to_json)
            .collect()
    };
    let mut warnings = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let root = if docs.len() > 1 {
            format!("(document {})", i + 1)
        } else {
            String::new()
        };
        match doc {
            Value::Object(top) if top.contains_key("credentials") => {
                lint_plugin(doc, &root, &mut warnings)
            }
            _ => walk(doc, &root, &mut warnings),
        }
    }
    let accepted = accepted_rules(text);
    for w in &mut warnings {
        w.accepted = accepted.contains(&w.rule);
    }
    Ok(warnings)
}

fn accepted_rules(text: &str) -> Vec<Rule> {
    text.lines()
        .filter_map(|line| line.trim_start().strip_prefix('#'))
        .filter_map(|comment| comment.trim().strip_prefix(ACCEPT_MARKER))
        .filter_map(|id| Rule::from_id(id.trim()))
        .collect()
}

fn warn(out: &mut Vec<Warning>, rule: Rule, location: &str, problem: String) {
    out.push(Warning {
        rule,
        location: location.to_string(),
        problem,
        accepted: false,
    });
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn at<'a>(node: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().try_fold(node, |n, k| n.get(*k))
}

fn walk(node: &Value, path: &str, out: &mut Vec<Warning>) {
    match node {
        Value::Object(fields) => {
            match fields.get("@type").and_then(Value::as_str) {
                Some(HCM_TYPE) => lint_hcm(node, path, out),
                Some(WASM_FILTER_TYPE) if is_keygate_filter(fields) => {
                    lint_keygate_filter(node, path, out)
                }
                _ => {}
            }
            if fields.contains_key("allow_credentials") {
                lint_cors(fields, path, out);
            }
            for (key, child) in fields {
                walk(child, &join(path, key), out);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                walk(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The plugin JSON inside a keygate wasm filter's `typed_config`.
fn plugin_of(typed_config: &Value) -> Option<Value> {
    let json = at(typed_config, &["config", "configuration", "value"])?.as_str()?;
    serde_json::from_str(json).ok()
}

fn lint_keygate_filter(typed_config: &Value, path: &str, out: &mut Vec<Warning>) {
    let policy = at(typed_config, &["config", "failure_policy"]).and_then(Value::as_str);
    if policy != Some("FAIL_CLOSED") {
        warn(
            out,
            Rule::FailOpen,
            &join(path, "config.failure_policy"),
            format!(
                "keygate's failure_policy is {}: a crashed or unconfigured filter must refuse \
                 requests, not pass them",
                policy.unwrap_or("unset")
            ),
        );
    }
    if let Some(plugin) = plugin_of(typed_config) {
        lint_plugin(&plugin, &join(path, "config.configuration.value"), out);
    }
}

/// Whether the policy named `name` (or the default policy, for `None`) needs no credential.
fn is_public_policy(plugin: &Value, name: Option<&str>) -> bool {
    let spec = match name {
        Some(name) => at(plugin, &["policies", name]),
        None => plugin.get("default_policy"),
    };
    spec.and_then(|s| s.get("auth")).and_then(Value::as_str) == Some("none")
}

fn lint_plugin(plugin: &Value, path: &str, out: &mut Vec<Warning>) {
    let credentials = plugin.get("credentials").and_then(Value::as_array);
    for (i, source) in credentials.into_iter().flatten().enumerate() {
        if source.get("in").and_then(Value::as_str) == Some("query") {
            warn(
                out,
                Rule::QueryCredential,
                &join(path, &format!("credentials[{i}]")),
                "a credential source reads the key from the query string, which lands in \
                 access logs and proxy logs"
                    .into(),
            );
        }
    }
    // The plugin's own path rules: the first matching rule wins.
    let rules: Vec<RouteMatch> = plugin
        .get("routes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, rule)| {
            Some(RouteMatch {
                location: join(path, &format!("routes[{i}].path_prefix")),
                kind: MatchKind::Prefix,
                value: rule.get("path_prefix")?.as_str()?.to_string(),
                public: is_public_policy(plugin, rule.get("policy").and_then(Value::as_str)),
                forwards: true,
            })
        })
        .collect();
    lint_public_routes(&rules, out);
}

fn lint_cors(policy: &Map<String, Value>, path: &str, out: &mut Vec<Warning>) {
    if policy.get("allow_credentials") != Some(&Value::Bool(true)) {
        return;
    }
    let origins = policy
        .get("allow_origin_string_match")
        .and_then(Value::as_array);
    for (i, matcher) in origins.into_iter().flatten().enumerate() {
        if matches_any_origin(matcher) {
            warn(
                out,
                Rule::CredentialedAnyOrigin,
                &join(path, &format!("allow_origin_string_match[{i}]")),
                format!(
                    "a CORS policy allows credentials for {matcher}: any web page can read \
                     responses made with a signed-in user's cookies"
                ),
            );
        }
    }
}

/// A string matcher that accepts any origin (or any origin of a scheme).
fn matches_any_origin(matcher: &Value) -> bool {
    let text = |key| matcher.get(key).and_then(Value::as_str);
    let any_scheme = |s: &str| {
        [
            "", "http", "https", "http:", "https:", "http://", "https://",
        ]
        .contains(&s)
    };
    if text("exact") == Some("*")
        || text("prefix").is_some_and(any_scheme)
        || text("suffix") == Some("")
        || text("contains") == Some("")
    {
        return true;
    }
    let Some(regex) = at(matcher, &["safe_regex", "regex"]).and_then(Value::as_str) else {
        return false;
    };
    let core = regex.trim_start_matches('^').trim_end_matches('$');
    let core = core
        .strip_prefix("https?://")
        .or_else(|| core.strip_prefix("https://"))
        .or_else(|| core.strip_prefix("http://"))
        .unwrap_or(core);
    [".*", ".+", "(.*)", "(.+)", ".*.*", "[^/]*", "[^/]+"].contains(&core)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MatchKind {
    Prefix,
    Path,
    PathSeparatedPrefix,
    /// A regex or another matcher this linter cannot compare.
    Other,
}

struct RouteMatch {
    location: String,
    kind: MatchKind,
    value: String,
    public: bool,
    /// The route sends requests upstream (not a redirect or a direct response).
    forwards: bool,
}

impl RouteMatch {
    /// Whether this public match also takes requests for `path` (a protected route's match).
    fn covers(&self, path: &str) -> bool {
        match self.kind {
            MatchKind::Prefix => path.starts_with(&self.value),
            MatchKind::PathSeparatedPrefix => {
                path == self.value
                    || path
                        .strip_prefix(self.value.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            }
            MatchKind::Path | MatchKind::Other => false,
        }
    }
}

fn lint_public_routes(routes: &[RouteMatch], out: &mut Vec<Warning>) {
    for public in routes.iter().filter(|r| r.public) {
        match public.kind {
            MatchKind::Prefix if !public.value.ends_with('/') => warn(
                out,
                Rule::PublicRoutePrefix,
                &public.location,
                format!(
                    "the public prefix \"{p}\" also matches longer paths (\"{p}-admin\")",
                    p = public.value
                ),
            ),
            MatchKind::Other => warn(
                out,
                Rule::PublicRoutePrefix,
                &public.location,
                "a public route with a matcher this check cannot compare (regex or template)"
                    .into(),
            ),
            _ => {}
        }
        for protected in routes.iter().filter(|r| !r.public && r.forwards) {
            if protected.kind != MatchKind::Other && public.covers(&protected.value) {
                warn(
                    out,
                    Rule::PublicRoutePrefix,
                    &public.location,
                    format!(
                        "the public route \"{}\" also covers the protected route \"{}\" ({})",
                        public.value, protected.value, protected.location
                    ),
                );
            }
        }
    }
}

/// Checks of one connection manager that has a keygate filter.
fn lint_hcm(hcm: &Value, path: &str, out: &mut Vec<Warning>) {
    let filters = hcm.get("http_filters").and_then(Value::as_array);
    let keygate: Vec<(&str, Option<Value>)> = filters
        .into_iter()
        .flatten()
        .filter_map(|f| {
            let name = f.get("name").and_then(Value::as_str).unwrap_or("");
            if f.as_object().and_then(discovered_keygate_source).is_some() {
                // Its plugin config lives elsewhere (ECDS): assume it reads the path.
                return Some((name, None));
            }
            let typed = f.get("typed_config")?;
            let fields = typed.as_object()?;
            (fields.get("@type").and_then(Value::as_str) == Some(WASM_FILTER_TYPE)
                && is_keygate_filter(fields))
            .then(|| (name, plugin_of(typed)))
        })
        .collect();
    let Some((filter_name, plugin)) = keygate.first() else {
        return;
    };
    let plugin = plugin.clone().unwrap_or(Value::Null);
    let routes = envoy_routes(hcm, path, filter_name, &plugin);

    let plugin_reads_path = keygate.iter().any(|(_, p)| {
        p.is_none()
            || ["policies", "routes", "tenant_selectors"].iter().any(|k| {
                p.as_ref().and_then(|p| p.get(*k)).is_some_and(|v| {
                    v.as_object().is_some_and(|o| !o.is_empty())
                        || v.as_array().is_some_and(|a| !a.is_empty())
                })
            })
    });
    let routes_name_policies = routes_carry_keygate_policy(hcm);
    if plugin_reads_path || routes_name_policies {
        let mut missing = Vec::new();
        if hcm.get("normalize_path") != Some(&Value::Bool(true)) {
            missing.push("normalize_path: true");
        }
        if hcm.get("merge_slashes") != Some(&Value::Bool(true)) {
            missing.push("merge_slashes: true");
        }
        let escaped = hcm
            .get("path_with_escaped_slashes_action")
            .and_then(Value::as_str);
        if !matches!(escaped, Some("REJECT_REQUEST" | "UNESCAPE_AND_REDIRECT")) {
            missing.push("path_with_escaped_slashes_action");
        }
        if !missing.is_empty() {
            warn(
                out,
                Rule::PathNormalization,
                path,
                format!(
                    "keygate's policies depend on the path, but this connection manager routes \
                     on the raw path (missing {}): /public/../protected gets the public route's policy",
                    missing.join(", ")
                ),
            );
        }
    }
    let underscores = at(
        hcm,
        &[
            "common_http_protocol_options",
            "headers_with_underscores_action",
        ],
    )
    .and_then(Value::as_str);
    if underscores != Some("REJECT_REQUEST") {
        warn(
            out,
            Rule::UnderscoreHeaders,
            &join(path, "common_http_protocol_options"),
            "headers with underscores reach the upstream, where CGI/WSGI-style servers read \
             x_keygate_user as x-keygate-user"
                .into(),
        );
    }
    lint_public_routes(&routes, out);
}

fn routes_carry_keygate_policy(hcm: &Value) -> bool {
    virtual_host_routes(hcm)
        .any(|(_, route)| at(route, &["metadata", "filter_metadata", "keygate"]).is_some())
}

/// Every route of the connection manager's inline route table, with its path suffix.
fn virtual_host_routes(hcm: &Value) -> impl Iterator<Item = (String, &Value)> {
    let hosts = at(hcm, &["route_config", "virtual_hosts"]).and_then(Value::as_array);
    hosts
        .into_iter()
        .flatten()
        .enumerate()
        .flat_map(|(v, host)| {
            let routes = host.get("routes").and_then(Value::as_array);
            routes
                .into_iter()
                .flatten()
                .enumerate()
                .map(move |(r, route)| {
                    (
                        format!("route_config.virtual_hosts[{v}].routes[{r}]"),
                        route,
                    )
                })
        })
}

fn envoy_routes(hcm: &Value, path: &str, filter_name: &str, plugin: &Value) -> Vec<RouteMatch> {
    virtual_host_routes(hcm)
        .map(|(suffix, route)| {
            let matcher = route.get("match");
            let (kind, key) = [
                (MatchKind::Prefix, "prefix"),
                (MatchKind::Path, "path"),
                (MatchKind::PathSeparatedPrefix, "path_separated_prefix"),
            ]
            .into_iter()
            .find(|(_, key)| matcher.and_then(|m| m.get(*key)).is_some())
            .unwrap_or((MatchKind::Other, "match"));
            let value = matcher
                .and_then(|m| m.get(key))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let policy = at(route, &["metadata", "filter_metadata", "keygate", "policy"])
                .and_then(Value::as_str);
            let keygate_off = at(route, &["typed_per_filter_config", filter_name, "disabled"])
                == Some(&Value::Bool(true));
            RouteMatch {
                location: join(path, &format!("{suffix}.match.{key}")),
                kind,
                value,
                public: keygate_off || is_public_policy(plugin, policy),
                forwards: route.get("route").is_some(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEMO: &str = include_str!("../../envoy/demo.yaml");
    const ABACO: &str = include_str!("../../envoy/abaco.yaml");

    fn rules(text: &str) -> Vec<Rule> {
        lint_text(text)
            .unwrap()
            .into_iter()
            .filter(|w| !w.accepted)
            .map(|w| w.rule)
            .collect()
    }

    #[test]
    fn the_shipped_demo_and_abaco_configs_are_clean() {
        assert_eq!(rules(DEMO), vec![]);
        assert_eq!(rules(ABACO), vec![]);
    }

    /// tests/fixtures/boundary_configs.json: one edit of a shipped config per warning, shared
    /// with tests/cli.rs (which runs them through `keygate config check --strict`).
    #[test]
    fn each_bad_boundary_fixture_is_caught_by_its_rule_at_its_location() {
        let fixtures: Vec<Value> =
            serde_json::from_str(include_str!("../../tests/fixtures/boundary_configs.json"))
                .unwrap();
        for f in &fixtures {
            let base = match f["config"].as_str().unwrap() {
                "demo.yaml" => DEMO,
                "abaco.yaml" => ABACO,
                other => panic!("no fixture base {other}"),
            };
            let old = f["old"].as_str().unwrap();
            assert!(
                base.contains(old),
                "fixture {} no longer matches",
                f["name"]
            );
            let text = base.replacen(old, f["new"].as_str().unwrap(), 1);
            let warnings = lint_text(&text).unwrap();
            let rule = Rule::from_id(f["rule"].as_str().unwrap()).unwrap();
            assert!(
                warnings
                    .iter()
                    .any(|w| w.rule == rule && w.location == f["location"] && !w.accepted),
                "{}: {warnings:#?}",
                f["name"]
            );
        }
        for rule in Rule::ALL {
            assert!(
                fixtures.iter().any(|f| f["rule"] == rule.id()),
                "no fixture for {}",
                rule.id()
            );
        }
    }

    #[test]
    fn every_rule_has_a_distinct_id_that_round_trips() {
        for rule in Rule::ALL {
            assert_eq!(Rule::from_id(rule.id()), Some(rule));
            assert!(!rule.fix().is_empty());
        }
    }

    #[test]
    fn an_accepted_rule_is_reported_but_not_counted() {
        let text = format!(
            "# {ACCEPT_MARKER}fail-open\n{}",
            DEMO.replace("FAIL_CLOSED", "FAIL_OPEN")
        );
        let warnings = lint_text(&text).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].accepted);
    }

    #[test]
    fn origin_matchers_that_accept_anything_are_recognized() {
        for m in [
            serde_json::json!({"exact": "*"}),
            serde_json::json!({"prefix": ""}),
            serde_json::json!({"prefix": "https://"}),
            serde_json::json!({"safe_regex": {"regex": ".*"}}),
            serde_json::json!({"safe_regex": {"regex": "^https?://.+$"}}),
        ] {
            assert!(matches_any_origin(&m), "{m}");
        }
        for m in [
            serde_json::json!({"exact": "https://app.example"}),
            serde_json::json!({"suffix": ".app.example"}),
            serde_json::json!({"safe_regex": {"regex": "https://[a-z]+\\.app\\.example"}}),
        ] {
            assert!(!matches_any_origin(&m), "{m}");
        }
    }

    #[test]
    fn a_plugin_json_file_is_linted_for_its_sources_and_path_rules() {
        let plugin = r#"{"credentials": [{"in": "header"}, {"in": "query", "name": "k"}],
            "policies": {"open": {"auth": "none"}, "admin": {"required_permissions": ["a"]}},
            "routes": [{"path_prefix": "/status/", "policy": "open"},
                       {"path_prefix": "/status/admin", "policy": "admin"}]}"#;
        let warnings = lint_text(plugin).unwrap();
        let found: Vec<(Rule, &str)> = warnings
            .iter()
            .map(|w| (w.rule, w.location.as_str()))
            .collect();
        assert_eq!(
            found,
            vec![
                (Rule::QueryCredential, "credentials[1]"),
                (Rule::PublicRoutePrefix, "routes[0].path_prefix"),
            ]
        );
        assert!(warnings[1].problem.contains("\"/status/admin\""));
    }

    #[test]
    fn a_connection_manager_with_a_discovered_keygate_filter_is_linted() {
        let hot = include_str!("../../envoy/hot-reload.yaml");
        assert_eq!(rules(hot), vec![]);
        let bare = hot.replace("          normalize_path: true\n", "");
        assert_eq!(rules(&bare), vec![Rule::PathNormalization]);
    }

    #[test]
    fn a_path_separated_prefix_covers_only_its_own_subtree() {
        let public = RouteMatch {
            location: String::new(),
            kind: MatchKind::PathSeparatedPrefix,
            value: "/health".into(),
            public: true,
            forwards: true,
        };
        assert!(public.covers("/health/admin"));
        assert!(public.covers("/health"));
        assert!(!public.covers("/healthz-admin"));
    }
}
