//! envoy/global-ratelimit.yaml answers a global OVER_LIMIT through Envoy's `local_reply_config`
//! with a static body: it must be the very reply keygate renders for its own 429 from the same
//! listener's plugin config (language and message overrides included).

// Helpers outside `#[test]` functions are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use keygate::core::codes::ErrorCode;
use keygate::core::config::Config;
use yaml_rust2::{Yaml, YamlLoader};

const GLOBAL_RATELIMIT: &str = include_str!("../envoy/global-ratelimit.yaml");

/// Every value under a key named `key`, anywhere in the tree.
fn find_all<'a>(node: &'a Yaml, key: &str, out: &mut Vec<&'a Yaml>) {
    match node {
        Yaml::Hash(map) => {
            for (k, v) in map {
                if k.as_str() == Some(key) {
                    out.push(v);
                }
                find_all(v, key, out);
            }
        }
        Yaml::Array(items) => items.iter().for_each(|i| find_all(i, key, out)),
        _ => {}
    }
}

/// (keygate's own 429 body, the body the RL mapper of `local_reply_config` answers with).
fn both_429_bodies(envoy_yaml: &str) -> (String, String) {
    let doc = &YamlLoader::load_from_str(envoy_yaml).unwrap()[0];
    let mut configurations = Vec::new();
    find_all(doc, "configuration", &mut configurations);
    assert_eq!(configurations.len(), 1, "one keygate filter expected");
    let plugin = configurations[0];
    let (config, _) = Config::parse(plugin["value"].as_str().unwrap().as_bytes()).unwrap();
    let keygate_429 = config.replies.get(ErrorCode::RateLimitExceeded);
    assert_eq!(keygate_429.status, 429);

    let mut local_replies = Vec::new();
    find_all(doc, "local_reply_config", &mut local_replies);
    assert_eq!(local_replies.len(), 1, "one local_reply_config expected");
    let local_reply = local_replies[0];
    let mappers = local_reply["mappers"].as_vec().unwrap();
    let rate_limited = mappers
        .iter()
        .find(|m| m["filter"]["response_flag_filter"]["flags"][0].as_str() == Some("RL"))
        .unwrap();
    let format = &rate_limited["body_format_override"];
    assert_eq!(format["text_format"].as_str(), Some("%LOCAL_REPLY_BODY%"));
    let content_type = keygate_429
        .headers
        .iter()
        .find(|(name, _)| *name == "content-type")
        .unwrap();
    assert_eq!(
        format["content_type"].as_str(),
        Some(content_type.1.as_str())
    );
    (
        String::from_utf8(keygate_429.body).unwrap(),
        rate_limited["body"]["inline_string"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

#[test]
fn the_global_over_limit_body_is_keygates_own_429_body() {
    let (keygate, global) = both_429_bodies(GLOBAL_RATELIMIT);
    assert_eq!(global, keygate);
}

#[test]
fn a_config_in_spanish_needs_the_spanish_body() {
    let spanish = GLOBAL_RATELIMIT.replace(
        "\"name\": \"global\",",
        "\"name\": \"global\", \"language\": \"es\",",
    );
    let (keygate, global) = both_429_bodies(&spanish);
    assert_ne!(global, keygate, "the English body no longer matches");
    assert!(keygate.contains("Demasiadas solicitudes"), "{keygate}");
    // The Spanish body the shipped config's comment gives is the one that matches.
    let comment = GLOBAL_RATELIMIT
        .lines()
        .find_map(|l| {
            l.trim_start()
                .strip_prefix("#   {\"code\":\"RATE_LIMIT_EXCEEDED\"")
        })
        .unwrap();
    assert_eq!(
        format!("{{\"code\":\"RATE_LIMIT_EXCEEDED\"{comment}"),
        keygate
    );
}
