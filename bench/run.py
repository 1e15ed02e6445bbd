#!/usr/bin/env python3
"""`make bench-envoy`: every contender of envoy/bench.yaml side by side in one Envoy.

One Envoy (`--concurrency 1`) pinned to one core, wrk pinned to the other. Rounds are
interleaved (A B C ... A B C ...) so slow drifts in machine load hit every contender alike; each
round runs valid-key and unknown-key traffic against every contender. Per run: Envoy's CPU time
from /proc/<pid>/stat (utime + stime, all threads) divided by the requests wrk completed,
requests/s, and wrk's p50/p99 latency. Tables show medians over the rounds. The "added" column
subtracts the floor (the same traffic with no filter) measured in the same round.

A second phase (`--chain`, default 10) starts another Envoy in which each contender's filter is
chained N times, so that a valid-key request pays for it N times: a few microseconds of filter
cost become tens, well above the run-to-run noise of a shared machine. Its per-filter numbers
give the ratios to the native filter.
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
    "wasm_floor": "empty Rust proxy-wasm filter (does nothing)",
    "wasm_deny": "Rust proxy-wasm filter sending the same 401 (nothing else)",
    "module_floor": "empty Rust dynamic module (does nothing)",
    "module_deny": "Rust dynamic module sending the same 401 (nothing else)",
    "native": "native api_key_auth",
    "lua": "Lua filter",
    "ext_authz": "ext_authz (HTTP, local listener)",
    "keygate": "keygate, 1k keys",
    "keygate_before": "keygate before (BEFORE=…), 1k keys",
    "keygate_100k": "keygate, 100k inline keys",
    "keygate_service": "keygate, 100k keys from the key service (full sync via shared data)",
    "keygate_native": "keygate-native (libkeygate.so), 1k keys",
    "keygate_native_100k": "keygate-native (libkeygate.so), 100k inline keys",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# BENCH_CPU=user counts user time only. Filters run in user space; the loopback network's
# kernel work lands in the system time of whichever process happens to run, the largest
# source of noise on a shared machine.
USER_CPU_ONLY = os.environ.get("BENCH_CPU") == "user"


def cpu_seconds(pid):
    """utime + stime of a process (utime alone with BENCH_CPU=user), all threads, in seconds
    (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    system = 0 if USER_CPU_ONLY else int(fields[12])
    return (int(fields[11]) + system) / CLK_TCK


def envoy_ready(admin_port, envoy, seconds):
    """Waits until Envoy's admin answers /ready with 200; False if Envoy exits or time runs out."""
    deadline = time.time() + seconds
    while time.time() < deadline and envoy.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.2)
    return False


def http_status(port, key):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/v1/items", headers={"x-api-key": key} if key is not None else {})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def write_keys(path, keys):
    path.write_text("".join(k + "\n" for k in keys))
    return path


def traffic_kinds(name, chain):
    # A chained run measures the pass-through path only; the empty filter has no unknown-key case,
    # the deny filter only that one.
    if name in ("wasm_deny", "module_deny"):
        return ("invalid",)
    return ("valid",) if chain > 1 or name in ("wasm_floor", "module_floor") else ("valid", "invalid")


