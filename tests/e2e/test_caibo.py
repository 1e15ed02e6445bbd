"""Caibo IPG (seed 003) reproduced by envoy/caibo.yaml: test and live keys told apart by prefix,
the environment sent upstream, test keys routed to the sandbox cluster."""
from conftest import assert_denied, assert_passed

CONFIG = "caibo.yaml"

TEST_KEY = "caibo_test_sk_5Tg7Hy9Uj2Ik4Ol6"
LIVE_KEY = "caibo_live_sk_8Qa1Ws3Ed5Rf7Tg9"


def test_caibo_test_key_goes_to_the_sandbox_with_environment_test(stack):
    seen = assert_passed(stack.request("GET", "/payment-requests/12345", [("X-API-Key", TEST_KEY)]))
    assert seen[":upstream"] == ["sandbox"]
    assert seen["x-keygate-environment"] == ["test"]
    assert seen["x-keygate-tenant"] == ["merchant-55"]
    assert "x-api-key" not in seen


def test_caibo_live_key_goes_to_production_with_environment_live(stack):
    seen = assert_passed(stack.request("GET", "/payment-requests/12345", [("X-API-Key", LIVE_KEY)]))
    assert seen[":upstream"] == ["echo"]
    assert seen["x-keygate-environment"] == ["live"]


def test_caibo_client_cannot_route_itself_to_the_sandbox(stack):
    headers = [("X-API-Key", LIVE_KEY), ("x-keygate-environment", "test")]
    seen = assert_passed(stack.request("GET", "/payment-requests/1", headers))
    assert seen[":upstream"] == ["echo"]
    assert seen["x-keygate-environment"] == ["live"]


def test_caibo_key_without_a_caibo_prefix_is_401(stack):
    for key in ["sk_live_8Qa1Ws3Ed5Rf7Tg9", "caibo_prod_sk_8Qa1Ws3Ed5Rf7Tg9", "caibo_test_pk_1"]:
        assert_denied(stack.request("GET", "/payment-requests/1", [("X-API-Key", key)]), 401, "MALFORMED_API_KEY")


def test_caibo_missing_key_is_401(stack):
    assert_denied(stack.request("GET", "/payment-requests/1"), 401, "TOKEN_MISSING")


def test_caibo_regenerated_key_old_value_is_rejected_at_once(stack):
    # Regenerating replaces the record; the previous key value is not in the set any more.
    old_live_key = "caibo_live_sk_1234567890abcdef"
    assert_denied(stack.request("GET", "/payment-requests/1", [("X-API-Key", old_live_key)]), 401, "INVALID_API_KEY")


def test_caibo_test_prefix_on_a_live_secret_is_rejected(stack):
    # The environment is part of the key: the live key's body behind a test prefix is another key.
    swapped = "caibo_test_sk_8Qa1Ws3Ed5Rf7Tg9"
    assert_denied(stack.request("GET", "/payment-requests/1", [("X-API-Key", swapped)]), 401, "INVALID_API_KEY")
