"""A fleet on a real Docker engine (envoy/compose/fleet.yaml, local images): two Envoys, each on
its own container address, both with keygate in key-service full mode (envoy/keyservice.yaml,
refresh every 2 s) against one nginx key-service container serving a directory these tests
write key-set documents into. Run by `make compose-test`; `make e2e` leaves it out.

Each test publishes the key set it needs and waits until both Envoys serve it, so the tests do
not depend on each other's order.
"""
import os
import secrets
import shutil
import time

import pytest

from compose_stack import ComposeEnvoy, ComposeProject, ENVOY_DIR  # noqa: E402
from conftest import assert_denied, assert_passed  # noqa: E402
from keygate_stack import ROOT, wait_for_port  # noqa: E402
from static_keyservice import StaticKeyService, key_record, keyset_document  # noqa: E402

FLEET_FILES = [ENVOY_DIR / "compose" / "fleet.yaml", ENVOY_DIR / "compose" / "fleet-local-images.yaml"]
REFRESH = 2.0  # envoy/keyservice.yaml's refresh_seconds
KEYS_PORT = 8090
STATS = "wasmcustom.keygate.remote."


def new_key(label):
    return f"ks_{label}_{secrets.token_hex(8)}"


def record(key, **fields):
    return key_record(key.rsplit("_", 1)[0], key, tenant="fleet", **fields)


class Fleet:
    def __init__(self, project, envoys, keys_dir, keyservice_address):
        self.project = project
        self.envoys = envoys  # {"a": ComposeEnvoy, "b": ComposeEnvoy}
        # The container's nginx serves this directory; the helper only writes files into it.
        self.files = StaticKeyService(keys_dir, KEYS_PORT, keys_dir.parent)
        self.keyservice_address = keyservice_address
        self.serial = 0

    def publish(self, records):
        self.serial += 1
        self.files.write("keys.json", keyset_document(*records, serial=self.serial))

    def time_until(self, key, status, names, timeout):
        """Seconds (from now) until each named Envoy answers `key` with `status`: {name: s or None}."""
        start = time.time()
        reached = {}
        while time.time() - start < timeout and len(reached) < len(names):
            for name in names:
                if name not in reached and self.envoys[name].request(
                        "GET", "/orders", [("x-api-key", key)]).status == status:
                    reached[name] = time.time() - start
            time.sleep(0.05)
        return {name: reached.get(name) for name in names}

    def publish_and_wait(self, records, key):
        """Publishes `records` and waits until `key` (one of them) passes on both Envoys."""
        self.publish(records)
        took = self.time_until(key, 200, ("a", "b"), REFRESH + 5)
        assert all(t is not None for t in took.values()), f"not served everywhere: {took}"


