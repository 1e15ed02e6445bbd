"""The trust boundary, end to end: no path, method, origin or header trick reaches a protected
resource, on every shipped profile with a public or permission-gated route, over HTTP/1.1 and
HTTP/2 (h2c with prior knowledge). Every row is sent both ways and must get the same answer.

Who answers each row:
- Envoy itself, before keygate (`Envoy(status)`): escaped slashes (`path_with_escaped_slashes_action:
  REJECT_REQUEST`) and header names with underscores (`headers_with_underscores_action:
  REJECT_REQUEST`); over HTTP/2 Envoy resets the stream of an underscore header (`Envoy(None)`).
- keygate with its status and code (`Keygate`): what Envoy normalized (`/health/../x` is `/x`)
  is decided as the path it became; what Envoy leaves ambiguous (`/..;/`) is AMBIGUOUS_PATH.
- The upstream (`Upstream`), with the path and identity it must see.
"""
from dataclasses import dataclass, field

import pytest

from conftest import Stack, abaco_session_token, assert_passed, assert_refused

PROTOCOLS = ["http1", "http2"]

COMPAGO_PAYMENTS_KEY = "cpk_partner7_Rm4Xq8Lw2Tz6Vb1N"  # payments:read, org-101/org-102
DEMO_KEY = "cmp_demo_Q7fX2mLr9Wk4TbVn8PzA"  # tenant acme, no admin permission
DEMO_ID_SECRET = "abk_demo:demo_secret_b64url_Zm9vYmFy"
ABACO_KEY = "abk_k7Qm2Xw9:c2VjcmV0LWFiYWNvLWRlbW8tMQ"
MAKEPAY_PAIR = [("x-makecrypto-key-id", "mk_makepay_team12prod"),
                ("x-makecrypto-key-secret", "mksec_Vq2Wn4Er6Ty8Ui0Op")]
FORGED = "forged-by-client"


@dataclass
class Keygate:
    status: int
    code: str


@dataclass
class Envoy:
    """Envoy refuses before any filter runs, with this status; None: it resets the HTTP/2 stream."""
    status: int | None


@dataclass
class Upstream:
    path: str
    auth: str
    seen: dict = field(default_factory=dict)  # header: exact values the upstream must see
    absent: tuple = ()  # headers the upstream must not see


@dataclass
class Row:
    name: str
    profile: str
    method: str
    path: str
    headers: list
    expect: object
    h2: object = None  # the HTTP/2 answer, where Envoy's codec answers differently


