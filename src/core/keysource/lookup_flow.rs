//! Lookup on miss as one flow over the host traits, the same for both hosts: the cache read and
//! its counters, the lookup sent to the key service, its answer checked and cached, and the
//! decision each outcome leads to (with `on_unavailable`). What stays in a host is where a
//! paused request waits: the wasm filter coalesces per VM, the native module per process.

use super::host::{Counter, KeySourceHost, Level};
use super::lookup_on_miss::{parse_answer, Answer, Cached, KeyCache};
use super::paths::LookupKey;
use super::service::{FetchResponse, KeyService, OnUnavailable};
use crate::core::codes::ErrorCode;
use crate::core::config::Config;
use crate::core::credential::Credential;
use crate::core::decision::{decide_for_key, Decision, Principal};
use crate::core::policy::Policy;
use crate::core::request::RequestView;

/// What a request's key came to, to decide with.
#[derive(Debug, Clone, Copy)]
pub enum LookupOutcome<'a> {
    /// The key service's answer (fresh, cached, or an old one served when a lookup failed).
    Answer(&'a Answer),
    /// No usable answer: `on_unavailable` decides.
    Unavailable,
    /// Past the process's lookups per second with nothing cached: 503, whatever
    /// `on_unavailable` says (unknown keys must not get through unauthenticated by flooding).
    OverCap,
}

impl<'a> LookupOutcome<'a> {
    /// No fresh answer could be had (the lookup failed or was not sent): an expired answer
    /// still within `max_stale_seconds` if there is one, else `Unavailable`.
    pub fn failed(stale: Option<&'a Answer>) -> LookupOutcome<'a> {
        stale.map_or(LookupOutcome::Unavailable, LookupOutcome::Answer)
    }

    /// Past the cap on lookups: an expired answer if there is one, else `OverCap`.
    pub fn over_cap(stale: Option<&'a Answer>) -> LookupOutcome<'a> {
        stale.map_or(LookupOutcome::OverCap, LookupOutcome::Answer)
    }
}

/// The lookup flow of one filter's key service.
pub struct LookupFlow<'a> {
    name: &'a str,
    service: &'a KeyService,
    cache: KeyCache<'a>,
}

impl<'a> LookupFlow<'a> {
    /// `None` unless the service is in lookup mode.
    pub fn of(name: &'a str, service: &'a KeyService) -> Option<LookupFlow<'a>> {
        Some(LookupFlow {
            name,
            service,
            cache: KeyCache::of(service)?,
        })
    }

    /// A fresh cached answer to decide with now (`Ok`), or a miss (`Err`) with the expired
    /// answer to fall back on if the lookup fails.
    pub fn cached(
        &self,
        host: &impl KeySourceHost,
        key: &LookupKey,
    ) -> Result<Answer, Option<Answer>> {
        match self.cache.get(host, key, host.now_ms()) {
            Cached::Fresh(answer) => {
                host.bump(Counter::CacheHits);
                Ok(answer)
            }
            Cached::Stale(answer) => {
                host.bump(Counter::CacheMisses);
                Err(Some(answer))
            }
            Cached::Miss => {
                host.bump(Counter::CacheMisses);
                Err(None)
            }
        }
    }

    /// Counts one lookup against this second's cap; false: past it, send nothing.
    pub fn admit(&self, host: &impl KeySourceHost) -> bool {
        let admitted = self.cache.admit_miss(host, host.now_ms());
        if !admitted {
            host.bump(Counter::MissesOverCap);
        }
        admitted
    }

    /// The request waits for a lookup of the same key already in flight.
    pub fn coalesced(&self, host: &impl KeySourceHost) {
        host.bump(Counter::Coalesced);
    }

    /// Sends the lookup of `key`; its token, or `None` when it could not be sent (counted and
    /// logged as a failed lookup).
    pub fn send(&self, host: &impl KeySourceHost, key: &LookupKey) -> Option<u64> {
        let Some(headers) = self.cache.request_headers(key) else {
            self.failed(host, "no lookup path for this kind of key");
            return None;
        };
        match host.dispatch(&self.service.cluster, &headers, self.service.timeout_ms) {
            Ok(token) => Some(token),
            Err(err) => {
                self.failed(host, err);
                None
            }
        }
    }

    /// The key service's answer to the lookup of `key`: checked and cached, or `None` when the
    /// lookup failed (counted and logged).
    pub fn answered(
        &self,
        host: &impl KeySourceHost,
        key: &LookupKey,
        response: &FetchResponse,
    ) -> Option<Answer> {
        match parse_answer(response.status, &response.body, key) {
            Ok(fetched) => {
                self.cache.put(host, key, &fetched, host.now_ms());
                Some(fetched.answer)
            }
            Err(reason) => {
                self.failed(host, &reason);
                None
            }
        }
    }

