"""A bad keygate config is refused by Envoy itself, with a log line naming the field."""
import json
import subprocess

import pytest

from keygate_stack import ENVOY_BIN, ROOT, envoy_env, for_host

# Edits of envoy/demo.yaml that the filter refuses, shared with the unit tests
# (src/cli/config_check.rs) and `keygate config check` (tests/cli.rs).
BAD_CONFIGS = [(c["name"], c["old"], c["new"], c["error"])
               for c in json.loads((ROOT / "tests" / "fixtures" / "bad_configs.json").read_text())]


def validate(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(for_host(text))
    return subprocess.run([ENVOY_BIN, "--mode", "validate", "-c", str(path), "--log-level", "info"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=envoy_env())


@pytest.mark.parametrize("name,old,new,named", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_envoy_refuses_a_bad_keygate_config_and_logs_the_field(tmp_path, name, old, new, named):
    shipped = (ROOT / "envoy" / "demo.yaml").read_text()
    assert old in shipped, "the fixture no longer matches envoy/demo.yaml"
    result = validate(tmp_path, shipped.replace(old, new, 1))
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-2000:]
    assert "keygate: invalid configuration:" in log
    assert named in log, log[-2000:]


def test_envoy_accepts_the_shipped_demo_config(tmp_path):
    result = validate(tmp_path, (ROOT / "envoy" / "demo.yaml").read_text())
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
