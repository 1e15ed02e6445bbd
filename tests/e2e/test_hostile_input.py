"""Hostile input, end to end: a table of malicious or malformed requests sent as raw bytes to a
real Envoy running the shipped envoy/demo.yaml (and envoy/abaco.yaml for forged sessions).

Every row states who answers and how: keygate with its documented 4xx and `code`, Envoy's own
HTTP codec with a 4xx before keygate runs (bad bytes, too-large headers), or the upstream with
the identity keygate derived. Whatever answers, for every row:
- the status is never a 5xx;
- the upstream never sees a credential header, a secret, or a client-forged identity header;
- no response echoes a secret.
"""
import base64
import http.client
import socket
import urllib.parse
from dataclasses import dataclass

import pytest

from conftest import abaco_session_token as session_token, b64url
from keygate_stack import Response, Stack  # noqa: E402

CONFIG = "demo.yaml"

OPAQUE = "cmp_demo_Q7fX2mLr9Wk4TbVn8PzA"
ABK_ID, ABK_SECRET = "abk_demo", "demo_secret_b64url_Zm9vYmFy"
ID_SECRET = f"{ABK_ID}:{ABK_SECRET}"
PAIR_ID, PAIR_SECRET = "mk_makepay_demo", "mksec_demo_9c1f0e7a5b3d"
DEMO_SECRETS = [OPAQUE, ABK_SECRET, PAIR_SECRET]
CREDENTIAL_HEADERS = ["x-api-key", "authorization", "x-makecrypto-key-id", "x-makecrypto-key-secret"]
FORGED = "forged-by-client"
SCOPE_HEADERS = ["x-keygate-key-id", "x-keygate-tenant", "x-keygate-organizations",
                 "x-keygate-environment", "x-keygate-product", "x-keygate-user",
                 "x-keygate-permissions", "x-keygate-auth"]
FORGED_SCOPE = [f"{h}: {FORGED}" for h in SCOPE_HEADERS]

# What each demo key looks like upstream (the scope headers keygate sets, nothing else).
CMP_DEMO = {"x-keygate-auth": "api_key", "x-keygate-key-id": "cmp_demo", "x-keygate-tenant": "acme",
            "x-keygate-permissions": "compress"}
ABK_DEMO = {"x-keygate-auth": "api_key", "x-keygate-key-id": "abk_demo", "x-keygate-tenant": "company-7",
            "x-keygate-user": "owner@company-7"}
ANONYMOUS = {"x-keygate-auth": "none"}


@dataclass
class Keygate:
    """keygate answers locally with this status and code."""
    status: int
    code: str


@dataclass
class Codec:
    """Envoy's HTTP/1 codec refuses the request before any filter runs."""
    status: int


@dataclass
class Upstream:
    """The request reaches the upstream with exactly these scope headers."""
    scope: dict


@dataclass
class Row:
    id: str
    lines: list  # raw header lines (str or bytes), sent as-is
    expect: object
    method: str = "GET"
    path: str = "/payments"


def b(text):
    return text if isinstance(text, bytes) else text.encode()


def send_raw(port, method, path, lines):
    """Sends one HTTP/1.1 request byte for byte (http.client refuses CR, LF and friends)."""
    request = b(method) + b" " + b(path) + b" HTTP/1.1\r\nhost: keygate.test\r\n"
    request += b"".join(b(line) + b"\r\n" for line in lines) + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        body = resp.read()
        return Response(resp.status, [(k.lower(), v) for k, v in resp.getheaders()], body)


def assert_never_unsafe(resp, secrets):
    """The invariants every row shares, whoever answered."""
    assert resp.status < 500, resp
    text = resp.body.decode("latin-1")
    seen = resp.upstream
    for secret in secrets:
        assert secret not in text, "a secret was echoed or forwarded"
        assert secret not in " ".join(v for _, v in resp.headers), "a secret is in a response header"
    if seen is None:
        return
    for name in CREDENTIAL_HEADERS:
        assert name not in seen, f"the credential header {name} reached the upstream"
    for name in SCOPE_HEADERS:
        values = seen.get(name, [])
        assert len(values) <= 1, f"{name} reached the upstream {len(values)} times: {values}"
        assert not any(FORGED in v or "evil" in v for v in values), f"forged {name} reached the upstream"


