#!/usr/bin/env python3
"""`make bench`: every contender of envoy/bench.yaml side by side in one Envoy, printed as a table.

One Envoy (`--concurrency 1`) pinned to one core, wrk pinned to the other. Rounds are
interleaved (A B C ... A B C ...) so slow drifts in machine load hit every contender alike; each
round runs valid-key and invalid-key traffic against every contender. Per run: Envoy's CPU time
from /proc/<pid>/stat (utime + stime, all threads) divided by the requests wrk completed,
requests/s, and wrk's p50/p99 latency. The table shows medians over the rounds.

The "added" columns subtract the floor (the same proxying with no filter) measured in the same
round, and the last column divides a contender's added CPU by the native filter's.
"""
import argparse
import datetime
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_config  # noqa: E402

ENVOY_BIN = os.environ.get("ENVOY_BIN", str(ROOT / ".venv/lib/python3.11/site-packages/envoy/_bin/envoy"))
WORK = ROOT / ".tmp" / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")

LABELS = {
    "floor": "no filter (floor)",
    "native": "native api_key_auth",
    "lua": "Lua filter",
    "ext_authz": "ext_authz (HTTP, local listener)",
    "keygate": "keygate, 1k keys",
    "keygate_before": "keygate before (build/keygate-before.wasm), 1k keys",
    "keygate_100k": "keygate, 100k inline keys",
    "wasm_floor": "empty Rust proxy-wasm filter (no work)",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(n_keys, extra):
    """envoy/bench.yaml plus the extra listeners, with every port swapped for a free one."""
    shipped = (ROOT / "envoy" / "bench.yaml").read_text()
    if n_keys == 1000 and shipped != bench_config.render(n_keys):
        sys.exit("envoy/bench.yaml is stale: run `python3 bench/bench_config.py > envoy/bench.yaml`")
    text = bench_config.render(n_keys, extra)
    ports = {}
    for name, shipped in bench_config.PORTS.items():
        ports[name] = free_port()
        text = text.replace(f"port_value: {shipped} ", f"port_value: {ports[name]} ")
    path = WORK / "bench.yaml"
    path.write_text(text)
    return path, ports


def cpu_seconds(pid):
    """utime + stime of a process, all threads, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def http_status(port, key):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"x-api-key": key} if key is not None else {}
    conn.request("GET", "/v1/items", headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def traffic_kinds(name):
    # The empty wasm filter lets every request through: it has no unknown-key case.
    return ("valid",) if name == "wasm_floor" else ("valid", "invalid")


def write_keys(path, keys):
    path.write_text("".join(k + "\n" for k in keys))
    return path


class Bench:
    def __init__(self, args):
        self.args = args
        self.contenders = list(bench_config.CONTENDERS)
        if "empty" in args.extra:
            self.contenders.insert(1, "wasm_floor")
        if "before" in args.extra:
            self.contenders.append("keygate_before")
        if "100k" in args.extra:
            self.contenders.append("keygate_100k")
        WORK.mkdir(parents=True, exist_ok=True)
        n = args.keys
        self.key_files = {
            "valid": write_keys(WORK / "valid-keys.txt", [bench_config.bench_key(i) for i in range(n)]),
            # Well-formed (right prefix and length) but unknown: every contender must look them up.
            "invalid": write_keys(WORK / "invalid-keys.txt",
                                  [bench_config.KEY_PREFIX + f"{i:032x}" for i in range(n)]),
        }

    def start_envoy(self):
        config, self.ports = render_config(self.args.keys, self.args.extra)
        self.log = open(WORK / "envoy.log", "wb")
        # Warn level: every contender's per-request logging (keygate logs each denial at info)
        # stays off, as in a production proxy that logs at warn.
        self.envoy = subprocess.Popen(
            ["taskset", "-c", str(self.args.envoy_cpu), ENVOY_BIN, "-c", str(config),
             "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.envoy.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['admin']}/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        sys.exit("Envoy did not start:\n" + (WORK / "envoy.log").read_text()[-3000:])

    def stop(self):
        if self.envoy.poll() is None:
            self.envoy.terminate()
            try:
                self.envoy.wait(10)
            except subprocess.TimeoutExpired:
                self.envoy.kill()

    def check_contenders(self):
        """Each contender must let a valid key through and refuse an unknown one, or the numbers
        would compare different work."""
        valid = bench_config.bench_key(7)
        invalid = bench_config.KEY_PREFIX + "0" * 32
        for name in self.contenders:
            port = self.ports[name]
            got = (http_status(port, valid), http_status(port, invalid), http_status(port, None))
            want = (200, 200, 200) if name in ("floor", "wasm_floor") else (200, 401, 401)
            if got != want:
                self.stop()
                sys.exit(f"contender {name}: valid/invalid/missing key gave {got}, expected {want}")
        if http_status(self.ports[bench_config.FLOOR_DENY], valid) != 401:
            self.stop()
            sys.exit("the floor of unknown-key traffic must answer 401")

    def port(self, name, traffic):
        if name == "floor" and traffic == "invalid":
            return self.ports[bench_config.FLOOR_DENY]
        return self.ports[name]

    def wrk(self, name, traffic, seconds):
        cmd = ["taskset", "-c", str(self.args.wrk_cpu), self.args.wrk, "-t1", f"-c{self.args.connections}",
               f"-d{seconds}s", "--latency", "-s", str(ROOT / "bench" / "wrk.lua"),
               f"http://127.0.0.1:{self.port(name, traffic)}/", "--", str(self.key_files[traffic])]
        before = cpu_seconds(self.envoy.pid)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
        cpu = cpu_seconds(self.envoy.pid) - before
        line = next((l for l in done.stdout.splitlines() if l.startswith("{")), None)
        if done.returncode != 0 or line is None:
            self.stop()
            sys.exit(f"wrk failed on {name}:\n{done.stdout}\n{done.stderr}")
        run = json.loads(line)
        requests = run["requests"]
        expect_denied = traffic == "invalid"
        if run["socket_errors"] or run["status_errors"] != (requests if expect_denied else 0):
            self.stop()
            sys.exit(f"{name}/{traffic}: unexpected replies: {run}")
        return {
            "cpu_us": cpu * 1e6 / requests,
            "rps": requests / (run["duration_us"] / 1e6),
            "p50_us": run["p50_us"],
            "p99_us": run["p99_us"],
        }

    def run(self):
        started = time.time()
        self.start_envoy()
        try:
            self.check_contenders()
            for name in self.contenders:  # V8 tiers wasm up to optimized code while it runs
                for traffic in traffic_kinds(name):
                    self.wrk(name, traffic, self.args.warmup)
            runs = {(n, t): [] for n in self.contenders for t in traffic_kinds(n)}
            for r in range(self.args.rounds):
                for name in self.contenders:
                    for traffic in traffic_kinds(name):
                        runs[(name, traffic)].append(self.wrk(name, traffic, self.args.seconds))
                print(f"  round {r + 1}/{self.args.rounds} done ({time.time() - started:.0f}s)",
                      file=sys.stderr)
        finally:
            self.stop()
        return runs


def medians(runs, floor_runs):
    """Medians over rounds; the added CPU is taken per round against that round's floor."""
    added = [r["cpu_us"] - f["cpu_us"] for r, f in zip(runs, floor_runs)]
    return {
        "cpu_us": statistics.median(r["cpu_us"] for r in runs),
        "cpu_us_min": min(r["cpu_us"] for r in runs),
        "cpu_us_max": max(r["cpu_us"] for r in runs),
        "added_us": statistics.median(added),
        "rps": statistics.median(r["rps"] for r in runs),
        "p50_us": statistics.median(r["p50_us"] for r in runs),
        "p99_us": statistics.median(r["p99_us"] for r in runs),
    }


def machine_facts():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    envoy_version = subprocess.run([ENVOY_BIN, "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "kernel": platform.release(),
        "envoy": envoy_version.split("version:")[-1].strip(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def table(results, contenders, args):
    out = []
    for traffic, title in (("valid", "valid key (200 from the upstream)"),
                           ("invalid", "unknown key (401 from the filter)")):
        native = results[("native", traffic)]["added_us"]
        out.append(f"\n**{title}**\n")
        out.append("| contender | Envoy CPU µs/req (min–max) | added µs/req over floor | "
                   "added ÷ native's added | req/s | p50 µs | p99 µs |")
        out.append("|---|---|---|---|---|---|---|")
        for name in contenders:
            if (name, traffic) not in results:
                continue
            m = results[(name, traffic)]
            label = LABELS[name]
            if name == "floor":
                added, ratio = "—", "—"
                if traffic == "invalid":
                    label = "no filter, the route answers 401 (floor)"
            else:
                added = f"{m['added_us']:.1f}"
                ratio = f"{m['added_us'] / native:.2f}×" if native > 0 else "n/a"
            out.append(f"| {label} | {m['cpu_us']:.1f} ({m['cpu_us_min']:.1f}–{m['cpu_us_max']:.1f}) "
                       f"| {added} | {ratio} | {m['rps']:,.0f} | {m['p50_us']:.0f} | {m['p99_us']:.0f} |")
        if "keygate_100k" not in contenders:
            out.append("| keygate, 100k keys from the shared-data key cache | not yet measurable: "
                       "the shared-data key cache is not on main | | | | | |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 5)))
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("BENCH_SECONDS", 5)))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--extra", action="append", default=[], choices=["empty", "before", "100k"],
                        help="empty: also run build/bench-empty.wasm (a Rust proxy-wasm filter doing nothing); "
                             "before: build/keygate-before.wasm; 100k: keygate with 100,000 inline keys")
    parser.add_argument("--envoy-cpu", type=int, default=0)
    parser.add_argument("--wrk-cpu", type=int, default=1)
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    parser.add_argument("--json", type=Path, default=WORK / "results.json")
    args = parser.parse_args()
    for extra, wasm in (("empty", "bench-empty.wasm"), ("before", "keygate-before.wasm")):
        if extra in args.extra and not (ROOT / "build" / wasm).exists():
            sys.exit(f"--extra {extra} needs build/{wasm}")

    facts = machine_facts()
    bench = Bench(args)
    print(f"make bench: {len(bench.contenders)} contenders x 2 traffic kinds x {args.rounds} rounds x "
          f"{args.seconds}s (load average before: {' '.join(facts['loadavg'])})", file=sys.stderr)
    runs = bench.run()
    results = {}
    for (name, traffic), rs in runs.items():
        results[(name, traffic)] = medians(rs, runs[("floor", traffic)])
    facts["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    wasm = ROOT / "build" / "keygate.wasm"
    args.json.write_text(json.dumps({
        "facts": facts, "args": {k: str(v) for k, v in vars(args).items()},
        "runs": {f"{n}/{t}": rs for (n, t), rs in runs.items()},
        "medians": {f"{n}/{t}": m for (n, t), m in results.items()},
    }, indent=1))

    print(f"\n### keygate benchmark ({facts['date']})\n")
    print(f"- machine: {facts['cpu']}, Linux {facts['kernel']}; Envoy {facts['envoy']}")
    print(f"- Envoy `--concurrency 1` on CPU {args.envoy_cpu}, wrk `-t1 -c{args.connections}` on CPU "
          f"{args.wrk_cpu}; {args.rounds} interleaved rounds of {args.seconds}s per contender and "
          f"traffic kind, medians; {args.keys:,} keys per contender")
    print(f"- load average before/after: {' '.join(facts['loadavg'])} / {' '.join(facts['loadavg_after'])}")
    if wasm.exists():
        print(f"- build/keygate.wasm: {wasm.stat().st_size:,} bytes")
    print(table(results, bench.contenders, args))
    print(f"\nraw runs: {args.json.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
