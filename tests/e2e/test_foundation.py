"""Foundation: every credential scheme and every outcome, against a real Envoy running
envoy/demo.yaml (the config `make run` starts)."""
from conftest import assert_denied, assert_passed, keygate_access_log_field

CONFIG = "demo.yaml"

OPAQUE = "cmp_demo_Q7fX2mLr9Wk4TbVn8PzA"
ID_SECRET = "abk_demo:demo_secret_b64url_Zm9vYmFy"
PAIR_ID, PAIR_SECRET = "mk_makepay_demo", "mksec_demo_9c1f0e7a5b3d"
ALL_SECRETS = [OPAQUE, "demo_secret_b64url_Zm9vYmFy", PAIR_SECRET]
SCOPE_HEADERS = ["x-keygate-key-id", "x-keygate-tenant", "x-keygate-organizations",
                 "x-keygate-environment", "x-keygate-product", "x-keygate-user",
                 "x-keygate-permissions", "x-keygate-auth"]


def test_no_credential_is_401_token_missing_with_www_authenticate(stack):
    resp = stack.request("GET", "/payments")
    assert_denied(resp, 401, "TOKEN_MISSING")
    assert resp.header("www-authenticate") == 'ApiKey realm="keygate"'
    assert resp.json["message"]


def test_opaque_key_in_x_api_key_passes_with_scope_headers_and_no_credential(stack):
    seen = assert_passed(stack.request("GET", "/payments", [("x-api-key", OPAQUE)]))
    assert seen["x-keygate-key-id"] == ["cmp_demo"]
    assert seen["x-keygate-tenant"] == ["acme"]
    assert seen["x-keygate-permissions"] == ["compress"]
    assert seen["x-keygate-auth"] == ["api_key"]
    assert "x-api-key" not in seen


def test_header_names_match_case_insensitively(stack):
    seen = assert_passed(stack.request("GET", "/p", [("X-API-KEY", OPAQUE)]))
    assert seen["x-keygate-key-id"] == ["cmp_demo"]


def test_bearer_id_secret_passes_and_authorization_is_stripped(stack):
    seen = assert_passed(stack.request("GET", "/p", [("Authorization", "Bearer " + ID_SECRET)]))
    assert seen["x-keygate-key-id"] == ["abk_demo"]
    assert seen["x-keygate-user"] == ["owner@company-7"]
    assert "authorization" not in seen


def test_bearer_scheme_name_is_case_insensitive(stack):
    seen = assert_passed(stack.request("GET", "/p", [("Authorization", "bearer " + ID_SECRET)]))
    assert seen["x-keygate-key-id"] == ["abk_demo"]


def test_split_header_pair_passes_and_both_headers_are_stripped(stack):
    seen = assert_passed(stack.request("GET", "/p", [("x-makecrypto-key-id", PAIR_ID),
                                                     ("x-makecrypto-key-secret", PAIR_SECRET)]))
    assert seen["x-keygate-key-id"] == [PAIR_ID]
    assert seen["x-keygate-product"] == ["makepay"]
    assert seen["x-keygate-tenant"] == ["team-3"]
    assert "x-makecrypto-key-id" not in seen and "x-makecrypto-key-secret" not in seen


def test_client_sent_scope_headers_are_replaced_or_removed(stack):
    forged = [(h, "forged") for h in SCOPE_HEADERS]
    seen = assert_passed(stack.request("GET", "/p", [("x-api-key", OPAQUE)] + forged))
    for h in SCOPE_HEADERS:
        assert "forged" not in seen.get(h, []), h
    assert seen["x-keygate-tenant"] == ["acme"]
    assert "x-keygate-user" not in seen and "x-keygate-product" not in seen


def test_client_sent_scope_headers_with_the_keys_own_values_reach_upstream_once(stack):
    # keygate-native leaves a header it would set to the same value as it is (a chain's earlier
    # copy set it): sent once it stays once; sent twice, the two copies become one.
    once = [("x-keygate-tenant", "acme"), ("x-keygate-key-id", "cmp_demo")]
    seen = assert_passed(stack.request("GET", "/p", [("x-api-key", OPAQUE)] + once))
    assert seen["x-keygate-tenant"] == ["acme"]
    assert seen["x-keygate-key-id"] == ["cmp_demo"]
    assert seen["x-keygate-auth"] == ["api_key"]
    twice = [("x-keygate-tenant", "acme"), ("x-keygate-tenant", "acme")]
    seen = assert_passed(stack.request("GET", "/p", [("x-api-key", OPAQUE)] + twice))
    assert seen["x-keygate-tenant"] == ["acme"]


def test_public_route_needs_no_key_and_still_scrubs_scope_headers(stack):
    seen = assert_passed(stack.request("GET", "/healthz", [("x-keygate-tenant", "forged")]))
    assert "x-keygate-tenant" not in seen
    assert seen["x-keygate-auth"] == ["none"]


def test_unknown_opaque_key_is_401_invalid_api_key(stack):
    assert_denied(stack.request("GET", "/p", [("x-api-key", "cmp_unknown_key")]), 401, "INVALID_API_KEY")


def test_wrong_secret_is_401_invalid_api_key(stack):
    assert_denied(stack.request("GET", "/p", [("Authorization", "Bearer abk_demo:d3JvbmctYnV0LXZhbGlk")]),
                  401, "INVALID_API_KEY")


def test_wrong_pair_secret_is_401_invalid_api_key(stack):
    assert_denied(stack.request("GET", "/p", [("x-makecrypto-key-id", PAIR_ID),
                                              ("x-makecrypto-key-secret", "mksec_wrong")]),
                  401, "INVALID_API_KEY")


