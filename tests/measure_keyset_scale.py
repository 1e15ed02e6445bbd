#!/usr/bin/env python3
"""Measures full-mode key sets at scale inside a real Envoy (envoy/keyservice.yaml, two workers,
stock nginx as the key service): for each size, Envoy's RSS with an empty set, the time from
publishing the document to a valid key passing, RSS after the load, the latency of a valid key
at rest, the latency spike while a new version is published under load (p99 / max, non-2xx
count), and RSS after five such reloads.

Not part of `make test` (it is slow and prints timings, never asserts them): run it by hand,
  ENVOY_BIN=.venv/lib/python3.11/site-packages/envoy/_bin/envoy .venv/bin/python \\
      tests/measure_keyset_scale.py 1000 1000000
The route answers with a direct response; latencies include the Python client, so compare sizes
within one run."""
import hashlib
import http.client
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
from conftest import wait_for  # noqa: E402
from keygate_stack import Stack  # noqa: E402
from static_keyservice import StaticKeyService, keyset_document  # noqa: E402

THREADS = 4
RELOADS = 5


def secret(i):
    return f"ks_scale_{i:07d}"


def records(count):
    return ['{"id":"scale-%07d","secret_sha256":"%s","tenant":"tenant-%d"}'
            % (i, hashlib.sha256(secret(i).encode()).hexdigest(), i % 1000) for i in range(count)]


def document(texts):
    return ('{"serial":%d,"keys":[' % keyset_document()["serial"] + ",".join(texts) + "]}").encode()


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def status_of(stack, key):
    return stack.request("GET", "/orders", [("x-api-key", key)]).status


class Load:
    """THREADS clients sending a valid key back to back, each on one kept-alive connection."""

    def __init__(self, port, key):
        self.port, self.key = port, key
        self.samples, self.failures, self.stop = [], 0, threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run) for _ in range(THREADS)]

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                conn.request("GET", "/orders", headers={"x-api-key": self.key})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except OSError:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                ok = False
            with self.lock:
                self.samples.append((time.perf_counter() - start) * 1000)
                self.failures += not ok

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()

    def summary(self):
        ordered = sorted(self.samples)
        p99 = ordered[int(len(ordered) * 0.99) - 1] if ordered else 0
        return p99, (ordered[-1] if ordered else 0), self.failures, len(ordered)


def measure(count):
    # Answered by Envoy itself, as in issue 14: the upstream is not what is measured.
    stack = Stack("keyservice.yaml", concurrency=2, substitutions={
        'prefix: "/" }\n                route: { cluster: echo }':
        'prefix: "/" }\n                direct_response: { status: 200 }'})
    service = StaticKeyService.for_stack(stack)
    service.start()
    try:
        with stack:
            pid = stack.envoy.pid
            service.write("keys.json", document([]))
            wait_for(lambda: stack.stats().get("wasmcustom.keygate.remote.keyset.version", 0) >= 1, 30)
            time.sleep(1)
            empty = rss_mb(pid)
            texts = records(count)
            probe = secret(count - 1)
            service.write("keys.json", document(texts))
            start = time.time()
            loaded = wait_for(lambda: all(status_of(stack, probe) == 200 for _ in range(6)), 300)
            load_s = time.time() - start if loaded is not None else float("nan")
            time.sleep(1)
            after_load = rss_mb(pid)
            at_rest = []
            for _ in range(300):
                t = time.perf_counter()
                status_of(stack, probe)
                at_rest.append((time.perf_counter() - t) * 1000)
            spikes = []
            for reload in range(RELOADS):
                with Load(stack.port, probe) as load:
                    time.sleep(1)
                    # One key changes: the new version disables key 0.
                    changed = list(texts)
                    if reload % 2 == 0:
                        changed[0] = changed[0].replace('"tenant":', '"enabled":false,"tenant":')
                    service.write("keys.json", document(changed))
                    wait_for(lambda: status_of(stack, secret(0)) == (401 if reload % 2 == 0 else 200), 300)
                    time.sleep(3)
                spikes.append(load.summary())
            after_reloads = rss_mb(pid)
            return {
                "keys": count,
                "document_mb": round(len(document(texts)) / 2**20, 1),
                "load_s": round(load_s, 2),
                "rss_empty_mb": round(empty),
                "rss_loaded_mb": round(after_load),
                "rss_growth_bytes_per_key": round((after_load - empty) * 2**20 / count),
                "rss_after_5_reloads_mb": round(after_reloads),
                "valid_key_ms_median": round(statistics.median(at_rest), 3),
                "reload_p99_ms": round(max(s[0] for s in spikes), 1),
                "reload_max_ms": round(max(s[1] for s in spikes), 1),
                "reload_non_2xx": sum(s[2] for s in spikes),
                "reload_requests": sum(s[3] for s in spikes),
            }
    finally:
        service.stop()


if __name__ == "__main__":
    for size in [int(arg) for arg in sys.argv[1:]] or [1000, 1_000_000]:
        print(measure(size), flush=True)
