#!/usr/bin/env bash
# Makes the Debian root filesystem of the local images in DIR: debootstrap (minbase) of SUITE
# from MIRROR with python3 and nginx-light, set up the way the official images run them.
# docker/build-images.sh hashes this file into the base image's tag: change it, and the base is
# built again.
#
#   docker/rootfs.sh SUITE MIRROR DIR
set -euo pipefail

suite=${1:?usage: $0 SUITE MIRROR DIR} mirror=${2:?} rootfs=${3:?}
packages=python3,python-is-python3,nginx-light

debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror"
# Like the official nginx image: logs to the container's output, no default site on :80 (the
# key service's server block comes from the compose file's mount).
ln -sf /dev/stdout "$rootfs/var/log/nginx/access.log"
ln -sf /dev/stderr "$rootfs/var/log/nginx/error.log"
rm -f "$rootfs/etc/nginx/sites-enabled/default"
# The package cache is not part of the image.
rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