def check(resp, row, secrets=DEMO_SECRETS):
    assert_never_unsafe(resp, secrets)
    expect = row.expect
    if isinstance(expect, Keygate):
        assert resp.status == expect.status, resp
        assert resp.code == expect.code, resp
        assert resp.header("x-keygate-code") == expect.code, resp.headers
        assert resp.upstream is None
    elif isinstance(expect, Codec):
        assert resp.status == expect.status, resp
        assert resp.header("x-keygate-code") is None, "expected Envoy's codec, not keygate, to answer"
        assert resp.upstream is None
    else:
        assert resp.status == 200, resp
        seen = resp.upstream
        assert seen is not None, resp
        got = {h: seen[h][0] for h in SCOPE_HEADERS if h in seen}
        assert got == expect.scope


HOSTILE = [
    # --- CR, LF, NUL and other control bytes inside header values --------------------------
    # A bare LF ends the header line in Envoy's codec: the forged line becomes a header of its
    # own, which keygate replaces with the key's real tenant.
    Row("bare-lf-splits-a-forged-scope-header-which-keygate-replaces",
        [f"x-api-key: {OPAQUE}\nx-keygate-tenant: evil"], Upstream(CMP_DEMO)),
    # Envoy's codec drops a bare CR inside a value: the rest of the line joins the value.
    Row("bare-cr-joins-the-forged-line-to-the-key-which-is-malformed",
        [f"x-api-key: {OPAQUE}\rx-keygate-tenant: evil"], Keygate(401, "MALFORMED_API_KEY")),
    Row("bare-cr-inside-the-pair-secret-leaves-a-wrong-secret",
        [f"x-makecrypto-key-id: {PAIR_ID}", f"x-makecrypto-key-secret: {PAIR_SECRET}\rx"],
        Keygate(401, "INVALID_API_KEY")),
    Row("obs-fold-continuation-line-makes-the-key-malformed",
        [f"x-api-key: {OPAQUE}", " x-keygate-tenant: evil"], Keygate(401, "MALFORMED_API_KEY")),
    Row("nul-after-the-key-is-refused-by-the-codec", [b"x-api-key: " + b(OPAQUE) + b"\x00"], Codec(400)),
    Row("nul-inside-the-key-is-refused-by-the-codec",
        [b"x-api-key: cmp_demo\x00_Q7fX2mLr9Wk4TbVn8PzA"], Codec(400)),
    Row("nul-inside-a-bearer-token-is-refused-by-the-codec",
        [b"authorization: Bearer abk_demo:\x00" + b(ABK_SECRET)], Codec(400)),
    Row("control-byte-0x01-is-refused-by-the-codec", [b"x-api-key: " + b(OPAQUE) + b"\x01"], Codec(400)),
    Row("del-0x7f-is-refused-by-the-codec", [b"x-api-key: " + b(OPAQUE) + b"\x7f"], Codec(400)),
    Row("tab-inside-the-key-is-malformed", ["x-api-key: cmp_demo\t_Q7fX2mLr9Wk4TbVn8PzA"],
        Keygate(401, "MALFORMED_API_KEY")),
    # --- sizes around Envoy's 60 KiB request-header limit -----------------------------------
    Row("headers-just-under-60-kib-with-a-valid-key-pass",
        ["x-filler: " + "a" * (60 * 1024 - 400), f"x-api-key: {OPAQUE}"], Upstream(CMP_DEMO)),
    Row("headers-over-60-kib-are-refused-by-the-codec",
        ["x-filler: " + "a" * (61 * 1024), f"x-api-key: {OPAQUE}"], Codec(431)),
    Row("a-59-kib-api-key-is-malformed-before-hashing", ["x-api-key: cmp_" + "a" * (59 * 1024)],
        Keygate(401, "MALFORMED_API_KEY")),
    Row("a-59-kib-bearer-secret-is-malformed", ["authorization: Bearer abk_demo:" + "A" * (59 * 1024)],
        Keygate(401, "MALFORMED_API_KEY")),
    Row("ninety-copies-of-the-same-key-pass-as-one", [f"x-api-key: {OPAQUE}"] * 90, Upstream(CMP_DEMO)),
    Row("ninety-copies-and-one-other-key-conflict",
        [f"x-api-key: {OPAQUE}"] * 90 + ["x-api-key: cmp_other_1"], Keygate(401, "CONFLICTING_CREDENTIALS")),
    Row("more-than-100-headers-are-refused-by-the-codec", [f"x-api-key: {OPAQUE}"] * 101, Codec(431)),
    # --- bytes that are not UTF-8 -------------------------------------------------------------
    Row("latin1-bytes-in-the-key-are-malformed", [b"x-api-key: cmp_\xff\xfe\xe9"],
        Keygate(401, "MALFORMED_API_KEY")),
    Row("invalid-utf8-in-the-bearer-secret-is-malformed", [b"authorization: Bearer abk_demo:\xc3\x28abc"],
        Keygate(401, "MALFORMED_API_KEY")),
    Row("invalid-utf8-in-the-pair-id-is-malformed",
        [b"x-makecrypto-key-id: mk_makepay_\xe9", f"x-makecrypto-key-secret: {PAIR_SECRET}"],
        Keygate(401, "MALFORMED_API_KEY")),
    Row("non-utf8-forged-scope-header-is-replaced",
        [f"x-api-key: {OPAQUE}", b"x-keygate-tenant: \xff" + b(FORGED)], Upstream(CMP_DEMO)),
    # --- repeated headers -----------------------------------------------------------------------
    Row("two-different-api-keys-conflict", [f"x-api-key: {OPAQUE}", "x-api-key: cmp_other_1"],
        Keygate(401, "CONFLICTING_CREDENTIALS")),
    Row("two-keys-in-one-comma-joined-value-conflict", [f"x-api-key: {OPAQUE}, cmp_other_1"],
        Keygate(401, "CONFLICTING_CREDENTIALS")),
    Row("two-different-bearer-tokens-conflict",
        [f"authorization: Bearer {ID_SECRET}", "authorization: Bearer abk_demo:b3RoZXI"],
        Keygate(401, "CONFLICTING_CREDENTIALS")),
    Row("two-different-pair-secrets-conflict",
        [f"x-makecrypto-key-id: {PAIR_ID}", f"x-makecrypto-key-secret: {PAIR_SECRET}",
         "x-makecrypto-key-secret: mksec_other"], Keygate(401, "CONFLICTING_CREDENTIALS")),
    Row("the-same-bearer-twice-passes-as-one",
        [f"authorization: Bearer {ID_SECRET}", f"authorization: Bearer {ID_SECRET}"], Upstream(ABK_DEMO)),
    Row("basic-next-to-bearer-is-ignored-and-both-are-stripped",
        ["authorization: Basic dXNlcjpwYXNz", f"authorization: Bearer {ID_SECRET}"], Upstream(ABK_DEMO)),
    Row("a-valid-key-next-to-a-broken-one-conflicts",
        [f"x-api-key: {OPAQUE}", "authorization: Bearer abk_demo"], Keygate(401, "CONFLICTING_CREDENTIALS")),
    Row("every-scope-header-forged-twice-is-replaced-once",
        [f"x-api-key: {OPAQUE}"] + FORGED_SCOPE + FORGED_SCOPE, Upstream(CMP_DEMO)),
    # --- header-name case games ------------------------------------------------------------------
    Row("upper-case-header-name-is-the-same-header", [f"X-API-KEY: {OPAQUE}"], Upstream(CMP_DEMO)),
    Row("mixed-case-header-name-is-the-same-header", [f"x-Api-kEY: {OPAQUE}"], Upstream(CMP_DEMO)),
    Row("upper-case-forged-scope-headers-are-replaced",
        [f"x-api-key: {OPAQUE}"] + [f"{h.upper()}: {FORGED}" for h in SCOPE_HEADERS], Upstream(CMP_DEMO)),
    Row("underscore-header-name-is-refused-by-envoy", [f"x_api_key: {OPAQUE}"], Codec(400)),  # headers_with_underscores_action
    Row("space-before-the-colon-is-refused-by-the-codec", [f"x-api-key : {OPAQUE}"], Codec(400)),
    Row("cyrillic-letter-in-the-header-name-is-refused-by-the-codec",
        [f"x-\u0430pi-key: {OPAQUE}"], Codec(400)),
    # --- Unicode look-alikes in prefixes and ids -------------------------------------------------
    Row("cyrillic-es-in-the-cmp-prefix-is-malformed", ["x-api-key: \u0441mp_demo_Q7fX2mLr9Wk4TbVn8PzA"],
        Keygate(401, "MALFORMED_API_KEY")),
    Row("fullwidth-letters-in-the-prefix-are-malformed", ["x-api-key: \uff43\uff4d\uff50_demo_Q7fX2mLr9Wk4TbVn8PzA"],
        Keygate(401, "MALFORMED_API_KEY")),
    Row("cyrillic-ie-in-the-key-id-is-malformed", [f"authorization: Bearer abk_d\u0435mo:{ABK_SECRET}"],
        Keygate(401, "MALFORMED_API_KEY")),
    Row("zero-width-space-in-the-pair-id-is-malformed",
        [f"x-makecrypto-key-id: mk_makepay_\u200bdemo", f"x-makecrypto-key-secret: {PAIR_SECRET}"],
        Keygate(401, "MALFORMED_API_KEY")),
    # --- Bearer spacing and spelling ------------------------------------------------------------
    Row("bearer-then-a-tab-passes", [f"authorization: Bearer\t{ID_SECRET}"], Upstream(ABK_DEMO)),
    Row("bearer-then-several-spaces-passes", [f"authorization: Bearer    {ID_SECRET}"], Upstream(ABK_DEMO)),
    Row("bearer-in-capitals-passes", [f"authorization: BEARER {ID_SECRET}"], Upstream(ABK_DEMO)),
    Row("bearer-with-trailing-spaces-passes", [f"authorization: Bearer {ID_SECRET}   "], Upstream(ABK_DEMO)),
    Row("bearer-colon-is-another-scheme-so-no-credential", [f"authorization: Bearer:{ID_SECRET}"],
        Keygate(401, "TOKEN_MISSING")),
    Row("bearer-glued-to-the-token-is-another-scheme", [f"authorization: Bearer{ID_SECRET}"],
        Keygate(401, "TOKEN_MISSING")),
    Row("bearer-alone-is-malformed", ["authorization: Bearer"], Keygate(401, "MALFORMED_API_KEY")),
    Row("space-inside-the-token-is-malformed", [f"authorization: Bearer {ABK_ID}: {ABK_SECRET}"],
        Keygate(401, "MALFORMED_API_KEY")),
    # --- extra ':' in ids and secrets ------------------------------------------------------------
    Row("second-colon-in-the-secret-is-malformed", [f"authorization: Bearer {ID_SECRET}:extra"],
        Keygate(401, "MALFORMED_API_KEY")),
    Row("double-colon-is-malformed", [f"authorization: Bearer {ABK_ID}::{ABK_SECRET}"],
        Keygate(401, "MALFORMED_API_KEY")),
    Row("empty-key-id-is-malformed", [f"authorization: Bearer :{ABK_SECRET}"], Keygate(401, "MALFORMED_API_KEY")),
    Row("colon-in-the-pair-id-is-malformed",
        [f"x-makecrypto-key-id: {PAIR_ID}:x", f"x-makecrypto-key-secret: {PAIR_SECRET}"],
        Keygate(401, "MALFORMED_API_KEY")),
    Row("colon-after-an-opaque-key-makes-another-key", [f"x-api-key: {OPAQUE}:x"], Keygate(401, "INVALID_API_KEY")),
    # --- credentials in the query string (demo.yaml enables none) --------------------------------
    Row("api-key-in-the-query-is-not-read-when-not-enabled", [], Keygate(401, "TOKEN_MISSING"),
        path=f"/payments?x-api-key={OPAQUE}"),
    Row("percent-encoded-api-key-name-in-the-query-is-not-read", [], Keygate(401, "TOKEN_MISSING"),
        path="/payments?x%2Dapi%2Dkey=" + OPAQUE),
    Row("fragment-in-the-path-is-refused-by-the-codec", [f"x-api-key: {OPAQUE}"], Codec(400),
        path="/payments?a=1#x-keygate-tenant=evil"),
    Row("fragment-hiding-a-query-key-is-refused-by-the-codec", [], Codec(400),
        path=f"/payments?a=1#&api_key={OPAQUE}"),
    # --- request-line games -----------------------------------------------------------------------
    Row("lower-case-method-is-refused-by-the-codec", [f"x-api-key: {OPAQUE}"], Codec(400), method="delete"),
    Row("absolute-form-target-with-a-key-in-userinfo-is-not-a-credential", [], Keygate(401, "TOKEN_MISSING"),
        path=f"http://{OPAQUE}@keygate.test/payments"),
    # --- client-sent scope headers ---------------------------------------------------------------
    Row("forged-scope-headers-with-a-valid-key-are-replaced-or-removed",
        [f"x-api-key: {OPAQUE}"] + FORGED_SCOPE, Upstream(CMP_DEMO)),
    Row("forged-scope-headers-without-a-key-are-refused", FORGED_SCOPE, Keygate(401, "TOKEN_MISSING")),
    Row("forged-scope-headers-with-a-wrong-secret-are-refused",
        ["authorization: Bearer abk_demo:d3Jvbmc"] + FORGED_SCOPE, Keygate(401, "INVALID_API_KEY")),
    Row("forged-scope-headers-on-a-public-route-are-removed", FORGED_SCOPE, Upstream(ANONYMOUS),
        path="/healthz"),
    Row("forged-auth-api-key-on-a-public-route-says-none", ["x-keygate-auth: api_key",
        "x-keygate-key-id: cmp_admin"], Upstream(ANONYMOUS), path="/healthz"),
    Row("forged-admin-permission-does-not-open-the-admin-route",
        [f"x-api-key: {OPAQUE}", "x-keygate-permissions: admin"], Keygate(403, "FORBIDDEN"), path="/admin/users"),
    Row("cors-preflight-imitation-gets-no-identity",
        ["origin: https://evil.example", "access-control-request-method: GET"] + FORGED_SCOPE,
        Upstream(ANONYMOUS), method="OPTIONS", path="/healthz"),  # elsewhere: a local 204 (test_identity_spellings.py)
    # --- headers imitating other filters' results -----------------------------------------------
    Row("forged-jwt-payload-header-is-not-a-credential",
        ["x-jwt-payload: " + base64.b64encode(b'{"sub":"admin","tenant":"acme"}').decode()],
        Keygate(401, "TOKEN_MISSING")),
    Row("forged-envoy-internal-headers-are-not-a-credential",
        ["x-envoy-internal: true", "x-envoy-original-path: /healthz", "x-forwarded-for: 127.0.0.1",
         "x-envoy-auth-failure-mode-allowed: true", "x-forwarded-client-cert: By=spiffe://x;URI=spiffe://admin"],
        Keygate(401, "TOKEN_MISSING")),
    Row("forged-original-path-does-not-pick-the-public-policy", ["x-envoy-original-path: /healthz"],
        Keygate(401, "TOKEN_MISSING"), path="/admin/users"),
]


