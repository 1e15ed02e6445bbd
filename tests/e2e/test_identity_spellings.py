"""Identity through spellings keygate did not read (issue 20), end to end on a real Envoy, every
row over HTTP/1.1 and HTTP/2 (h2c).

A tenant selector is refused in every spelling an upstream framework reads as the selector
(`organizationId[]`, `OrganizationId`, ` organizationId`, `;` separators, `x_organization_id`,
form bodies); scope headers spelled with `_` never reach the upstream; a CORS preflight that
reaches keygate is answered locally (204, no CORS grant) and never forwarded with its body.

The shipped configs may set Envoy's `headers_with_underscores_action: REJECT_REQUEST`, which
refuses underscore headers before keygate runs. These stacks set it to ALLOW, so the rows prove
keygate's own layer, which holds for configs that do not set it.
"""
import secrets
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import abaco_session_token, assert_passed, assert_refused, native_only, wasm_only
from keygate_stack import HOST, ROOT, Stack, wait_for
from static_keyservice import StaticKeyService, key_record, keyset_document

UNDERSCORES_ALLOWED = {"headers_with_underscores_action: REJECT_REQUEST": "headers_with_underscores_action: ALLOW"}

COMPAGO_KEY = "cpk_partner7_Rm4Xq8Lw2Tz6Vb1N"  # organizations org-101, org-102 (envoy/compago.yaml)
ABACO_KEY = "abk_k7Qm2Xw9:c2VjcmV0LWFiYWNvLWRlbW8tMQ"  # company-314 (envoy/abaco.yaml)
DEMO_NO_USER_KEY = "cmp_demo_Q7fX2mLr9Wk4TbVn8PzA"  # tenant acme, no user (envoy/demo.yaml)

PROTOCOLS = [pytest.param(False, id="http1"), pytest.param(True, id="http2")]
# Refusing a request whose body is still uploading: the wasm filter answers after reading the
# body; the native module answers before it (it does not read bodies), and over h2c curl then
# sometimes sees only the stream's reset (exit 92, no answer), so native sends these on HTTP/1.1.
BODY_PROTOCOLS = PROTOCOLS if HOST == "wasm" else PROTOCOLS[:1]


def running(config):
    with Stack(config, substitutions=UNDERSCORES_ALLOWED) as stack:
        yield stack


@pytest.fixture(scope="module")
def compago():
    yield from running("compago.yaml")


@pytest.fixture(scope="module")
def abaco():
    yield from running("abaco.yaml")


@pytest.fixture(scope="module")
def demo():
    yield from running("demo.yaml")


def no_underscore_twins(seen, *names):
    """Neither the `_` spelling nor a `-` header forged from it reached the upstream."""
    for name in names:
        assert name not in seen, (name, seen.get(name))


# --- 1. tenant selectors --------------------------------------------------------------------

COMPAGO_OUT_OF_SCOPE = [
    "organizationId[]=org-901",
    "organizationId%5B%5D=org-901",
    "organizationId[0]=org-901",
    "OrganizationId=org-901",
    "organizationid=org-901",
    "%20organizationId=org-901",
    "limit=1;organizationId=org-901",
    "organizationId=org-101&organizationId[]=org-901",
]


@pytest.mark.parametrize("http2", PROTOCOLS)
@pytest.mark.parametrize("query", COMPAGO_OUT_OF_SCOPE)
def test_every_spelling_of_an_out_of_scope_organization_is_tenant_forbidden(compago, query, http2):
    resp = compago.request("GET", f"/api/developer/payment?{query}", [("x-api-key", COMPAGO_KEY)],
                           http2=http2)
    assert_refused(resp, 403, "TENANT_FORBIDDEN")


@pytest.mark.parametrize("http2", PROTOCOLS)
def test_in_scope_organizations_pass_in_any_spelling(compago, http2):
    path = "/api/developer/payment?organizationId[]=org-101&OrganizationId=org-102&limit=1"
    seen = assert_passed(compago.request("GET", path, [("x-api-key", COMPAGO_KEY)], http2=http2))
    assert seen[":path"] == [path]
    assert seen["x-keygate-organizations"] == ["org-101,org-102"]


@pytest.mark.parametrize("http2", PROTOCOLS)
def test_organization_header_spelled_with_underscores_is_tenant_forbidden(compago, http2):
    resp = compago.request("GET", "/api/developer/payment",
                           [("x-api-key", COMPAGO_KEY), ("x_organization_id", "org-901")], http2=http2)
    assert_refused(resp, 403, "TENANT_FORBIDDEN")


@pytest.mark.parametrize("http2", BODY_PROTOCOLS)
def test_organization_in_an_urlencoded_body_is_tenant_forbidden(compago, http2):
    resp = compago.request("POST", "/api/developer/payment",
                           [("x-api-key", COMPAGO_KEY),
                            ("content-type", "application/x-www-form-urlencoded")],
                           body=b"amount=5&organizationId=org-901", http2=http2)
    assert_refused(resp, 403, "TENANT_FORBIDDEN")


