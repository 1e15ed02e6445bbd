#!/usr/bin/env python3
"""Measures keygate's shared limits state inside a real Envoy: 100,000 distinct keys, each with
a rate limit, send one request each over two workers; Envoy's heap (admin /memory) is read
before, right after, and once the idle counters have been swept.

Not part of `make test` (it sends 100k requests): run it by hand,
  ENVOY_BIN=.venv/lib/python3.11/site-packages/envoy/_bin/envoy .venv/bin/python tests/measure_limits_state.py
It writes a throwaway envoy/.bench-limits.yaml (envoy/limits.yaml with a generated key set,
answering with a direct response) and removes it afterwards."""
import hashlib
import http.client
import json
import os
import threading
import time

from keygate_stack import ROOT, Stack  # noqa: E402

KEYS = int(os.environ.get("KEYS", "100000"))
THREADS = 8


def secret(i):
    return f"lim_bench_{i:06d}_x"


def write_config():
    keys = [{"id": f"bench-{i:06d}", "secret_sha256": hashlib.sha256(secret(i).encode()).hexdigest()}
            for i in range(KEYS)]
    filter_config = {
        "name": "bench",
        "credentials": [{"in": "header", "name": "x-api-key", "prefixes": ["lim_"]}],
        # One request takes a minute of a key's bucket: every key stays active for the whole run.
        "limits": {"rate_limit": {"requests": 60, "per_seconds": 3600}, "slots": 4096},
        "keys": keys,
    }
    text = (ROOT / "envoy" / "limits.yaml").read_text()
    head, _, _ = text.partition("                  value: |\n")
    _, _, tail = text.partition("          - name: envoy.filters.http.router\n")
    value = json.dumps(json.dumps(filter_config))
    body = head + f"                  value: {value}\n" + "          - name: envoy.filters.http.router\n" + tail
    # Answer directly: the measurement is about keygate's state, not the echo upstream.
    body = body.replace("route: { cluster: echo }", 'direct_response: { status: 200, body: { inline_string: "ok" } }')
    (ROOT / "envoy" / ".bench-limits.yaml").write_text(body)
    return ".bench-limits.yaml"


def memory(stack):
    data = json.loads(stack.admin("/memory"))
    return int(data["allocated"]), int(data["heap_size"])


def send_all(stack):
    statuses = {}
    lock = threading.Lock()

    def worker(start):
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
        local = {}
        for i in range(start, KEYS, THREADS):
            conn.request("GET", "/", headers={"x-api-key": secret(i)})
            resp = conn.getresponse()
            resp.read()
            local[resp.status] = local.get(resp.status, 0) + 1
        conn.close()
        with lock:
            for k, v in local.items():
                statuses[k] = statuses.get(k, 0) + v

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def main():
    name = write_config()
    try:
        with Stack(name, concurrency=2) as stack:
            time.sleep(2)
            before = memory(stack)
            started = time.time()
            statuses = send_all(stack)
            elapsed = time.time() - started
            after = memory(stack)
            print(f"{KEYS} distinct keys, one request each in {elapsed:.1f} s: {statuses}")
            print(f"envoy heap allocated before: {before[0]:,} bytes")
            print(f"envoy heap allocated after:  {after[0]:,} bytes "
                  f"(+{after[0] - before[0]:,}, {(after[0] - before[0]) / KEYS:.1f} per key)")
            # Buckets are full again 60 s after each key's request; each worker then sweeps 1/16
            # of the table per second.
            time.sleep(60 + 25)
            swept = memory(stack)
            print(f"envoy heap allocated after the sweep: {swept[0]:,} bytes "
                  f"(+{swept[0] - before[0]:,} over before)")
    finally:
        (ROOT / "envoy" / ".bench-limits.yaml").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
