"""The README's curl suite (tests/curl_suite.sh), run against a real local Envoy on the demo
config: the same script `make compose-test` runs against the Docker stack, so the README's
examples, the local stack and the compose stack cannot drift apart."""
import os
import re
import shutil
import subprocess
from pathlib import Path

from keygate_stack import HOST, STATS_NAMESPACE

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIG = "demo.yaml"
SUITE = ROOT / "tests" / "curl_suite.sh"


def run_suite(*args):
    assert shutil.which("curl"), "curl is needed (make deps installs it)"
    env = dict(os.environ, STATS_NAMESPACE=STATS_NAMESPACE[HOST].rstrip("."))
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_curl_suite_passes_every_readme_example_against_the_local_stack(stack):
    done = run_suite(f"http://127.0.0.1:{stack.port}", f"http://127.0.0.1:{stack.ports['admin']}")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = re.search(r"(\d+) passed, (\d+) failed", done.stdout)
    assert summary, done.stdout
    # nine requests plus the admin-stats check; a silently skipped check would lower the count
    assert summary.groups() == ("10", "0"), done.stdout
    assert "FAIL" not in done.stdout


def test_curl_suite_fails_when_keygate_is_not_in_front(stack):
    # Pointed straight at the echo upstream (no keygate), every keygate expectation must fail:
    # the suite really checks statuses and bodies rather than printing "ok".
    done = run_suite(f"http://127.0.0.1:{stack.ports['echo']}")
    assert done.returncode != 0, done.stdout
    summary = re.search(r"(\d+) passed, (\d+) failed", done.stdout)
    assert summary, done.stdout
    assert summary.group(1) == "0", done.stdout
    assert summary.group(2) == "9", done.stdout


def test_curl_suite_covers_every_example_of_the_readme_try_it_section():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Try it (`make run`)", 1)[1].split("\n## ", 1)[0]
    suite = SUITE.read_text()
    header_values = re.findall(r"-H '[^:']+: ([^']+)'", section)
    codes = re.findall(r'"code":"([A-Z_]+)"', section)
    paths = re.findall(r"localhost:10000(/[^\s'\"]*)", section)
    assert len(header_values) >= 6 and len(codes) >= 5 and paths, section
    for value in header_values:
        if value.startswith("Bearer "):
            value = value.removeprefix("Bearer ")
        assert value in suite, f"README example credential {value!r} is not exercised by the curl suite"
    for code in codes:
        assert f'"code":"{code}"' in suite, f"README code {code} is not checked by the curl suite"
    for path in set(paths):
        assert f" {path} " in suite or f" {path}\n" in suite, f"README path {path} is not requested by the suite"