def test_disabled_key_is_401_invalid_api_key(stack):
    assert_denied(stack.request("GET", "/p", [("x-api-key", "cmp_disabled_Hq8wE4tYu6Io1PzX")]),
                  401, "INVALID_API_KEY")


def test_expired_key_is_401_api_key_expired(stack):
    assert_denied(stack.request("GET", "/p", [("x-api-key", "cmp_expired_Lk3pQ9sVx2Rm7TbN")]),
                  401, "API_KEY_EXPIRED")


def test_wrong_prefix_is_401_malformed_before_lookup(stack):
    assert_denied(stack.request("GET", "/p", [("x-api-key", "sk_live_abc123")]), 401, "MALFORMED_API_KEY")
    assert_denied(stack.request("GET", "/p", [("Authorization", "Bearer xyz_demo:abc")]), 401, "MALFORMED_API_KEY")


def test_missing_permission_is_403_forbidden(stack):
    assert_denied(stack.request("GET", "/admin/users", [("x-api-key", OPAQUE)]), 403, "FORBIDDEN")


def test_key_holding_the_permission_passes_the_admin_route(stack):
    seen = assert_passed(stack.request("GET", "/admin/users", [("x-api-key", "cmp_readonly_Zx5cV7bNm2Qw9ErT")]))
    assert seen["x-keygate-key-id"] == ["cmp_admin"]


def test_origin_outside_the_keys_allowed_origins_is_403(stack):
    key = ("x-api-key", "cmp_origin_Ws4eD6rFt8Gy1HuJ")
    assert_denied(stack.request("GET", "/p", [key, ("origin", "https://evil.example")]), 403, "ORIGIN_NOT_ALLOWED")
    assert_passed(stack.request("GET", "/p", [key, ("origin", "https://merchant.example")]))
    assert_passed(stack.request("GET", "/p", [key]))


def test_bearer_and_x_api_key_disagreeing_is_401_conflicting(stack):
    resp = stack.request("GET", "/p", [("x-api-key", OPAQUE), ("Authorization", "Bearer " + ID_SECRET)])
    assert_denied(resp, 401, "CONFLICTING_CREDENTIALS")


def test_one_header_twice_with_different_values_is_401_conflicting(stack):
    resp = stack.request("GET", "/p", [("x-api-key", OPAQUE), ("x-api-key", "cmp_other_value")])
    assert_denied(resp, 401, "CONFLICTING_CREDENTIALS")


def test_one_header_twice_with_the_same_value_passes(stack):
    assert_passed(stack.request("GET", "/p", [("x-api-key", OPAQUE), ("x-api-key", OPAQUE)]))


def test_half_a_header_pair_is_401_incomplete(stack):
    assert_denied(stack.request("GET", "/p", [("x-makecrypto-key-id", PAIR_ID)]), 401, "INCOMPLETE_API_KEY")


def test_non_bearer_authorization_is_not_a_key_and_stays_for_the_upstream(stack):
    assert_denied(stack.request("GET", "/p", [("Authorization", "Basic dXNlcjpwYXNz")]), 401, "TOKEN_MISSING")


def test_malformed_headers_get_a_401_json_never_a_5xx(stack):
    cases = [
        [("x-api-key", b"cmp_\xff\xfe\x80bytes")],
        [("x-api-key", "cmp_" + "a" * 16 * 1024)],
        [("x-api-key", "")],
        [("Authorization", "Bearer")],
        [("Authorization", "Bearer ")],
        [("Authorization", "Bearer :secret")],
        [("Authorization", "Bearer abk_demo:")],
        [("Authorization", "Bearer abk_demo:a:b")],
        [("x-makecrypto-key-id", "mk_makepay_demo"), ("x-makecrypto-key-secret", "")],
    ]
    for headers in cases:
        resp = stack.request("GET", "/p", headers)
        assert resp.status == 401, (headers, resp)
        assert resp.code in {"MALFORMED_API_KEY", "TOKEN_MISSING", "INCOMPLETE_API_KEY"}, (headers, resp)
        assert resp.upstream is None


def test_every_outcome_is_counted_in_envoy_stats(stack):
    before = stack.stats()
    stack.request("GET", "/p")
    stack.request("GET", "/p", [("x-api-key", OPAQUE)])
    after = stack.stats()
    assert after["wasmcustom.keygate.demo.denied.token_missing"] == before["wasmcustom.keygate.demo.denied.token_missing"] + 1
    assert after["wasmcustom.keygate.demo.allowed"] == before["wasmcustom.keygate.demo.allowed"] + 1


def test_denials_are_in_the_access_log_with_code_and_key_id_and_never_the_secret(stack):
    stack.request("GET", "/p/expired-denial", [("x-api-key", "cmp_expired_Lk3pQ9sVx2Rm7TbN")])
    stack.request("GET", "/p/wrong-secret", [("Authorization", "Bearer abk_demo:d3JvbmctYnV0LXZhbGlk")])
    expired = stack.access_log_line("/p/expired-denial")
    assert expired and keygate_access_log_field(expired) == {
        "auth": "none", "key_id": "cmp_expired", "code": "API_KEY_EXPIRED"}, expired
    assert stack.access_log_line("/p/wrong-secret")
    log = stack.log_text()
    for secret in ALL_SECRETS + ["cmp_expired_Lk3pQ9sVx2Rm7TbN", "d3JvbmctYnV0LXZhbGlk"]:
        assert secret not in log
