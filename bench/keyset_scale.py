#!/usr/bin/env python3
"""The key-set scale table of `make bench` (issue 14): keys from a key service at 1k (the
baseline), 10k, 100k and 1M keys, in full mode (envoy/keyservice.yaml) and lookup on miss
(envoy/keyservice-lookup.yaml), for each host (keygate.wasm, keygate-native), in a real Envoy
with two workers and stock nginx as the key service. The route answers with a direct response,
so the upstream is not what is measured.

Per row:
- full mode: Envoy's RSS with an empty set, the time from publishing the document to a valid
  key passing everywhere, RSS after that load, Envoy CPU per request under load at rest, the
  latency of a valid key at rest, the latency spike while a new version (one key changed) is
  published under load (p99 / max, non-2xx count, when the slowest request started and how
  long the reload took; each document is built and written aside before its window, since
  building 100 MB in this process stalls its clients), and RSS after five such reloads with
  Envoy's heap (allocated + held free, admin /memory), then again once the allocator has
  handed its free pages back (up to RELEASE_WAIT_SECONDS later);
- lookup on miss: the store is `{digest:3}` shard files of the given size; RSS before any
  request, the first request's latency (a miss: one fetch of a shard), CPU per request and RSS
  under load at rest. There is no set to reload: a changed key is seen when its cached answer
  expires (positive_ttl_seconds), so the reload columns say n/a.
A size a host cannot load shows `refused: <reason>` (the host's own log line), never a blank.

Timed numbers are printed, never asserted. Run by hand:
  ENVOY_BIN=.venv/lib/python3.11/site-packages/envoy/_bin/envoy .venv/bin/python \\
      bench/keyset_scale.py --keys 1000,1000000 --hosts wasm --modes full
Latencies include the Python clients, so compare rows within one run."""
import argparse
import gc
import hashlib
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from keygate_stack import Stack, wait_for  # noqa: E402
from static_keyservice import StaticKeyService, keyset_document, write_digest_shards  # noqa: E402

THREADS = 4
RELOADS = 5
AT_REST_SECONDS = 4
# Publish -> loaded; a size the host refuses is given up on after this many failed fetches.
LOAD_TIMEOUT = 300
REFUSALS = 3
# Before RSS is read, after the load and after the reloads alike: a reload is over once the set it
# replaced is freed (keygate.wasm empties the old slot in slices, within a couple of seconds at
# 1M keys) and Envoy's allocator has handed the freed memory back (memory_allocator_manager in
# envoy/keyservice.yaml releases some every second).
SETTLE_SECONDS = 5
# Requests slower than this during a reload are listed in the row's JSON, with when they started.
SLOW_MS = 50
# Envoy's allocator (tcmalloc) keeps freed pages while recent demand peaks say they will be
# needed again (its skip-subrelease window, 5 minutes), so RSS read seconds after a reload still
# holds the replaced copy. After the reloads the bench also waits, up to RELEASE_WAIT_SECONDS,
# until the allocator holds under RELEASED_MB free, then RELEASE_SETTLE_SECONDS more (the release
# runs over a few seconds), and reads RSS again.
RELEASE_WAIT_SECONDS = int(os.environ.get("BENCH_SCALE_RELEASE_WAIT", "360"))
RELEASED_MB = 16
RELEASE_SETTLE_SECONDS = 20
DIRECT_RESPONSE = {'prefix: "/" }\n                route: { cluster: echo }':
                   'prefix: "/" }\n                direct_response: { status: 200 }'}
HOST_LABEL = {"wasm": "keygate.wasm", "native": "keygate-native"}
# Diagnosis only: build and write each reload's document inside the measured window, as the
# bench did before 2026-11-30 (Python's str.join holds the GIL, stalling the client threads).
BUILD_IN_WINDOW = os.environ.get("BENCH_SCALE_BUILD_IN_WINDOW") == "1"
# Diagnosis only: Envoy's allocator keeps what it freed (envoy/keyservice.yaml's
# memory_allocator_manager line taken out).
KEEP_FREED = os.environ.get("BENCH_SCALE_KEEP_FREED") == "1"
RELEASE_LINE = re.compile(r"^memory_allocator_manager:.*$", re.M)


def full_secret(i):
    return f"ks_scale_{i:07d}"


def lookup_secret(i):
    return f"kl_scale_{i:07d}"


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def full_records(count):
    """Each record's JSON text, written by hand: json.dumps of a million dicts is the slow part."""
    return ['{"id":"scale-%07d","secret_sha256":"%s","tenant":"tenant-%d"}'
            % (i, sha(full_secret(i)), i % 1000) for i in range(count)]


