#!/usr/bin/env python3
"""Instructions per request, deterministic: Envoy under callgrind, one listener per variant
(keygate chained N times, as bench/ab.py renders them), the counters zeroed before and dumped
after each variant's requests. A floor listener without filters runs first; the per-filter cost
is (variant Ir/req - floor Ir/req) / N. CPU timings on this shared 2-core machine move by ±20%;
instruction counts do not (they count work, not time: cache misses and locks are invisible).

    python3 bench/callgrind_envoy.py native=build/libkeygate.so api_key_auth=api_key_auth \\
        empty_module=build/libbench_empty.so --requests 2000

Each dump is left in .tmp/bench/callgrind/<variant>.out (callgrind_annotate --inclusive=yes reads
it; a libkeygate.so built with `CARGO_PROFILE_NATIVE_STRIP=false
CARGO_PROFILE_NATIVE_DEBUG=line-tables-only` shows keygate's function names).
"""
import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import ab  # noqa: E402
import bench_config  # noqa: E402
import run  # noqa: E402


def total_ir(path):
    """The `totals:` (or `summary:`) line of a callgrind dump: instructions executed."""
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    sys.exit(f"{path}: no totals line")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--chain", type=int, default=10)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--config", action="append", default=[], metavar="NAME=FIELDS")
    args = parser.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.variants]
    names = ["floor"] + [n for n, _ in variants]
    keys = {n: args.keys for n in names}
    out = run.WORK / "callgrind"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):
        old.unlink()
    ports = {n: run.free_port() for n in names + ["upstream", "admin"]}
    fields = dict(c.split("=", 1) for c in args.config)
    config = run.WORK / "callgrind.yaml"
    config.write_text(ab.render(variants, args.chain, keys, ports, fields=fields))
    plain = [bench_config.bench_key(i) for i in range(args.keys)]
    log = open(run.WORK / "callgrind-envoy.log", "wb")
    envoy = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/startup.%p.out",
         "--dump-instr=no", run.ENVOY_BIN, "-c", str(config), "--concurrency", "1",
         "--disable-hot-restart", "--log-level", "warn"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(ROOT / "build")))
    results = {}
    try:
        if not run.envoy_ready(ports["admin"], envoy, 600):
            sys.exit("Envoy did not get ready under callgrind")

        def send(name, count):
            # One keep-alive connection, requests one after another, keys in turn.
            done = 0
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", ports[name], timeout=60)
            for i in range(count):
                conn.request("GET", "/v1/items?page=2", headers={
                    "x-api-key": plain[i % len(plain)], "user-agent": "keygate-bench/1",
                    "accept": "application/json"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    sys.exit(f"{name}: status {resp.status}")
                done += 1
            conn.close()
            return done

        for name in names:
            send(name, 50)  # warm-up: connection pools, first-use allocations
            subprocess.run(["callgrind_control", "-z", str(envoy.pid)], check=True, capture_output=True)
            count = send(name, args.requests)
            subprocess.run(["callgrind_control", "-d", name, str(envoy.pid)], check=True, capture_output=True)
            time.sleep(1)
            dumps = sorted(out.glob(f"startup.{envoy.pid}.out.*"), key=lambda p: p.stat().st_mtime)
            dump = dumps[-1]
            target = out / f"{name}.out"
            dump.rename(target)
            results[name] = total_ir(target) / count
            print(f"{name}: {results[name]:,.0f} Ir/req ({count} requests)", file=sys.stderr)
    finally:
        envoy.terminate()
        envoy.wait()
    floor = results["floor"]
    print(f"\nInstructions per request (callgrind, Envoy --concurrency 1), keygate chained x{args.chain}, "
          f"{args.requests} valid-key requests per variant, {args.keys:,} keys\n")
    print("| variant | listener Ir/req | per filter over floor, Ir/req |")
    print("|---|---|---|")
    print(f"| no filter (floor) | {floor:,.0f} | — |")
    for name, path in variants:
        print(f"| {name} (`{path}`) | {results[name]:,.0f} | {(results[name] - floor) / args.chain:,.0f} |")


if __name__ == "__main__":
    main()
