"""envoy/global-ratelimit.yaml against a running global rate limit service (a real gRPC server
speaking envoy.service.ratelimit.v3, tests/ratelimit_service.py): the service receives keygate's
identity as descriptors, its OK lets the request through, and its OVER_LIMIT answers the same
JSON 429 that keygate sends for its own per-key limits, with Retry-After."""
import pytest
from conftest import assert_denied, assert_passed
from keygate_stack import Stack
from ratelimit_service import RateLimitService

CONFIG = "global-ratelimit.yaml"
ACME = "glb_acme_Wm3xT7qN2vRd"
GLOBEX = "glb_globex_Fs8kL4pY6bHc"
RESET_SECONDS = 42
# keygate's own per-key limit on the globex key (1 request an hour), to compare the two 429s.
GLOBEX_RECORD = '"secret_sha256": "1f471a771a1ceb0c6cb245cee7f329c4ea671a4445a6294d7a7cd95f6f2387a4"'
LOCAL_LIMIT = {GLOBEX_RECORD: GLOBEX_RECORD + ', "rate_limit": {"requests": 1, "per_seconds": 3600}'}


@pytest.fixture(scope="module")
def running():
    stack = Stack(CONFIG, substitutions=LOCAL_LIMIT)
    with RateLimitService(stack.ports["ratelimit"], reset_seconds=RESET_SECONDS) as service:
        with stack:
            yield stack, service


@pytest.fixture
def service(running):
    stack, service = running
    service.over_limit.clear()
    service.taken()
    return service


def test_the_service_receives_the_key_id_and_tenant_keygate_resolved(running, service):
    stack, _ = running
    seen = assert_passed(stack.request("GET", "/orders", [("x-api-key", ACME)]))
    assert seen["x-keygate-key-id"] == ["glb-acme-1"]
    assert "x-api-key" not in seen
    [(domain, descriptors, _)] = service.taken()
    assert domain == "keygate"
    assert descriptors == [(("key_id", "glb-acme-1"),), (("tenant", "acme"),),
                           (("tenant", "acme"), ("key_id", "glb-acme-1"))]


def test_a_client_sent_identity_never_becomes_a_descriptor(running, service):
    stack, _ = running
    assert_passed(stack.request("GET", "/orders", [("x-api-key", ACME), ("x-keygate-key-id", "glb-globex-1"),
                                                   ("x-keygate-tenant", "globex")]))
    [(_, descriptors, _)] = service.taken()
    assert ("key_id", "glb-globex-1") not in [entry for d in descriptors for entry in d]
    assert_passed(stack.request("GET", "/healthz", [("x-keygate-key-id", "glb-globex-1")]))
    assert service.taken() == []


def test_over_limit_answers_keygates_json_429_with_retry_after(running, service):
    stack, _ = running
    service.over_limit.add((("tenant", "acme"),))
    resp = stack.request("GET", "/orders", [("x-api-key", ACME)])
    assert_denied(resp, 429, "RATE_LIMIT_EXCEEDED")
    assert resp.json == {"code": "RATE_LIMIT_EXCEEDED",
                         "message": "Too many requests with this API key. Try again later."}
    assert resp.header("retry-after") == str(RESET_SECONDS)
    assert resp.header("x-keygate-code") == "RATE_LIMIT_EXCEEDED"
    assert len(service.taken()) == 1


def test_over_limit_for_one_tenant_leaves_the_other_tenant_served(running, service):
    stack, _ = running
    service.over_limit.add((("tenant", "globex"),))
    assert_denied(stack.request("GET", "/orders", [("x-api-key", GLOBEX)]), 429, "RATE_LIMIT_EXCEEDED")
    seen = assert_passed(stack.request("GET", "/orders", [("x-api-key", ACME)]))
    assert seen["x-keygate-tenant"] == ["acme"]


def test_a_global_and_a_keygate_429_are_the_same_reply(running, service):
    """globex has keygate's own limit of one request an hour: its second request is refused by
    keygate, before the service is asked; acme's refusal comes from the service."""
    stack, _ = running
    service.over_limit.add((("key_id", "glb-acme-1"),))
    global_429 = stack.request("GET", "/orders", [("x-api-key", ACME)])
    stack.request("GET", "/orders", [("x-api-key", GLOBEX)])
    service.taken()
    keygate_429 = stack.request("GET", "/orders", [("x-api-key", GLOBEX)])
    assert service.taken() == [], "keygate's own limit refuses before the rate limit filter"
    for resp in (global_429, keygate_429):
        assert_denied(resp, 429, "RATE_LIMIT_EXCEEDED")
        assert int(resp.header("retry-after")) >= 1
    assert global_429.body == keygate_429.body
    assert global_429.header("content-type") == keygate_429.header("content-type")
