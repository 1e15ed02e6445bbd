#!/bin/sh
# Starts Envoy inside the compose stack on one shipped config, envoy/$KEYGATE_CONFIG, unchanged
# except for two bind addresses.
#
# The shipped configs bind the listener (10000) and the admin (9901) to 127.0.0.1, which is right
# on a developer machine. Docker publishes a port by forwarding to the container's network
# interface, never to its loopback, so inside a container those two must bind 0.0.0.0 (the
# container's own interfaces; docker-compose.yaml publishes them on the host's 127.0.0.1 only).
# Upstreams stay on 127.0.0.1: the echo, sandbox and key-service containers share this
# container's network namespace. Everything else, keygate.wasm included, is read as shipped.
#
# KEYGATE_KEYSERVICE_ADDRESS (the fleet, envoy/compose/fleet.yaml) moves the key service from
# 127.0.0.1:8090 to that IP address, the key-service container's on the fleet's network.
# Run from the directory holding envoy/ and build/ (the compose working_dir, /keygate).
# KEYGATE_RENDER_ONLY=1 writes the rendered config and exits (the static checks use it).
set -eu

config_name="${KEYGATE_CONFIG:-demo.yaml}"
source_config="envoy/${config_name}"
rendered="${KEYGATE_RENDERED:-/tmp/keygate-envoy.yaml}"

if [ ! -f "$source_config" ]; then
  echo "keygate compose: no config $source_config; KEYGATE_CONFIG must name one of:" >&2
  for f in envoy/*.yaml; do
    case "$f" in *docker-compose*) ;; *) echo "  ${f#envoy/}" >&2 ;; esac
  done
  exit 2
fi
if [ ! -f build/keygate.wasm ]; then
  echo "keygate compose: build/keygate.wasm is missing; run 'make build' on the host first" >&2
  exit 2
fi

sed -e 's/address: 127\.0\.0\.1, port_value: 10000 }/address: 0.0.0.0, port_value: 10000 }/' \
    -e 's/address: 127\.0\.0\.1, port_value: 9901 }/address: 0.0.0.0, port_value: 9901 }/' \
    "$source_config" > "$rendered"

if [ -n "${KEYGATE_KEYSERVICE_ADDRESS:-}" ]; then
  sed -i "s/address: 127\.0\.0\.1, port_value: 8090 }/address: ${KEYGATE_KEYSERVICE_ADDRESS}, port_value: 8090 }/" \
    "$rendered"
  if ! grep -q "address: ${KEYGATE_KEYSERVICE_ADDRESS}, port_value: 8090 }" "$rendered"; then
    echo "keygate compose: $source_config has no key service at 'address: 127.0.0.1, port_value: 8090 }'" \
         "to move to ${KEYGATE_KEYSERVICE_ADDRESS}" >&2
    exit 2
  fi
fi

for port in 10000 9901; do
  if ! grep -q "address: 0\.0\.0\.0, port_value: ${port} }" "$rendered"; then
    echo "keygate compose: $source_config does not bind 127.0.0.1:${port} in the shipped form" \
         "'address: 127.0.0.1, port_value: ${port} }'; cannot publish it from the container" >&2
    exit 2
  fi
done

if [ "${KEYGATE_RENDER_ONLY:-0}" = "1" ]; then
  exit 0
fi
echo "keygate compose: starting Envoy on $source_config (listener :10000, admin :9901)"
exec envoy -c "$rendered" --concurrency 2 --log-level "${KEYGATE_LOG_LEVEL:-info}"
