import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from keygate_stack import Stack  # noqa: E402


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


def keygate_access_log_field(line):
    """keygate's decision in an access-log line of a shipped config: the JSON object after
    `keygate=` (`%FILTER_STATE(wasm.keygate:PLAIN)%`), or None where Envoy printed `-`."""
    _, _, value = line.partition(" keygate=")
    return None if value.strip() == "-" else json.loads(value)
