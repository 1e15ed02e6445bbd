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

#[test]
fn the_global_over_limit_body_is_keygates_own_429_body() {
    let doc = &YamlLoader::load_from_str(GLOBAL_RATELIMIT).unwrap()[0];
    let mut configurations = Vec::new();
    find_all(doc, "configuration", &mut configurations);
    let [plugin] = configurations.as_slice() else {
        panic!(
            "one keygate filter expected, found {}",
            configurations.len()
        );
    };
    let (config, _) = Config::parse(plugin["value"].as_str().unwrap().as_bytes()).unwrap();
    let keygate_429 = config.replies.get(ErrorCode::RateLimitExceeded);

    let mut local_replies = Vec::new();
    find_all(doc, "local_reply_config", &mut local_replies);
    let [local_reply] = local_replies.as_slice() else {
        panic!("one local_reply_config expected");
    };
    let mappers = local_reply["mappers"].as_vec().unwrap();
    let rate_limited = mappers
        .iter()
        .find(|m| m["filter"]["response_flag_filter"]["flags"][0].as_str() == Some("RL"))
        .unwrap();
    let body = rate_limited["body"]["inline_string"].as_str().unwrap();
    assert_eq!(body.as_bytes(), keygate_429.body.as_slice());
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
    assert_eq!(keygate_429.status, 429);
}
