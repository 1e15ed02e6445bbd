"""Compresr API (seed 001) reproduced by envoy/compresr.yaml: `X-API-Key: cmp_...`, any other
prefix 401, expired keys 401 after their expiry time, 402 when the monthly budget is exhausted."""

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


BUDGET_FIVE = "cmp_budget_R4nW8kT2qLx6"
BILLING_EXHAUSTED = "cmp_billing_J7sM3vP9cZe1"


def test_compresr_monthly_budget_of_five_lets_exactly_five_through_then_402(stack):
    def compress(_):
        return stack.request("POST", "/api/compress", [("X-API-Key", BUDGET_FIVE)], body=b"{}")

    responses = stack.in_parallel(compress, range(20))
    passed = [r for r in responses if r.status == 200]
    assert len(passed) == 5
    for r in passed:
        assert r.upstream["x-keygate-key-id"] == ["cmp-key-budget-5"]
    refused = [r for r in responses if r.status != 200]
    assert len(refused) == 15
    for r in refused:
        assert_denied(r, 402, "BUDGET_EXHAUSTED")


def test_compresr_key_marked_exhausted_by_billing_is_402_payment_required(stack):
    resp = stack.request("POST", "/api/compress", [("X-API-Key", BILLING_EXHAUSTED)], body=b"{}")
    assert_denied(resp, 402, "BUDGET_EXHAUSTED")
    assert resp.json["message"] == "The API key's monthly budget is exhausted."


def test_compresr_exhausted_budget_does_not_outrank_an_invalid_key(stack):
    assert_denied(stack.request("POST", "/api/compress", [("X-API-Key", "cmp_budget_wrong_secret")]),
                  401, "INVALID_API_KEY")
