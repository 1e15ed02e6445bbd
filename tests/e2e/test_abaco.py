"""abaco API (seed 002) reproduced by envoy/abaco.yaml: id:secret keys in Bearer or X-API-Key,
session-cookie precedence (verified by Envoy's jwt_authn), Spanish JSON errors, forbidden
DELETE / key management / web-session-only routes, company scope from the key, CORS preflight."""

from conftest import abaco_session_token as session_token, assert_denied, assert_passed

CONFIG = "abaco.yaml"

KEY = "abk_k7Qm2Xw9:c2VjcmV0LWFiYWNvLWRlbW8tMQ"
NO_USER_KEY = "abk_n0User55:bm8tdXNlci1zZWNyZXQtZGVtbw"
EXPIRED_KEY = "abk_expired1:ZXhwaXJlZC1rZXktc2VjcmV0"
REVOKED_KEY = "abk_revoked1:cmV2b2tlZC1rZXktc2VjcmV0"


def bearer(token):
    return [("Authorization", "Bearer " + token)]


def test_abaco_bearer_key_id_and_secret_passes_with_company_scope(stack):
    seen = assert_passed(stack.request("GET", "/business-partners", bearer(KEY)))
    assert seen["x-keygate-key-id"] == ["abk_k7Qm2Xw9"]
    assert seen["x-keygate-tenant"] == ["company-314"]
    assert seen["x-keygate-user"] == ["owner@company-314"]
    assert seen["x-keygate-auth"] == ["api_key"]
    assert "authorization" not in seen


def test_abaco_x_api_key_header_with_key_id_and_secret_passes(stack):
    seen = assert_passed(stack.request("GET", "/business-partners", [("X-API-Key", KEY)]))
    assert seen["x-keygate-key-id"] == ["abk_k7Qm2Xw9"]
    assert "x-api-key" not in seen


def test_abaco_no_cookie_and_no_key_is_token_missing_in_spanish(stack):
    resp = stack.request("GET", "/business-partners")
    assert_denied(resp, 401, "TOKEN_MISSING")
    assert resp.json["message"] == "No se envió una API key ni una sesión válida."


def test_abaco_unknown_key_id_is_invalid_api_key(stack):
    assert_denied(stack.request("GET", "/x", bearer("abk_nope0000:c2VjcmV0")), 401, "INVALID_API_KEY")


def test_abaco_wrong_secret_is_invalid_api_key(stack):
    assert_denied(stack.request("GET", "/x", bearer("abk_k7Qm2Xw9:d3Jvbmc")), 401, "INVALID_API_KEY")


def test_abaco_revoked_key_is_invalid_api_key(stack):
    assert_denied(stack.request("GET", "/x", bearer(REVOKED_KEY)), 401, "INVALID_API_KEY")


def test_abaco_expired_key_is_api_key_expired(stack):
    resp = stack.request("GET", "/x", bearer(EXPIRED_KEY))
    assert_denied(resp, 401, "API_KEY_EXPIRED")
    assert resp.json["message"] == "La API key ha expirado."


def test_abaco_key_without_a_company_user_is_api_key_no_user(stack):
    assert_denied(stack.request("GET", "/x", bearer(NO_USER_KEY)), 401, "API_KEY_NO_USER")


def test_abaco_first_colon_splits_so_a_secret_with_colon_is_rejected(stack):
    assert_denied(stack.request("GET", "/x", bearer("abk_k7Qm2Xw9:c2Vj:cmV0")), 401, "MALFORMED_API_KEY")


def test_abaco_delete_with_api_key_is_forbidden(stack):
    resp = stack.request("DELETE", "/products/12", bearer(KEY))
    assert_denied(resp, 403, "API_KEY_DELETE_FORBIDDEN")
    assert resp.json["message"].startswith("Las API keys no pueden realizar solicitudes DELETE")


def test_abaco_key_management_with_api_key_is_forbidden(stack):
    assert_denied(stack.request("POST", "/api-keys", bearer(KEY)), 403, "API_KEY_MANAGEMENT_FORBIDDEN")
    assert_denied(stack.request("GET", "/api-keys", [("X-API-Key", KEY)]), 403, "API_KEY_MANAGEMENT_FORBIDDEN")


def test_abaco_web_session_only_routes_refuse_api_keys(stack):
    assert_denied(stack.request("POST", "/company/switch", bearer(KEY)), 403, "WEB_SESSION_REQUIRED")
    assert_denied(stack.request("PUT", "/users/permissions/9", bearer(KEY)), 403, "WEB_SESSION_REQUIRED")


def test_abaco_company_selector_outside_the_keys_company_is_forbidden(stack):
    assert_denied(stack.request("GET", "/documents?companyId=company-999", bearer(KEY)), 403, "TENANT_FORBIDDEN")
    assert_denied(stack.request("GET", "/documents", bearer(KEY) + [("x-company-id", "company-999")]),
                  403, "TENANT_FORBIDDEN")


