# Debian's python3 (as `python`, like the official python image) for the echo upstreams.
ARG BASE
FROM ${BASE}
CMD ["python3"]
