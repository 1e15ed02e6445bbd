"""The Kubernetes examples (docs/kubernetes/): Istio's WasmPlugin and Envoy Gateway's
EnvoyExtensionPolicy parse, carry the demo config (envoy/demo.yaml, with its route policies as
`routes` rules), pass `keygate config check`, and that config, handed to keygate as JSON text the
way both controllers do, serves the demo's answers in a real Envoy. The OCI image they load is
built by `make oci` with /plugin.wasm as its only layer."""
import json
import os
import subprocess
import tarfile

import pytest
import yaml

from conftest import assert_denied, assert_passed, keygate_cli
from keygate_stack import ROOT, Stack, plugin_config_block

MANIFESTS = {
    "istio-wasmplugin.yaml": ("WasmPlugin", lambda spec: spec["pluginConfig"]),
    "envoy-gateway-extensionpolicy.yaml": ("EnvoyExtensionPolicy", lambda spec: spec["wasm"][0]["config"]),
}
ROUTE_RULES = [{"path_prefix": "/healthz", "policy": "public"},
               {"path_prefix": "/admin", "policy": "admin"}]
DEMO_KEY = "cmp_demo_Q7fX2mLr9Wk4TbVn8PzA"
VERSION = next(line.split('"')[1] for line in (ROOT / "Cargo.toml").read_text().splitlines()
               if line.startswith("version = "))


def manifest(name):
    docs = list(yaml.safe_load_all((ROOT / "docs" / "kubernetes" / name).read_text()))
    assert len(docs) == 1
    return docs[0]


def embedded_config(name):
    kind, config_of = MANIFESTS[name]
    doc = manifest(name)
    assert doc["kind"] == kind
    return config_of(doc["spec"])


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_carries_the_demo_config_with_its_route_policies_as_rules(name):
    _, demo = plugin_config_block("demo.yaml")
    config = embedded_config(name)
    assert config.pop("routes") == ROUTE_RULES
    assert config == demo


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_loads_the_image_make_oci_builds_and_fails_closed(name):
    doc = manifest(name)
    image = f"keygate-wasm:{VERSION}"
    if doc["kind"] == "WasmPlugin":
        assert doc["spec"]["url"].startswith("oci://") and doc["spec"]["url"].endswith("/" + image)
        assert doc["spec"]["pluginName"] == "keygate"
        assert doc["spec"]["failStrategy"] == "FAIL_CLOSE"
    else:
        [wasm] = doc["spec"]["wasm"]
        assert wasm["code"]["type"] == "Image" and wasm["code"]["image"]["url"].endswith("/" + image)
        assert wasm["rootID"] == "keygate"
        assert wasm["failOpen"] is False


def test_keygate_config_check_accepts_the_config_in_both_manifests():
    result = keygate_cli("config", "check", *(f"docs/kubernetes/{name}" for name in MANIFESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "spec.pluginConfig (filter \"keygate\"): ok: keygate \"demo\"" in result.stdout
    assert "spec.wasm[0].config (filter \"keygate\"): ok: keygate \"demo\"" in result.stdout
    assert result.stdout.endswith("2 valid, 0 refused\n")


@pytest.fixture(scope="module")
def stack():
    """envoy/demo.yaml without route metadata, keygate configured with the manifest's config as
    the controllers pass it: the object serialized as JSON text."""
    block, _ = plugin_config_block("demo.yaml")
    indent = block[:len(block) - len(block.lstrip())]
    config = json.dumps(embedded_config("istio-wasmplugin.yaml"))
    substitutions = {block: indent + config + "\n",
                     "metadata: { filter_metadata: { keygate: { policy: public } } }": "",
                     "metadata: { filter_metadata: { keygate: { policy: admin } } }": ""}
    with Stack("demo.yaml", substitutions=substitutions) as running:
        yield running


def test_the_manifest_config_serves_the_demo_answers_without_route_metadata(stack):
    assert "filter_metadata" not in stack.render_config().read_text()
    seen = assert_passed(stack.request("GET", "/orders", [("x-api-key", DEMO_KEY)]))
    assert seen["x-keygate-key-id"] == ["cmp_demo"] and "x-api-key" not in seen
    assert_denied(stack.request("GET", "/orders"), 401, "TOKEN_MISSING")
    seen = assert_passed(stack.request("GET", "/healthz"))
    assert seen["x-keygate-auth"] == ["none"]
    assert_denied(stack.request("GET", "/admin/users", [("x-api-key", DEMO_KEY)]), 403, "FORBIDDEN")


def docker_engine():
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.mark.skipif(not docker_engine(), reason="needs a running Docker engine ('docker info' got no answer)")
def test_make_oci_builds_a_single_layer_image_with_the_module_at_plugin_wasm(tmp_path):
    tag = f"keygate-wasm:test-{os.getpid()}"
    built = subprocess.run(["make", "--no-print-directory", "oci", f"OCI_IMAGE={tag}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    try:
        saved = tmp_path / "image.tar"
        subprocess.run(["docker", "save", "-o", str(saved), tag], check=True, timeout=60)
        with tarfile.open(saved) as image:
            [entry] = json.load(image.extractfile("manifest.json"))
            [layer_name] = entry["Layers"]
            with tarfile.open(fileobj=image.extractfile(layer_name)) as layer:
                assert [m.name for m in layer.getmembers()] == ["plugin.wasm"]
                module = layer.extractfile("plugin.wasm").read()
            config = json.load(image.extractfile(entry["Config"]))
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True, timeout=60)
    assert module == (ROOT / "build" / "keygate.wasm").read_bytes()
    assert module[:4] == b"\0asm"
    assert not config["config"].get("Entrypoint") and not config["config"].get("Cmd")
