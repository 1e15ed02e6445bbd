#!/usr/bin/env python3
"""Generates envoy/bench.yaml: one Envoy, one listener per contender, the same key set for all.

Every contender checks `x-api-key` against the same N bench keys, strips it and tells the
upstream who the caller is:

  floor      no filter: the cost of proxying alone (floor_deny: no filter, the route answers
             401 itself; the floor of unknown-key traffic)
  native     Envoy's api_key_auth filter (plaintext keys in its config, by its design)
  lua        a Lua filter doing the same table lookup
  ext_authz  the ext_authz HTTP filter calling a second listener (native check + direct_response)
  keygate    keygate.wasm with the N keys inline, as SHA-256 digests only

The upstream is a direct_response listener in the same Envoy, so it is never the bottleneck and
costs every contender the same. The bench keys are fake and derived from their index, so the
load generator can recompute the plaintext; keygate's config holds only their digests.

    python3 bench/bench_config.py > envoy/bench.yaml           # the shipped file (1,000 keys)
    python3 bench/bench_config.py --keys 100000 --extra before  # variants used by bench/run.py
"""
import argparse
import hashlib
import json
import sys

KEY_PREFIX = "kgb_"
# Ports as shipped; bench/run.py swaps every one for a free port (like tests/keygate_stack.py).
PORTS = {
    "floor": 10000,  # the shipped listener port (the compose checks expect 10000 and 9901)
    "native": 10001,
    "lua": 10002,
    "ext_authz": 10003,
    "keygate": 10004,
    "keygate_before": 10005,
    "keygate_100k": 10006,
    "floor_deny": 10007,
    "wasm_floor": 10008,
    "keygate_service": 10010,
    "keyservice_100k": 10011,
    "authz_service": 10009,
    "keygate_native": 10012,
    "keygate_native_100k": 10013,
    "wasm_deny": 10014,
    "module_floor": 10015,
    "module_deny": 10016,
    "upstream": 8081,
    "admin": 9901,
}
CONTENDERS = ["floor", "native", "lua", "ext_authz", "keygate"]
# Contenders measured with one filter per listener only: the large key sets (one copy is enough)
# and the 401-only filter (it answers before a second copy would run).
SINGLE_ONLY = ("keygate_100k", "keygate_service", "keygate_native_100k", "wasm_deny", "module_deny")
# The floor of unknown-key traffic: no filter, the route itself answers 401 locally.
FLOOR_DENY = "floor_deny"


def bench_key(i):
    """The plaintext of bench key i: fake, deterministic, well-formed for every contender."""
    return KEY_PREFIX + hashlib.sha256(f"keygate-bench-{i}".encode()).hexdigest()[:32]


def key_id(i):
    return f"bench-{i:07d}"


def key_set_document(n, serial=1):
    """The key service's document for the key-service contender: `{"serial": S, "keys": [...]}`,
    digests only (keygate refuses a document without a serial, or one not above the serial it holds)."""
    records = ",\n".join(
        json.dumps({"id": key_id(i), "tenant": f"tenant-{i % 50}",
                    "secret_sha256": hashlib.sha256(bench_key(i).encode()).hexdigest()})
        for i in range(n))
    return f'{{"serial": {serial}, "keys": [\n' + records + "\n]}\n"


# keygate in full key-service mode: the whole set is fetched once (refresh at the maximum, so no
# refetch lands inside a measurement) into shared data, and every VM loads it from there.
KEYGATE_SERVICE_CONFIG = """{
  "name": "bench100kservice",
  "credentials": [{"in": "header", "name": "x-api-key", "prefixes": ["kgb_"]}],
  "key_service": {"cluster": "keyservice_100k", "authority": "keys.internal", "path": "/keys.json",
                  "refresh_seconds": 86400, "timeout_ms": 60000, "max_stale_seconds": 0,
                  "on_unavailable": "deny"}
}
"""
KEY_SET_FILE = ".tmp/bench/keys-100k.json"


def keygate_config(n, name="bench"):
    """keygate's plugin configuration: the N keys as digests, an id and a tenant each."""
    records = ",\n".join(
        json.dumps({"id": key_id(i), "tenant": f"tenant-{i % 50}",
                    "secret_sha256": hashlib.sha256(bench_key(i).encode()).hexdigest()},
                   separators=(", ", ": "))
        for i in range(n)
    )
    return (
        "{\n"
        f'  "name": "{name}",\n'
        '  "credentials": [{"in": "header", "name": "x-api-key", "prefixes": ["' + KEY_PREFIX + '"]}],\n'
        '  "keys": [\n' + records + "\n  ]\n}\n"
    )


def indent(text, spaces):
    pad = " " * spaces
    return "".join(pad + line if line.strip() else line for line in text.splitlines(True))