@wasm_only("the native module does not read request bodies yet; it refuses form bodies here")
@pytest.mark.parametrize("http2", PROTOCOLS)
def test_an_urlencoded_body_within_scope_reaches_the_upstream(compago, http2):
    seen = assert_passed(compago.request(
        "POST", "/api/developer/payment",
        [("x-api-key", COMPAGO_KEY), ("content-type", "application/x-www-form-urlencoded")],
        body=b"amount=5&organizationId=org-102", http2=http2))
    assert seen["x-keygate-key-id"] == ["partner-7-production"]
    assert seen["content-length"] == ["31"]


# HTTP/1.1 only: the refusal comes before the upload ends, and over h2c curl then sometimes
# sees the stream reset before the reply (the wasm filter answers after reading the body).
@native_only("the wasm filter reads the body and forwards an in-scope form")
def test_native_module_refuses_a_form_body_it_cannot_check(compago):
    resp = compago.request(
        "POST", "/api/developer/payment",
        [("x-api-key", COMPAGO_KEY), ("content-type", "application/x-www-form-urlencoded")],
        body=b"amount=5&organizationId=org-102")
    assert_refused(resp, 403, "TENANT_FORBIDDEN")


def multipart(field, value, boundary="b0undary"):
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"\r\n\r\n{value}\r\n"
            f"--{boundary}--\r\n").encode()
    return [("content-type", f"multipart/form-data; boundary={boundary}")], body


@pytest.mark.parametrize("http2", BODY_PROTOCOLS)
def test_company_in_a_multipart_body_is_tenant_forbidden(abaco, http2):
    headers, body = multipart("companyId", "company-999")
    resp = abaco.request("POST", "/documents", [("authorization", "Bearer " + ABACO_KEY)] + headers,
                         body=body, http2=http2)
    assert_refused(resp, 403, "TENANT_FORBIDDEN")


@wasm_only("the native module does not read request bodies yet; it refuses form bodies here")
@pytest.mark.parametrize("http2", PROTOCOLS)
def test_a_multipart_upload_without_a_selector_reaches_the_upstream(abaco, http2):
    headers, body = multipart("file", "%PDF-1.7 ...")
    seen = assert_passed(abaco.request("POST", "/documents",
                                       [("authorization", "Bearer " + ABACO_KEY)] + headers,
                                       body=body, http2=http2))
    assert seen["x-keygate-tenant"] == ["company-314"]
    assert seen["content-length"] == [str(len(body))]


@pytest.mark.parametrize("http2", PROTOCOLS)
@pytest.mark.parametrize("query", ["companyId[]=company-999", "CompanyId=company-999",
                                   "page=1;companyId=company-999"])
def test_every_spelling_of_another_company_is_tenant_forbidden(abaco, query, http2):
    resp = abaco.request("GET", f"/business-partners?{query}",
                         [("authorization", "Bearer " + ABACO_KEY)], http2=http2)
    assert_refused(resp, 403, "TENANT_FORBIDDEN")


@pytest.mark.parametrize("http2", PROTOCOLS)
def test_company_header_spelled_with_underscores_is_tenant_forbidden(abaco, http2):
    resp = abaco.request("GET", "/business-partners",
                         [("authorization", "Bearer " + ABACO_KEY), ("x_company_id", "company-999")],
                         http2=http2)
    assert_refused(resp, 403, "TENANT_FORBIDDEN")


# --- 2. scope headers spelled with underscores -------------------------------------------------

FORGED_UNDERSCORES = [("x_keygate_user", "admin@victim-corp"), ("x_keygate_organizations", "org-victim")]


@pytest.mark.parametrize("http2", PROTOCOLS)
def test_underscore_scope_headers_never_reach_the_upstream_with_a_key(demo, http2):
    seen = assert_passed(demo.request("GET", "/payments", [("x-api-key", DEMO_NO_USER_KEY)] + FORGED_UNDERSCORES,
                                      http2=http2))
    assert seen["x-keygate-key-id"] == ["cmp_demo"]
    no_underscore_twins(seen, "x_keygate_user", "x_keygate_organizations", "x-keygate-user",
                        "x-keygate-organizations")


@pytest.mark.parametrize("http2", PROTOCOLS)
def test_underscore_scope_headers_never_reach_the_upstream_on_a_public_route(demo, http2):
    seen = assert_passed(demo.request("GET", "/healthz", FORGED_UNDERSCORES + [("x_keygate_auth", "api_key")],
                                      http2=http2))
    assert seen["x-keygate-auth"] == ["none"]
    no_underscore_twins(seen, "x_keygate_user", "x_keygate_organizations", "x_keygate_auth")


