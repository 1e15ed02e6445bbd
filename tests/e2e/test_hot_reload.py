"""Hot reload through Envoy's dynamic configuration (envoy/hot-reload.yaml): keygate's filter
config, key set included, comes from a file Envoy watches (ECDS from a path). Replacing the file
under steady traffic swaps the key set with no restart and no failed request for keys valid in
both versions; a broken replacement is refused by Envoy and the running set stays."""
import os
import threading
import time

import pytest

from conftest import api_key_header, assert_denied, assert_passed
from keygate_stack import ROOT, Stack, for_host, wait_for

CONFIG = "hot-reload.yaml"
ONE = "hr_one_Pq4Ws8Ed2Rf6"      # in both versions
TWO = "hr_two_Tg5Yh7Uj9Ik1"      # only in the shipped version
THREE = "hr_three_Ol3Km5Nj7Bh9"  # only in the second version
THREE_RECORD = ('{"id": "hr-three", "secret_sha256": '
                '"d71fd27d95b7372fdc59a620fd8d66176943f2e011089a1ef3730a76473e7cdd", "tenant": "initech"}')
SHIPPED = (ROOT / "envoy" / "hot-reload" / "keygate.yaml").read_text()
TWO_LINE = next(line for line in SHIPPED.splitlines() if '"id": "hr-two"' in line)
# Version B: hr-two replaced by hr-three (a rotation by removal), hr-one unchanged.
VERSION_B = SHIPPED.replace(TWO_LINE, "              " + THREE_RECORD)


@pytest.fixture(scope="module")
def hot():
    stack = Stack(CONFIG, concurrency=2)
    filter_file = stack.workdir / "hot-reload" / "keygate.yaml"
    filter_file.parent.mkdir(parents=True, exist_ok=True)
    filter_file.write_text(for_host(SHIPPED))
    stack.substitutions = {"path: envoy/hot-reload/keygate.yaml": f"path: {filter_file}"}
    with stack:
        yield stack, filter_file


def replace_atomically(path, text):
    """Write a temporary file next to it, then rename over it: Envoy's watcher reacts to the
    rename, and never reads half a file."""
    tmp = path.with_name(".keygate.yaml.tmp")
    tmp.write_text(for_host(text))
    os.replace(tmp, path)


def reloads(stack):
    for line in stack.admin("/stats").splitlines():
        if line.startswith("extension_config_discovery.http_filter.keygate.config_reload:"):
            return int(line.split(": ")[1])
    return 0



def test_replacing_the_config_file_under_steady_traffic_fails_no_request(hot):
    stack, filter_file = hot
    pid = stack.envoy.pid
    assert_passed(stack.request("GET", "/x", api_key_header(TWO)))
    assert_denied(stack.request("GET", "/x", api_key_header(THREE)), 401, "INVALID_API_KEY")
    results = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            results.append(stack.request("GET", "/x", api_key_header(ONE)))

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    swaps = 0
    try:
        for version, present, absent in [(VERSION_B, THREE, TWO), (SHIPPED, TWO, THREE)] * 3:
            before = reloads(stack)
            replace_atomically(filter_file, version)
            swaps += 1
            assert wait_for(lambda: reloads(stack) > before), "Envoy did not reload the file"
            assert wait_for(lambda: stack.request("GET", "/x", api_key_header(present)).status == 200)
            for _ in range(5):
                assert_denied(stack.request("GET", "/x", api_key_header(absent)), 401, "INVALID_API_KEY")
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert swaps == 6
    assert len(results) > 200, len(results)
    failed = [r for r in results if r.status != 200]
    assert not failed, failed[:3]
    for r in results[:: max(1, len(results) // 20)]:
        assert r.upstream["x-keygate-key-id"] == ["hr-one"]
    # The same Envoy process served throughout.
    assert stack.envoy.poll() is None and stack.envoy.pid == pid


def test_a_broken_replacement_is_refused_and_the_running_key_set_stays(hot):
    stack, filter_file = hot
    assert_passed(stack.request("GET", "/x", api_key_header(TWO)))
    failures_before = [line for line in stack.admin("/stats").splitlines()
                       if line.startswith("extension_config_discovery.http_filter.keygate.config_fail:")]
    broken = SHIPPED.replace('"secret_sha256": "7891', '"secret_sha256": "zz91')
    replace_atomically(filter_file, broken)
    assert wait_for(lambda: [line for line in stack.admin("/stats").splitlines()
                             if line.startswith("extension_config_discovery.http_filter.keygate.config_fail:")]
                    != failures_before)
    assert "keys[0].secret_sha256: expected 64 hex characters" in stack.log_text()
    for _ in range(10):
        assert_passed(stack.request("GET", "/x", api_key_header(ONE)))
        assert_passed(stack.request("GET", "/x", api_key_header(TWO)))
    replace_atomically(filter_file, SHIPPED)
