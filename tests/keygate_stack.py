"""Starts a real Envoy with a shipped config from envoy/, plus its echo upstreams.

The shipped configs use fixed ports (listener 10000, admin 9901, echo upstream 8081, sandbox
upstream 8082, key service 8090, rate limit service 8091). `Stack` copies the config with those
ports swapped for free ones, so test groups can run side by side; nothing else in the config
changes.

`KEYGATE_HOST=native` runs the same configs with keygate as an Envoy dynamic module
(build/libkeygate.so): each keygate.wasm filter block becomes the dynamic-module block with the
same JSON (`to_native`), and Envoy finds the module through ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
"""
import http.client
from concurrent.futures import ThreadPoolExecutor
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENVOY_BIN = os.environ.get(
    "ENVOY_BIN", str(ROOT / ".venv/lib/python3.11/site-packages/envoy/_bin/envoy")
)
# Which keygate artifact the stacks load: "wasm" (build/keygate.wasm) or "native" (build/libkeygate.so).
HOST = os.environ.get("KEYGATE_HOST", "wasm")
if HOST not in ("wasm", "native"):
    raise SystemExit(f"KEYGATE_HOST must be wasm or native, not {HOST!r}")
NATIVE_MODULE_DIR = ROOT / "build"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
MODULE_TYPE = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
# What marks keygate's own log lines in Envoy's log, and the component they are logged under.
KEYGATE_LOG_MARK = {"wasm": "wasm log", "native": "[dynamic_modules]"}[HOST]
KEYGATE_LOG_COMPONENT = {"wasm": "[wasm]", "native": "[dynamic_modules]"}[HOST]
# Envoy prefixes a dynamic module's stats with its metrics namespace; wasm ones with this.
STATS_NAMESPACE = {"wasm": "wasmcustom.", "native": "dynamicmodulescustom."}


def to_native(text):
    """The config with every keygate.wasm filter block rewritten into the dynamic-module block
    that loads libkeygate.so with the same JSON configuration. Lines from the Wasm `@type` up to
    `configuration:` (vm_config, failure_policy, ...) have no native counterpart and go; the
    configuration's StringValue stays as is, now under `filter_config`."""
    out, skipping = [], None
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        indent = line[: len(line) - len(line.lstrip())]
        if stripped == f'"@type": {WASM_TYPE}':
            out += [f'{indent}"@type": {MODULE_TYPE}\n',
                    f"{indent}dynamic_module_config: {{ name: keygate }}\n",
                    f"{indent}filter_name: keygate\n"]
            skipping = indent
            continue
        if skipping is not None:
            if stripped == "configuration:":
                out.append(f"{skipping}filter_config:\n")
                skipping = None
            continue
        out.append(line.replace(f'type_urls: ["{WASM_TYPE}"]', f'type_urls: ["{MODULE_TYPE}"]'))
    if skipping is not None:
        raise ValueError("a keygate.wasm filter block without `configuration:`")
    return "".join(out)


def for_host(text):
    """A config's text as the selected host loads it (unchanged for wasm)."""
    return to_native(text) if HOST == "native" else text


def envoy_env(module_dir=None):
    """Envoy's environment: the dynamic-module search path when keygate runs natively."""
    env = dict(os.environ)
    if HOST == "native":
        env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(module_dir or NATIVE_MODULE_DIR)
    return env


SHIPPED_PORTS = {"listener": 10000, "admin": 9901, "echo": 8081, "sandbox": 8082, "keys": 8090,
                 "ratelimit": 8091}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, timeout=15.0, host="127.0.0.1"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def plugin_config_block(config_name):
    """The keygate plugin JSON of a shipped single-filter config: (the literal text of its
    `value: |` block, as a `Stack` substitution key, and the parsed config)."""
    text = (ROOT / "envoy" / config_name).read_text()
    start = text.index("value: |\n") + len("value: |\n")
    end = start
    lines = text[start:].splitlines(keepends=True)
    indent = len(lines[0]) - len(lines[0].lstrip())
    for line in lines:
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        end += len(line)
    block = text[start:end]
    return block, json.loads(block)


