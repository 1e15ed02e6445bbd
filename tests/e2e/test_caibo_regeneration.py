"""Caibo IPG (seed 003): "Regenerating a key immediately invalidates the previous key."
envoy/caibo-keyservice.yaml is the Caibo profile with its keys served by a key service (stock
nginx serving files this module writes). Regeneration publishes a document where the merchant's
record carries the new key's digest: the old key fails on every worker within one refresh
period + 1 s, the new one works, and it is still routed by its environment."""
import json
import time

import pytest

from conftest import assert_denied, assert_passed
from keygate_stack import ROOT, Stack, wait_for
from static_keyservice import StaticKeyService, key_record

CONFIG = "caibo-keyservice.yaml"
REFRESH = 1.0  # refresh_seconds in envoy/caibo-keyservice.yaml
OLD_LIVE = "caibo_live_sk_8Qa1Ws3Ed5Rf7Tg9"  # the demo live key of envoy/keyservice/caibo/keys.json
NEW_LIVE = "caibo_live_sk_Rg4Hn6Jm8Kq0Lw2Z"
TEST_KEY = "caibo_test_sk_5Tg7Hy9Uj2Ik4Ol6"


def live_record(secret):
    return key_record("merchant-55-live", secret, tenant="merchant-55", environment="live")


@pytest.fixture(scope="module")
def caibo():
    stack = Stack(CONFIG, concurrency=2)
    service = StaticKeyService.for_stack(stack)
    # Start from the shipped document, exactly as `make run PROFILE=caibo-keyservice` serves it.
    shipped = json.loads((ROOT / "envoy" / "keyservice" / "caibo" / "keys.json").read_text())
    service.write("caibo/keys.json", shipped)
    service.start()
    try:
        with stack:
            yield stack, service, shipped
    finally:
        service.stop()




def test_caibo_regenerated_live_key_invalidates_the_old_one_on_every_worker(caibo):
    stack, service, shipped = caibo
    assert wait_for(lambda: stack.request("GET", "/p", [("X-API-Key", OLD_LIVE)]).status == 200, 10)
    seen = assert_passed(stack.request("GET", "/payment-requests/1", [("X-API-Key", OLD_LIVE)]))
    assert seen[":upstream"] == ["echo"] and seen["x-keygate-environment"] == ["live"]

    regenerated = {"serial": shipped["serial"] + 1,
                   "keys": [r for r in shipped["keys"] if r["id"] != "merchant-55-live"] + [live_record(NEW_LIVE)]}
    published = time.time()
    service.write("caibo/keys.json", regenerated)

    assert wait_for(lambda: all(r.status == 401 for r in stack.fire(30, [("X-API-Key", OLD_LIVE)], path="/payment-requests/1")), REFRESH + 1.0), \
        "the old key still worked on some worker after one refresh period + 1 s"
    assert time.time() - published <= REFRESH + 1.5
    for resp in stack.fire(30, [("X-API-Key", OLD_LIVE)], path="/payment-requests/1"):
        assert_denied(resp, 401, "INVALID_API_KEY")
    for resp in stack.fire(30, [("X-API-Key", NEW_LIVE)], path="/payment-requests/1"):
        seen = assert_passed(resp)
        assert seen[":upstream"] == ["echo"]
        assert seen["x-keygate-environment"] == ["live"]
        assert seen["x-keygate-tenant"] == ["merchant-55"]
    # The merchant's test key was not regenerated and still goes to the sandbox.
    seen = assert_passed(stack.request("GET", "/payment-requests/1", [("X-API-Key", TEST_KEY)]))
    assert seen[":upstream"] == ["sandbox"]