@pytest.mark.parametrize("http2", PROTOCOLS)
def test_underscore_tenant_header_never_reaches_the_upstream_with_a_session(abaco, http2):
    seen = assert_passed(abaco.request("GET", "/business-partners",
                                       [("cookie", "accessToken=" + abaco_session_token()),
                                        ("x_keygate_tenant", "company-999")], http2=http2))
    assert seen["x-keygate-auth"] == ["session"]
    no_underscore_twins(seen, "x_keygate_tenant", "x-keygate-tenant")


# --- 3. preflights ----------------------------------------------------------------------------

PREFLIGHT = [("origin", "https://evil.example"), ("access-control-request-method", "DELETE"),
             ("content-type", "application/json")]


def preflight_body(http2):
    """The reproduction's JSON body. keygate answers a preflight from its headers; over h2, curl
    still sending a body when any early local reply arrives sometimes sees only the stream's
    reset (curl exit 92, seen for 401s too), so the h2 rows send the headers alone."""
    return None if http2 else b'{"delete": "everyone"}'


@pytest.mark.parametrize("http2", PROTOCOLS)
def test_a_preflight_is_answered_locally_without_a_cors_grant_even_with_a_body(demo, http2):
    resp = demo.request("OPTIONS", "/admin/users", PREFLIGHT, body=preflight_body(http2), http2=http2)
    assert resp.status == 204, resp
    assert resp.upstream is None, "a preflight must never reach the upstream"
    assert resp.header("access-control-allow-origin") is None
    assert resp.body == b""


PINNED_ORIGIN = {'allow_origin_string_match: [{ safe_regex: { regex: ".*" } }]':
                 'allow_origin_string_match: [{ exact: "https://app.example" }]'}


@pytest.fixture(scope="module")
def abaco_pinned_origin():
    with Stack("abaco.yaml", substitutions={**UNDERSCORES_ALLOWED, **PINNED_ORIGIN}) as stack:
        yield stack


@pytest.mark.parametrize("http2", PROTOCOLS)
def test_a_preflight_from_an_origin_the_cors_filter_refuses_never_reaches_the_upstream(abaco_pinned_origin, http2):
    resp = abaco_pinned_origin.request("OPTIONS", "/business-partners", PREFLIGHT,
                                       body=preflight_body(http2), http2=http2)
    assert resp.upstream is None, "a preflight must never reach the upstream"
    # keygate's 204, or Envoy's own answer once `forward_not_matching_preflights: false` is set.
    assert resp.status in (200, 204, 403), resp
    assert resp.header("access-control-allow-origin") is None
    # The origin the cors filter allows still gets its grant from Envoy.
    allowed = abaco_pinned_origin.request("OPTIONS", "/business-partners",
                                          [("origin", "https://app.example"),
                                           ("access-control-request-method", "GET")], http2=http2)
    assert allowed.upstream is None
    assert allowed.header("access-control-allow-origin") == "https://app.example"


# --- 4. key-set rollback ---------------------------------------------------------------------

KS_ALPHA = "ks_alpha_Q2mX7rT9wL4v"  # a key of envoy/keyservice.yaml's profile (name "remote")
KS_REFRESH = 2.0  # refresh_seconds in envoy/keyservice.yaml


@pytest.fixture(scope="module")
def keyservice():
    stack = Stack("keyservice.yaml", concurrency=2)
    with StaticKeyService.for_stack(stack) as service, stack:
        yield stack, service


def alpha(enabled):
    return key_record("ks-alpha", KS_ALPHA, tenant="acme", enabled=enabled)


def test_an_older_key_set_served_again_does_not_re_enable_a_revoked_key(keyservice):
    stack, service = keyservice
    key = [("x-api-key", KS_ALPHA)]
    enabled = keyset_document(alpha(True), serial=100)
    service.write("keys.json", enabled)
    assert wait_for(lambda: stack.request("GET", "/orders", key).status == 200, KS_REFRESH + 3)
    service.write("keys.json", keyset_document(alpha(False), serial=101))
    assert wait_for(lambda: stack.request("GET", "/orders", key).status == 401, KS_REFRESH + 3)
    version = stack.stat("wasmcustom.keygate.remote.keyset.version")

    service.write("keys.json", enabled)  # a stale cache or replica serves the old document again
    assert wait_for(lambda: stack.stat("wasmcustom.keygate.remote.keyset.rollbacks_refused") >= 1,
                    KS_REFRESH + 3)
    for http2 in (False, True):
        assert_refused(stack.request("GET", "/orders", key, http2=http2), 401, "INVALID_API_KEY")
    assert stack.stat("wasmcustom.keygate.remote.keyset.version") == version
    assert "serial 100 is not above serial 101" in stack.log_text()


# --- 5. lookup cache flooding ------------------------------------------------------------------