@pytest.fixture(scope="module")
def fleet():
    workdir = ROOT / ".tmp" / f"fleet-{os.getpid()}"
    keys_dir = workdir / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    project = ComposeProject("keygate-fleet", FLEET_FILES, {"KEYGATE_FLEET_KEYS": str(keys_dir)})
    try:
        with project:
            envoys = {name: ComposeEnvoy(project, f"envoy-{name}", project.address(f"envoy-{name}", "front"))
                      for name in ("a", "b")}
            for envoy in envoys.values():
                envoy.wait_ready()
            yield Fleet(project, envoys, keys_dir, project.address("keyservice", "keys"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_valid_key_passes_on_both_envoys_and_an_unknown_one_on_neither(fleet):
    key = new_key("both")
    fleet.publish_and_wait([record(key, permissions=["orders:read"])], key)
    for envoy in fleet.envoys.values():
        seen = assert_passed(envoy.request("GET", "/orders", [("x-api-key", key)]))
        assert seen["x-keygate-key-id"] == ["ks_both"] and seen["x-keygate-tenant"] == ["fleet"]
        assert seen["x-keygate-permissions"] == ["orders:read"]
        assert "x-api-key" not in seen
        assert_denied(envoy.request("GET", "/orders", [("x-api-key", new_key("stranger"))]), 401, "INVALID_API_KEY")
    assert fleet.envoys["a"].host != fleet.envoys["b"].host


def test_revocation_reaches_both_envoys_within_refresh_plus_one_second(fleet):
    revoked, kept = new_key("revoked"), new_key("kept")
    fleet.publish_and_wait([record(revoked), record(kept)], revoked)
    fleet.publish([record(kept)])
    took = fleet.time_until(revoked, 401, ("a", "b"), REFRESH + 3)
    print(f"revocation reached the Envoys after {took} s")
    assert all(t is not None and t <= REFRESH + 1 for t in took.values()), took
    for envoy in fleet.envoys.values():
        assert_denied(envoy.request("GET", "/orders", [("x-api-key", revoked)]), 401, "INVALID_API_KEY")
        assert assert_passed(envoy.request("GET", "/orders", [("x-api-key", kept)]))["x-keygate-key-id"] == ["ks_kept"]


def test_key_service_outage_serves_the_last_good_set_and_its_return_brings_the_next_revocation(fleet):
    valid, later_revoked = new_key("valid"), new_key("later")
    fleet.publish_and_wait([record(valid), record(later_revoked)], later_revoked)
    failures_before = {n: e.stats().get(STATS + "keyset.fetch_failures", 0) for n, e in fleet.envoys.items()}
    fleet.project.stop("keyservice")
    # Three refresh periods with the key service gone: not one valid request fails on either.
    outage_end = time.time() + 3 * REFRESH
    sent = 0
    while time.time() < outage_end:
        for envoy in fleet.envoys.values():
            for key in (valid, later_revoked):
                assert_passed(envoy.request("GET", "/orders", [("x-api-key", key)]))
                sent += 1
        time.sleep(0.1)
    assert sent >= 40
    for name, envoy in fleet.envoys.items():
        # The outage was seen (the fetches failed), not merely unnoticed.
        assert envoy.stats()[STATS + "keyset.fetch_failures"] > failures_before[name], name
    fleet.project.start("keyservice")
    assert wait_for_port(KEYS_PORT, 15, host=fleet.keyservice_address)
    fleet.publish([record(valid)])
    took = fleet.time_until(later_revoked, 401, ("a", "b"), REFRESH + 3)
    print(f"after the outage, the revocation reached the Envoys after {took} s")
    assert all(t is not None and t <= REFRESH + 1 for t in took.values()), took
    for envoy in fleet.envoys.values():
        assert_denied(envoy.request("GET", "/orders", [("x-api-key", later_revoked)]), 401, "INVALID_API_KEY")
        assert_passed(envoy.request("GET", "/orders", [("x-api-key", valid)]))


def test_network_cut_leaves_one_envoy_stale_while_the_other_picks_up_changes(fleet):
    old, new = new_key("old"), new_key("new")
    fleet.publish_and_wait([record(old)], old)
    failures_before = fleet.envoys["b"].stats().get(STATS + "keyset.fetch_failures", 0)
    fleet.project.disconnect("envoy-b", "keys")
    try:
        fleet.publish([record(new)])  # `old` revoked, `new` added
        took = fleet.time_until(new, 200, ("a",), REFRESH + 3)
        assert took["a"] is not None and took["a"] <= REFRESH + 1, took
        assert_denied(fleet.envoys["a"].request("GET", "/orders", [("x-api-key", old)]), 401, "INVALID_API_KEY")
        # Two more periods: envoy-b, cut off, still serves the last set it fetched.
        stale_until = time.time() + 2 * REFRESH
        while time.time() < stale_until:
            b = fleet.envoys["b"]
            assert assert_passed(b.request("GET", "/orders", [("x-api-key", old)]))["x-keygate-key-id"] == ["ks_old"]
            assert_denied(b.request("GET", "/orders", [("x-api-key", new)]), 401, "INVALID_API_KEY")
            time.sleep(0.2)
        assert fleet.envoys["b"].stats()[STATS + "keyset.fetch_failures"] > failures_before
    finally:
        fleet.project.connect("envoy-b", "keys")
    # Reconnected, envoy-b catches up on its next fetch.
    took = fleet.time_until(new, 200, ("b",), REFRESH + 3)
    assert took["b"] is not None, took
    assert_denied(fleet.envoys["b"].request("GET", "/orders", [("x-api-key", old)]), 401, "INVALID_API_KEY")


def test_rate_limits_count_per_envoy_process_not_across_the_fleet(fleet):
    # keygate's limits live in one Envoy's shared data: each Envoy lets the key through its own
    # `requests + burst`. Fleet-wide counts need the global rate limit service (README).
    key = new_key("limited")
    limit = {"requests": 2, "per_seconds": 3600, "burst": 0}
    # The wait stops asking an Envoy at its first 200: one counted request on each (refused
    # requests are never counted). One more passes, then 429, on each.
    fleet.publish_and_wait([record(key, rate_limit=limit)], key)
    for name, envoy in fleet.envoys.items():
        assert_passed(envoy.request("GET", "/orders", [("x-api-key", key)]))
        resp = envoy.request("GET", "/orders", [("x-api-key", key)])
        assert_denied(resp, 429, "RATE_LIMIT_EXCEEDED")
        assert resp.header("retry-after") is not None, name