class Phase:
    """One Envoy on one rendered config, its contenders measured in interleaved rounds."""

    def __init__(self, args, contenders, chain, key_files):
        self.args, self.contenders, self.chain, self.key_files = args, contenders, chain, key_files

    def render(self):
        if self.chain == 1 and self.args.keys == 1000:
            shipped = (ROOT / "envoy" / "bench.yaml").read_text()
            if shipped != bench_config.render(self.args.keys):
                sys.exit("envoy/bench.yaml is stale: run `python3 bench/bench_config.py > envoy/bench.yaml`")
        text = bench_config.render(self.args.keys, self.args.extra, self.chain)
        self.ports = {}
        for name, shipped_port in bench_config.PORTS.items():
            # The kernel may hand out a port again once its probe socket is closed.
            port = free_port()
            while port in self.ports.values():
                port = free_port()
            self.ports[name] = port
            text = text.replace(f"port_value: {shipped_port} ", f"port_value: {self.ports[name]} ")
        path = WORK / f"bench-chain{self.chain}.yaml"
        path.write_text(text)
        return path

    def start_envoy(self):
        config = self.render()
        if "keygate_service" in self.contenders:
            (ROOT / bench_config.KEY_SET_FILE).write_text(bench_config.key_set_document(100_000))
        log = open(WORK / f"envoy-chain{self.chain}.log", "wb")
        # Warn level: every contender's per-request logging (keygate logs each denial at info)
        # stays off, as in a production proxy that logs at warn.
        self.envoy = subprocess.Popen(
            ["taskset", "-c", str(self.args.envoy_cpu), ENVOY_BIN, "-c", str(config),
             "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, ENVOY_DYNAMIC_MODULES_SEARCH_PATH=str(ROOT / "build")))
        if envoy_ready(self.ports["admin"], self.envoy, 180):
            return
        self.stop()
        sys.exit("Envoy did not start:\n" + (WORK / f"envoy-chain{self.chain}.log").read_text()[-3000:])

    def stop(self):
        if self.envoy.poll() is None:
            self.envoy.terminate()
            try:
                self.envoy.wait(10)
            except subprocess.TimeoutExpired:
                self.envoy.kill()
                self.envoy.wait()

    def fail(self, message):
        self.stop()
        sys.exit(message)

    def check_contenders(self):
        """Each contender must let a valid key through and refuse an unknown one, or the numbers
        would compare different work."""
        valid, invalid = bench_config.bench_key(7), bench_config.KEY_PREFIX + "0" * 32
        if "keygate_service" in self.contenders:  # the first fetch lands after the first tick
            deadline = time.time() + 120
            while http_status(self.ports["keygate_service"], valid) != 200 and time.time() < deadline:
                time.sleep(0.5)
        for name in self.contenders:
            port = self.ports[name]
            got = (http_status(port, valid), http_status(port, invalid), http_status(port, None))
            want = {"floor": (200, 200, 200), "wasm_floor": (200, 200, 200), "module_floor": (200, 200, 200),
                    "wasm_deny": (401, 401, 401), "module_deny": (401, 401, 401)}.get(name, (200, 401, 401))
            if got != want:
                self.fail(f"contender {name}: valid/unknown/missing key gave {got}, expected {want}")
        if http_status(self.ports[bench_config.FLOOR_DENY], valid) != 401:
            self.fail("the floor of unknown-key traffic must answer 401")

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
            self.fail(f"wrk failed on {name}:\n{done.stdout}\n{done.stderr}")
        run = json.loads(line)
        requests = run["requests"]
        if run["socket_errors"] or run["status_errors"] != (requests if traffic == "invalid" else 0):
            self.fail(f"{name}/{traffic}: unexpected replies: {run}")
        return {"cpu_us": cpu * 1e6 / requests, "rps": requests / (run["duration_us"] / 1e6),
                "p50_us": run["p50_us"], "p99_us": run["p99_us"]}

    def run(self, rounds, seconds, started):
        self.start_envoy()
        try:
            self.check_contenders()
            kinds = {n: traffic_kinds(n, self.chain) for n in self.contenders}
            for name in self.contenders:  # V8 tiers wasm up to optimized code while it runs
                for traffic in kinds[name]:
                    self.wrk(name, traffic, self.args.warmup)
            runs = {(n, t): [] for n in self.contenders for t in kinds[n]}
            for r in range(rounds):
                for name in self.contenders:
                    for traffic in kinds[name]:
                        runs[(name, traffic)].append(self.wrk(name, traffic, seconds))
                print(f"  x{self.chain}: round {r + 1}/{rounds} done ({time.time() - started:.0f}s)",
                      file=sys.stderr)
        finally:
            self.stop()
        return runs


def lower_quartile(values):
    return statistics.quantiles(values, n=4, method="inclusive")[0] if len(values) > 1 else values[0]


def summarize(runs, floor_runs, chain):
    """Medians over rounds; the added CPU is taken per round against that round's floor, per
    filter when chained."""
    added = [(r["cpu_us"] - f["cpu_us"]) / chain for r, f in zip(runs, floor_runs)]
    cpu = [r["cpu_us"] for r in runs]
    return {
        "cpu_us": statistics.median(cpu), "cpu_us_min": min(cpu), "cpu_us_max": max(cpu),
        "added_us": statistics.median(added), "added_us_min": min(added), "added_us_max": max(added),
        # Other processes only ever add CPU time to a run, so each listener's quieter rounds give
        # a second, steadier estimate on a shared machine: lower quartile minus lower quartile.
        "added_lowest_us": (lower_quartile(cpu) - lower_quartile([f["cpu_us"] for f in floor_runs])) / chain,
        "rps": statistics.median(r["rps"] for r in runs),
        "p50_us": statistics.median(r["p50_us"] for r in runs),
        "p99_us": statistics.median(r["p99_us"] for r in runs),
    }


def machine_facts():
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    version = subprocess.run([ENVOY_BIN, "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "kernel": platform.release(),
        "envoy": version.split("version:")[-1].strip(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def ratio(value, native):
    return f"{value / native:.1f}×" if native > 0.05 else "n/a (native's ≈ 0)"


def single_table(results, contenders):
    out = []
    for traffic, title in (("valid", "Valid key: 200 from the upstream"),
                           ("invalid", "Unknown key: 401 from the filter")):
        native = results[("native", traffic)]["added_lowest_us"]
        out.append(f"\n**{title}** (one filter per listener)\n")
        out.append("| contender | Envoy CPU µs/req, median (min–max) | added µs/req: median of rounds "
                   "/ from the quieter rounds | quieter added ÷ native's | req/s | p50 µs | p99 µs |")
        out.append("|---|---|---|---|---|---|---|")
        for name in contenders:
            if (name, traffic) not in results:
                continue
            m = results[(name, traffic)]
            label = LABELS[name]
            if name == "floor":
                added, times = "—", "—"
                if traffic == "invalid":
                    label = "no filter, the route answers 401 (floor)"
            else:
                added = f"{m['added_us']:.1f} / {m['added_lowest_us']:.1f}"
                times = ratio(m["added_lowest_us"], native)
            out.append(f"| {label} | {m['cpu_us']:.1f} ({m['cpu_us_min']:.1f}–{m['cpu_us_max']:.1f}) "
                       f"| {added} | {times} | {m['rps']:,.0f} | {m['p50_us']:.0f} | {m['p99_us']:.0f} |")
        if "keygate_service" not in contenders:
            out.append("| keygate, 100k keys from the key service | not run: `make bench BENCH_100K=1` "
                       "| | | | | |")
    return "\n".join(out)


def chained_table(results, contenders, chain):
    native = results[("native", "valid")]
    out = [f"\n**Per filter, chained ×{chain}** (valid key; each listener runs its filter {chain} times, "
           "keys left in place)\n",
           "| contender | listener CPU µs/req, median (lowest) | per filter µs/req: median of rounds "
           "(min–max) | from the quieter rounds | ÷ native's (median / quieter) |",
           "|---|---|---|---|---|"]
    for name in contenders:
        m = results[(name, "valid")]
        if name == "floor":
            out.append(f"| {LABELS[name]} | {m['cpu_us']:.1f} ({m['cpu_us_min']:.1f}) | — | — | — |")
            continue
        out.append(f"| {LABELS[name]} | {m['cpu_us']:.1f} ({m['cpu_us_min']:.1f}) | {m['added_us']:.2f} "
                   f"({m['added_us_min']:.2f}–{m['added_us_max']:.2f}) | {m['added_lowest_us']:.2f} | "
                   f"{ratio(m['added_us'], native['added_us'])} / "
                   f"{ratio(m['added_lowest_us'], native['added_lowest_us'])} |")
    return "\n".join(out)


def issue15_goal(results, chained_results, chain):
    """Issue 15's goal rows: keygate-native's added CPU against twice api_key_auth's, with the
    dynamic-module floor (the empty module, or the 401-only one) beside it: what any module
    costs before it does any work, so whether the target is reachable above it at all."""
    rows = [("valid key, one filter", results, "valid", "module_floor"),
            ("unknown key (401), one filter", results, "invalid", "module_deny")]
    if chained_results:
        rows.insert(0, (f"valid key, chained ×{chain}, per filter", chained_results, "valid", "module_floor"))
    out = ["\n**Issue 15's goal in this run**: keygate-native adds ≤ 2× native api_key_auth's CPU per request "
           "(added µs/req over the no-filter floor: median of rounds / from the quieter rounds)\n",
           "| path | api_key_auth | target: 2× api_key_auth | dynamic-module floor (its ÷ api_key_auth) "
           "| keygate-native | keygate-native over the module floor | met? |",
           "|---|---|---|---|---|---|---|"]

    def pair(m):
        return f"{m['added_us']:.2f} / {m['added_lowest_us']:.2f}"

    for title, res, traffic, floor_name in rows:
        native, keygate = res.get(("native", traffic)), res.get(("keygate_native", traffic))
        if native is None or keygate is None:
            continue
        target = {k: 2 * native[k] for k in ("added_us", "added_lowest_us")}
        floor = res.get((floor_name, traffic))
        if floor is None:
            floor_cell = over_floor = "not run (`--extra empty`)"
        else:
            ratios = (ratio(floor["added_us"], native["added_us"]),
                      ratio(floor["added_lowest_us"], native["added_lowest_us"]))
            floor_cell = f"{pair(floor)} ({' / '.join(ratios) if 'n/a' not in ''.join(ratios) else 'n/a'})"
            over_floor = (f"{keygate['added_us'] - floor['added_us']:.2f} / "
                          f"{keygate['added_lowest_us'] - floor['added_lowest_us']:.2f}")
        met = [keygate[k] <= target[k] for k in ("added_us", "added_lowest_us")]
        verdict = "met" if all(met) else "not met" if not any(met) else "met by one estimate"
        if native["added_lowest_us"] <= 0.05:
            # api_key_auth's cost is below this run's noise: there is no target to compare with.
            verdict = "n/a: api_key_auth's added CPU is ≈ 0 or below in this run (noise)"
        elif floor is not None and floor["added_lowest_us"] > target["added_lowest_us"]:
            verdict += "; the empty module alone is above the target"
        out.append(f"| {title} | {pair(native)} | {pair(target)} | {floor_cell} | {pair(keygate)} "
                   f"| {over_floor} | {verdict} |")
    return "\n".join(out) if len(out) > 3 else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--chain", type=int, default=10, help="filters per listener in phase 2 (1: skip it)")
    parser.add_argument("--chain-rounds", type=int, default=6)
    parser.add_argument("--chain-seconds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--extra", action="append", default=[], choices=["empty", "before", "100k", "native"],
                        help="empty: also run build/bench-empty.wasm (a Rust proxy-wasm filter doing nothing) and, "
                             "on the 401 path, build/bench-deny.wasm (the same filter sending keygate's 401), and "
                             "the same two as dynamic modules (build/libbench_empty.so, build/libbench_deny.so); "
                             "before: build/keygate-before.wasm; 100k: keygate with 100,000 inline keys; "
                             "native: build/libkeygate.so")
    parser.add_argument("--envoy-cpu", type=int, default=0)
    parser.add_argument("--wrk-cpu", type=int, default=1)
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    parser.add_argument("--json", type=Path, default=WORK / "results.json")
    args = parser.parse_args()
    for extra, wasm in (("empty", "bench-empty.wasm"), ("empty", "bench-deny.wasm"), ("empty", "libbench_empty.so"),
                        ("empty", "libbench_deny.so"), ("before", "keygate-before.wasm"),
                        ("native", "libkeygate.so")):
        if extra in args.extra and not (ROOT / "build" / wasm).exists():
            sys.exit(f"--extra {extra} needs build/{wasm}")

    WORK.mkdir(parents=True, exist_ok=True)
    key_files = {
        "valid": write_keys(WORK / "valid-keys.txt", [bench_config.bench_key(i) for i in range(args.keys)]),
        # Well-formed (right prefix and length) but unknown: every contender must look them up.
        "invalid": write_keys(WORK / "invalid-keys.txt",
                              [bench_config.KEY_PREFIX + f"{i:032x}" for i in range(args.keys)]),
    }
    contenders = list(bench_config.CONTENDERS)
    for extra, name in (("empty", "wasm_floor"), ("empty", "module_floor"), ("empty", "wasm_deny"),
                        ("empty", "module_deny"), ("before", "keygate_before"),
                        ("100k", "keygate_100k"), ("100k", "keygate_service"), ("native", "keygate_native")):
        if extra in args.extra:
            # The filter floors next to the floor: the empty wasm filter and dynamic module, then
            # the 401-only ones.
            floors = {"wasm_floor": 1, "module_floor": 2, "wasm_deny": 3, "module_deny": 4}
            contenders.insert(floors[name], name) if name in floors else contenders.append(name)
    if "native" in args.extra and "100k" in args.extra:
        contenders.append("keygate_native_100k")

    facts = machine_facts()
    started = time.time()
    print(f"make bench: {len(contenders)} contenders, {args.rounds} rounds x {args.seconds}s, then x{args.chain} "
          f"chains {args.chain_rounds} x {args.chain_seconds}s (load average {' '.join(facts['loadavg'])})",
          file=sys.stderr)
    single = Phase(args, contenders, 1, key_files).run(args.rounds, args.seconds, started)
    results = {key: summarize(rs, single[("floor", key[1])], 1) for key, rs in single.items()}
    chained_results = {}
    chained_contenders = [c for c in contenders if c not in bench_config.SINGLE_ONLY]
    if args.chain > 1:
        chained = Phase(args, chained_contenders, args.chain, key_files).run(
            args.chain_rounds, args.chain_seconds, started)
        chained_results = {key: summarize(rs, chained[("floor", "valid")], args.chain)
                           for key, rs in chained.items()}
    facts["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    args.json.write_text(json.dumps({
        "facts": facts, "args": {k: str(v) for k, v in vars(args).items()},
        "single": {f"{n}/{t}": {"runs": rs, "summary": results[(n, t)]} for (n, t), rs in single.items()},
        "chained": {f"{n}/{t}": s for (n, t), s in chained_results.items()},
    }, indent=1))

    wasm = ROOT / "build" / "keygate.wasm"
    print(f"\n### Envoy benchmark ({facts['date']}, {time.time() - started:.0f}s)\n")
    print(f"- machine: {facts['cpu']}, Linux {facts['kernel']}; Envoy {facts['envoy']}")
    print(f"- Envoy `--concurrency 1 --log-level warn` on CPU {args.envoy_cpu}, wrk `-t1 -c{args.connections}` "
          f"on CPU {args.wrk_cpu}; {args.rounds} interleaved rounds of {args.seconds}s per contender and "
          f"traffic kind, then {args.chain_rounds} rounds of {args.chain_seconds}s chained ×{args.chain}; "
          f"medians; {args.keys:,} keys per contender")
    print(f"- load average before/after: {' '.join(facts['loadavg'])} / {' '.join(facts['loadavg_after'])}")
    if wasm.exists():
        print(f"- build/keygate.wasm: {wasm.stat().st_size:,} bytes")
    print(single_table(results, contenders))
    if chained_results:
        print(chained_table(chained_results, chained_contenders, args.chain))
    goal = issue15_goal(results, chained_results, args.chain)
    if goal:
        print(goal)
    print(f"\nraw runs: {args.json.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
