"""Keys from a key service, full mode (envoy/keyservice.yaml): Envoy with two workers fetches
/keys.json from stock nginx serving files this module writes. Revocations and additions reach
every worker within one refresh period + 1 s; the service stopped for 30 s under steady traffic
or serving malformed JSON changes nothing; before any set, keys get 503 KEYSET_UNAVAILABLE."""
import json
import re
import threading
import time

import pytest

from conftest import api_key_header, assert_denied, assert_passed
from keygate_stack import HOST, Stack, wait_for
from static_keyservice import StaticKeyService, key_record, keyset_document

CONFIG = "keyservice.yaml"
REFRESH = 2.0  # refresh_seconds in envoy/keyservice.yaml
STAT = "wasmcustom.keygate.remote."

ALPHA = "ks_alpha_Q2mX7rT9wL4v"
BETA = "ks_beta_N8pK3sV6yB1c"
GAMMA = "Bearer ksid_gamma:Z2FtbWEtc2VjcmV0LTE"
DELTA = "ks_delta_Wq8Zr2Lp6Nm4"  # not in the shipped document; added by a test

SECRETS = {"ks-alpha": ALPHA, "ks-beta": BETA, "ksid_gamma": "Z2FtbWEtc2VjcmV0LTE", "ks-delta": DELTA}


def record(key_id, tenant, **extra):
    return key_record(key_id, SECRETS[key_id], tenant=tenant, **extra)


BASE = [record("ks-alpha", "acme"), record("ks-beta", "globex"), record("ksid_gamma", "initech")]


@pytest.fixture(scope="module")
def remote():
    stack = Stack(CONFIG, concurrency=2)
    with StaticKeyService.for_stack(stack) as service, stack:
        yield stack, service


def bearer(value):
    return [("authorization", value)]




def stat(stack, name):
    return stack.stat(STAT + name)


def tenant_of(stack, key):
    seen = stack.request("GET", "/orders", api_key_header(key)).upstream
    return seen and seen["x-keygate-tenant"][0]



def test_before_any_key_set_keys_are_503_keyset_unavailable_and_public_routes_pass(remote):
    stack, service = remote
    assert_denied(stack.request("GET", "/orders", api_key_header(ALPHA)), 503, "KEYSET_UNAVAILABLE")
    # Routes that need no key do not need the key set either.
    seen = assert_passed(stack.request("GET", "/healthz"))
    assert seen["x-keygate-auth"] == ["none"]
    # The fetcher asked and got 404: counted and logged, nothing loaded.
    assert wait_for(lambda: stat(stack, "keyset.fetch_failures") >= 1, REFRESH + 2) is not None
    assert ("/keys.json", 404) in service.requests()
    assert "key-set fetch failed" in stack.log_text() and "status 404 for /keys.json" in stack.log_text()
    assert stat(stack, "keyset.version") == 0
    assert_denied(stack.request("GET", "/orders", bearer(GAMMA)), 503, "KEYSET_UNAVAILABLE")


def test_a_published_key_set_serves_every_worker_with_scope_from_the_record(remote):
    stack, service = remote
    service.write("keys.json", keyset_document(*BASE))
    assert wait_for(lambda: stack.request("GET", "/orders", api_key_header(ALPHA)).status == 200, REFRESH + 1)
    before = stack.connections_per_worker()
    responses = stack.fire(30, api_key_header(ALPHA)) + stack.fire(10, bearer(GAMMA))
    after = stack.connections_per_worker()
    assert len(after) == 2 and all(after[w] > before.get(w, 0) for w in after), (before, after)
    for r in responses[:30]:
        seen = assert_passed(r)
        assert seen["x-keygate-key-id"] == ["ks-alpha"] and seen["x-keygate-tenant"] == ["acme"]
        assert "x-api-key" not in seen
    for r in responses[30:]:
        assert assert_passed(r)["x-keygate-tenant"] == ["initech"]
    assert_denied(stack.request("GET", "/orders", api_key_header("ks_unknown_key_1234")), 401, "INVALID_API_KEY")
    stats = stack.stats()
    assert stats[STAT + "keyset.version"] >= 1
    assert stats[STAT + "keyset.keys"] == 3
    # wasm: every worker VM (and the main thread's) parsed the new version once, none fetched it
    # again; native: the process parsed it once, for every worker.
    parsed = {"wasm": 3, "native": 1}[HOST]
    assert len(re.findall(r"key set version 1 loaded \(3 keys\)", stack.log_text())) == parsed


def test_one_fetch_per_refresh_period_for_the_whole_process(remote):
    stack, service = remote
    fetches_before = stat(stack, "keyset.fetches")
    logged_before = len(service.requests("/keys.json"))
    time.sleep(5 * REFRESH)
    fetched = stat(stack, "keyset.fetches") - fetches_before
    logged = len(service.requests("/keys.json")) - logged_before
    # Three VMs tick (two workers and the main thread); one lease holder fetches: about 5, not 15.
    assert 4 <= fetched <= 6, fetched
    assert logged == fetched
    # Unchanged document: nginx answers the If-None-Match with 304.
    assert all(status == 304 for _, status in service.requests("/keys.json")[-logged:])
    assert stat(stack, "keyset.age_seconds") <= REFRESH + 1


