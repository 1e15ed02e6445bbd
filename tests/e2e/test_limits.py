"""Per-key rate limits (429) and monthly budgets (402) shared by every Envoy worker,
reproduced with envoy/limits.yaml on an Envoy with two worker threads."""
import re

from conftest import api_key_header, assert_denied, assert_passed, keygate_access_log_field, wasm_only

CONFIG = "limits.yaml"
CONCURRENCY = 2

BURST_KEY = "lim_burst_Vq3nX8pL2sKd"      # 20 per hour + burst 5
THREE_PER_HOUR = "lim_hdrs_Tg7wM4zR9bYc"  # 3 per hour
BUDGET_SEVEN = "lim_seven_Hj2kP6vN8qWe"   # monthly budget 7
BUDGET_TEN = "lim_cost_Zr5tB1mQ7xLa"      # monthly budget 10, /expensive costs 3
BILLING_EXHAUSTED = "lim_billing_Ku8dF3sY6pRn"
UNLIMITED = "lim_free_Ne4gW9cJ2hTv"
PAIR_A = "lim_pair_a_Bx6mQ2rT8wZk"        # 2 per hour
PAIR_B = "lim_pair_b_Pc3vL7nK1sYd"        # 2 per hour




def test_concurrent_requests_over_two_workers_get_exactly_limit_plus_burst(stack):
    before = stack.connections_per_worker()
    responses = stack.fire(100, api_key_header(BURST_KEY), path="/work", threads=16)
    after = stack.connections_per_worker()
    # Both workers served part of the load, so the count really was shared.
    assert len(after) == 2 and all(after[w] > before.get(w, 0) for w in after), (before, after)
    allowed = [r for r in responses if r.status == 200]
    limited = [r for r in responses if r.status == 429]
    assert len(allowed) == 20 + 5
    assert len(limited) == 75
    for r in allowed:
        assert r.upstream["x-keygate-key-id"] == ["burst-20-per-hour-plus-5"]
    for r in limited:
        assert_denied(r, 429, "RATE_LIMIT_EXCEEDED")
        # One request's worth of the bucket drains in 3600 s / 20 = 180 s, counted from the
        # first allowed request (a loaded machine may take a few seconds to send them all).
        assert 170 <= int(r.header("retry-after")) <= 180
    stats = stack.stats()
    assert stats["wasmcustom.keygate.limits.denied.rate_limit_exceeded"] == 75


def test_rate_limit_headers_on_allowed_responses_and_retry_after_on_429(stack):
    first = stack.request("GET", "/x", api_key_header(THREE_PER_HOUR))
    assert_passed(first)
    assert first.header("ratelimit-limit") == "3"
    assert first.header("ratelimit-remaining") == "2"
    assert first.header("ratelimit-reset") == "1200"
    assert_passed(stack.request("GET", "/x", api_key_header(THREE_PER_HOUR)))
    third = stack.request("GET", "/x", api_key_header(THREE_PER_HOUR))
    assert_passed(third)
    assert third.header("ratelimit-remaining") == "0"
    denied = stack.request("GET", "/x", api_key_header(THREE_PER_HOUR))
    assert_denied(denied, 429, "RATE_LIMIT_EXCEEDED")
    assert denied.json["message"] == "Too many requests with this API key. Try again later."
    assert 1190 <= int(denied.header("retry-after")) <= 1200  # 3600 s / 3 since the first
    assert denied.header("ratelimit-limit") == "3"
    assert denied.header("ratelimit-remaining") == "0"
    assert 3590 <= int(denied.header("ratelimit-reset")) <= 3600


def test_a_monthly_budget_of_seven_lets_exactly_seven_through_then_402(stack):
    responses = stack.fire(30, api_key_header(BUDGET_SEVEN), path="/work", threads=16)
    allowed = [r for r in responses if r.status == 200]
    assert len(allowed) == 7
    for r in allowed:
        assert r.upstream["x-keygate-key-id"] == ["budget-seven"]
    for r in (r for r in responses if r.status != 200):
        assert_denied(r, 402, "BUDGET_EXHAUSTED")
        assert r.json["message"] == "The API key's monthly budget is exhausted."
        assert r.header("retry-after") is None
    assert_denied(stack.request("GET", "/later", api_key_header(BUDGET_SEVEN)), 402, "BUDGET_EXHAUSTED")


def test_each_request_spends_its_routes_cost(stack):
    for _ in range(3):
        assert_passed(stack.request("POST", "/expensive/compress", api_key_header(BUDGET_TEN), body=b"{}"))
    # 9 of 10 spent: a cost-3 request no longer fits, a cost-1 request does once.
    assert_denied(stack.request("POST", "/expensive/compress", api_key_header(BUDGET_TEN), body=b"{}"),
                  402, "BUDGET_EXHAUSTED")
    assert_passed(stack.request("GET", "/cheap", api_key_header(BUDGET_TEN)))
    assert_denied(stack.request("GET", "/cheap", api_key_header(BUDGET_TEN)), 402, "BUDGET_EXHAUSTED")


def test_a_key_marked_exhausted_by_billing_is_402_at_once(stack):
    resp = stack.request("GET", "/x", api_key_header(BILLING_EXHAUSTED))
    assert_denied(resp, 402, "BUDGET_EXHAUSTED")
    line = stack.access_log_line('"key_id":"billing-exhausted"')
    assert line and keygate_access_log_field(line)["code"] == "BUDGET_EXHAUSTED", line


def test_keys_are_counted_separately(stack):
    for _ in range(2):
        assert_passed(stack.request("GET", "/x", api_key_header(PAIR_A)))
    assert_denied(stack.request("GET", "/x", api_key_header(PAIR_A)), 429, "RATE_LIMIT_EXCEEDED")
    for _ in range(2):
        assert_passed(stack.request("GET", "/x", api_key_header(PAIR_B)))
    assert_denied(stack.request("GET", "/x", api_key_header(PAIR_B)), 429, "RATE_LIMIT_EXCEEDED")


def test_a_key_without_limits_is_never_limited_and_gets_no_limit_headers(stack):
    responses = stack.fire(60, api_key_header(UNLIMITED), path="/work", threads=16)
    for r in responses:
        assert_passed(r)
        assert r.header("ratelimit-limit") is None


def test_limits_apply_only_after_authentication(stack):
    assert_denied(stack.request("GET", "/x", api_key_header("lim_unknown_key_value")), 401, "INVALID_API_KEY")
    assert_denied(stack.request("GET", "/x"), 401, "TOKEN_MISSING")


@wasm_only("the native module keeps one process-wide table, not Envoy's shared data")
def test_the_shared_table_is_created_once_before_workers_serve(stack):
    created = [int(n) for n in re.findall(r"limits table of 1024 slots \((\d+) created here\)",
                                           stack.log_text())]
    # One VM per worker plus the main thread's; only the first one created the table.
    assert len(created) >= 3
    assert sum(created) == 1024
