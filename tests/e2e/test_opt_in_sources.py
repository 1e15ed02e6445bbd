"""Opt-in credential sources (envoy/opt-in-sources.yaml): a key in a query parameter or a cookie,
removed before the request goes upstream."""
from conftest import assert_denied, assert_passed

CONFIG = "opt-in-sources.yaml"
KEY = "cmp_demo_Q7fX2mLr9Wk4TbVn8PzA"


def test_key_in_query_parameter_passes_and_is_removed_from_the_path(stack):
    seen = assert_passed(stack.request("GET", f"/payments?limit=5&api_key={KEY}&page=2"))
    assert seen["x-keygate-key-id"] == ["cmp_demo"]
    assert seen[":path"] == ["/payments?limit=5&page=2"]


def test_key_in_cookie_passes_and_only_that_cookie_is_removed(stack):
    seen = assert_passed(stack.request("GET", "/payments", [("Cookie", f"theme=dark; api_key={KEY}; lang=es")]))
    assert seen["x-keygate-key-id"] == ["cmp_demo"]
    assert seen["cookie"] == ["theme=dark; lang=es"]


def test_query_key_with_wrong_prefix_is_401(stack):
    assert_denied(stack.request("GET", "/payments?api_key=sk_abc"), 401, "MALFORMED_API_KEY")


def test_query_and_cookie_disagreeing_is_401_conflicting(stack):
    resp = stack.request("GET", f"/payments?api_key={KEY}", [("Cookie", "api_key=cmp_other_value")])
    assert_denied(resp, 401, "CONFLICTING_CREDENTIALS")


def test_header_key_is_not_read_when_only_query_and_cookie_are_enabled(stack):
    assert_denied(stack.request("GET", "/payments", [("x-api-key", KEY)]), 401, "TOKEN_MISSING")
