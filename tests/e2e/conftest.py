import subprocess
import base64
import hashlib
import hmac
import json
import sys
import time
from pathlib import Path

import pytest

# The one place that puts tests/ on the path (pytest loads this before any test module), so
# test files import the shared modules (keygate_stack, static_keyservice, ...) directly.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from keygate_stack import HOST, ROOT, Stack  # noqa: E402

CLI = ROOT / "target" / "release" / "keygate"


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


def assert_refused(resp, status, code):
    """keygate answered locally, in either body format (`json` or `text`): status, code, and
    nothing reached the upstream. Every local reply carries its code in `x-keygate-code`."""
    assert resp.status == status, resp
    assert resp.header("x-keygate-code") == code, resp.headers
    if resp.header("content-type") == "application/json":
        assert resp.code == code, resp
    assert resp.upstream is None, "a refused request must not reach the upstream"


def assert_passed(resp):
    assert resp.status == 200, resp
    seen = resp.upstream
    assert seen is not None, "the request did not reach the upstream"
    return seen


def keygate_cli(*args, stdin=""):
    """Runs the release `keygate` binary (`make cli`; built here if a test run starts without it)
    from the repository root."""
    if not CLI.exists():
        subprocess.run(["cargo", "build", "--release", "--bin", "keygate"], cwd=ROOT, check=True)
    return subprocess.run([str(CLI), *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


# The session cookie of envoy/abaco.yaml: an HS256 JWT its jwt_authn filter verifies.
ABACO_SESSION_SIGNING_KEY = b"abaco-demo-session-signing-key-32b!"  # demo only, also in envoy/abaco.yaml


def api_key_header(secret):
    """The request headers of a test that sends its key the default way."""
    return [("x-api-key", secret)]


def b64url(data):
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def abaco_session_token(sub="web-user-1", exp_in=3600, key=ABACO_SESSION_SIGNING_KEY, alg="HS256"):
    """An `accessToken` session cookie value that envoy/abaco.yaml's jwt_authn accepts (unless a
    test changes `key`, or `alg` to "none": then unsigned)."""
    header = {"alg": alg, "typ": "JWT", "kid": "abaco-demo"}
    now = int(time.time())
    payload = {"iss": "https://abaco.example/session", "sub": sub, "iat": now - 10, "exp": now + exp_in}
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())
    if alg == "none":
        return signing_input + "."
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def keygate_access_log_field(line):
    """keygate's decision in an access-log line of a shipped config: the JSON object after
    `keygate=` (`%FILTER_STATE(wasm.keygate:PLAIN)%`), or None where Envoy printed `-`."""
    _, _, value = line.partition(" keygate=")
    return None if value.strip() == "-" else json.loads(value)