def document(texts):
    return ('{"serial":%d,"keys":[' % keyset_document()["serial"] + ",".join(texts) + "]}").encode()


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def heap_mb(stack):
    """Envoy's heap (tcmalloc, admin /memory): what is allocated, and what it holds free and
    mapped (counted in RSS, not handed back to the system). Wasm linear memory is not in it."""
    try:
        memory = json.loads(stack.admin("/memory"))
        allocated = int(memory["allocated"])
        held_free = int(memory["heap_size"]) - int(memory["pageheap_unmapped"]) - allocated
    except (OSError, ValueError, KeyError):
        return {}
    return {"allocated": round(allocated / 2**20), "free": round(held_free / 2**20),
            "pageheap_free": round(int(memory.get("pageheap_free", 0)) / 2**20)}


def after_release(stack, pid):
    """RSS once the allocator has handed its free pages back (or RELEASE_WAIT_SECONDS passed),
    and the seconds waited."""
    start = time.time()
    while True:
        waited = time.time() - start
        if heap_mb(stack).get("pageheap_free", 0) < RELEASED_MB or waited >= RELEASE_WAIT_SECONDS:
            break
        time.sleep(10)
    if waited > 0:
        # The release was seen starting: the system takes the pages back over the next seconds.
        time.sleep(RELEASE_SETTLE_SECONDS)
    return {"rss_after_release_mb": round(rss_mb(pid)), "release_wait_s": round(time.time() - start)}


def cpu_seconds(pid):
    """User plus system CPU of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_of(stack, key, header="x-api-key"):
    return stack.request("GET", "/orders", [(header, key)]).status


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
                self.samples.append(((time.perf_counter() - start) * 1000, start))
                self.failures += not ok

    def __enter__(self):
        # No collection of this process's objects (a million key texts) in the window: a full
        # one holds the GIL, and every client would report Envoy slow at the same moment.
        gc.disable()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()
        gc.enable()

    def summary(self):
        ordered = sorted(ms for ms, _ in self.samples)
        p99 = ordered[int(len(ordered) * 0.99) - 1] if ordered else 0
        return p99, (ordered[-1] if ordered else 0), self.failures, len(ordered)

    def slowest_since(self, moment):
        """When the slowest request started, in seconds after `moment` (negative: before)."""
        if not self.samples:
            return 0.0
        return max(self.samples)[1] - moment

    def slow_since(self, moment, over_ms=SLOW_MS):
        """The requests slower than `over_ms`: when each started (s after `moment`), its ms."""
        return [(round(start - moment, 2), round(ms, 1)) for ms, start in self.samples if ms > over_ms]


def at_rest(stack, pid, key):
    """Median client latency of single requests, then Envoy CPU per request under load."""
    single = []
    for _ in range(200):
        t = time.perf_counter()
        status_of(stack, key)
        single.append((time.perf_counter() - t) * 1000)
    cpu_before = cpu_seconds(pid)
    with Load(stack.port, key) as load:
        time.sleep(AT_REST_SECONDS)
    cpu = cpu_seconds(pid) - cpu_before
    _, _, failures, requests = load.summary()
    return {
        "valid_key_ms_median": round(statistics.median(single), 3),
        "cpu_us_per_request": round(cpu * 1e6 / max(requests, 1), 1),
        "at_rest_non_2xx": failures,
    }


class LogWatch:
    """New key-set fetch failures in Envoy's log since the last `mark()`."""
    FAILED = re.compile(r"key-set fetch failed[^\n]*")

    def __init__(self, stack):
        self.stack, self.offset = stack, 0

    def mark(self):
        self.offset = self.stack.log_path.stat().st_size

    def failures(self):
        with open(self.stack.log_path, "rb") as log:
            log.seek(self.offset)
            return self.FAILED.findall(log.read().decode(errors="replace"))


def wait_loaded(stack, probe, watch):
    """Seconds until `probe` passes everywhere, or the refusal reason after REFUSALS failed
    fetches of the new document."""
    result = {}

    def settled():
        if all(status_of(stack, probe) == 200 for _ in range(6)):
            result["loaded"] = True
            return True
        failed = watch.failures()
        if len(failed) >= REFUSALS:
            result["refused"] = failed[-1].split(": ", 1)[-1][:160]
            return True
        return False

    start = time.time()
    if wait_for(settled, LOAD_TIMEOUT, interval=0.2) is None:
        return None, f"not loaded within {LOAD_TIMEOUT} s"
    return (time.time() - start, None) if result.get("loaded") else (None, result["refused"])


