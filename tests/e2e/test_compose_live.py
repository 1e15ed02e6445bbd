"""The user-facing compose stack (envoy/docker-compose.yaml) run for real, with the local images
swapped in (envoy/compose/local-images.yaml): the README's curl suite against it, on the
published host ports 10000/9901. Run by `make compose-test` (needs a Docker engine and the
images of `make compose-images`); `make e2e` leaves it out.
"""
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from compose_stack import ComposeEnvoy, ComposeProject, ENVOY_DIR, ServiceExited  # noqa: E402
from keygate_stack import ROOT, SHIPPED_PORTS  # noqa: E402

STACK_FILES = [ENVOY_DIR / "docker-compose.yaml", ENVOY_DIR / "compose" / "local-images.yaml"]


@pytest.fixture(scope="module")
def demo_stack():
    project = ComposeProject("keygate", STACK_FILES, {"KEYGATE_CONFIG": "demo.yaml"})
    with project:
        envoy = ComposeEnvoy(project, "envoy", "127.0.0.1", SHIPPED_PORTS["listener"], SHIPPED_PORTS["admin"])
        yield envoy.wait_ready()


def test_compose_stack_runs_the_local_images_in_place_of_the_official_ones(demo_stack):
    project = demo_stack.project
    for service, image in (("envoy", "keygate-local/envoy:"), ("echo", "keygate-local/python:"),
                           ("sandbox", "keygate-local/python:"), ("keyservice", "keygate-local/nginx:")):
        assert project.inspect(service, "{{.Config.Image}}").startswith(image), service
        assert project.running(service), service


def test_readme_curl_suite_passes_against_the_live_compose_stack(demo_stack):
    base = f"http://127.0.0.1:{demo_stack.port}"
    admin = f"http://127.0.0.1:{demo_stack.admin_port}"
    done = subprocess.run(["bash", str(ROOT / "tests" / "curl_suite.sh"), "--wait", "30", base, admin],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr + demo_stack.project.logs()
    assert done.stdout.rstrip().splitlines()[-1] == f"curl suite against {base}: 10 passed, 0 failed", done.stdout
    # The upstream is the echo container, reached through keygate in the Envoy container.
    resp = demo_stack.request("GET", "/payments", [("x-api-key", "cmp_demo_Q7fX2mLr9Wk4TbVn8PzA")])
    assert resp.status == 200, resp
    assert resp.upstream["x-keygate-tenant"] == ["acme"] and "x-api-key" not in resp.upstream


def test_a_stack_whose_envoy_cannot_start_fails_at_once_with_its_logs(tmp_path):
    # The same stack with the wasm's mount pointing at an empty directory: Envoy's start script
    # refuses to start, and the wait says so instead of timing out or passing.
    broken = tmp_path / "broken-mount.yaml"
    empty = tmp_path / "no-build"
    empty.mkdir()
    broken.write_text(f"services:\n  envoy:\n    volumes: ['{empty}:/keygate/build:ro']\n")
    project = ComposeProject("keygate-broken", STACK_FILES + [broken], {"KEYGATE_CONFIG": "demo.yaml"})
    # Only the Envoy container: its ports would clash with the demo stack's.
    project.require_images()
    project.down()
    try:
        project.run("run", "-d", "--no-deps", "--name", "keygate-broken-envoy", "envoy")
        envoy = ComposeEnvoy(project, "envoy", "127.0.0.1")
        with pytest.raises(ServiceExited) as exited:
            envoy.wait_ready(timeout=30)
        assert "build/keygate.wasm is missing" in str(exited.value)
    finally:
        subprocess.run(["docker", "rm", "-f", "keygate-broken-envoy"], capture_output=True)
        project.down()
