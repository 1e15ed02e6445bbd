#!/usr/bin/env python3
"""Envoy's memory per key, keygate.wasm against libkeygate.so (the issue-15 goal: at most
150 bytes per key for the whole process at 1M keys).

For each host and key count, starts Envoy (`--concurrency 2`) with one keygate filter and N bench
keys (bench/bench_config.py's keys, digests only), waits until it serves the last key, and reads
its resident memory (VmRSS). `--source inline`: the keys in the filter config (Envoy keeps the
config text too); `--source service`: the key service in full mode, the document served by nginx
(tests/static_keyservice.py) in another process. Bytes per key = (RSS at N - RSS at the smallest
N) / (N - smallest N). Also shown: the peak (VmHWM) while loading, and with `--reloads R` (key
service only) the RSS after R changed documents were fetched and installed (refresh every
second), so memory kept after reloads shows. Envoy's allocator (tcmalloc) keeps pages freed by a
parse mapped: `--release` adds Envoy's bootstrap `memory_allocator_manager`, which hands free
memory back to the system every second, as an operator would for a big key set.

    ENVOY_BIN=... python3 bench/key_memory.py --keys 1000 --keys 100000 --host native --host wasm
    ENVOY_BIN=... python3 bench/key_memory.py --source service --keys 1000 --keys 1000000 --host native
    python3 bench/key_memory.py --source service --keys 1000 --keys 300000 --host native --reloads 3
"""
import json
import re
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
                  "refresh_seconds": REFRESH, "timeout_ms": 60000, "on_unavailable": "deny"}
}
"""


# Envoy's bootstrap: release up to 1 GiB of the allocator's free memory to the system every second.
RELEASE = "memory_allocator_manager: { bytes_to_release: 1073741824, memory_release_interval: 1s }\n"


def config(n, host, port, admin, service_port=None, refresh=86400, release=False):
    plugin = SERVICE_CONFIG.replace("REFRESH", str(refresh)) if service_port else bench_config.keygate_config(n)
    filters = bench_config.keygate_filter("mem", "build/keygate.wasm", plugin)
    text = ((RELEASE if release else "") + "admin:\n"
            f"  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}\n"
            "static_resources:\n  listeners:\n"
            + bench_config.listener("keygate", port, bench_config.hcm("keygate", filters,
                                                                    route=bench_config.UPSTREAM_ROUTE)))
    if service_port:
        text += "  clusters:\n" + bench_config.cluster("keyservice", service_port)
    return to_native(text) if host == "native" else text


def rss_kib(pid, field="VmRSS"):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def allocated_kib(admin):
    """What Envoy's allocator (tcmalloc, which the module's Rust allocations go to as well) holds
    allocated: live memory, without freed pages it keeps mapped (RSS counts those)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/memory", timeout=5) as r:
        return int(json.load(r)["allocated"]) // 1024


def key_set_updates(admin):
    """Envoy's count of installed key sets, whichever host's stat name carries it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?format=json&filter=keyset.updates",
                                timeout=5) as r:
        stats = json.load(r).get("stats", [])
    return sum(s.get("value", 0) for s in stats if re.search(r"keyset\.updates$", s.get("name", "")))


def reload_documents(n, service, admin, envoy, reloads):
    """Serves `reloads` changed documents one after another, each waited for until installed."""
    for i in range(reloads):
        installed = key_set_updates(admin)
        # The same keys under a higher serial: fetched, parsed and installed again.
        service.write("keys.json", bench_config.key_set_document(n, serial=i + 2))
        started = time.time()
        while key_set_updates(admin) <= installed:
            if envoy.poll() is not None or time.time() - started > 600:
                raise RuntimeError(f"reload {i + 1} of {n} keys not installed")
            time.sleep(0.5)
    time.sleep(2)


def measure(n, host, source, reloads=0, release=False):
    port, admin = free_port(), free_port()
    WORK.mkdir(parents=True, exist_ok=True)
    service = None
    if source == "service":
        service = StaticKeyService(WORK / f"docs-{n}", free_port(), WORK).start()
        service.write("keys.json", bench_config.key_set_document(n))
    path = WORK / f"{host}-{source}-{n}.yaml"
    path.write_text(config(n, host, port, admin, service and service.port, 1 if reloads else 86400, release))
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
        time.sleep(3 if release else 1)
        loaded = rss_kib(envoy.pid), rss_kib(envoy.pid, "VmHWM"), allocated_kib(admin)
        if reloads:
            reload_documents(n, service, admin, envoy, reloads)
            time.sleep(2 if release else 0)
        return loaded, rss_kib(envoy.pid), allocated_kib(admin), ready
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
    parser.add_argument("--release", action="store_true", help="Envoy releases free memory every second")
    parser.add_argument("--reloads", type=int, default=0, help="changed documents to install after "
                        "loading (key service only)")
    args = parser.parse_args()
    if args.reloads and args.source != "service":
        sys.exit("--reloads needs --source service")
    counts = sorted(set(args.keys))
    print("| host | keys | source | ready after (s) | Envoy RSS / peak / allocated (MiB) "
          "| bytes per key over the smallest: RSS / allocated "
          "| after reloads: RSS / allocated (MiB) | after reloads: bytes per key, RSS / allocated |")
    print("|---|---|---|---|---|---|---|---|")
    for host in args.host:
        base = None
        for n in counts:
            (rss, peak, alloc), reloaded, reloaded_alloc, ready = measure(n, host, args.source, args.reloads, args.release)
            base = base or (n, rss, alloc, reloaded, reloaded_alloc)

            def per_key(now, then):
                return "—" if n == base[0] else f"{(now - then) * 1024 / (n - base[0]):.0f}"
            after = (f"{reloaded / 1024:.1f} / {reloaded_alloc / 1024:.1f} | {per_key(reloaded, base[3])} / "
                     f"{per_key(reloaded_alloc, base[4])}") if args.reloads else "— | —"
            print(f"| {host} | {n:,} | {args.source} | {ready:.1f} | {rss / 1024:.1f} / {peak / 1024:.1f} / "
                  f"{alloc / 1024:.1f} | {per_key(rss, base[1])} / {per_key(alloc, base[2])} | {after} |", flush=True)


if __name__ == "__main__":
    main()
