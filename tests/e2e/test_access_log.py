"""Access logs: every shipped config logs each request with keygate's decision (key id, tenant,
environment, code) read from filter state, and never a secret. Against envoy/demo.yaml."""
import uuid

from conftest import assert_denied, assert_passed, keygate_access_log_field
from keygate_stack import ROOT, Stack

OPAQUE = "cmp_demo_Q7fX2mLr9Wk4TbVn8PzA"
EXPIRED = "cmp_expired_Lk3pQ9sVx2Rm7TbN"
ID_SECRET = "abk_demo:demo_secret_b64url_Zm9vYmFy"
PAIR_ID, PAIR_SECRET = "mk_makepay_demo", "mksec_demo_9c1f0e7a5b3d"
SECRETS = [OPAQUE, EXPIRED, "demo_secret_b64url_Zm9vYmFy", PAIR_SECRET]
CONFIG = "demo.yaml"
FIELD = "keygate=%FILTER_STATE(wasm.keygate:PLAIN)%"


def logged(stack, headers, marker=None, query=""):
    """Sends one request on a path unique to it; returns the response and its access-log line."""
    marker = marker or f"/access-log/{uuid.uuid4().hex}"
    resp = stack.request("GET", marker + query, headers)
    line = stack.access_log_line(marker)
    assert line is not None, f"no access-log line for {marker}:\n{stack.log_text()[-2000:]}"
    return resp, line


def test_allowed_request_logs_its_key_id_tenant_and_status(stack):
    resp, line = logged(stack, [("x-api-key", OPAQUE)])
    seen = assert_passed(resp)
    assert seen["x-keygate-key-id"] == ["cmp_demo"]
    assert " 200 " in line, line
    assert keygate_access_log_field(line) == {"auth": "api_key", "key_id": "cmp_demo", "tenant": "acme"}


def test_unknown_key_logs_the_denial_code_and_no_key_id(stack):
    resp, line = logged(stack, [("x-api-key", "cmp_unknown_key_0000000000000")])
    assert_denied(resp, 401, "INVALID_API_KEY")
    assert " 401 " in line, line
    assert keygate_access_log_field(line) == {"auth": "none", "code": "INVALID_API_KEY"}


def test_a_found_but_expired_key_logs_its_id_next_to_the_code(stack):
    resp, line = logged(stack, [("x-api-key", EXPIRED)])
    assert_denied(resp, 401, "API_KEY_EXPIRED")
    assert keygate_access_log_field(line) == {"auth": "none", "key_id": "cmp_expired",
                                              "code": "API_KEY_EXPIRED"}


def test_public_route_logs_auth_none_without_a_code(stack):
    # The public route matches /healthz exactly: this request is told apart by its user agent.
    marker = f"access-log-{uuid.uuid4().hex}"
    resp = stack.request("GET", "/healthz", [("user-agent", marker)])
    assert_passed(resp)
    line = stack.access_log_line(marker)
    assert keygate_access_log_field(line) == {"auth": "none"}


def test_no_secret_in_the_access_log_whatever_the_scheme_or_outcome(stack):
    marker = uuid.uuid4().hex
    sent = [
        [("x-api-key", OPAQUE)],
        [("x-api-key", EXPIRED)],
        [("authorization", "Bearer " + ID_SECRET)],
        [("x-makecrypto-key-id", PAIR_ID), ("x-makecrypto-key-secret", PAIR_SECRET)],
        [("x-api-key", OPAQUE + "x")],  # malformed: denied before any lookup
    ]
    statuses = []
    for n, headers in enumerate(sent):
        resp, _ = logged(stack, headers, marker=f"/leak/{marker}/{n}")
        statuses.append(resp.status)
    # A credential in the query string, which the demo does not read: the log drops the query.
    resp, _ = logged(stack, [], marker=f"/leak/{marker}/query", query=f"?api_key={OPAQUE}")
    statuses.append(resp.status)
    assert statuses == [200, 401, 200, 200, 401, 401], statuses
    lines = [line for line in stack.log_text().splitlines() if f"/leak/{marker}/" in line]
    assert len(lines) == len(sent) + 1, lines
    for line in lines:
        for secret in SECRETS:
            assert secret not in line, line


def test_every_shipped_config_logs_keygates_field_to_a_file_access_log():
    configs = [p for p in sorted((ROOT / "envoy").glob("*.yaml"))
               if "http_connection_manager" in p.read_text() and p.name != "bench.yaml"]
    assert len(configs) >= 14
    for config in configs:
        text = config.read_text()
        assert "envoy.access_loggers.file" in text and FIELD in text, f"{config.name}: no keygate access log"
        # The query string may carry a credential: shipped formats print the path without it.
        assert "%REQ(:PATH)%" not in text, config.name


def test_access_log_false_publishes_nothing_and_still_decides():
    off = {'"name": "demo",': '"name": "demo", "access_log": false,'}
    with Stack(CONFIG, substitutions=off) as quiet:
        resp, line = logged(quiet, [("x-api-key", OPAQUE)])
        assert assert_passed(resp)["x-keygate-key-id"] == ["cmp_demo"]
        assert " 200 " in line and line.endswith(" keygate=-"), line
        resp, line = logged(quiet, [("x-api-key", "cmp_unknown_key_0000000000000")])
        assert_denied(resp, 401, "INVALID_API_KEY")
        assert " 401 " in line and line.endswith(" keygate=-"), line
