"""Failure policy: what Envoy does when the keygate VM fails, and that every shipped config
fails closed.

A Rust panic in keygate would be a wasm trap. keygate is written so it cannot panic (clippy
denies unwrap/expect/panic and index/slice panics in the core; the fuzz targets look for the
rest), so the crash tests load tests/crashing_wasm.py's module, which traps on every request,
in place of keygate.wasm in envoy/demo.yaml, and show each `failure_policy` of Envoy 1.40.
"""
import re
import subprocess
import time

import pytest

import crashing_wasm  # noqa: E402
from conftest import wasm_only  # noqa: E402
from keygate_stack import ENVOY_BIN, ROOT, Stack  # noqa: E402

# The native module has no VM to fail: its hooks catch panics and fail closed instead
# (tests/e2e/test_native_panic.py).
pytestmark = wasm_only("failure_policy is the wasm VM's; the native module catches panics itself")

WASM_FILTER = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
OPAQUE = "cmp_demo_Q7fX2mLr9Wk4TbVn8PzA"
# Every Envoy config and config fragment shipped under envoy/ (ECDS resources included).
SHIPPED = sorted(p for p in (ROOT / "envoy").rglob("*.yaml")
                 if "docker-compose" not in p.name and WASM_FILTER in p.read_text())


def wasm_filter_configs(text):
    """The text of each typed_config whose "@type" is the wasm filter: the @type line and every
    following line indented at least as deep (its sibling keys, `config:` and below)."""
    lines = text.splitlines()
    blocks = []
    for n, line in enumerate(lines):
        if not re.match(r'\s*"@type":\s*' + re.escape(WASM_FILTER), line):
            continue
        indent = len(line) - len(line.lstrip())
        block = [line]
        for following in lines[n + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) < indent:
                break
            block.append(following)
        blocks.append("\n".join(block))
    return blocks


@pytest.mark.parametrize("config", SHIPPED, ids=[str(p.relative_to(ROOT / "envoy")) for p in SHIPPED])
def test_every_keygate_filter_in_a_shipped_config_fails_closed(config):
    text = config.read_text()
    keygate_filters = [block for block in wasm_filter_configs(text) if "keygate.wasm" in block]
    if not keygate_filters:
        # Only a filter discovered over ECDS may leave the wasm config to another file.
        assert "config_discovery" in text, f"{config.name} names the wasm filter but loads no keygate"
        return
    for block in keygate_filters:
        assert re.search(r"^\s*failure_policy:\s*FAIL_CLOSED\s*$", block, re.M), block[:400]
        assert not re.search(r"fail_open:\s*true", block), "the deprecated fail_open is set"


def test_the_failure_policy_check_sees_every_shipped_keygate_filter():
    found = sum(len([b for b in wasm_filter_configs(p.read_text()) if "keygate.wasm" in b]) for p in SHIPPED)
    assert found == sum(p.read_text().count("keygate.wasm") for p in SHIPPED), "a keygate filter was missed"
    assert found >= 10, found


def validate(text, tmp_path):
    path = tmp_path / "candidate.yaml"
    path.write_text(text)
    return subprocess.run([ENVOY_BIN, "--mode", "validate", "-c", str(path), "--log-level", "critical"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60).returncode


def test_envoy_knows_exactly_the_documented_failure_policies(tmp_path):
    demo = (ROOT / "envoy" / "demo.yaml").read_text()
    for policy in ("FAIL_CLOSED", "FAIL_RELOAD", "FAIL_OPEN"):
        assert validate(demo.replace("failure_policy: FAIL_CLOSED", f"failure_policy: {policy}"), tmp_path) == 0
    assert validate(demo.replace("failure_policy: FAIL_CLOSED", "failure_policy: FAIL_SOMETIMES"), tmp_path) != 0


def crashing_stack(policy, tmp_path):
    """envoy/demo.yaml with the trapping module; `policy` None leaves failure_policy unset."""
    module = crashing_wasm.write(tmp_path / "crashing.wasm")
    setting = f"failure_policy: {policy}" if policy else "# failure_policy left unset"
    return Stack("demo.yaml", concurrency=1, workdir=tmp_path / "envoy", substitutions={
        "filename: build/keygate.wasm": f"filename: {module}",
        "failure_policy: FAIL_CLOSED": setting,
    })


def wasm_stat(stack, name):
    for line in stack.admin("/stats").splitlines():
        if line.startswith(name + ": "):
            return int(line.split(": ")[1])
    return None


@pytest.mark.parametrize("policy", ["FAIL_CLOSED", None], ids=["FAIL_CLOSED", "unset"])
def test_fail_closed_a_crashed_vm_answers_503_and_nothing_reaches_the_upstream(tmp_path, policy):
    with crashing_stack(policy, tmp_path) as stack:
        responses = [stack.request("GET", "/payments", [("x-api-key", OPAQUE)] if n % 2 else [])
                     for n in range(4)]
        time.sleep(2)  # longer than FAIL_RELOAD's first back-off: a closed VM stays closed
        responses.append(stack.request("GET", "/payments", [("x-api-key", OPAQUE)]))
        assert [r.status for r in responses] == [503] * 5
        assert all(r.upstream is None and r.body == b"" for r in responses)
        assert "proxy_on_request_headers failed: Uncaught RuntimeError: unreachable" in stack.log_text()
        assert wasm_stat(stack, "wasm.keygate.vm_reload_success") == 0


def test_fail_open_would_let_unauthenticated_requests_through_after_a_crash(tmp_path):
    """Why no shipped config uses FAIL_OPEN: once the VM has crashed, the filter is skipped."""
    with crashing_stack("FAIL_OPEN", tmp_path) as stack:
        assert stack.request("GET", "/payments").status == 503  # the request that crashed it
        after = stack.request("GET", "/payments", [("x-keygate-tenant", "forged")])
        assert after.status == 200
        seen = after.upstream
        assert seen is not None and "x-keygate-auth" not in seen
        assert seen["x-keygate-tenant"] == ["forged"], "nothing scrubs client-sent scope headers either"


def test_fail_reload_stays_closed_while_it_backs_off_then_loads_a_new_vm(tmp_path):
    with crashing_stack("FAIL_RELOAD", tmp_path) as stack:
        first = [stack.request("GET", "/payments", [("x-api-key", OPAQUE)]) for _ in range(3)]
        assert [r.status for r in first] == [503] * 3
        assert all(r.upstream is None for r in first)
        assert wasm_stat(stack, "wasm.keygate.vm_reload_backoff") >= 1
        deadline = time.time() + 10  # the default backoff starts at 1 s, with jitter
        while wasm_stat(stack, "wasm.keygate.vm_reload_success") < 1 and time.time() < deadline:
            time.sleep(0.5)
            again = stack.request("GET", "/payments", [("x-api-key", OPAQUE)])
            assert again.status == 503 and again.upstream is None  # the new VM traps too
        assert wasm_stat(stack, "wasm.keygate.vm_reload_success") >= 1
        assert stack.log_text().count("Uncaught RuntimeError: unreachable") >= 2, "the new VM never ran"
