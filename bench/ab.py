#!/usr/bin/env python3
"""Side-by-side A/B of keygate builds, amplified: `make bench-ab A=build/keygate-before.wasm`.

A filter adds a few microseconds to a request that costs Envoy about fifty, and on a shared
machine run-to-run noise is larger than that. So each build gets its own listener in one Envoy
with the keygate filter chained N times (default 10) in front of the router: a valid-key request
passes every copy, each doing the whole check (read headers, parse, hash, look up, decide, set
the scope headers). Credential stripping is off so that every copy still sees the key; all else
is the bench config's. Rounds are interleaved; the per-filter cost is the median over rounds of
(listener CPU - floor CPU) / N, the floor being a listener without filters.

    python3 bench/ab.py before=build/keygate-before.wasm after=build/keygate.wasm \\
        empty=build/bench-empty.wasm --rounds 10

A variant whose path ends in `.so` is keygate as an Envoy dynamic module: `build/lib<name>.so`
(copy a build to build/libkeygate_before.so to compare it with build/libkeygate.so; Envoy loads
each by its module name from build/). The variant path `api_key_auth` is Envoy's own
`api_key_auth` filter, chained the same way, as the reference of issue 15's goal:

    python3 bench/ab.py before=build/libkeygate_before.so after=build/libkeygate.so \\
        api_key_auth=api_key_auth --rounds 10

`--service` takes the keys from a key service in full mode (one set per process, shared by the
chained copies) instead of the filter config; `name=path@N` gives a variant its own key count, so
one run compares a key-set size with another (issue 15's flatness):

    python3 bench/ab.py --service k1=build/libkeygate.so@1000 k300=build/libkeygate.so@300000

`--unknown` measures the 401 path instead: well-formed unknown keys, one filter per listener
(the first copy answers, so chaining would not amplify), against a floor listener whose route
answers 401 itself; empty-filter variants are left out (they would pass the request upstream).
A variant named `deny…` (build/bench-deny.wasm: the empty filter answering keygate's 401 with the
SDK's `send_http_response`) is the floor of a wasm filter's local reply; it runs only with
`--unknown` (it would answer 401 to valid keys too):

    python3 bench/ab.py --unknown deny=build/bench-deny.wasm keygate=build/keygate.wasm

The dynamic-module floors (bench/empty-module, `make build/libbench_empty.so
build/libbench_deny.so`) are variants like any `.so`: a name containing `empty` runs
build/libbench_empty.so (a module doing nothing) without a keygate config, a name starting with
`deny` runs build/libbench_deny.so (the same module answering keygate's 401). Issue 15's
comparison, one variant list for the three paths (chained, `--chain 1`, `--unknown`):

    BENCH_CPU=user python3 bench/ab.py empty_module=build/libbench_empty.so \
        deny_module=build/libbench_deny.so api_key_auth=api_key_auth native=build/libkeygate.so

build/libbench_calls.so (`make build/libbench_calls.so`; name it `empty_calls`) makes the Envoy
callbacks keygate-native makes for a valid key, with fixed values and nothing else: between the
empty module and keygate-native, it splits what the callbacks cost Envoy from keygate's own work.
Its `--config` names the steps it makes, so variants can add them one at a time:

    BENCH_CPU=user python3 bench/ab.py empty_module=build/libbench_empty.so \\
        empty_h=build/libbench_calls.so empty_hs=build/libbench_calls.so \\
        empty_calls=build/libbench_calls.so native=build/libkeygate.so \\
        --config empty_h=headers --config 'empty_hs=headers state'
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import bench_config  # noqa: E402
import run  # noqa: E402
from static_keyservice import StaticKeyService  # noqa: E402


API_KEY_AUTH = "api_key_auth"


def service_config(name, keys):
    """keygate in full key-service mode, its set in /keys-N.json; one name per variant, so each
    keeps its own process-wide set."""
    return json.dumps({
        "name": f"ab{name}", "strip_credentials": False,
        "credentials": [{"in": "header", "name": "x-api-key", "prefixes": [bench_config.KEY_PREFIX]}],
        "key_service": {"cluster": "keyservice", "authority": "keys.internal", "path": f"/keys-{keys}.json",
                        "refresh_seconds": 86400, "timeout_ms": 60000, "on_unavailable": "deny"},
    }, indent=2) + "\n"


def without_keygate_config(name):
    """The bench filters (build/bench-empty.wasm, build/bench-deny.wasm) take no keygate config."""
    return "empty" in name or name.startswith("deny")


def chained_filters(name, wasm, chain, keys, service=False, fields=""):
    if wasm == API_KEY_AUTH:
        return "".join(bench_config.native_filter(keys, strip=False, name=f"api_key_auth_{i}")
                       for i in range(chain))
    if service and not without_keygate_config(name):
        config = service_config(name, keys)
    elif not without_keygate_config(name):
        config = bench_config.keygate_config(keys)
        extra = '"strip_credentials": false,' + (f" {fields}," if fields else "")
        config = config.replace('"name": "bench",', f'"name": "bench", {extra}', 1)
    else:
        # A bench module's --config is its whole filter config (build/libbench_calls.so: the steps).
        config = f"{fields}\n" if fields else "{}\n"
    if wasm.endswith(".so"):
        module = Path(wasm).name.removeprefix("lib").removesuffix(".so")
        one = bench_config.keygate_module_filter(config, module=module)
    else:
        one = bench_config.keygate_filter(f"ab-{name}", wasm, config)
    return "".join(one.replace("- name: keygate", f"- name: keygate_{i}", 1) for i in range(chain))


def render(variants, chain, keys, ports, unknown=False, service_port=None, fields=None):
    floor_route = bench_config.DENY_ROUTE if unknown else None
    listeners = [bench_config.listener("floor", ports["floor"], bench_config.hcm("floor", "", route=floor_route))]
    for name, wasm in variants:
        filters = chained_filters(name, wasm, chain, keys[name], service_port is not None,
                                 (fields or {}).get(name, ""))
        listeners.append(bench_config.listener(name, ports[name], bench_config.hcm(name, filters)))
    listeners.append(bench_config.listener(
        "upstream", ports["upstream"], bench_config.hcm("upstream", "", route=bench_config.UPSTREAM_ROUTE)))
    return ("admin:\n"
            f"  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ports['admin']} }} }}\n"
            "static_resources:\n  listeners:\n" + "".join(listeners)
            + "  clusters:\n" + bench_config.cluster("upstream", ports["upstream"])
            + (bench_config.cluster("keyservice", service_port) if service_port else ""))


def wait_for_keys(port, key, envoy, timeout=600):
    """Until the listener passes `key` (its key set is loaded)."""
    started = time.time()
    while True:
        if envoy.poll() is not None or time.time() - started > timeout:
            sys.exit(f"port {port}: key set not loaded; see {run.WORK / 'ab-envoy.log'}")
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"x-api-key": key})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="name=path/to/keygate.wasm (a name containing 'empty' "
                        "is run without a keygate config: build/bench-empty.wasm)")
    parser.add_argument("--chain", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--unknown", action="store_true", help="unknown keys: the 401 path, one filter")
    parser.add_argument("--service", action="store_true", help="keys from a key service (full mode)")
    parser.add_argument("--config", action="append", default=[], metavar="NAME=FIELDS",
                        help="extra keygate config fields for one variant, e.g. "
                        "--config 'nolog=\"access_log\": false' (the same build under another config)")
    args = parser.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.variants]
    # name=path@N: N keys for that variant.
    keys = {n: int(w.partition("@")[2] or args.keys) for n, w in variants}
    keys["floor"] = args.keys
    variants = [(n, w.partition("@")[0]) for n, w in variants]
    if args.unknown:
        args.chain = 1
        variants = [(n, w) for n, w in variants if "empty" not in n]
    else:
        variants = [(n, w) for n, w in variants if not n.startswith("deny")]
    for _, wasm in variants:
        if wasm != API_KEY_AUTH and not (ROOT / wasm).exists():
            sys.exit(f"no such build: {wasm}")
        if wasm.endswith(".so") and (ROOT / wasm).resolve().parent != ROOT / "build":
            sys.exit(f"{wasm}: Envoy loads dynamic modules from build/ only here")

    run.WORK.mkdir(parents=True, exist_ok=True)
    names = ["floor"] + [n for n, _ in variants]
    ports = {n: run.free_port() for n in names + ["upstream", "admin"]}
    service = None
    if args.service:
        service = StaticKeyService(run.WORK / "ab-docs", run.free_port(), run.WORK).start()
        for n in sorted(set(keys.values())):
            service.write(f"keys-{n}.json", bench_config.key_set_document(n))
    config = run.WORK / "ab.yaml"
    fields = dict(c.split("=", 1) for c in args.config)
    config.write_text(render(variants, args.chain, keys, ports, args.unknown, service and service.port, fields))
    key_files = {}
    for n in sorted(set(keys.values())):
        if args.unknown:
            plain = [bench_config.KEY_PREFIX + f"{i:032x}" for i in range(n)]
        else:
            plain = [bench_config.bench_key(i) for i in range(n)]
        key_files[n] = run.write_keys(run.WORK / f"ab-keys-{n}.txt", plain)
    log = open(run.WORK / "ab-envoy.log", "wb")
    envoy = subprocess.Popen(["taskset", "-c", "0", run.ENVOY_BIN, "-c", str(config), "--concurrency", "1",
                              "--disable-hot-restart", "--log-level", "warn"],
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(ROOT / "build")))

    def once(name, seconds):
        before = run.cpu_seconds(envoy.pid)
        done = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{args.connections}", f"-d{seconds}s",
                               "-s", str(ROOT / "bench" / "wrk.lua"), f"http://127.0.0.1:{ports[name]}/",
                               "--", str(key_files[keys[name]])], capture_output=True, text=True)
        cpu = run.cpu_seconds(envoy.pid) - before
        result = json.loads(next(l for l in done.stdout.splitlines() if l.startswith("{")))
        # wrk counts every non-2xx/3xx answer as a status error: on the 401 path all of them are.
        # A loaded machine times a few connections out (wrk's socket errors); more than 2% is a fault.
        if (result["status_errors"] and not args.unknown) or result["socket_errors"] > result["requests"] // 50:
            raise RuntimeError(f"{name}: {result}")
        if result["socket_errors"]:
            print(f"{name}: {result['socket_errors']} socket errors (timeouts) in {result['requests']} requests",
                  file=sys.stderr)
        return cpu * 1e6 / result["requests"]

    try:
        if not run.envoy_ready(ports["admin"], envoy, 60):
            sys.exit(f"Envoy did not start: see {run.WORK / 'ab-envoy.log'}")
        if service:
            for name in names:
                wait_for_keys(ports[name], bench_config.bench_key(keys[name] - 1), envoy)
        load = Path("/proc/loadavg").read_text().split()[:3]
        for name in names:
            once(name, 2)
        cpu = {n: [] for n in names}
        for _ in range(args.rounds):
            for name in names:
                cpu[name].append(once(name, args.seconds))
    finally:
        envoy.terminate()
        # A crash at shutdown (issue 15 saw one) would otherwise go unnoticed.
        if envoy.wait() != 0:
            print(f"Envoy exited with status {envoy.returncode} when stopped: see {log.name}", file=sys.stderr)
        if service:
            service.stop()

    traffic = "unknown keys (401 from the filter; floor: the route answers 401)" if args.unknown else "valid keys"
    counts = ", ".join(sorted({f"{k:,}" for n, k in keys.items() if n != "floor"}))
    source = "from a key service (full mode)" if args.service else "inline"
    print(f"\nA/B, keygate chained x{args.chain} per listener, {args.rounds} interleaved rounds of "
          f"{args.seconds}s, {traffic}, {counts} keys {source}; load average {' '.join(load)} / "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}\n")
    # Interference from other processes only ever adds CPU time, so each listener's quieter
    # rounds give the second estimate: (lower quartile of its CPU - the floor's) / N.
    print("| build | listener CPU µs/req, median (lowest) | per filter over floor µs/req: median of rounds "
          "(min–max) | per filter from the quieter rounds (lower quartiles) |")
    print("|---|---|---|---|")
    floor = cpu["floor"]
    print(f"| no filter (floor) | {statistics.median(floor):.1f} ({min(floor):.1f}) | — | — |")
    for name, wasm in variants:
        per_filter = [(c - f) / args.chain for c, f in zip(cpu[name], floor)]
        print(f"| {name} (`{wasm}`, {keys[name]:,} keys) | {statistics.median(cpu[name]):.1f} ({min(cpu[name]):.1f}) | "
              f"{statistics.median(per_filter):.2f} ({min(per_filter):.2f}–{max(per_filter):.2f}) | "
              f"{(run.lower_quartile(cpu[name]) - run.lower_quartile(floor)) / args.chain:.2f} |")


if __name__ == "__main__":
    main()
