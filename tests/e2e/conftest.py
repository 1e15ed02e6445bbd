import base64
import hashlib
import hmac
import json
import sys
import time
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


def assert_refused(resp, status, code):
    """keygate answered with this status and code, in whatever body format the profile uses
    (its `x-keygate-code` header names the code in every format)."""
    assert resp.status == status, resp
    assert resp.header("x-keygate-code") == code, resp.headers
    assert resp.upstream is None, "a refused request must not reach the upstream"


def assert_passed(resp):
    assert resp.status == 200, resp
    seen = resp.upstream
    assert seen is not None, "the request did not reach the upstream"
    return seen


# The session cookie of envoy/abaco.yaml: an HS256 JWT its jwt_authn filter verifies.
SESSION_SIGNING_KEY = b"abaco-demo-session-signing-key-32b!"  # demo only, also in envoy/abaco.yaml


def b64url(data):
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def session_token(sub="web-user-1", exp_in=3600, key=SESSION_SIGNING_KEY):
    header = {"alg": "HS256", "typ": "JWT", "kid": "abaco-demo"}
    now = int(time.time())
    payload = {"iss": "https://abaco.example/session", "sub": sub, "iat": now - 10, "exp": now + exp_in}
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def wait_for(predicate, timeout):
    """Seconds until `predicate()` held, or None."""
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return time.time() - start
        time.sleep(0.05)
    return None
