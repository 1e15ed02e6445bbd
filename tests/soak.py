#!/usr/bin/env python3
"""Soak: a long run of mixed valid and invalid requests through a real Envoy running
envoy/demo.yaml, with Envoy's memory sampled between rounds. `make soak` runs it (outside
`make test`: it takes minutes).

wrk (Debian package `wrk`) sends the requests; tests/soak.lua rotates through every demo scheme
with valid, wrong, malformed, missing and conflicting credentials. After a warm-up round, each
round's memory is compared with the first sample after warm-up: Envoy's process RSS
(/proc/<pid>/status), the heap Envoy's allocator reports (admin /memory), and the wasm VM
count. The run fails if RSS grows by more than --max-growth-mib after warm-up, if any response
was a 5xx, or if a status other than the expected ones appears.
"""
import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from keygate_stack import ROOT, Stack  # noqa: E402

EXPECTED_STATUSES = {"200", "401", "403"}


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def sample(stack):
    memory = json.loads(stack.admin("/memory"))
    wasm = {line.split(": ")[0]: line.split(": ")[1] for line in stack.admin("/stats").splitlines()
            if line.startswith("wasm.") and ": " in line}
    return {
        "rss_kib": rss_kib(stack.envoy.pid),
        "heap_allocated_kib": int(memory.get("allocated", 0)) // 1024,
        "heap_size_kib": int(memory.get("heap_size", 0)) // 1024,
        "wasm_vms_active": wasm.get("wasm.envoy.wasm.runtime.v8.active"),
        "wasm_vms_created": wasm.get("wasm.envoy.wasm.runtime.v8.created"),
    }


def run_wrk(stack, requests, threads, connections, workdir):
    """Sends `requests` requests (each wrk thread stops itself after its share and leaves a
    marker; wrk is then interrupted, which still prints its summary); returns the summary."""
    done_dir = Path(workdir) / "wrk-done"
    done_dir.mkdir(parents=True, exist_ok=True)
    for marker in done_dir.iterdir():
        marker.unlink()
    env = {"SOAK_REQUESTS_PER_THREAD": str(requests // threads), "SOAK_DONE_DIR": str(done_dir),
           "PATH": "/usr/bin:/bin"}
    wrk = subprocess.Popen(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", "3600s", "--timeout", "10s",
         "-s", str(ROOT / "tests" / "soak.lua"), f"http://127.0.0.1:{stack.port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 3600
        while len(list(done_dir.iterdir())) < threads and wrk.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        wrk.send_signal(signal.SIGINT)
        out, _ = wrk.communicate(timeout=60)
    finally:
        if wrk.poll() is None:
            wrk.kill()
    if "SOAK_SUMMARY " not in out:
        raise RuntimeError("wrk printed no summary:\n" + out[-2000:])
    summary = json.loads(out[out.index("SOAK_SUMMARY ") + len("SOAK_SUMMARY "):].splitlines()[0])
    summary["wrk"] = [" ".join(line.split()) for line in out.splitlines()
                      if "Requests/sec" in line or "Latency" in line]
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000, help="total requests (default 1,000,000)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds, memory sampled after each")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads")
    parser.add_argument("--max-growth-mib", type=float, default=8.0,
                        help="allowed RSS growth after warm-up (default 8 MiB)")
    args = parser.parse_args()

    per_round = args.requests // args.rounds
    samples, totals = [], {}
    started = time.time()
    # warning: keygate logs every denial at info; half a million log lines would measure the log.
    with Stack("demo.yaml", concurrency=args.concurrency, log_level="warning") as stack:
        samples.append({"round": "start", "requests": 0, **sample(stack)})
        sent = 0
        for round_no in range(1, args.rounds + 1):
            summary = run_wrk(stack, per_round, args.threads, args.connections, stack.workdir)
            sent += summary["requests"]
            for status, count in summary["statuses"].items():
                totals[status] = totals.get(status, 0) + count
            time.sleep(1)  # let in-flight connections close before sampling
            row = {"round": round_no, "requests": sent, **sample(stack), "wrk": summary["wrk"]}
            samples.append(row)
            print(json.dumps(row), flush=True)
        stats = stack.stats()
    elapsed = time.time() - started

    baseline = samples[args.warmup_rounds]
    final = samples[-1]
    growth_mib = (final["rss_kib"] - baseline["rss_kib"]) / 1024
    peak_mib = (max(s["rss_kib"] for s in samples[args.warmup_rounds:]) - baseline["rss_kib"]) / 1024
    report = {
        "requests": sent,
        "seconds": round(elapsed, 1),
        "statuses": totals,
        "keygate_allowed": stats.get("wasmcustom.keygate.demo.allowed"),
        "keygate_denied": stats.get("wasmcustom.keygate.demo.denied"),
        "rss_mib": {"start": round(samples[0]["rss_kib"] / 1024, 1),
                    "after_warmup": round(baseline["rss_kib"] / 1024, 1),
                    "final": round(final["rss_kib"] / 1024, 1),
                    "growth_after_warmup": round(growth_mib, 2),
                    "peak_growth_after_warmup": round(peak_mib, 2)},
        "heap_allocated_mib": {"after_warmup": round(baseline["heap_allocated_kib"] / 1024, 1),
                               "final": round(final["heap_allocated_kib"] / 1024, 1)},
        "wasm_vms_active": {"after_warmup": baseline["wasm_vms_active"], "final": final["wasm_vms_active"]},
    }
    print("SOAK " + json.dumps(report, indent=1))
    problems = []
    if sent < args.requests:
        problems.append(f"only {sent} of {args.requests} requests were sent")
    if any(status.startswith("5") for status in totals):
        problems.append(f"5xx answers: {totals}")
    if set(totals) - EXPECTED_STATUSES:
        problems.append(f"unexpected statuses: {totals}")
    if growth_mib > args.max_growth_mib:
        problems.append(f"RSS grew {growth_mib:.1f} MiB after warm-up (limit {args.max_growth_mib})")
    if final["wasm_vms_active"] != baseline["wasm_vms_active"]:
        problems.append("the number of wasm VMs changed (a VM failed or was reloaded)")
    for problem in problems:
        print("SOAK FAILED: " + problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