@pytest.mark.parametrize("row", HOSTILE, ids=[r.id for r in HOSTILE])
def test_hostile_request_on_demo(stack, row):
    check(send_raw(stack.port, row.method, row.path, row.lines), row)


def test_every_keygate_row_is_counted_as_one_denial_and_none_as_5xx(stack):
    """keygate's own counters agree with the table: each row keygate answers is one denial."""
    rows = [row for row in HOSTILE if isinstance(row.expect, Keygate)]
    before = stack.stats()
    for row in rows:
        send_raw(stack.port, row.method, row.path, row.lines)
    after = stack.stats()
    grew = after.get("wasmcustom.keygate.demo.denied", 0) - before.get("wasmcustom.keygate.demo.denied", 0)
    assert grew == len(rows), (before, after)
    assert after.get("wasmcustom.keygate.demo.denied.keyset_unavailable", 0) == 0


# --- forged sessions against envoy/abaco.yaml (jwt_authn runs before keygate) ---------------

ABACO_KEY_ID, ABACO_SECRET = "abk_k7Qm2Xw9", "c2VjcmV0LWFiYWNvLWRlbW8tMQ"
ABACO_USER = {"x-keygate-auth": "api_key", "x-keygate-key-id": ABACO_KEY_ID, "x-keygate-tenant": "company-314",
              "x-keygate-user": "owner@company-314",
              "x-keygate-permissions": "business-partners:read,documents:write"}