ROWS = [
    # --- path tricks through a public route (issue 13's reproductions) ---
    Row("compago_dot_segments_through_public_health_need_a_key", "compago.yaml", "GET",
        "/health/../api/developer/reports", [], Keygate(401, "TOKEN_MISSING")),
    Row("compago_encoded_dot_segments_through_public_health_need_a_key", "compago.yaml", "GET",
        "/health/%2e%2E/api/developer/reports", [], Keygate(401, "TOKEN_MISSING")),
    Row("compago_encoded_slashes_are_refused_by_envoy", "compago.yaml", "GET",
        "/health%2F..%2Fapi%2Fdeveloper%2Freports", [], Envoy(400)),
    Row("compago_encoded_backslashes_are_refused_by_envoy", "compago.yaml", "GET",
        "/health%5C..%5Capi%5Cdeveloper%5Creports", [], Envoy(400)),
    Row("compago_merged_slashes_do_not_escape_a_policy", "compago.yaml", "GET",
        "//api//developer//reports", [("x-api-key", COMPAGO_PAYMENTS_KEY)], Keygate(403, "FORBIDDEN")),
    Row("compago_payments_key_cannot_climb_into_reports", "compago.yaml", "GET",
        "/api/developer/payment/../reports", [("x-api-key", COMPAGO_PAYMENTS_KEY)],
        Keygate(403, "FORBIDDEN")),
    Row("compago_tomcat_path_parameter_dot_segment_is_resolved_by_envoy", "compago.yaml", "GET",
        "/health/..;/api/developer/reports", [], Keygate(401, "TOKEN_MISSING")),
    Row("compago_raw_backslashes_are_resolved_by_envoy", "compago.yaml", "GET",
        "/health\\..\\api\\developer\\reports", [], Keygate(401, "TOKEN_MISSING")),
    Row("compago_encoded_dot_segment_with_parameters_is_ambiguous_to_keygate", "compago.yaml", "GET",
        "/health/%2e%2e;/api/developer/reports", [], Keygate(400, "AMBIGUOUS_PATH")),
    Row("compago_public_health_is_exact_and_not_a_prefix", "compago.yaml", "GET",
        "/healthz-admin", [], Keygate(401, "TOKEN_MISSING")),
    Row("compago_public_health_still_passes_anonymously", "compago.yaml", "GET",
        "/health", [("x-keygate-organizations", FORGED)], Upstream("/health", "none",
                                                                   absent=("x-keygate-organizations",))),
    Row("demo_dot_segments_through_public_healthz_need_admin", "demo.yaml", "GET",
        "/healthz/../admin/users", [("x-api-key", DEMO_KEY)], Keygate(403, "FORBIDDEN")),
    Row("demo_dot_segments_without_a_key_need_a_key", "demo.yaml", "GET",
        "/healthz/./../admin/users", [], Keygate(401, "TOKEN_MISSING")),
    Row("demo_public_healthz_is_exact", "demo.yaml", "GET", "/healthz/../healthz-admin", [],
        Keygate(401, "TOKEN_MISSING")),
    Row("abaco_dot_segments_through_public_health_need_a_key", "abaco.yaml", "GET",
        "/health/../api-keys", [], Keygate(401, "TOKEN_MISSING")),
    Row("abaco_dot_segments_do_not_reach_key_management_with_a_key", "abaco.yaml", "POST",
        "/products/../api-keys", [("x-api-key", ABACO_KEY)], Keygate(403, "API_KEY_MANAGEMENT_FORBIDDEN")),
    Row("makepay_dot_segments_do_not_reach_the_portal_only_route", "makepay.yaml", "GET",
        "/api/partner/v1/payment-links/../companies", MAKEPAY_PAIR, Keygate(403, "FORBIDDEN")),
    # --- method override (abaco denies DELETE to API keys) ---
    *[Row(f"abaco_override_{name.replace('-', '_')}_delete_is_forbidden", "abaco.yaml", "POST",
          "/products/12", [("x-api-key", ABACO_KEY), (name, value)],
          Keygate(403, "API_KEY_DELETE_FORBIDDEN"))
      for name, value in [("X-HTTP-Method-Override", "DELETE"), ("X-HTTP-Method", "delete"),
                          ("X-Method-Override", "Delete")]],
    Row("abaco_method_query_parameter_delete_is_forbidden", "abaco.yaml", "POST",
        "/products/12?_method=DELETE", [("x-api-key", ABACO_KEY)], Keygate(403, "API_KEY_DELETE_FORBIDDEN")),
    Row("abaco_allowed_override_is_forwarded_unchanged", "abaco.yaml", "POST", "/products/12",
        [("x-api-key", ABACO_KEY), ("X-HTTP-Method-Override", "PATCH")],
        Upstream("/products/12", "api_key", {"x-http-method-override": ["PATCH"]})),
    Row("abaco_session_may_delete_through_an_override", "abaco.yaml", "POST", "/products/12",
        [("cookie", "accessToken=" + abaco_session_token()), ("X-HTTP-Method-Override", "DELETE")],
        Upstream("/products/12", "session")),
    # --- underscore spellings of scope headers never reach the upstream ---
    Row("demo_underscore_scope_header_is_refused_by_envoy", "demo.yaml", "GET", "/x",
        [("x-api-key", DEMO_KEY), ("x_keygate_user", "admin@victim-corp")], Envoy(400), h2=Envoy(None)),
    Row("abaco_underscore_tenant_header_with_a_session_is_refused", "abaco.yaml", "GET", "/documents",
        [("cookie", "accessToken=" + abaco_session_token()), ("x_keygate_tenant", "company-999")],
        Envoy(400), h2=Envoy(None)),
    Row("compago_underscore_selector_header_is_refused_by_envoy", "compago.yaml", "GET",
        "/api/developer/payment", [("x-api-key", COMPAGO_PAYMENTS_KEY), ("x_organization_id", "org-901")],
        Envoy(400), h2=Envoy(None)),
    Row("makepay_underscore_credential_header_is_refused_by_envoy", "makepay.yaml", "GET",
        "/api/partner/v1/payment-links", [("x_makecrypto_key_id", "mk_makepay_team12prod"),
                                          ("x-makecrypto-key-secret", "mksec_Vq2Wn4Er6Ty8Ui0Op")],
        Envoy(400), h2=Envoy(None)),
    # --- the same answers on HTTP/1.1 and HTTP/2 for every kind of credential ---
    Row("demo_missing_credential", "demo.yaml", "GET", "/x", [], Keygate(401, "TOKEN_MISSING")),
    Row("demo_invalid_credential", "demo.yaml", "GET", "/x", [("x-api-key", "cmp_demo_wrong")],
        Keygate(401, "INVALID_API_KEY")),
    Row("demo_conflicting_credentials", "demo.yaml", "GET", "/x",
        [("x-api-key", DEMO_KEY), ("authorization", "Bearer " + DEMO_ID_SECRET)],
        Keygate(401, "CONFLICTING_CREDENTIALS")),
    Row("demo_valid_key_with_spoofed_scope_headers", "demo.yaml", "GET", "/x",
        [("x-api-key", DEMO_KEY), ("x-keygate-tenant", FORGED), ("x-keygate-user", FORGED),
         ("x-keygate-auth", "session")],
        Upstream("/x", "api_key", {"x-keygate-tenant": ["acme"], "x-keygate-key-id": ["cmp_demo"]},
                 absent=("x-keygate-user", "x-api-key"))),
]