LOOKUP_STAT = "wasmcustom.keygate.lookup."
EPSILON = "Bearer klid_epsilon:ZXBzaWxvbi1zZWNyZXQ"  # envoy/keyservice/keys/by-id/klid_epsilon.json


def lookup_stack(substitutions):
    stack = Stack("keyservice-lookup.yaml", concurrency=2, substitutions=substitutions)
    root = stack.workdir / "keyservice"
    shutil.copytree(ROOT / "envoy" / "keyservice", root, dirs_exist_ok=True)
    return stack, StaticKeyService(root, stack.ports["keys"], stack.workdir)


def random_keys(count):
    return [[("x-api-key", "kl_" + secrets.token_hex(12))] for _ in range(count)]


def test_a_flood_of_unknown_keys_never_evicts_a_cached_key():
    # 64 entries (16 slots): before separate budgets, 400 unknown keys evicted every known one.
    stack, service = lookup_stack({'"cache_entries": 65536': '"cache_entries": 64'})
    with service, stack:
        assert_passed(stack.request("GET", "/orders", [("authorization", EPSILON)]))
        answers = stack.in_parallel(lambda h: stack.request("GET", "/orders", h), random_keys(400))
        assert all(r.status in (401, 503) for r in answers)
        service.stop()  # a key-service outage right after the flood
        for http2 in (False, True):
            seen = assert_passed(stack.request("GET", "/orders", [("authorization", EPSILON)], http2=http2))
            assert seen["x-keygate-key-id"] == ["klid_epsilon"]


def test_lookups_beyond_the_cap_per_second_are_answered_without_a_fetch():
    stack, service = lookup_stack({'"cache_entries": 65536': '"cache_entries": 65536, "max_misses_per_second": 20'})
    with service, stack:
        before = len(service.requests())
        keys = random_keys(200)
        answers = stack.in_parallel(lambda i: stack.request("GET", "/orders", keys[i], http2=i % 2 == 1),
                                    range(len(keys)))
        fetched = len(service.requests()) - before
        refused = [r for r in answers if r.status == 503]
        assert refused, "some unknown keys were answered without a fetch"
        for r in refused:
            assert_refused(r, 503, "KEYSET_UNAVAILABLE")
        assert all(r.status == 401 and r.upstream is None for r in answers if r.status != 503)
        assert stack.stat(LOOKUP_STAT + "cache.misses_over_cap") == len(refused)
        assert fetched <= 20 * 4, fetched  # 20 per second; the burst may straddle a few seconds


class SlowKeyService:
    """A key service that takes half a second to say 404, and counts what it was asked."""

    def __init__(self, port):
        paths = self.paths = []

        class Slow(BaseHTTPRequestHandler):
            def do_GET(self):
                paths.append(self.path)
                time.sleep(0.5)
                self.send_response(404)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Slow)
        self.server.daemon_threads = True

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def test_concurrent_requests_for_one_uncached_key_share_one_lookup_per_worker():
    stack = Stack("keyservice-lookup.yaml", concurrency=2)
    with SlowKeyService(stack.ports["keys"]) as service, stack:
        key = random_keys(1)[0]
        answers = stack.in_parallel(lambda i: stack.request("GET", "/orders", key, http2=i % 2 == 1),
                                    range(20), threads=20)
        for r in answers:
            assert_refused(r, 401, "INVALID_API_KEY")
        # One lookup per worker VM at most (wasm); one for the whole process (native).
        assert 1 <= len(service.paths) <= 2, service.paths
        assert stack.stat(LOOKUP_STAT + "cache.coalesced") >= 20 - 2 - stack.stat(LOOKUP_STAT + "cache.hits")


# --- 6. counters shared across filters ----------------------------------------------------------

@wasm_only("vm_id names a wasm VM; the native module keeps its limits per filter config")
def test_two_tenants_filters_sharing_a_vm_id_never_spend_each_others_budget():
    config = "../tests/e2e/configs/two-tenants-one-vm-id.yaml"
    with Stack(config, concurrency=2) as stack:
        tenant_b_port = stack.ports["ratelimit"]
        seen = assert_passed(stack.request("GET", "/", [("x-api-key", "tk_tenant_a_secret_1")]))
        assert seen["x-keygate-tenant"] == ["tenant-a"]
        assert_refused(stack.request("GET", "/", [("x-api-key", "tk_tenant_a_secret_1")]), 402,
                       "BUDGET_EXHAUSTED")
        for http2 in (False, True):
            resp = stack.request("GET", "/", [("x-api-key", "tk_tenant_b_secret_1")], port=tenant_b_port,
                                 http2=http2)
            if http2:
                assert_refused(resp, 402, "BUDGET_EXHAUSTED")  # B's own budget of 1, spent just before
            else:
                assert assert_passed(resp)["x-keygate-tenant"] == ["tenant-b"]
