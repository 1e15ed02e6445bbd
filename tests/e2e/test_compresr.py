"""Compresr API (seed 001) reproduced by envoy/compresr.yaml: `X-API-Key: cmp_...`, any other
prefix 401, expired keys 401 after their expiry time."""
from conftest import assert_denied, assert_passed

CONFIG = "compresr.yaml"

KEY = "cmp_live_9sK2mV8xQ4rT7wY1zB3n"
EXPIRED = "cmp_old_4fH6jK8lZ2xC5vB7nM1q"
EXPIRES_NEXT_CENTURY = "cmp_rot_7yU3iO5pA1sD9fG2hJ4k"


def test_compresr_cmp_key_in_x_api_key_passes(stack):
    seen = assert_passed(stack.request("POST", "/api/compress", [("X-API-Key", KEY)], body=b"{}"))
    assert seen["x-keygate-key-id"] == ["cmp-key-production"]
    assert seen["x-keygate-tenant"] == ["acct-42"]
    assert "x-api-key" not in seen


def test_compresr_no_key_is_401(stack):
    assert_denied(stack.request("POST", "/api/compress", body=b"{}"), 401, "TOKEN_MISSING")


def test_compresr_any_other_prefix_is_401(stack):
    for key in ["sk_live_9sK2mV8xQ4rT7wY1zB3n", "CMP_live_9sK2mV8xQ4rT7wY1zB3n", "cmp", "cmq_live_x"]:
        assert_denied(stack.request("POST", "/api/compress", [("X-API-Key", key)]), 401, "MALFORMED_API_KEY")


def test_compresr_unknown_or_deleted_cmp_key_is_401(stack):
    assert_denied(stack.request("POST", "/api/compress", [("X-API-Key", "cmp_deleted_key_value")]),
                  401, "INVALID_API_KEY")


def test_compresr_key_past_its_expiry_timestamp_is_401(stack):
    assert_denied(stack.request("POST", "/api/compress", [("X-API-Key", EXPIRED)]), 401, "API_KEY_EXPIRED")


def test_compresr_key_before_its_expiry_timestamp_passes(stack):
    assert_passed(stack.request("POST", "/api/compress", [("X-API-Key", EXPIRES_NEXT_CENTURY)]))