def hcm(stat_prefix, http_filters, route=None):
    route = route or "route: { cluster: upstream }"
    return f"""    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {stat_prefix}
          normalize_path: true
          merge_slashes: true
          path_with_escaped_slashes_action: REJECT_REQUEST
          common_http_protocol_options: {{ headers_with_underscores_action: REJECT_REQUEST }}
          route_config:
            virtual_hosts:
            - name: {stat_prefix}
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                {route}
          http_filters:
{http_filters}          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"""


def listener(name, port, body):
    return f"""  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
{body}"""


def native_filter(n, strip=True, name="envoy.filters.http.api_key_auth"):
    creds = "".join(f"              - {{ key: {bench_key(i)}, client: {key_id(i)} }}\n" for i in range(n))
    return f"""          - name: {name}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth
              key_sources: [{{ header: x-api-key }}]
              forwarding: {{ header: x-client-id, hide_credentials: {str(strip).lower()} }}
              credentials:
{creds}"""


def lua_filter(n, strip=True, name="envoy.filters.http.lua"):
    table = "".join(f'  ["{bench_key(i)}"] = "{key_id(i)}",\n' for i in range(n))
    source = (
        "local clients = {\n" + table + "}\n"
        "function envoy_on_request(handle)\n"
        "  local headers = handle:headers()\n"
        '  local client = clients[headers:get("x-api-key") or ""]\n'
        "  if client == nil then\n"
        '    handle:respond({[":status"] = "401", ["content-type"] = "text/plain"}, "Client authentication failed.")\n'
        "    return\n"
        "  end\n"
        + ('  headers:remove("x-api-key")\n' if strip else "")
        + '  headers:replace("x-client-id", client)\n'
        "end\n"
    )
    return f"""          - name: {name}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code:
                inline_string: |
{indent(source, 18)}"""


def ext_authz_filter(cluster_name="authz_service", name="envoy.filters.http.ext_authz"):
    return f"""          - name: {name}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              http_service:
                server_uri: {{ uri: "http://127.0.0.1", cluster: {cluster_name}, timeout: 1s }}
                authorization_request:
                  allowed_headers: {{ patterns: [{{ exact: x-api-key }}] }}
                authorization_response:
                  allowed_upstream_headers: {{ patterns: [{{ exact: x-client-id }}] }}
"""


def authz_route(strip=True):
    """The authorization service's answer: 200 with the client id the native check found, and
    (unless chained) the instruction to strip the key, which ext_authz honours."""
    remove = "\n                - header: { key: x-envoy-auth-headers-to-remove, value: x-api-key }"
    return ("""direct_response: { status: 200 }
                response_headers_to_add:
                - header: { key: x-client-id, value: "%REQ(x-client-id)%" }""" + (remove if strip else ""))


UPSTREAM_ROUTE = 'direct_response: { status: 200, body: { inline_string: "ok" } }'
DENY_ROUTE = 'direct_response: { status: 401, body: { inline_string: "Client authentication failed." } }'


def keygate_filter(vm_id, wasm, config_json, name="keygate"):
    return f"""          - name: {name}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: keygate
                root_id: keygate
                failure_policy: FAIL_CLOSED
                vm_config:
                  vm_id: {vm_id}
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: {wasm} }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: |
{indent(config_json, 20)}"""


def keygate_module_filter(config_json, name="keygate", module="keygate"):
    """keygate as the Envoy dynamic module build/lib<module>.so (build/libkeygate.so unless an A/B
    names another copy), the same JSON (`--extra native`; Envoy needs
    ENVOY_DYNAMIC_MODULES_SEARCH_PATH=build)."""
    return f"""          - name: {name}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config: {{ name: {module} }}
              filter_name: keygate
              filter_config:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: |
{indent(config_json, 18)}"""


def cluster(name, port):
    return f"""  - name: {name}
    type: STATIC
    load_assignment:
      cluster_name: {name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}]
"""


