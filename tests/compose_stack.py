"""Runs the compose stacks of envoy/ on a real Docker engine, with the local images
(docker/build-images.sh, `make compose-images`), for `make compose-test`.

`ComposeProject` wraps docker-compose for one project: up from scratch, down, per-service
container, address, stop/start and network connect/disconnect. `ComposeEnvoy` is one Envoy of a
stack as the tests reach it: the listener and admin at an address the host can reach.
Nothing here hides a failure: a service that exits while we wait for it fails at once, with
its logs.
"""
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from keygate_stack import ROOT, parse_stats, send_request

ENVOY_DIR = ROOT / "envoy"


def compose_command():
    """`docker compose` (v2) when installed, else Debian's docker-compose (v1), as the Makefile."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    found = shutil.which("docker-compose")
    assert found, "docker-compose is needed (make compose-tools installs Debian's)"
    return [found]


def debian_suite():
    """The suite docker/build-images.sh builds from: KEYGATE_DEBIAN_SUITE, else the host's."""
    if os.environ.get("KEYGATE_DEBIAN_SUITE"):
        return os.environ["KEYGATE_DEBIAN_SUITE"]
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise RuntimeError("no VERSION_CODENAME in /etc/os-release; set KEYGATE_DEBIAN_SUITE")


def local_image_env():
    """The tags docker/build-images.sh gives the local images, as the override files name them."""
    return {"KEYGATE_ENVOY_VERSION": os.environ.get("KEYGATE_ENVOY_VERSION") or "1.40.0",
            "KEYGATE_DEBIAN_SUITE": debian_suite()}


class ServiceExited(RuntimeError):
    pass


class ComposeProject:
    def __init__(self, name, files, env=None):
        self.name = name
        self.files = [Path(f) for f in files]
        self.env = {**os.environ, **local_image_env(), **(env or {})}

    def run(self, *args, check=True, timeout=180):
        argv = compose_command() + ["-p", self.name]
        for f in self.files:
            argv += ["-f", str(f)]
        done = subprocess.run(argv + list(args), capture_output=True, text=True, env=self.env,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        return done

    def require_images(self):
        """Every image the project names must be on the engine already: there is no registry to
        pull from, and a silent pull attempt would only time out."""
        config = self.run("config")
        images = sorted({line.split("image:", 1)[1].strip().strip("'\"")
                         for line in config.stdout.splitlines() if line.strip().startswith("image:")})
        missing = [i for i in images if subprocess.run(["docker", "image", "inspect", i],
                                                        capture_output=True).returncode != 0]
        assert not missing, f"images missing on this engine: {missing}; run `make compose-images`"
        return images

    def up(self):
        self.require_images()
        # From scratch each time: no container is recreated (docker-compose v1 on Engine 25+
        # fails at recreation, docker/compose#11742), and no state leaks between runs.
        self.down()
        started = self.run("up", "-d", check=False)
        if started.returncode != 0:
            logs = self.logs()
            self.down()
            raise RuntimeError(f"{self.name}: up failed ({started.returncode}):\n{started.stdout}{started.stderr}\n{logs}")
        return self

    def down(self):
        self.run("down", "--remove-orphans", "--timeout", "5", check=False)

    def container(self, service):
        """The service's container, stopped or running, `compose run` ones included."""
        found = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.name}",
                                "--filter", f"label=com.docker.compose.service={service}"],
                               capture_output=True, text=True, check=True).stdout.split()
        assert found, f"{self.name}: no container for {service}"
        return found[0]

    def inspect(self, service, template):
        return subprocess.run(["docker", "inspect", "--format", template, self.container(service)],
                              capture_output=True, text=True, check=True).stdout.strip()

    def running(self, service):
        return self.inspect(service, "{{.State.Running}}") == "true"

    def network(self, network):
        return f"{self.name}_{network}"

    def address(self, service, network):
        return self.inspect(service, f'{{{{ (index .NetworkSettings.Networks "{self.network(network)}").IPAddress }}}}')

    def stop(self, service):
        self.run("stop", "--timeout", "5", service)

    def start(self, service):
        self.run("start", service)

    def disconnect(self, service, network):
        subprocess.run(["docker", "network", "disconnect", self.network(network), self.container(service)],
                       capture_output=True, text=True, check=True)

    def connect(self, service, network):
        subprocess.run(["docker", "network", "connect", self.network(network), self.container(service)],
                       capture_output=True, text=True, check=True)

    def logs(self, tail=60):
        """The last lines of every container of the project, `compose run` ones included."""
        names = subprocess.run(["docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={self.name}",
                                "--format", "{{.Names}}"], capture_output=True, text=True).stdout.split()
        out = []
        for name in sorted(names):
            done = subprocess.run(["docker", "logs", "--tail", str(tail), name], capture_output=True, text=True)
            out.append(f"--- {name}\n{done.stdout}{done.stderr}")
        return "\n".join(out)

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()


class ComposeEnvoy:
    """One Envoy of a compose stack: listener and admin at `host` (host loopback for the
    published single stack, the container's address for the fleet)."""

    def __init__(self, project, service, host, port=10000, admin_port=9901):
        self.project = project
        self.service = service
        self.host = host
        self.port = port
        self.admin_port = admin_port

    def wait_ready(self, timeout=60.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.project.running(self.service):
                raise ServiceExited(f"{self.service} exited while starting:\n{self.project.logs()}")
            try:
                with urllib.request.urlopen(f"http://{self.host}:{self.admin_port}/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.service} not ready within {timeout}s:\n{self.project.logs()}")

    def request(self, method="GET", path="/", headers=(), body=None):
        return send_request(self.host, self.port, method, path, headers, body)

    def admin(self, path):
        with urllib.request.urlopen(f"http://{self.host}:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def stats(self, prefix="wasmcustom.keygate"):
        return parse_stats(self.admin("/stats"), prefix)