@pytest.fixture(scope="module")
def stacks():
    """One Envoy per shipped profile, started on first use."""
    running = {}

    def get(profile):
        if profile not in running:
            running[profile] = Stack(profile, concurrency=1).start()
        return running[profile]

    yield get
    for stack in running.values():
        stack.stop()


def send(stack, row, protocol):
    try:
        return stack.request(row.method, row.path, row.headers, http2=protocol == "http2")
    except RuntimeError as reset:  # curl got no HTTP/2 response: the stream was reset
        return reset


def check(resp, expect):
    if isinstance(expect, Envoy):
        if expect.status is None:
            assert isinstance(resp, RuntimeError), resp
        else:
            assert not isinstance(resp, RuntimeError), resp
            assert resp.status == expect.status, resp
        if not isinstance(resp, RuntimeError):
            assert resp.header("x-keygate-code") is None, "Envoy answers before keygate runs"
            assert resp.upstream is None
        return
    assert not isinstance(resp, RuntimeError), resp
    if isinstance(expect, Keygate):
        assert_refused(resp, expect.status, expect.code)
        return
    seen = assert_passed(resp)
    assert seen[":path"] == [expect.path]
    assert seen["x-keygate-auth"] == [expect.auth]
    for name, values in expect.seen.items():
        assert seen.get(name) == values, (name, seen)
    for name in expect.absent:
        assert name not in seen, (name, seen)
    assert not any("_" in name for name in seen), seen


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_trust_boundary_row(stacks, row, protocol):
    expect = row.h2 if protocol == "http2" and row.h2 is not None else row.expect
    check(send(stacks(row.profile), row, protocol), expect)


