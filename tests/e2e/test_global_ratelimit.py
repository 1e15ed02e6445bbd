"""Fleet-wide limits are Envoy's job: envoy/global-ratelimit.yaml puts Envoy's global `ratelimit`
filter after keygate, with descriptors built from the trusted headers keygate sets. The rate
limit service is not running here (`failure_mode_deny: false`), so every call to it is counted
as an error and the request passes: the counters show exactly which requests produced
descriptors."""
from conftest import assert_denied, assert_passed

CONFIG = "global-ratelimit.yaml"

ACME = "glb_acme_Wm3xT7qN2vRd"
GLOBEX = "glb_globex_Fs8kL4pY6bHc"
CALLS = "cluster.echo.ratelimit.error"
ALLOWED_WHILE_DOWN = "cluster.echo.ratelimit.failure_mode_allowed"


def service_calls(stack):
    stats = stack.stats(prefix="cluster.echo.ratelimit")
    return stats.get(CALLS, 0), stats.get(ALLOWED_WHILE_DOWN, 0)


def test_a_request_with_a_key_asks_the_rate_limit_service_with_keygates_identity(stack):
    before = service_calls(stack)
    seen = assert_passed(stack.request("GET", "/orders", [("x-api-key", ACME)]))
    assert seen["x-keygate-key-id"] == ["glb-acme-1"]
    assert seen["x-keygate-tenant"] == ["acme"]
    after = service_calls(stack)
    assert after == (before[0] + 1, before[1] + 1), (before, after)


def test_a_public_route_without_a_key_produces_no_descriptor(stack):
    before = service_calls(stack)
    assert_passed(stack.request("GET", "/healthz"))
    assert service_calls(stack) == before


def test_a_client_cannot_forge_the_key_id_the_descriptors_are_built_from(stack):
    before = service_calls(stack)
    seen = assert_passed(stack.request("GET", "/healthz", [("x-keygate-key-id", "glb-globex-1"),
                                                           ("x-keygate-tenant", "globex")]))
    assert "x-keygate-key-id" not in seen and "x-keygate-tenant" not in seen
    assert service_calls(stack) == before


def test_a_request_keygate_refuses_never_reaches_the_rate_limit_filter(stack):
    before = service_calls(stack)
    assert_denied(stack.request("GET", "/orders", [("x-api-key", "glb_wrong_key")]), 401, "INVALID_API_KEY")
    assert service_calls(stack) == before
    assert_passed(stack.request("GET", "/orders", [("x-api-key", GLOBEX)]))
    assert service_calls(stack)[0] == before[0] + 1
