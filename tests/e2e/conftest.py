import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from keygate_stack import HOST, Stack  # noqa: E402

def native_only(reason):
    """Marks a test of the native module itself (KEYGATE_HOST=native)."""
    return pytest.mark.skipif(HOST != "native", reason=reason)


def wasm_only(reason):
    """Marks a test (or, as `pytestmark`, a module) that needs the wasm host."""
    return pytest.mark.skipif(HOST != "wasm", reason=reason)


@pytest.fixture(scope="module")
def stack(request):
    """A real Envoy running the shipped config named by the test module's `CONFIG`."""
    config = getattr(request.module, "CONFIG")
    concurrency = getattr(request.module, "CONCURRENCY", 2)
    with Stack(config, concurrency=concurrency) as running:
        yield running


def assert_denied(resp, status, code):
    assert resp.status == status, resp
    assert resp.header("content-type") == "application/json", resp.headers
    assert resp.code == code, resp
    assert resp.upstream is None, "a denied request must not reach the upstream"


def assert_passed(resp):
    assert resp.status == 200, resp
    seen = resp.upstream
    assert seen is not None, "the request did not reach the upstream"
    return seen