def wait_for(predicate, timeout=5.0, interval=0.05):
    """Seconds until `predicate()` held (never 0, so a success is truthy), or None."""
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return max(time.time() - start, 1e-6)
        time.sleep(interval)
    return None


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # list of (lower-case name, value)
        self.body = body

    def header(self, name):
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def code(self):
        """The `code` of a keygate JSON error body."""
        try:
            return self.json.get("code")
        except ValueError:
            return None

    @property
    def upstream(self):
        """What the echo upstream received: {name: [values]}; None if keygate answered."""
        try:
            data = self.json
        except ValueError:
            return None
        if "headers" not in data or "upstream" not in data:
            return None
        seen = {}
        for k, v in data["headers"]:
            seen.setdefault(k, []).append(v)
        seen[":upstream"] = [data["upstream"]]
        seen[":path"] = [data["path"]]
        return seen

    def __repr__(self):
        return f"<{self.status} {self.body[:300]!r}>"


def send_request(host, port, method="GET", path="/", headers=(), body=None):
    """One HTTP/1.1 request to host:port; `headers` is a list of (name, value) pairs, values str
    or bytes, so repeated headers and raw bytes can be sent."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest(method, path, skip_accept_encoding=True)
    for name, value in headers:
        conn.putheader(name, value)
    if body is not None:
        conn.putheader("content-length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    data = resp.read()
    result = Response(resp.status, [(k.lower(), v) for k, v in resp.getheaders()], data)
    conn.close()
    return result


def parse_stats(text, prefix="wasmcustom.keygate"):
    """Envoy admin /stats text → {name: int} for the counters and gauges under `prefix`."""
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.partition(": ")
            try:
                out[name] = int(value)
            except ValueError:
                pass
    return out


class Stack:
    def __init__(self, config_name, concurrency=2, workdir=None, extra_upstreams=("echo", "sandbox"),
                 log_level="info", substitutions=None, extra_args=(), module_dir=None):
        self.config_name = config_name
        self.ports = {name: free_port() for name in SHIPPED_PORTS}
        self.concurrency = concurrency
        self.workdir = Path(workdir or ROOT / ".tmp" / f"{Path(config_name).stem}-{os.getpid()}-{self.ports['listener']}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "envoy.log"
        self.upstream_names = extra_upstreams
        self.log_level = log_level
        self.substitutions = substitutions or {}
        self.extra_args = list(extra_args)  # more Envoy flags, e.g. --component-log-level
        self.procs = []
        self.module_dir = module_dir  # where libkeygate.so is (native host), build/ by default

    @property
    def port(self):
        return self.ports["listener"]

    def render_config(self):
        text = (ROOT / "envoy" / self.config_name).read_text()
        for name, shipped in SHIPPED_PORTS.items():
            text = text.replace(f"port_value: {shipped}", f"port_value: {self.ports[name]}")
        for old, new in self.substitutions.items():
            text = text.replace(old, new)
        text = for_host(text)
        path = self.workdir / Path(self.config_name).name  # a name may be a path outside envoy/
        path.write_text(text)
        return path

    def start(self):
        for name in self.upstream_names:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "echo_upstream.py"),
                 "--port", str(self.ports[name]), "--name", name],
            )
            self.procs.append(proc)
        config = self.render_config()
        # Append mode: the shipped access logs reopen Envoy's stdout (/dev/stdout) with O_APPEND,
        # and writes through a non-append descriptor would overwrite their lines.
        self.log_file = open(self.log_path, "ab")
        self.envoy = subprocess.Popen(
            # Access logs flushed within 50 ms (Envoy's default is 10 s), so tests can read them.
            [ENVOY_BIN, "-c", str(config), "--concurrency", str(self.concurrency),
             "--disable-hot-restart", "--log-level", self.log_level, "--file-flush-interval-msec", "50",
             *self.extra_args],
            cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT, env=envoy_env(self.module_dir),
        )
        self.procs.append(self.envoy)
        for name in self.upstream_names:
            if not wait_for_port(self.ports[name]):
                raise RuntimeError(f"upstream {name} did not start")
        if not self.wait_ready():
            self.stop()
            raise RuntimeError("envoy did not become ready:\n" + self.log_path.read_text()[-4000:])
        return self

    def wait_ready(self, timeout=30.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.envoy.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['admin']}/ready", timeout=1) as r:
                    if r.status == 200 and wait_for_port(self.port, 1):
                        return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def stop(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if getattr(self, "log_file", None):
            self.log_file.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def request(self, method="GET", path="/", headers=(), body=None, port=None, http2=False):
        """Sends one request; `headers` is a list of (name, value) pairs, values str or bytes,
        so repeated headers and raw bytes can be sent. `http2=True` sends it over h2c with prior
        knowledge (curl), the path as-is."""
        if http2:
            return self.request_h2(method, path, headers, body, port)
        return send_request("127.0.0.1", port or self.port, method, path, headers, body)

    def request_h2(self, method, path, headers, body, port):
        # Header names go lower-case on h2 anyway; curl's `-H 'name;'` form sends an empty value.
        # -g: `[` and `]` in a path are sent as they are, not read as a curl URL range.
        args = [b"curl", b"-s", b"-g", b"--http2-prior-knowledge", b"--path-as-is", b"-o", b"-", b"-D",
                b"/dev/stderr", b"-X", method.encode()]
        for name, value in headers:
            value = value if isinstance(value, bytes) else value.encode()
            name = name.encode() if isinstance(name, str) else name
            args += [b"-H", name + b";" if value == b"" else name + b": " + value]
        if body is not None:
            args += [b"--data-binary", b"@-"]
        args.append(f"http://127.0.0.1:{port or self.port}{path}".encode())
        done = subprocess.run(args, input=body if body is not None else b"", capture_output=True,
                              timeout=15)
        head = done.stderr.decode("latin-1").split("\r\n")
        # 92: Envoy answered before the upload ended and reset the rest of the request stream
        # (a local reply to a request with a body); the answer itself arrived whole.
        if done.returncode not in (0, 92) or not head[0].startswith("HTTP/2"):
            raise RuntimeError(f"curl h2c failed ({done.returncode}): {head[:3]}")
        status = int(head[0].split()[1])
        pairs = [line.split(":", 1) for line in head[1:] if ":" in line]
        return Response(status, [(k.strip().lower(), v.strip()) for k, v in pairs], done.stdout)

    def fire(self, count, headers, path="/orders", threads=10):
        """`count` requests at once from `threads` threads, each on its own connection, so the
        kernel spreads them over Envoy's workers."""
        return self.in_parallel(lambda _: self.request("GET", path, headers), range(count), threads)

    @staticmethod
    def in_parallel(call, items, threads=8):
        """[call(item) for item in items], from `threads` threads at once: concurrent requests
        on their own connections (so Envoy's workers and shared state see them together)."""
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(call, items))

    def connections_per_worker(self):
        """{worker: downstream connections so far}: shows which workers served a burst."""
        counts = {}
        for line in self.admin("/stats").splitlines():
            m = re.match(r"listener\.127\.0\.0\.1_\d+\.(worker_\d+)\.downstream_cx_total: (\d+)", line)
            if m:
                counts[m.group(1)] = int(m.group(2))
        return counts

    def admin(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['admin']}{path}", timeout=5) as r:
            return r.read().decode()

    def stats(self, prefix="wasmcustom.keygate"):
        """Stats starting with `prefix`. keygate's own stats are named as the wasm filter's
        (`wasmcustom.keygate...`) whichever host runs, so tests read them the same way."""
        text = self.admin("/stats")
        if HOST != "wasm":
            text = text.replace(STATS_NAMESPACE[HOST] + "keygate.", STATS_NAMESPACE["wasm"] + "keygate.")
        return parse_stats(text, prefix)

    def stat(self, name):
        """One stat by its full name (`wasmcustom.keygate.<filter>.<name>`); 0 until it exists."""
        return self.stats().get(name, 0)

    def log_text(self):
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def access_log_line(self, marker, timeout=5.0):
        """The access-log line (the shipped configs log to Envoy's stdout, which is `log_path`)
        that contains `marker` (e.g. a path unique to one request); None if none appears within
        `timeout`."""
        deadline = time.time() + timeout
        while True:
            for line in self.log_text().splitlines():
                if marker in line and " keygate=" in line:
                    return line
            if time.time() > deadline:
                return None
            time.sleep(0.1)
