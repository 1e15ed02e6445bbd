"""Keys from a key service, lookup on miss (envoy/keyservice-lookup.yaml): a store of 1,000,000
opaque keys served by stock nginx as 4096 static shard files (/keys/shards/<first 3 hex digits
of the key's SHA-256>.json), plus id:secret keys as one file per id (/keys/by-id/<id>.json).
Envoy with two workers asks for a key only when its shared cache has no answer."""
import hashlib
import json
import random
import shutil
import time

import pytest

from conftest import api_key_header, assert_denied, assert_passed
from keygate_stack import ROOT, Stack
from static_keyservice import StaticKeyService, write_digest_shards

CONFIG = "keyservice-lookup.yaml"
STAT = "wasmcustom.keygate.lookup."
STORE_SIZE = 1_000_000
NEGATIVE_TTL = 10  # negative_ttl_seconds in envoy/keyservice-lookup.yaml

EPSILON = "Bearer klid_epsilon:ZXBzaWxvbi1zZWNyZXQ"  # envoy/keyservice/keys/by-id/klid_epsilon.json


def bulk_key(i):
    return f"kl_bulk_{i:07d}_Xy9"


def digest(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


def write_store(root):
    """1,000,000 key records in 4096 shard files of about 244 records (30 KB) each: the
    static-file layout for big stores (4096 inodes, not a million)."""
    def records():
        for i in range(STORE_SIZE):
            d = digest(bulk_key(i))
            yield d, '{"id":"bulk-%07d","secret_sha256":"%s","tenant":"t%03d"}' % (i, d, i % 1000)
    return write_digest_shards(root, records())


@pytest.fixture(scope="module")
def lookup():
    stack = Stack(CONFIG, concurrency=2)
    root = stack.workdir / "keyservice"
    shutil.copytree(ROOT / "envoy" / "keyservice", root)  # the shipped example files
    written, files = write_store(root)
    service = StaticKeyService(root, stack.ports["keys"], stack.workdir)
    try:
        with service, stack:
            yield stack, service, (written, files)
    finally:
        shutil.rmtree(root / "keys" / "shards", ignore_errors=True)




def counters(stack, service):
    stats = stack.stats()
    return (stats.get(STAT + "cache.hits", 0), stats.get(STAT + "cache.misses", 0),
            len(service.requests("/keys/")))


def test_the_store_really_holds_a_million_keys_in_static_files(lookup):
    stack, service, (written, files) = lookup
    assert written == STORE_SIZE and files == 4096
    shard_dir = service.root / "keys" / "shards"
    assert len(list(shard_dir.iterdir())) == 4096
    # Spot-check one shard as nginx serves it.
    d = digest(bulk_key(123_456))
    shard = json.loads((shard_dir / f"{d[:3]}.json").read_text())
    assert {"id": "bulk-0123456", "secret_sha256": d, "tenant": "t456"} in shard["keys"]


def test_keys_from_across_the_store_are_found_each_with_one_call(lookup):
    stack, service, _ = lookup
    sample = [0, 1, 499_999, 777_777, STORE_SIZE - 1] + random.Random(7).sample(range(STORE_SIZE), 45)
    hits, misses, calls = counters(stack, service)
    for i in sample:
        seen = assert_passed(stack.request("GET", "/orders", api_key_header(bulk_key(i))))
        assert seen["x-keygate-key-id"] == [f"bulk-{i:07d}"]
        assert seen["x-keygate-tenant"] == [f"t{i % 1000:03d}"]
        assert "x-api-key" not in seen
    hits2, misses2, calls2 = counters(stack, service)
    assert misses2 - misses == len(sample) and calls2 - calls == len(sample)
    # Each call fetched exactly the shard of the key's digest.
    asked = [p for p, _ in service.requests("/keys/")[calls:]]
    assert asked == [f"/keys/shards/{digest(bulk_key(i))[:3]}.json" for i in sample]


def test_a_cached_key_does_not_call_the_key_service_again_on_any_worker(lookup):
    stack, service, _ = lookup
    key = bulk_key(424_242)
    assert_passed(stack.request("GET", "/orders", api_key_header(key)))
    hits, misses, calls = counters(stack, service)
    before = stack.connections_per_worker()
    for r in stack.fire(40, api_key_header(key)):
        assert assert_passed(r)["x-keygate-key-id"] == ["bulk-0424242"]
    after = stack.connections_per_worker()
    assert all(after[w] > before.get(w, 0) for w in after), (before, after)
    hits2, misses2, calls2 = counters(stack, service)
    assert (hits2 - hits, misses2 - misses, calls2 - calls) == (40, 0, 0)


def test_an_unknown_key_is_401_and_the_negative_answer_is_cached(lookup):
    stack, service, _ = lookup
    unknown = "kl_bulk_9999999_nope"
    hits, misses, calls = counters(stack, service)
    assert_denied(stack.request("GET", "/orders", api_key_header(unknown)), 401, "INVALID_API_KEY")
    # The shard exists (200) but has no such digest: not found.
    assert service.requests("/keys/")[calls:] == [(f"/keys/shards/{digest(unknown)[:3]}.json", 200)]
    for r in stack.fire(20, api_key_header(unknown)):
        assert_denied(r, 401, "INVALID_API_KEY")
    hits2, misses2, calls2 = counters(stack, service)
    assert (hits2 - hits, misses2 - misses, calls2 - calls) == (20, 1, 1)


def test_id_secret_keys_are_found_by_id_and_a_wrong_secret_costs_no_call(lookup):
    stack, service, _ = lookup
    hits, misses, calls = counters(stack, service)
    seen = assert_passed(stack.request("GET", "/orders", [("authorization", EPSILON)]))
    assert seen["x-keygate-key-id"] == ["klid_epsilon"] and seen["x-keygate-user"] == ["dev@globex"]
    assert "authorization" not in seen
    assert service.requests("/keys/")[calls:] == [("/keys/by-id/klid_epsilon.json", 200)]
    wrong = [("authorization", "Bearer klid_epsilon:d3Jvbmctc2VjcmV0")]
    for r in stack.fire(10, wrong):
        assert_denied(r, 401, "INVALID_API_KEY")
    assert counters(stack, service)[2] == calls + 1
    # An id without a file: nginx 404, which is "no such key".
    assert_denied(stack.request("GET", "/orders", [("authorization", "Bearer klid_nobody:c2VjcmV0")]),
                  401, "INVALID_API_KEY")
    assert service.requests("/keys/")[-1] == ("/keys/by-id/klid_nobody.json", 404)


def test_a_key_created_after_a_miss_works_once_the_negative_answer_expires(lookup):
    stack, service, _ = lookup
    fresh = "kl_new_customer_Mn7Bv5Cx3"
    assert_denied(stack.request("GET", "/orders", api_key_header(fresh)), 401, "INVALID_API_KEY")
    cached_at = time.time()
    d = digest(fresh)
    shard_path = f"keys/shards/{d[:3]}.json"
    shard = json.loads((service.root / shard_path).read_text())
    shard["keys"].append({"id": "new-customer", "secret_sha256": d, "tenant": "t-new"})
    service.write(shard_path, shard)
    # Still the cached "unknown" until the negative TTL ends, without asking again.
    calls = counters(stack, service)[2]
    assert_denied(stack.request("GET", "/orders", api_key_header(fresh)), 401, "INVALID_API_KEY")
    assert counters(stack, service)[2] == calls
    time.sleep(max(0.0, cached_at + NEGATIVE_TTL + 0.2 - time.time()))
    assert assert_passed(stack.request("GET", "/orders", api_key_header(fresh)))["x-keygate-key-id"] == ["new-customer"]


def test_key_service_down_cached_keys_pass_uncached_keys_are_503(lookup):
    stack, service, _ = lookup
    cached = bulk_key(31_337)
    assert_passed(stack.request("GET", "/orders", api_key_header(cached)))
    service.stop()
    try:
        for r in stack.fire(10, api_key_header(cached)):
            assert_passed(r)
        assert_denied(stack.request("GET", "/orders", api_key_header(bulk_key(31_338))), 503, "KEYSET_UNAVAILABLE")
        assert stack.stats()[STAT + "cache.lookup_failures"] >= 1
        assert "key lookup failed" in stack.log_text()
    finally:
        service.start()
    assert_passed(stack.request("GET", "/orders", api_key_header(bulk_key(31_338))))