# --- CORS on abaco: only the listed web-app origin is granted ---------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_abaco_session_request_from_another_origin_gets_no_cors_grant(stacks, protocol):
    resp = stacks("abaco.yaml").request("GET", "/documents", [
        ("Origin", "https://evil.example"), ("cookie", "accessToken=" + abaco_session_token())],
        http2=protocol == "http2")
    seen = assert_passed(resp)
    assert seen["x-keygate-auth"] == ["session"]
    assert resp.header("access-control-allow-origin") is None
    assert resp.header("access-control-allow-credentials") is None


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_abaco_preflight_from_another_origin_is_answered_by_envoy_without_a_grant(stacks, protocol):
    resp = stacks("abaco.yaml").request("OPTIONS", "/products/12", [
        ("Origin", "https://evil.example"), ("Access-Control-Request-Method", "DELETE"),
        ("Access-Control-Request-Headers", "authorization")], http2=protocol == "http2")
    assert resp.status == 200, resp
    assert resp.upstream is None, "a preflight from an unlisted origin must not be forwarded"
    assert resp.header("x-keygate-code") is None, "Envoy's cors filter answers, not keygate"
    # Envoy still sends its allow-methods and allow-credentials lines; without
    # access-control-allow-origin no browser grants anything.
    assert resp.header("access-control-allow-origin") is None


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_abaco_preflight_from_the_listed_origin_allows_both_credential_headers(stacks, protocol):
    resp = stacks("abaco.yaml").request("OPTIONS", "/business-partners", [
        ("Origin", "https://app.example"), ("Access-Control-Request-Method", "GET"),
        ("Access-Control-Request-Headers", "authorization, x-api-key")], http2=protocol == "http2")
    assert resp.status == 200, resp
    assert resp.upstream is None
    assert resp.header("access-control-allow-origin") == "https://app.example"
    assert resp.header("access-control-allow-credentials") == "true"
    allowed = (resp.header("access-control-allow-headers") or "").lower()
    assert "authorization" in allowed and "x-api-key" in allowed


# --- keygate's own guard, for an operator who left Envoy's normalization out ------------------

# demo.yaml as an operator might have written it: no normalization and a public prefix.
UNNORMALIZED = {
    'match: { path: "/healthz" }': 'match: { prefix: "/healthz" }',
    "          normalize_path: true\n": "",
    "          merge_slashes: true\n": "",
    "path_with_escaped_slashes_action: REJECT_REQUEST": "path_with_escaped_slashes_action: KEEP_UNCHANGED",
}


@pytest.fixture(scope="module")
def unnormalized_demo():
    with Stack("demo.yaml", concurrency=1, substitutions=UNNORMALIZED) as running:
        yield running


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("path", ["/healthz/../admin/users", "/healthz/%2E%2e/admin/users",
                                  "/healthz%2F..%2Fadmin%2Fusers", "/healthz%5c..%5cadmin",
                                  "/healthz/./x"])
def test_without_envoy_normalization_keygate_refuses_ambiguous_paths_and_counts_them(
        unnormalized_demo, path, protocol):
    counter = "wasmcustom.keygate.demo.denied.ambiguous_path"
    before = unnormalized_demo.stats().get(counter, 0)
    resp = unnormalized_demo.request("GET", path, [], http2=protocol == "http2")
    assert_refused(resp, 400, "AMBIGUOUS_PATH")
    assert unnormalized_demo.stats()[counter] == before + 1


def test_switching_the_guard_off_lets_a_dot_segment_through_the_public_route():
    """The risk the README names: with `reject_ambiguous_paths: false` and no normalization in
    Envoy, /healthz/../admin/users reaches the upstream anonymously as it was sent."""
    off = {**UNNORMALIZED, '"name": "demo",': '"name": "demo", "reject_ambiguous_paths": false,'}
    with Stack("demo.yaml", concurrency=1, substitutions=off) as running:
        seen = assert_passed(running.request("GET", "/healthz/../admin/users"))
    assert seen[":path"] == ["/healthz/../admin/users"]
    assert seen["x-keygate-auth"] == ["none"]
