"""A bad keygate config is refused by Envoy itself, with a log line naming the field."""
import subprocess

import pytest

from keygate_stack import ENVOY_BIN, ROOT

GOOD_DIGEST = "4e2f2db88f4648fb2d6de4d51cb99c7816c6d3149abeb26ef2c5700ad8fdb4e7"

BAD_CONFIGS = [
    ("short_digest", GOOD_DIGEST, GOOD_DIGEST[:10], "keys[0].secret_sha256"),
    ("duplicate_id", '"id": "cmp_expired"', '"id": "cmp_demo"', "keys[1].id"),
    ("unknown_field", '"tenant": "acme", "permissions": ["compress"]',
     '"tenant": "acme", "secret": "plaintext", "permissions": ["compress"]', "unknown field `secret`"),
    ("bad_time", '"expires_at": "2025-01-01T00:00:00Z"', '"expires_at": "January 1st"', "keys[1].expires_at"),
    ("bad_scheme", '{"in": "header", "name": "x-api-key"', '{"in": "headr", "name": "x-api-key"', "unknown variant `headr`"),
    ("unknown_code", '"admin": {"required_permissions": ["admin"]}',
     '"admin": {"deny_api_keys": "NOPE"}', "unknown variant `NOPE`"),
]


def validate(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return subprocess.run([ENVOY_BIN, "--mode", "validate", "-c", str(path), "--log-level", "info"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


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