def contender_filters(contender, n, chain=1):
    """The http_filters of one contender's listener. With `chain` > 1 the filter is repeated so a
    benchmark can amplify its cost; every copy then leaves the key in place (no stripping) so the
    next copy does the whole check again."""
    strip = chain == 1
    keygate_json = keygate_config(n)
    if not strip:
        keygate_json = keygate_json.replace('"name": "bench",', '"name": "bench", "strip_credentials": false,', 1)
    one = {
        "floor": lambda i: "",
        "native": lambda i: native_filter(n, strip, f"api_key_auth_{i}" if chain > 1 else
                                          "envoy.filters.http.api_key_auth"),
        "lua": lambda i: lua_filter(n, strip, f"lua_{i}" if chain > 1 else "envoy.filters.http.lua"),
        "ext_authz": lambda i: ext_authz_filter("authz_service" if strip else "authz_service_chained",
                                                f"ext_authz_{i}" if chain > 1 else "envoy.filters.http.ext_authz"),
        "keygate": lambda i: keygate_filter("bench-keygate", "build/keygate.wasm", keygate_json,
                                            f"keygate_{i}" if chain > 1 else "keygate"),
        "keygate_before": lambda i: keygate_filter("bench-keygate-before", "build/keygate-before.wasm",
                                                   keygate_json, f"keygate_before_{i}" if chain > 1 else "keygate"),
        "keygate_100k": lambda i: keygate_filter("bench-keygate-100k", "build/keygate.wasm",
                                                 keygate_config(100_000, "bench100k"), "keygate"),
        "keygate_service": lambda i: keygate_filter("bench-keygate-service", "build/keygate.wasm",
                                                    KEYGATE_SERVICE_CONFIG, "keygate"),
        "keygate_native": lambda i: keygate_module_filter(keygate_json, f"keygate_native_{i}" if chain > 1
                                                          else "keygate"),
        "keygate_native_100k": lambda i: keygate_module_filter(keygate_config(100_000, "bench100knative")),
        "wasm_floor": lambda i: keygate_filter("bench-empty", "build/bench-empty.wasm", "{}\n",
                                               f"empty_{i}" if chain > 1 else "empty"),
        "wasm_deny": lambda i: keygate_filter("bench-deny", "build/bench-deny.wasm", "{}\n", "deny"),
        "module_floor": lambda i: keygate_module_filter("{}\n", f"empty_module_{i}" if chain > 1 else "empty_module",
                                                        module="bench_empty"),
        "module_deny": lambda i: keygate_module_filter("{}\n", "deny_module", module="bench_deny"),
    }[contender]
    return "".join(one(i) for i in range(chain))


def render(n, extra=(), chain=1):
    """The bench config. `extra` adds listeners bench/run.py uses but does not ship (their wasm
    files exist only after `make bench` builds them): `empty` (bench/empty-filter, a Rust
    proxy-wasm filter that does nothing, and the same filter built to answer keygate's unknown-key
    401 itself, the floor of the 401 path; one filter only; and the same two as Envoy dynamic
    modules, bench/empty-module: build/libbench_empty.so and build/libbench_deny.so), `before` (build/keygate-before.wasm, same keys) and
    `100k` (keygate with 100,000 inline keys). `chain` repeats every contender's filter."""
    names = list(CONTENDERS)
    names += [name for key, name in (("empty", "wasm_floor"), ("empty", "wasm_deny"), ("empty", "module_floor"),
                                     ("empty", "module_deny"), ("before", "keygate_before"),
                                     ("100k", "keygate_100k"), ("100k", "keygate_service"),
                                     ("native", "keygate_native")) if key in extra]
    if "native" in extra and "100k" in extra:
        names.append("keygate_native_100k")
    if chain > 1:
        names = [n for n in names if n not in SINGLE_ONLY]
    listeners = [listener(name, PORTS[name], hcm(name, contender_filters(name, n, chain))) for name in names]
    listeners.insert(1, listener("floor_deny", PORTS["floor_deny"], hcm("floor_deny", "", route=DENY_ROUTE)))
    authz = "authz_service" if chain == 1 else "authz_service_chained"
    listeners.append(listener(authz, PORTS["authz_service"],
                              hcm(authz, native_filter(n, strip=chain == 1), route=authz_route(chain == 1))))
    listeners.append(listener("upstream", PORTS["upstream"], hcm("upstream", "", route=UPSTREAM_ROUTE)))
    if "keygate_service" in names:
        # The key service: the 100k-key document (written by bench/run.py) as a direct response.
        listeners.append(listener("keyservice_100k", PORTS["keyservice_100k"], hcm(
            "keyservice_100k", "",
            route=f'direct_response: {{ status: 200, body: {{ filename: {KEY_SET_FILE} }} }}')
            .replace("          route_config:\n",
                     "          route_config:\n            max_direct_response_body_size_bytes: 33554432\n")))
    return (
        "# Generated by bench/bench_config.py; `make bench` runs it (see BENCHMARKS.md). Do not edit.\n"
        "# One listener per contender, all checking x-api-key against the same "
        f"{n:,} fake bench keys.\n"
        "# native, lua and the authz service hold the plaintext keys (they have no hashed form);\n"
        "# keygate holds SHA-256 digests only. The keys are fake, derived from their index.\n"
        "admin:\n"
        f"  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {PORTS['admin']} }} }}\n"
        "static_resources:\n"
        "  listeners:\n"
        + "".join(listeners)
        + "  clusters:\n"
        + cluster("upstream", PORTS["upstream"])
        + cluster(authz, PORTS["authz_service"])
        + (cluster("keyservice_100k", PORTS["keyservice_100k"]) if "keygate_service" in names else "")
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1000, help="keys per contender (default 1000)")
    parser.add_argument("--extra", action="append", default=[], choices=["empty", "before", "100k", "native"])
    parser.add_argument("--chain", type=int, default=1, help="repeat each contender's filter")
    args = parser.parse_args()
    sys.stdout.write(render(args.keys, args.extra, args.chain))


if __name__ == "__main__":
    main()
