"""MakePay (seed 004) reproduced by envoy/makepay.yaml: key id and secret in two headers, secret
stored as a hash, product (appSlug) and team scope, allowed origins, enabled flag."""
from conftest import assert_denied, assert_passed

CONFIG = "makepay.yaml"

KEY_ID, SECRET = "mk_makepay_team12prod", "mksec_Vq2Wn4Er6Ty8Ui0Op"
DISABLED_ID, DISABLED_SECRET = "mk_makepay_team12old", "mksec_Zx1Cv3Bn5Mm7Ll9Kk"
OTHER_PRODUCT_ID, OTHER_PRODUCT_SECRET = "mk_makepay_team12other", "mksec_Aa2Ss4Dd6Ff8Gg0Hh"


def pair(key_id, secret):
    return [("x-makecrypto-key-id", key_id), ("x-makecrypto-key-secret", secret)]


def assert_invalid_credentials(resp):
    assert resp.code in {"INVALID_API_KEY", "MALFORMED_API_KEY"}, resp
    assert_denied(resp, 401, resp.code)
    assert resp.json["message"] == "Invalid MakePay API credentials"


def test_makepay_key_pair_reaches_payment_links_with_the_team_from_the_key(stack):
    seen = assert_passed(stack.request("POST", "/api/partner/v1/payment-links", pair(KEY_ID, SECRET), body=b"{}"))
    assert seen["x-keygate-tenant"] == ["team-12"]
    assert seen["x-keygate-product"] == ["makepay"]
    assert seen["x-keygate-key-id"] == [KEY_ID]
    assert "x-makecrypto-key-secret" not in seen and "x-makecrypto-key-id" not in seen


def test_makepay_wrong_secret_is_invalid_makepay_api_credentials(stack):
    resp = stack.request("GET", "/api/partner/v1/payment-links", pair(KEY_ID, "mksec_wrongwrongwrong"))
    assert_invalid_credentials(resp)
    assert resp.code == "INVALID_API_KEY"


def test_makepay_unknown_key_id_is_invalid_makepay_api_credentials(stack):
    assert_invalid_credentials(stack.request("GET", "/api/partner/v1/payment-links", pair("mk_makepay_nobody", SECRET)))


def test_makepay_disabled_key_is_invalid_makepay_api_credentials(stack):
    assert_invalid_credentials(stack.request("GET", "/api/partner/v1/payment-links", pair(DISABLED_ID, DISABLED_SECRET)))


def test_makepay_key_for_another_product_is_invalid_makepay_api_credentials(stack):
    resp = stack.request("GET", "/api/partner/v1/payment-links", pair(OTHER_PRODUCT_ID, OTHER_PRODUCT_SECRET))
    assert_invalid_credentials(resp)


def test_makepay_wrong_prefixes_are_invalid_makepay_api_credentials(stack):
    assert_invalid_credentials(stack.request("GET", "/api/partner/v1/payment-links", pair("mk_other_team12prod", SECRET)))
    assert_invalid_credentials(stack.request("GET", "/api/partner/v1/payment-links", pair(KEY_ID, "sec_Vq2Wn4Er6Ty8Ui0Op")))


def test_makepay_one_of_the_two_headers_missing_is_401_unauthorized(stack):
    for headers in [[("x-makecrypto-key-id", KEY_ID)], [("x-makecrypto-key-secret", SECRET)]]:
        resp = stack.request("GET", "/api/partner/v1/payment-links", headers)
        assert_denied(resp, 401, "INCOMPLETE_API_KEY")
        assert resp.json["message"] == "Unauthorized"


def test_makepay_no_credentials_is_401_unauthorized(stack):
    resp = stack.request("GET", "/api/partner/v1/payment-links")
    assert_denied(resp, 401, "TOKEN_MISSING")
    assert resp.json["message"] == "Unauthorized"


def test_makepay_allowed_origin_passes_and_other_origins_are_403(stack):
    ok = stack.request("GET", "/api/partner/v1/payment-links", pair(KEY_ID, SECRET) + [("Origin", "https://merchant.example")])
    assert_passed(ok)
    resp = stack.request("GET", "/api/partner/v1/payment-links", pair(KEY_ID, SECRET) + [("Origin", "https://attacker.example")])
    assert_denied(resp, 403, "ORIGIN_NOT_ALLOWED")
    assert resp.json["message"] == "Forbidden"


def test_makepay_team_and_key_management_routes_refuse_api_keys_with_403(stack):
    for method, path in [("GET", "/api/partner/v1/companies"),
                         ("POST", "/api/partner/v1/companies/team-12/integrations")]:
        resp = stack.request(method, path, pair(KEY_ID, SECRET))
        assert_denied(resp, 403, "FORBIDDEN")
        assert resp.json["message"] == "Forbidden"
