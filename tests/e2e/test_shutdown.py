"""Envoy stops cleanly with keygate loaded and busy: on SIGTERM, while requests are arriving, it
exits with status 0 and no crash report. The configs are the two with background work: full mode
(keygate-native's ticker thread posts to Envoy's main thread; a fetch may be in flight) and lookup
on miss (lookups in flight, waiting requests woken across workers). Three rounds each: a crash
at shutdown depends on timing."""
import hashlib
import json
import shutil
import signal
import threading
import time

import pytest

from keygate_stack import ROOT, Stack, wait_for
from static_keyservice import StaticKeyService, keyset_document

ROUNDS = 3
FULL_KEY = "ks_alpha_Q2mX7rT9wL4v"  # envoy/keyservice.yaml's prefix
LOOKUP_KEY = "kl_bulk_0000001_Xy9"  # envoy/keyservice-lookup.yaml's prefix; not in the store: 401


def full_mode_service(stack):
    service = StaticKeyService.for_stack(stack)
    record = {"id": "ks-alpha", "tenant": "acme", "secret_sha256": hashlib.sha256(FULL_KEY.encode()).hexdigest()}
    service.write("keys.json", json.dumps(keyset_document(record)))
    return service


def lookup_service(stack):
    service = StaticKeyService.for_stack(stack)
    shutil.copytree(ROOT / "envoy" / "keyservice", service.root, dirs_exist_ok=True)
    return service


CASES = [pytest.param("keyservice.yaml", full_mode_service, FULL_KEY, 200, id="full-mode"),
         pytest.param("keyservice-lookup.yaml", lookup_service, LOOKUP_KEY, 401, id="lookup-on-miss")]


@pytest.mark.parametrize("config, make_service, key, status", CASES)
def test_envoy_exits_cleanly_on_sigterm_while_serving(config, make_service, key, status):
    for _ in range(ROUNDS):
        stack = Stack(config, concurrency=2)
        with make_service(stack), stack:
            # Serving as configured (in full mode, once the set is in every worker).
            assert wait_for(lambda: stack.request("GET", "/orders", [("x-api-key", key)]).status == status, 10)
            assert {r.status for r in stack.fire(20, [("x-api-key", key)])} == {status}
            stop = threading.Event()

            def traffic(worker):
                # A fresh key per request: in lookup mode each is a miss, so lookups are in flight.
                n = 0
                while not stop.is_set():
                    n += 1
                    try:
                        stack.request("GET", "/orders", [("x-api-key", f"{key}{worker}x{n}")])
                    except OSError:
                        pass  # Envoy is going away

            clients = [threading.Thread(target=traffic, args=(w,)) for w in range(4)]
            for client in clients:
                client.start()
            time.sleep(0.3)
            stack.envoy.send_signal(signal.SIGTERM)
            exit_status = stack.envoy.wait(timeout=15)
            stop.set()
            for client in clients:
                client.join()
            log = stack.log_text()
        assert exit_status == 0, log[-3000:]
        assert "Caught " not in log, log[-3000:]  # Envoy's crash report: "Caught Segmentation fault, ..."