ABACO_HOSTILE = [
    Row("unsigned-alg-none-session-cookie-is-an-invalid-token", [f"cookie: accessToken={session_token(alg='none')}"],
        Keygate(401, "INVALID_TOKEN"), path="/business-partners"),
    Row("session-cookie-signed-with-another-key-is-an-invalid-token",
        [f"cookie: accessToken={session_token(key=b'attacker-chosen-signing-key-32b!!')}"],
        Keygate(401, "INVALID_TOKEN"), path="/business-partners"),
    Row("forged-jwt-payload-header-without-a-cookie-is-token-missing",
        ["x-jwt-payload: " + b64url(b'{"sub":"admin"}'), "x-keygate-auth: session"],
        Keygate(401, "TOKEN_MISSING"), path="/business-partners"),
    Row("forged-session-scope-headers-next-to-a-key-are-replaced",
        [f"x-api-key: {ABACO_KEY_ID}:{ABACO_SECRET}", "x-keygate-auth: session", "x-keygate-user: admin",
         "x-jwt-payload: " + b64url(b'{"sub":"admin"}')], Upstream(ABACO_USER), path="/business-partners"),
    Row("forged-session-headers-do-not-open-a-web-session-route",
        [f"x-api-key: {ABACO_KEY_ID}:{ABACO_SECRET}", "x-keygate-auth: session",
         "x-jwt-payload: " + b64url(b'{"sub":"admin"}')], Keygate(403, "WEB_SESSION_REQUIRED"),
        path="/company/switch", method="POST"),
    Row("valid-session-with-forged-scope-headers-keeps-only-the-session-identity",
        [f"cookie: accessToken={session_token(sub='web-user-9')}"] + FORGED_SCOPE,
        Upstream({"x-keygate-auth": "session", "x-keygate-user": "web-user-9"}), path="/business-partners"),
    Row("delete-with-a-key-is-forbidden", [f"x-api-key: {ABACO_KEY_ID}:{ABACO_SECRET}"],
        Keygate(403, "API_KEY_DELETE_FORBIDDEN"), path="/products/12", method="DELETE"),
    Row("lower-case-delete-cannot-dodge-the-delete-ban", [f"x-api-key: {ABACO_KEY_ID}:{ABACO_SECRET}"],
        Codec(400), path="/products/12", method="delete"),
    Row("company-header-outside-the-keys-scope-is-tenant-forbidden",
        [f"x-api-key: {ABACO_KEY_ID}:{ABACO_SECRET}", "x-company-id: company-314, company-999"],
        Keygate(403, "TENANT_FORBIDDEN"), path="/documents"),
]