def test_abaco_company_selector_of_the_keys_own_company_passes(stack):
    seen = assert_passed(stack.request("GET", "/documents?companyId=company-314", bearer(KEY)))
    assert seen["x-keygate-tenant"] == ["company-314"]


def test_abaco_accounting_report_templates_need_no_granular_permission_with_a_key(stack):
    seen = assert_passed(stack.request("GET", "/accounting/report-templates", bearer(KEY)))
    assert seen["x-keygate-tenant"] == ["company-314"]


def test_abaco_valid_session_cookie_takes_precedence_over_the_api_key(stack):
    # Even a wrong key is not looked at: the session is used and the key headers are stripped.
    headers = [("Cookie", "accessToken=" + session_token()),
               ("Authorization", "Bearer abk_k7Qm2Xw9:d3Jvbmc"), ("X-API-Key", "garbage")]
    seen = assert_passed(stack.request("DELETE", "/products/12", headers))
    assert seen["x-keygate-auth"] == ["session"]
    assert seen["x-keygate-user"] == ["web-user-1"]
    assert "x-keygate-key-id" not in seen
    assert "authorization" not in seen and "x-api-key" not in seen


def test_abaco_valid_session_reaches_web_session_only_routes(stack):
    seen = assert_passed(stack.request("POST", "/company/switch", [("Cookie", "accessToken=" + session_token())]))
    assert seen["x-keygate-auth"] == ["session"]


def test_abaco_expired_session_cookie_and_no_key_is_token_expired(stack):
    resp = stack.request("GET", "/x", [("Cookie", "accessToken=" + session_token(exp_in=-600))])
    assert_denied(resp, 401, "TOKEN_EXPIRED")


def test_abaco_forged_session_cookie_and_no_key_is_invalid_token(stack):
    forged = session_token(key=b"not-the-signing-key-of-abaco-demo")
    assert_denied(stack.request("GET", "/x", [("Cookie", "accessToken=" + forged)]), 401, "INVALID_TOKEN")
    assert_denied(stack.request("GET", "/x", [("Cookie", "accessToken=garbage")]), 401, "INVALID_TOKEN")


def test_abaco_invalid_session_cookie_with_a_valid_key_uses_the_key(stack):
    headers = [("Cookie", "accessToken=garbage")] + bearer(KEY)
    seen = assert_passed(stack.request("GET", "/x", headers))
    assert seen["x-keygate-auth"] == ["api_key"]
    assert seen["x-keygate-key-id"] == ["abk_k7Qm2Xw9"]


def test_abaco_cors_preflight_allows_authorization_and_x_api_key(stack):
    resp = stack.request("OPTIONS", "/business-partners", [
        ("Origin", "https://app.example"),
        ("Access-Control-Request-Method", "GET"),
        ("Access-Control-Request-Headers", "authorization, x-api-key"),
    ])
    assert resp.status == 200, resp
    allowed = resp.header("access-control-allow-headers") or ""
    assert "authorization" in allowed.lower() and "x-api-key" in allowed.lower()
    assert resp.header("access-control-allow-origin") == "https://app.example"


RATE_LIMITED_KEY = "abk_rl5Hour1:cmF0ZS1saW1pdGVkLWtleS0x"  # 5 requests per hour


def test_abaco_too_many_requests_with_one_key_is_429_rate_limit_exceeded_in_spanish(stack):
    def call(_):
        return stack.request("GET", "/business-partners", bearer(RATE_LIMITED_KEY))

    responses = stack.in_parallel(call, range(20))
    passed = [r for r in responses if r.status == 200]
    assert len(passed) == 5
    for r in passed:
        assert r.upstream["x-keygate-key-id"] == ["abk_rl5Hour1"]
    limited = [r for r in responses if r.status != 200]
    assert len(limited) == 15
    for r in limited:
        assert_denied(r, 429, "RATE_LIMIT_EXCEEDED")
        assert r.json["message"] == "Demasiadas solicitudes con la misma API key. Intente de nuevo más tarde."
        assert 710 <= int(r.header("retry-after")) <= 720  # 3600 s / 5 requests, from the first
        assert r.header("ratelimit-remaining") == "0"


def test_abaco_allowed_responses_carry_the_keys_rate_limit_headers(stack):
    resp = stack.request("GET", "/business-partners", bearer(KEY))
    assert_passed(resp)
    assert resp.header("ratelimit-limit") == "720"  # 600 per minute + burst 120
    assert 0 < int(resp.header("ratelimit-remaining")) < 720


def test_abaco_session_requests_are_not_counted_against_any_key(stack):
    resp = stack.request("GET", "/business-partners", [("Cookie", "accessToken=" + session_token())])
    assert_passed(resp)
    assert resp.header("ratelimit-limit") is None