def test_a_revoked_key_fails_on_every_worker_within_one_period_plus_one_second(remote):
    stack, service = remote
    assert_passed(stack.request("GET", "/orders", api_key_header(BETA)))
    version = stat(stack, "keyset.version")
    service.write("keys.json", keyset_document(record("ks-alpha", "acme"), record("ksid_gamma", "initech")))
    revoked_at = time.time()
    took = wait_for(lambda: all(r.status == 401 for r in stack.fire(6, api_key_header(BETA))), REFRESH + 1)
    assert took is not None, "the revocation did not reach every worker in time"
    time.sleep(max(0.0, revoked_at + REFRESH + 1 - time.time()))
    before = stack.connections_per_worker()
    for r in stack.fire(40, api_key_header(BETA)):
        assert_denied(r, 401, "INVALID_API_KEY")
    after = stack.connections_per_worker()
    assert all(after[w] > before.get(w, 0) for w in after), (before, after)
    for r in stack.fire(20, api_key_header(ALPHA)):
        assert_passed(r)
    assert stat(stack, "keyset.version") == version + 1
    assert stat(stack, "keyset.keys") == 2


def test_an_added_key_works_on_every_worker_within_one_period_plus_one_second(remote):
    stack, service = remote
    assert_denied(stack.request("GET", "/orders", api_key_header(DELTA)), 401, "INVALID_API_KEY")
    service.write("keys.json", keyset_document(record("ks-alpha", "acme"), record("ksid_gamma", "initech"),
                                        record("ks-delta", "hooli")))
    added_at = time.time()
    took = wait_for(lambda: all(r.status == 200 for r in stack.fire(6, api_key_header(DELTA))), REFRESH + 1)
    assert took is not None, "the new key did not reach every worker in time"
    time.sleep(max(0.0, added_at + REFRESH + 1 - time.time()))
    for r in stack.fire(40, api_key_header(DELTA)):
        assert assert_passed(r)["x-keygate-tenant"] == ["hooli"]


def test_malformed_documents_change_nothing(remote):
    stack, service = remote
    good = json.loads((service.root / "keys.json").read_text())  # the document stored now
    version = stat(stack, "keyset.version")
    failures = stat(stack, "keyset.fetch_failures")
    text = json.dumps(keyset_document(*good["keys"], record("ks-beta", "globex")))
    broken = [
        text[: len(text) // 2],  # truncated: would have re-added ks-beta
        "<html><body>502 Bad Gateway</body></html>",
        json.dumps(keyset_document({"id": "ks-beta", "secret_sha256": "not-a-digest"})),
        json.dumps(keyset_document(record("ks-beta", "globex\r\nx-injected: 1"))),
        json.dumps(keyset_document(record("ks-alpha", "acme"), record("ks-alpha", "acme"))),
    ]
    for n, body in enumerate(broken, start=1):
        service.write("keys.json", body)
        assert wait_for(lambda: stat(stack, "keyset.fetch_failures") >= failures + n, REFRESH + 2) is not None, n
        for r in stack.fire(10, api_key_header(ALPHA)):
            assert_passed(r)
        assert_denied(stack.request("GET", "/orders", api_key_header(BETA)), 401, "INVALID_API_KEY")
        assert stat(stack, "keyset.version") == version
    log = stack.log_text()
    assert "invalid key-set document" in log and "keeping version" in log
    # The good document again: fetched (both hosts ask for ranged parts, so 206 with its one
    # part the whole), recognised as the stored one, no new version.
    failures = stat(stack, "keyset.fetch_failures")
    served = len(service.requests("/keys.json"))
    service.write("keys.json", good)
    whole = ("/keys.json", 206)
    assert wait_for(lambda: whole in service.requests("/keys.json")[served:], REFRESH + 2)
    time.sleep(0.2)
    assert stat(stack, "keyset.fetch_failures") == failures
    assert stat(stack, "keyset.version") == version


def test_key_service_stopped_30_s_under_steady_traffic_fails_no_valid_key(remote):
    stack, service = remote
    version = stat(stack, "keyset.version")
    failures = stat(stack, "keyset.fetch_failures")
    results = []
    stop = threading.Event()

    def traffic(headers):
        while not stop.is_set():
            results.append(stack.request("GET", "/orders", headers))
            time.sleep(0.02)

    threads = [threading.Thread(target=traffic, args=(h,)) for h in
               (api_key_header(ALPHA), api_key_header(DELTA), bearer(GAMMA), api_key_header(ALPHA))]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        service.stop()
        time.sleep(30)
        age_while_down = stat(stack, "keyset.age_seconds")
        failed_while_down = stat(stack, "keyset.fetch_failures") - failures
        service.start()
        time.sleep(REFRESH + 1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(results) > 400, len(results)
    bad = [r for r in results if r.status != 200]
    assert not bad, bad[:3]
    assert age_while_down >= 28
    assert 12 <= failed_while_down <= 17, failed_while_down  # one per 2 s period, one process
    assert "no answer" in stack.log_text() or "status 503" in stack.log_text()
    # Back: the same document again (304), so no new version, and the set is fresh again.
    assert stat(stack, "keyset.version") == version
    assert stat(stack, "keyset.age_seconds") <= REFRESH + 1


def test_rotation_old_and_new_key_both_work_until_not_after(remote):
    stack, service = remote
    grace_ends = int(time.time()) + 4
    service.write("keys.json", keyset_document(
        record("ks-alpha", "acme", not_after=grace_ends),  # the old key, being rotated out
        record("ks-delta", "acme"),                          # its replacement
        record("ksid_gamma", "initech")))
    assert wait_for(lambda: tenant_of(stack, DELTA) == "acme", REFRESH + 1) is not None
    assert time.time() < grace_ends - 0.5, "machine too slow to observe the grace period"
    assert_passed(stack.request("GET", "/orders", api_key_header(ALPHA)))
    time.sleep(max(0.0, grace_ends + 0.2 - time.time()))
    for r in stack.fire(10, api_key_header(ALPHA)):
        assert_denied(r, 401, "INVALID_API_KEY")
    for r in stack.fire(10, api_key_header(DELTA)):
        assert_passed(r)