def measure_full(count):
    substitutions = dict(DIRECT_RESPONSE)
    if KEEP_FREED:
        shipped = (ROOT / "envoy" / "keyservice.yaml").read_text()
        substitutions.update({line: "" for line in RELEASE_LINE.findall(shipped)})
    stack = Stack("keyservice.yaml", concurrency=2, substitutions=substitutions)
    service = StaticKeyService.for_stack(stack)
    service.start()
    row = {"mode": "full", "keys": count}
    try:
        with stack:
            pid = stack.envoy.pid
            service.write("keys.json", document([]))
            wait_for(lambda: stack.stats().get("wasmcustom.keygate.remote.keyset.version", 0) >= 1, 30)
            time.sleep(1)
            empty = rss_mb(pid)
            texts = full_records(count)
            gc.freeze()  # the texts live to the end: no collection walks them again
            body = document(texts)
            row["document_mb"] = round(len(body) / 2**20, 1)
            probe = full_secret(count - 1)
            watch = LogWatch(stack)
            watch.mark()
            service.write("keys.json", body)
            del body
            load_s, refused = wait_loaded(stack, probe, watch)
            if refused:
                row["refused"] = refused
                return row
            time.sleep(SETTLE_SECONDS)
            after_load = rss_mb(pid)
            row["heap_loaded_mb"] = heap_mb(stack)
            row.update(load_s=round(load_s, 2), rss_empty_mb=round(empty), rss_loaded_mb=round(after_load),
                       rss_growth_bytes_per_key=round((after_load - empty) * 2**20 / count))
            row.update(at_rest(stack, pid, probe))
            spikes, slowest, reload_s, slow = [], [], [], []
            for reload in range(RELOADS):
                # One key changes: every other version disables key 0. The document is built and
                # written aside before the window (with BUILD_IN_WINDOW, inside it, as before).
                changed = list(texts)
                if reload % 2 == 0:
                    changed[0] = changed[0].replace('"tenant":', '"enabled":false,"tenant":')
                staged = None if BUILD_IN_WINDOW else service.stage("keys.json", document(changed))
                with Load(stack.port, probe) as load:
                    time.sleep(0.5)
                    published = time.perf_counter()
                    if staged:
                        staged()
                    else:
                        service.write("keys.json", document(changed))
                    wait_for(lambda: status_of(stack, full_secret(0)) == (401 if reload % 2 == 0 else 200),
                             LOAD_TIMEOUT)
                    reload_s.append(time.perf_counter() - published)
                    time.sleep(2)
                del changed
                spikes.append(load.summary())
                slowest.append(load.slowest_since(published))
                slow += [[reload, *s] for s in load.slow_since(published)]
            worst = max(range(RELOADS), key=lambda i: spikes[i][1])
            time.sleep(SETTLE_SECONDS)
            row.update(rss_after_5_reloads_mb=round(rss_mb(pid)), heap_reloaded_mb=heap_mb(stack),
                       reload_p99_ms=round(max(s[0] for s in spikes), 1),
                       reload_max_ms=round(max(s[1] for s in spikes), 1),
                       reload_max_at_s=round(slowest[worst], 2),
                       reload_s=round(statistics.median(reload_s), 2),
                       reload_slow_requests=slow[:20],
                       reload_non_2xx=sum(s[2] for s in spikes),
                       reload_requests=sum(s[3] for s in spikes))
            row.update(after_release(stack, pid))
            return row
    finally:
        service.stop()


def write_lookup_store(root, count):
    """`count` key records in the `{digest:3}` shard files envoy/keyservice-lookup.yaml asks for."""
    def records():
        for i in range(count):
            d = sha(lookup_secret(i))
            yield d, '{"id":"scale-%07d","secret_sha256":"%s","tenant":"tenant-%d"}' % (i, d, i % 1000)
    write_digest_shards(root, records())


def measure_lookup(count):
    stack = Stack("keyservice-lookup.yaml", concurrency=2, substitutions=DIRECT_RESPONSE)
    root = stack.workdir / "keyservice"
    write_lookup_store(root, count)
    service = StaticKeyService(root, stack.ports["keys"], stack.workdir)
    row = {"mode": "lookup_on_miss", "keys": count}
    try:
        with service, stack:
            pid = stack.envoy.pid
            time.sleep(1)
            empty = rss_mb(pid)
            probe = lookup_secret(count - 1)
            t = time.perf_counter()
            first = status_of(stack, probe)
            row.update(first_request_ms=round((time.perf_counter() - t) * 1000, 2), first_status=first)
            row.update(at_rest(stack, pid, probe))
            after = rss_mb(pid)
            row.update(rss_empty_mb=round(empty), rss_loaded_mb=round(after))
            return row
    finally:
        shutil.rmtree(root / "keys", ignore_errors=True)


