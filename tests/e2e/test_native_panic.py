"""A panic inside the native module must not take Envoy down (in a dynamic module it would abort
the whole process): every hook catches it, and a request being decided fails closed with 503
KEYSET_UNAVAILABLE. Proven with build/panic-probe/libkeygate.so (`make build-panic-probe`), a
module built with the `panic-probe` feature that panics in every request hook."""
from conftest import assert_denied, native_only
from keygate_stack import ROOT, Stack

pytestmark = native_only("the panic guard is the native module's; the wasm VM has failure_policy")

PROBE_DIR = ROOT / "build" / "panic-probe"
VALID = [("x-api-key", "cmp_demo_Q7fX2mLr9Wk4TbVn8PzA")]


def test_a_panicking_module_answers_503_keyset_unavailable_and_envoy_keeps_serving():
    assert (PROBE_DIR / "libkeygate.so").exists(), "run `make build-panic-probe` first"
    with Stack("demo.yaml", concurrency=2, module_dir=PROBE_DIR) as stack:
        before = stack.stats()
        # Many requests over several connections reach both workers; each one panics.
        for _ in range(20):
            assert_denied(stack.request("GET", "/payments", VALID), 503, "KEYSET_UNAVAILABLE")
            assert_denied(stack.request("GET", "/healthz"), 503, "KEYSET_UNAVAILABLE")
        assert stack.envoy.poll() is None, "Envoy died"
        assert stack.admin("/ready").strip() == "LIVE"
        after = stack.stats()
        key = "wasmcustom.keygate.demo.denied.keyset_unavailable"
        assert after[key] - before.get(key, 0) == 40
        assert "keygate[demo]: internal error (panic) while deciding; failing closed" in stack.log_text()


def test_the_regular_module_serves_the_same_request():
    # The control: the same request through the module built without the probe passes.
    with Stack("demo.yaml", concurrency=1) as stack:
        resp = stack.request("GET", "/payments", VALID)
        assert resp.status == 200, resp
        assert resp.upstream["x-keygate-key-id"] == ["cmp_demo"]
        assert "x-api-key" not in resp.upstream