    /// A lookup whose answer never came (its request went away) or could not be sent.
    pub fn failed(&self, host: &impl KeySourceHost, reason: impl std::fmt::Display) {
        host.bump(Counter::LookupFailures);
        host.log(
            Level::Warn,
            &format!("keygate[{}]: key lookup failed: {reason}", self.name),
        );
    }

    /// The decision for a request whose key came to `outcome`.
    pub fn decide<'p>(
        &self,
        host: &impl KeySourceHost,
        config: &'p Config,
        policy: &'p Policy,
        credential: &Credential,
        req: &RequestView,
        outcome: LookupOutcome<'p>,
    ) -> Decision<'p> {
        match outcome {
            LookupOutcome::Answer(answer) => {
                decide_for_key(config, policy, credential, answer.record(), req)
            }
            LookupOutcome::OverCap => Decision::Deny {
                code: ErrorCode::KeysetUnavailable,
                key_id: None,
            },
            LookupOutcome::Unavailable => unavailable(self.name, self.service, host, policy),
        }
    }
}

/// Keys cannot be verified (no set yet, set too stale, lookup failed): fail closed (503), or
/// let the request through unauthenticated when the operator chose availability.
pub fn unavailable<'p>(
    name: &str,
    service: &KeyService,
    host: &impl KeySourceHost,
    policy: &'p Policy,
) -> Decision<'p> {
    match service.on_unavailable {
        OnUnavailable::Deny => Decision::Deny {
            code: ErrorCode::KeysetUnavailable,
            key_id: None,
        },
        OnUnavailable::Allow => {
            host.bump(Counter::UnverifiedAllowed);
            host.log(
                Level::Warn,
                &format!(
                    "keygate[{name}]: keys cannot be verified; request allowed unauthenticated (on_unavailable: allow)"
                ),
            );
            Decision::Allow {
                principal: Principal::Anonymous,
                policy,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::decision::{begin, Step};
    use crate::core::digest::sha256;
    use crate::core::keysource::host::Clock;
    use crate::core::keysource::test_host::{Call, TestHost};
    use crate::core::test_support::{deny_code, RequestBuilder};

    const SECRET: &str = "kl_key";

    fn config(on_unavailable: &str) -> Config {
        let (config, _) = Config::parse(
            serde_json::json!({"name": "t",
                "credentials": [{"in": "header", "prefixes": ["kl_"]}],
                "key_service": {"cluster": "keyservice", "mode": "lookup_on_miss",
                    "by_digest_path": "/d/{digest}.json", "positive_ttl_seconds": 60,
                    "negative_ttl_seconds": 10, "max_stale_seconds": 30,
                    "max_misses_per_second": 2, "on_unavailable": on_unavailable}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        config
    }

    fn request(secret: &str) -> RequestView {
        RequestBuilder::to("GET", "/")
            .header("x-api-key", secret)
            .now(2_000_000_000)
            .build()
    }

    fn found(secret: &str) -> FetchResponse {
        let record = serde_json::json!({"id": "a", "tenant": "acme",
            "secret_sha256": hex::encode(sha256(secret.as_bytes()))});
        FetchResponse {
            status: Some(200),
            body: record.to_string().into_bytes(),
            ..Default::default()
        }
    }

    fn status(status: Option<u32>) -> FetchResponse {
        FetchResponse {
            status,
            ..Default::default()
        }
    }

    /// Runs one request through the flow as a host does, the key service answering `respond`
    /// (`None`: no call expected). The decision's code (`None`: allowed) and the calls sent.
    fn run(
        host: &TestHost,
        config: &Config,
        secret: &str,
        respond: Option<FetchResponse>,
    ) -> (Option<ErrorCode>, Vec<Call>) {
        let service = config.key_service.as_ref().unwrap();
        let flow = LookupFlow::of(&config.name, service).unwrap();
        let req = request(secret);
        let Step::Lookup { credential, policy } = begin(config, &req) else {
            panic!("expected a lookup")
        };
        let key = LookupKey::of(&credential);
        let answer = match flow.cached(host, &key) {
            Ok(answer) => Some(answer),
            Err(stale) if !flow.admit(host) => {
                let outcome = LookupOutcome::over_cap(stale.as_ref());
                let decision = flow.decide(host, config, policy, &credential, &req, outcome);
                return (deny_code(decision), host.take_calls());
            }
            Err(stale) => {
                let fetched = match (flow.send(host, &key), respond) {
                    (Some(_), Some(response)) => flow.answered(host, &key, &response),
                    (Some(_), None) => panic!("a call was sent"),
                    (None, _) => None,
                };
                fetched.or(stale)
            }
        };
        let outcome = answer
            .as_ref()
            .map_or(LookupOutcome::Unavailable, LookupOutcome::Answer);
        let decision = flow.decide(host, config, policy, &credential, &req, outcome);
        (deny_code(decision), host.take_calls())
    }

    #[test]
    fn a_miss_is_looked_up_cached_and_then_a_hit_without_a_call() {
        let (host, config) = (TestHost::at(1_000), config("deny"));
        let (code, calls) = run(&host, &config, SECRET, Some(found(SECRET)));
        assert_eq!(code, None);
        assert_eq!(calls.len(), 1);
        let digest = hex::encode(sha256(SECRET.as_bytes()));
        assert_eq!(
            calls[0].header(":path"),
            Some(format!("/d/{digest}.json").as_str())
        );
        assert_eq!(calls[0].cluster, "keyservice");
        host.now_ms.set(host.now_ms() + 59_000);
        let (code, calls) = run(&host, &config, SECRET, None);
        assert_eq!((code, calls.len()), (None, 0));
        assert_eq!(host.counter(Counter::CacheMisses), 1);
        assert_eq!(host.counter(Counter::CacheHits), 1);
    }

    #[test]
    fn an_unknown_key_is_401_and_its_404_is_cached_for_the_negative_ttl() {
        let (host, config) = (TestHost::at(1_000), config("deny"));
        let not_found = || Some(status(Some(404)));
        let (code, calls) = run(&host, &config, "kl_unknown", not_found());
        assert_eq!((code, calls.len()), (Some(ErrorCode::InvalidApiKey), 1));
        host.now_ms.set(1_000 + 9_999);
        let (code, calls) = run(&host, &config, "kl_unknown", None);
        assert_eq!((code, calls.len()), (Some(ErrorCode::InvalidApiKey), 0));
        host.now_ms.set(1_000 + 10_000);
        let (_, calls) = run(&host, &config, "kl_unknown", not_found());
        assert_eq!(calls.len(), 1, "looked up again after the negative TTL");
    }

    #[test]
    fn the_key_service_down_is_503_keyset_unavailable_or_allowed_unverified_by_choice() {
        let host = TestHost::at(1_000);
        // One request a second: under the cap of two lookups per second.
        let next_second = || host.now_ms.set(host.now_ms() + 1_000);
        for answer in [status(None), status(Some(503))] {
            next_second();
            let (code, _) = run(&host, &config("deny"), SECRET, Some(answer));
            assert_eq!(code, Some(ErrorCode::KeysetUnavailable));
        }
        *host.refuse_calls.borrow_mut() = Some("cluster not found");
        next_second();
        let (code, calls) = run(&host, &config("deny"), SECRET, None);
        assert_eq!((code, calls.len()), (Some(ErrorCode::KeysetUnavailable), 0));
        assert_eq!(host.counter(Counter::LookupFailures), 3);
        assert!(host.warnings()[2]
            .contains("key lookup failed: cannot call cluster 'keyservice' (cluster not found)"));
        next_second();
        let (code, _) = run(&host, &config("allow"), SECRET, None);
        assert_eq!(code, None);
        assert_eq!(host.counter(Counter::UnverifiedAllowed), 1);
        assert!(host.warnings()[4].contains("request allowed unauthenticated"));
    }

    #[test]
    fn an_expired_answer_is_served_when_the_lookup_fails_within_max_stale() {
        let (host, config) = (TestHost::at(1_000), config("deny"));
        run(&host, &config, SECRET, Some(found(SECRET)));
        host.now_ms.set(1_000 + 60_000 + 29_000);
        let (code, calls) = run(&host, &config, SECRET, Some(status(Some(503))));
        assert_eq!((code, calls.len()), (None, 1));
        host.now_ms.set(1_000 + 60_000 + 30_000);
        let (code, _) = run(&host, &config, SECRET, Some(status(Some(503))));
        assert_eq!(code, Some(ErrorCode::KeysetUnavailable));
    }

    #[test]
    fn past_the_cap_an_uncached_key_is_503_even_when_unverified_requests_are_allowed() {
        let (host, config) = (TestHost::at(1_000), config("allow"));
        for i in 0..2 {
            let (_, calls) = run(&host, &config, &format!("kl_n{i}"), Some(status(Some(404))));
            assert_eq!(calls.len(), 1);
        }
        let (code, calls) = run(&host, &config, "kl_n2", None);
        assert_eq!((code, calls.len()), (Some(ErrorCode::KeysetUnavailable), 0));
        assert_eq!(host.counter(Counter::MissesOverCap), 1);
        assert_eq!(host.counter(Counter::UnverifiedAllowed), 0);
        host.now_ms.set(2_000);
        let (_, calls) = run(&host, &config, "kl_n2", Some(status(Some(404))));
        assert_eq!(calls.len(), 1, "a new second, a new budget");
    }
}