def run_host(sizes, modes):
    """Rows for the host this process runs (KEYGATE_HOST), one JSON line each."""
    for mode in modes:
        for count in sizes:
            measure = measure_full if mode == "full" else measure_lookup
            try:
                row = measure(count)
            except Exception as error:  # a row that failed says why; the table goes on
                row = {"mode": mode, "keys": count, "refused": f"run failed: {error}"[:160]}
            row["host"] = HOST_LABEL[os.environ.get("KEYGATE_HOST", "wasm")]
            print(json.dumps(row), flush=True)


def heap_cell(heap):
    return f" ({heap['allocated']} + {heap['free']})" if heap else ""


def released_cell(row):
    if "rss_after_release_mb" not in row:
        return ""
    return f"; {row['rss_after_release_mb']} MB at +{row['release_wait_s']} s"


def cell(row, name, fmt="{}"):
    return fmt.format(row[name]) if name in row else "n/a"


def table(rows):
    lines = ["| host | mode | keys (document) | load | RSS empty → loaded | B/key | after 5 reloads (heap: used + free; once the allocator lets go) "
             "| CPU/request | valid key at rest | reload p99 / max (slowest at; reload took) | non-2xx |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        keys = f"{r['keys']:,}" + (f" ({r['document_mb']} MB)" if "document_mb" in r else "")
        head = f"| {r['host']} | {r['mode']} | {keys} "
        if "refused" in r:
            lines.append(head + f"| refused: {r['refused']} |" + " |" * 7)
            continue
        if r["mode"] == "full":
            load = f"{r['load_s']} s"
            growth = cell(r, "rss_growth_bytes_per_key")
            spike = (f"{r['reload_p99_ms']} / {r['reload_max_ms']} ms "
                     f"({r['reload_max_at_s']:+} s; {r['reload_s']} s)")
            non_2xx = f"{r['reload_non_2xx'] + r['at_rest_non_2xx']} of {r['reload_requests']:,}"
        else:
            load = f"per key (first miss {r['first_request_ms']} ms)"
            growth, spike, non_2xx = "n/a", "n/a (ttl)", str(r["at_rest_non_2xx"])
        lines.append(head + f"| {load} | {r['rss_empty_mb']} → {r['rss_loaded_mb']} MB | {growth} "
                     f"| {cell(r, 'rss_after_5_reloads_mb', '{} MB')}{heap_cell(r.get('heap_reloaded_mb'))}{released_cell(r)} | {r['cpu_us_per_request']} µs "
                     f"| {r['valid_key_ms_median']} ms | {spike} | {non_2xx} |")
    return "\n".join(lines)


def key_count(text):
    """A set size as given: `1000000`, `1_000_000`, `1000k` or `1M`."""
    text = text.strip().replace("_", "")
    scale = {"k": 1000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", default=os.environ.get("BENCH_SCALE_KEYS") or "1000,10000,100000,1000000",
                        help="comma-separated set sizes, e.g. 1k,1M (the first is the baseline row)")
    parser.add_argument("--hosts", default="wasm,native")
    parser.add_argument("--modes", default="full,lookup_on_miss")
    parser.add_argument("--one-host", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [key_count(k) for k in args.keys.split(",") if k]
    modes = args.modes.split(",")
    if args.one_host:
        run_host(sizes, modes)
        return
    started = time.time()
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    rows = []
    for host in args.hosts.split(","):
        # The host is chosen when keygate_stack is imported: one process per host.
        child = subprocess.Popen([sys.executable, __file__, "--one-host", "--keys", args.keys,
                                  "--modes", args.modes], env={**os.environ, "KEYGATE_HOST": host},
                                 stdout=subprocess.PIPE, text=True)
        for line in child.stdout:
            print(line, end="", flush=True)
            if line.startswith("{"):
                rows.append(json.loads(line))
        child.wait()
    print(f"\nKey sets at scale (issue 14), envoy --concurrency 2, {THREADS} Python clients, "
          f"load average {' '.join(loadavg)} before, {' '.join(Path('/proc/loadavg').read_text().split()[:3])} "
          f"after, {round(time.time() - started)} s:\n")
    print(table(rows))


if __name__ == "__main__":
    main()
