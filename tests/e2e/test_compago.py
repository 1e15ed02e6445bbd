"""Compago Sales Partner API (seed 000) reproduced by envoy/compago.yaml: `x-api-key`, plain-text
`Unauthorized` on 401, 403 without permission, and organization scope from the key."""
from conftest import assert_passed

CONFIG = "compago.yaml"

KEY = "cpk_partner7_Rm4Xq8Lw2Tz6Vb1N"
REVOKED = "cpk_partner7_revoked_Gh5Jk7Lm9Np"
REPORTING_KEY = "cpk_partner9_Yt3Ue5Wi7Oq9Pa2S"


def assert_text_denied(resp, status, body, code):
    assert resp.status == status, resp
    assert resp.header("content-type").startswith("text/plain"), resp.headers
    assert resp.body.decode() == body
    assert resp.header("x-keygate-code") == code
    assert resp.upstream is None


def test_compago_missing_key_is_401_plain_unauthorized(stack):
    resp = stack.request("GET", "/api/developer/payment?limit=10")
    assert_text_denied(resp, 401, "Unauthorized", "TOKEN_MISSING")
    assert resp.header("www-authenticate").startswith("ApiKey")


def test_compago_invalid_key_is_401_unauthorized(stack):
    resp = stack.request("GET", "/api/developer/payment", [("x-api-key", "sk_live_abc123")])
    assert_text_denied(resp, 401, "Unauthorized", "INVALID_API_KEY")


def test_compago_revoked_key_is_401_unauthorized(stack):
    resp = stack.request("GET", "/api/developer/payment", [("x-api-key", REVOKED)])
    assert_text_denied(resp, 401, "Unauthorized", "INVALID_API_KEY")


def test_compago_valid_key_reaches_payments_scoped_to_its_partner(stack):
    seen = assert_passed(stack.request("GET", "/api/developer/payment?limit=10", [("x-api-key", KEY)]))
    assert seen["x-keygate-tenant"] == ["partner-7"]
    assert seen["x-keygate-organizations"] == ["org-101,org-102"]
    assert seen["x-keygate-key-id"] == ["partner-7-production"]
    assert "x-api-key" not in seen
    assert seen[":path"] == ["/api/developer/payment?limit=10"]


def test_compago_key_without_permission_for_the_resource_is_403(stack):
    resp = stack.request("GET", "/api/developer/reports", [("x-api-key", KEY)])
    assert_text_denied(resp, 403, "Forbidden", "FORBIDDEN")


def test_compago_key_with_the_permission_reaches_the_resource(stack):
    seen = assert_passed(stack.request("GET", "/api/developer/reports", [("x-api-key", REPORTING_KEY)]))
    assert seen["x-keygate-tenant"] == ["partner-9"]


def test_compago_organization_filter_inside_the_partner_scope_passes(stack):
    seen = assert_passed(stack.request("GET", "/api/developer/payment?organizationId=org-102", [("x-api-key", KEY)]))
    assert seen["x-keygate-organizations"] == ["org-101,org-102"]


def test_compago_organization_filter_outside_the_partner_scope_does_not_leak(stack):
    for path in ["/api/developer/payment?organizationId=org-901",
                 "/api/developer/payment?organizationId=org-101&organizationId=org-901",
                 "/api/developer/payment?organization%49d=org-901"]:
        resp = stack.request("GET", path, [("x-api-key", KEY)])
        assert_text_denied(resp, 403, "Forbidden", "TENANT_FORBIDDEN")
    resp = stack.request("GET", "/api/developer/payment", [("x-api-key", KEY), ("x-organization-id", "org-901")])
    assert_text_denied(resp, 403, "Forbidden", "TENANT_FORBIDDEN")


def test_compago_client_cannot_claim_another_partner_through_scope_headers(stack):
    headers = [("x-api-key", KEY), ("x-keygate-tenant", "partner-9"), ("x-keygate-organizations", "org-901")]
    seen = assert_passed(stack.request("GET", "/api/developer/payment", headers))
    assert seen["x-keygate-tenant"] == ["partner-7"]
    assert seen["x-keygate-organizations"] == ["org-101,org-102"]
