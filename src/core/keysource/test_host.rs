//! An in-memory host for the key-source flows: a `MemoryStore`, a clock the test moves, callouts
//! that are recorded and answered by the test, counters, gauges and log lines kept for asserts.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use super::host::{CalloutError, Callouts, Clock, Counter, Gauge, Level, Log, Metrics};
use super::service::{FetchResponse, KeyService, KeyServiceSpec};
use super::store::{SharedStore, StoreError};
use crate::core::memory_store::MemoryStore;
use crate::core::test_support::merged;

/// One call the flow sent: its token and request headers.
#[derive(Debug, Clone)]
pub struct Call {
    pub token: u64,
    pub cluster: String,
    pub headers: Vec<(&'static str, String)>,
}

impl Call {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
pub struct TestHost {
    pub store: MemoryStore,
    pub now_ms: Cell<i64>,
    /// Calls sent and not yet taken by the test.
    pub calls: RefCell<Vec<Call>>,
    next_token: Cell<u64>,
    /// While set, `dispatch` refuses, giving this as the host's reason (it cannot call out).
    pub refuse_calls: RefCell<Option<&'static str>>,
    pub counters: RefCell<HashMap<Counter, u64>>,
    pub gauges: RefCell<HashMap<Gauge, u64>>,
    pub logs: RefCell<Vec<(Level, String)>>,
}

impl TestHost {
    /// A host whose store other `TestHost`s can share (workers of one process).
    pub fn at(now_ms: i64) -> TestHost {
        let host = TestHost::default();
        host.now_ms.set(now_ms);
        host
    }

    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters.borrow().get(&counter).copied().unwrap_or(0)
    }

    pub fn gauge(&self, gauge: Gauge) -> Option<u64> {
        self.gauges.borrow().get(&gauge).copied()
    }

    /// Takes the calls sent since the last take.
    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.borrow_mut())
    }

    pub fn warnings(&self) -> Vec<String> {
        self.logs
            .borrow()
            .iter()
            .filter(|(level, _)| *level == Level::Warn)
            .map(|(_, line)| line.clone())
            .collect()
    }
}

impl SharedStore for TestHost {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.store.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        self.store.set(key, value, cas)
    }
}

impl Clock for TestHost {
    fn now_ms(&self) -> i64 {
        self.now_ms.get()
    }
}

impl Callouts for TestHost {
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&'static str, String)],
        _timeout_ms: u64,
    ) -> Result<u64, CalloutError> {
        if let Some(why) = *self.refuse_calls.borrow() {
            return Err(CalloutError {
                cluster: cluster.to_string(),
                why: why.to_string(),
            });
        }
        let token = self.next_token.get() + 1;
        self.next_token.set(token);
        self.calls.borrow_mut().push(Call {
            token,
            cluster: cluster.to_string(),
            headers: headers.to_vec(),
        });
        Ok(token)
    }
}

impl Metrics for TestHost {
    fn bump(&self, counter: Counter) {
        *self.counters.borrow_mut().entry(counter).or_default() += 1;
    }
    fn record(&self, gauge: Gauge, value: u64) {
        self.gauges.borrow_mut().insert(gauge, value);
    }
}

impl Log for TestHost {
    fn log(&self, level: Level, line: &str) {
        self.logs.borrow_mut().push((level, line.to_string()));
    }
}

/// A key service from the spec `{"cluster": "keyservice"}` plus `extra`.
pub fn service(extra: serde_json::Value) -> KeyService {
    let spec = serde_json::json!({"cluster": "keyservice"});
    let spec = KeyServiceSpec::decode(&merged(spec, extra), "key_service").unwrap();
    KeyService::from_spec(spec, "test", true, true).unwrap()
}

/// A key-set document with one record per id, secret `secret-<id>`.
pub fn document(ids: &[&str], serial: u64) -> Vec<u8> {
    let keys: Vec<_> = ids
        .iter()
        .map(|id| {
            let digest = crate::core::digest::sha256(format!("secret-{id}").as_bytes());
            serde_json::json!({"id": id, "secret_sha256": hex::encode(digest)})
        })
        .collect();
    serde_json::json!({ "serial": serial, "keys": keys })
        .to_string()
        .into_bytes()
}

/// A 200 with this body and ETag.
pub fn ok(body: Vec<u8>, etag: &str) -> FetchResponse {
    FetchResponse {
        status: Some(200),
        etag: Some(etag.to_string()),
        body,
        ..Default::default()
    }
}