@pytest.fixture(scope="module")
def abaco():
    with Stack("abaco.yaml", concurrency=1) as running:
        yield running


@pytest.mark.parametrize("row", ABACO_HOSTILE, ids=[r.id for r in ABACO_HOSTILE])
def test_hostile_request_on_abaco(abaco, row):
    check(send_raw(abaco.port, row.method, row.path, row.lines), row, secrets=[ABACO_SECRET])

# --- query-string and cookie credentials against envoy/opt-in-sources.yaml -------------------
# The parameter and the cookie are both `api_key`. Names are percent-decoded once, then compared
# exactly; whatever keygate reads as the credential is removed from :path / cookie upstream.

OPT_IN = {"x-keygate-auth": "api_key", "x-keygate-key-id": "cmp_demo", "x-keygate-tenant": "acme",
          "x-keygate-permissions": "compress"}


def encoded(text):
    return "".join(f"%{ord(c):02X}" for c in text)


OPT_IN_HOSTILE = [
    Row("percent-encoded-parameter-name-is-read-and-stripped", [], Upstream(OPT_IN),
        path=f"/payments?page=2&api%5Fkey={OPAQUE}"),
    Row("fully-percent-encoded-name-and-value-are-read-and-stripped", [], Upstream(OPT_IN),
        path=f"/payments?{encoded('api_key')}={encoded(OPAQUE)}"),
    Row("double-encoded-name-is-another-parameter", [], Keygate(401, "TOKEN_MISSING"),
        path=f"/payments?api%255Fkey={OPAQUE}"),
    Row("upper-case-parameter-name-is-another-parameter", [], Keygate(401, "TOKEN_MISSING"),
        path=f"/payments?API_KEY={OPAQUE}"),
    Row("plain-and-encoded-names-with-different-keys-conflict", [], Keygate(401, "CONFLICTING_CREDENTIALS"),
        path=f"/payments?api_key={OPAQUE}&api%5Fkey=cmp_other_1"),
    Row("the-same-key-as-parameter-and-cookie-passes-and-both-are-stripped",
        [f"cookie: theme=dark; api_key={OPAQUE}"], Upstream(OPT_IN), path=f"/payments?api_key={OPAQUE}"),
    Row("broken-percent-escape-in-the-key-is-malformed", [], Keygate(401, "MALFORMED_API_KEY"),
        path="/payments?api_key=cmp_demo%ZZ"),
    Row("encoded-non-utf8-in-the-key-is-malformed", [], Keygate(401, "MALFORMED_API_KEY"),
        path="/payments?api_key=cmp_demo%FF%FE"),
    Row("encoded-newline-and-forged-header-in-the-key-is-malformed", [], Keygate(401, "MALFORMED_API_KEY"),
        path="/payments?api_key=" + OPAQUE + "%0D%0Ax-keygate-tenant:%20evil"),
    Row("plus-in-the-key-decodes-to-a-space-and-is-malformed", [], Keygate(401, "MALFORMED_API_KEY"),
        path="/payments?api_key=cmp_demo+Q7fX2mLr9Wk4TbVn8PzA"),
    Row("cookie-name-with-spaces-around-is-the-same-cookie",
        [f"cookie: theme=dark ;  api_key={OPAQUE}  ; lang=en"], Upstream(OPT_IN)),
    Row("cookie-name-in-capitals-is-another-cookie", [f"cookie: API_KEY={OPAQUE}"],
        Keygate(401, "TOKEN_MISSING")),
]


@pytest.fixture(scope="module")
def opt_in():
    with Stack("opt-in-sources.yaml", concurrency=1) as running:
        yield running


@pytest.mark.parametrize("row", OPT_IN_HOSTILE, ids=[r.id for r in OPT_IN_HOSTILE])
def test_hostile_request_on_opt_in_sources(opt_in, row):
    resp = send_raw(opt_in.port, row.method, row.path, row.lines)
    check(resp, row)
    seen = resp.upstream
    if seen is not None:
        query = urllib.parse.urlsplit(seen[":path"][0]).query
        names = [name for name, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)]
        assert "api_key" not in names, f"the credential parameter reached the upstream: {seen[':path']}"
        assert OPAQUE not in urllib.parse.unquote(seen[":path"][0])
        assert not any("api_key=" in c for c in seen.get("cookie", []))
