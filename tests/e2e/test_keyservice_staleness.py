"""Failure settings of a key service (envoy/keyservice.yaml with one setting changed):
`max_stale_seconds` fails closed once the last successful fetch is too old, and recovers by
itself; `on_unavailable: allow` lets requests through unauthenticated instead of 503."""
import time

from conftest import api_key_header, assert_denied, assert_passed
from keygate_stack import Stack, wait_for
from static_keyservice import StaticKeyService, key_record

CONFIG = "keyservice.yaml"
REFRESH = 2.0
ALPHA = "ks_alpha_Q2mX7rT9wL4v"
DOCUMENT = {"serial": 1, "keys": [key_record("ks-alpha", ALPHA, tenant="acme")]}


def running(substitutions):
    stack = Stack(CONFIG, concurrency=2, substitutions=substitutions)
    service = StaticKeyService.for_stack(stack)
    return stack, service



def test_past_max_stale_keys_are_503_until_the_service_answers_again():
    stack, service = running({'"max_stale_seconds": 300': '"max_stale_seconds": 4'})
    service.write("keys.json", DOCUMENT)
    with service, stack:
        assert wait_for(lambda: stack.request("GET", "/x", api_key_header(ALPHA)).status == 200, REFRESH + 2)
        service.stop()
        stopped = time.time()
        # Served stale while the last success is at most 4 s old...
        while time.time() - stopped < 1.5:
            assert_passed(stack.request("GET", "/x", api_key_header(ALPHA)))
            time.sleep(0.1)
        # ...then fail closed: at the latest 4 s after the last success (one period before the stop).
        took = wait_for(lambda: stack.request("GET", "/x", api_key_header(ALPHA)).status == 503, 6)
        assert took is not None
        assert time.time() - stopped <= 4 + 0.5 + 1.5
        for _ in range(10):
            assert_denied(stack.request("GET", "/x", api_key_header(ALPHA)), 503, "KEYSET_UNAVAILABLE")
        service.start()
        assert wait_for(lambda: stack.request("GET", "/x", api_key_header(ALPHA)).status == 200, REFRESH + 1) is not None
        seen = assert_passed(stack.request("GET", "/x", api_key_header(ALPHA)))
        assert seen["x-keygate-key-id"] == ["ks-alpha"]


def test_on_unavailable_allow_passes_requests_unauthenticated_without_key_scope():
    stack, service = running({'"on_unavailable": "deny"': '"on_unavailable": "allow"'})
    with service, stack:  # the service has no keys.json: no set can load
        resp = stack.request("GET", "/x", api_key_header(ALPHA) + [("x-keygate-tenant", "forged")])
        seen = assert_passed(resp)
        assert seen["x-keygate-auth"] == ["none"]
        assert "x-keygate-key-id" not in seen and "x-keygate-tenant" not in seen
        assert "x-api-key" not in seen
        assert stack.stats()["wasmcustom.keygate.remote.unverified_allowed"] >= 1
        assert "request allowed unauthenticated (on_unavailable: allow)" in stack.log_text()
        # Once a set is there, keys are checked again.
        service.write("keys.json", DOCUMENT)
        assert wait_for(lambda: stack.request("GET", "/x", api_key_header("ks_unknown_123")).status == 401, REFRESH + 2)
        assert assert_passed(stack.request("GET", "/x", api_key_header(ALPHA)))["x-keygate-key-id"] == ["ks-alpha"]
