#!/usr/bin/env python3
"""Envoy's memory per key, keygate.wasm against libkeygate.so (the issue-15 goal: at most
150 bytes per key for the whole process at 1M keys).

For each host and key count, starts Envoy (`--concurrency 2`) with one keygate filter and N bench
keys (bench/bench_config.py's keys, digests only), waits until it serves the last key, and reads
its resident memory (VmRSS). `--source inline`: the keys in the filter config (Envoy keeps the
config text too); `--source service`: the key service in full mode, the document served by nginx
(tests/static_keyservice.py) in another process. Bytes per key = (RSS at N - RSS at the smallest
N) / (N - smallest N).

    ENVOY_BIN=... python3 bench/key_memory.py --keys 1000 --keys 100000 --host native --host wasm
    ENVOY_BIN=... python3 bench/key_memory.py --source service --keys 1000 --keys 1000000 --host native
"""
import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import bench_config  # noqa: E402
from keygate_stack import free_port, to_native  # noqa: E402
from static_keyservice import StaticKeyService  # noqa: E402

ENVOY_BIN = os.environ.get("ENVOY_BIN", str(ROOT / ".venv/lib/python3.11/site-packages/envoy/_bin/envoy"))
WORK = ROOT / ".tmp" / "key-memory"


SERVICE_CONFIG = """{
  "name": "memory",
  "credentials": [{"in": "header", "name": "x-api-key", "prefixes": ["kgb_"]}],
  "key_service": {"cluster": "keyservice", "authority": "keys.internal", "path": "/keys.json",
                  "refresh_seconds": 86400, "timeout_ms": 60000, "on_unavailable": "deny"}
}
"""


def config(n, host, port, admin, service_port=None):
    plugin = SERVICE_CONFIG if service_port else bench_config.keygate_config(n)
    filters = bench_config.keygate_filter("mem", "build/keygate.wasm", plugin)
    text = ("admin:\n"
            f"  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}\n"
            "static_resources:\n  listeners:\n"
            + bench_config.listener("keygate", port, bench_config.hcm("keygate", filters,
                                                                    route=bench_config.UPSTREAM_ROUTE)))
    if service_port:
        text += "  clusters:\n" + bench_config.cluster("keyservice", service_port)
    return to_native(text) if host == "native" else text


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def measure(n, host, source):
    port, admin = free_port(), free_port()
    WORK.mkdir(parents=True, exist_ok=True)
    service = None
    if source == "service":
        service = StaticKeyService(WORK / f"docs-{n}", free_port(), WORK).start()
        service.write("keys.json", bench_config.key_set_document(n))
    path = WORK / f"{host}-{source}-{n}.yaml"
    path.write_text(config(n, host, port, admin, service and service.port))
    env = dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(ROOT / "build"))
    log = open(WORK / f"{host}-{n}.log", "wb")
    envoy = subprocess.Popen([ENVOY_BIN, "-c", str(path), "--concurrency", "2", "--disable-hot-restart",
                              "--log-level", "warn"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    started = time.time()
    try:
        key = bench_config.bench_key(n - 1)
        while True:
            if envoy.poll() is not None or time.time() - started > 600:
                raise RuntimeError(f"Envoy did not serve ({host}, {n} keys); see {log.name}")
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"x-api-key": key})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        ready = time.time() - started
        # Every worker has served once (several connections), then let allocations settle.
        for _ in range(8):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"x-api-key": key})
            urllib.request.urlopen(req, timeout=5).read()
        time.sleep(1)
        return rss_kib(envoy.pid), ready
    finally:
        envoy.terminate()
        envoy.wait(timeout=30)
        if service:
            service.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, action="append", required=True)
    parser.add_argument("--host", action="append", choices=["wasm", "native"], required=True)
    parser.add_argument("--source", choices=["inline", "service"], default="inline")
    args = parser.parse_args()
    counts = sorted(set(args.keys))
    print("| host | keys | source | Envoy RSS (MiB) | ready after (s) | bytes per key over the smallest |")
    print("|---|---|---|---|---|---|")
    for host in args.host:
        base = None
        for n in counts:
            rss, ready = measure(n, host, args.source)
            per_key = "—" if base is None else f"{(rss - base[1]) * 1024 / (n - base[0]):.0f}"
            base = base or (n, rss)
            print(f"| {host} | {n:,} | {args.source} | {rss / 1024:.1f} | {ready:.1f} | {per_key} |",
                  flush=True)


if __name__ == "__main__":
    main()
