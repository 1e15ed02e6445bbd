#!/usr/bin/env python3
"""Drops the per-request proxy-wasm callbacks keygate does not implement from the module's exports.

Envoy's proxy-wasm host skips a callback the module does not export. The Rust SDK exports every
callback whether or not the filter implements it, so each request paid for VM entries that only
ran the SDK's default (continue, or nothing): request body and trailers, response body and
trailers, on_log, on_done. Each entry costs Envoy a call into V8. `make build` runs this on the
module cargo builds; behavior is unchanged because a missing export means exactly that default.

An export stays whenever `fn on_<callback>` appears anywhere under the adapter directory, so
implementing a callback brings its export back without touching this file. Only the per-request
HTTP callbacks, and the network, gRPC, queue and foreign-function callbacks an HTTP filter is
never sent, are candidates; everything else is copied as it is.

    python3 tools/strip_callbacks.py target/.../keygate.wasm build/keygate.wasm src/host/wasm
"""
import re
import sys
from pathlib import Path

# Export the host calls per HTTP stream -> the SDK trait method that implements it.
STREAM_CALLBACKS = {
    "proxy_on_request_body": ("on_http_request_body",),
    "proxy_on_request_trailers": ("on_http_request_trailers",),
    "proxy_on_response_headers": ("on_http_response_headers",),
    "proxy_on_response_body": ("on_http_response_body",),
    "proxy_on_response_trailers": ("on_http_response_trailers",),
    "proxy_on_log": ("on_log",),
    "proxy_on_done": ("on_done",),
}
# Callbacks an HTTP filter that makes no gRPC calls and uses no queues is never sent. Dropping
# their exports costs nothing per request; it lets wasm-opt remove the SDK code behind them.
UNUSED_CALLBACKS = {
    "proxy_on_queue_ready": ("on_queue_ready",),
    "proxy_on_new_connection": ("on_new_connection",),
    "proxy_on_downstream_data": ("on_downstream_data",),
    "proxy_on_downstream_connection_close": ("on_downstream_close",),
    "proxy_on_upstream_data": ("on_upstream_data",),
    "proxy_on_upstream_connection_close": ("on_upstream_close",),
    "proxy_on_grpc_receive_initial_metadata": ("on_grpc_stream_initial_metadata",),
    "proxy_on_grpc_receive": ("on_grpc_call_response", "on_grpc_stream_message"),
    "proxy_on_grpc_receive_trailing_metadata": ("on_grpc_stream_trailing_metadata",),
    "proxy_on_grpc_close": ("on_grpc_call_response", "on_grpc_stream_close"),
    "proxy_on_foreign_function": ("on_foreign_function",),
}
EXPORT_SECTION = 7


def read_leb128(data, at):
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def leb128(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def implemented_callbacks(adapter_dir):
    names = set()
    for source in Path(adapter_dir).rglob("*.rs"):
        names.update(re.findall(r"\bfn\s+(on_\w+)\s*[(<]", source.read_text()))
    return names


def strip(module, drop):
    """The module with the exports named in `drop` removed; every other byte is kept."""
    if module[:4] != b"\0asm":
        raise ValueError("not a wasm module")
    out, at, removed = bytearray(module[:8]), 8, []
    while at < len(module):
        section_id = module[at]
        size, body_at = read_leb128(module, at + 1)
        body = module[body_at:body_at + size]
        at = body_at + size
        if section_id == EXPORT_SECTION:
            count, pos = read_leb128(body, 0)
            kept = []
            for _ in range(count):
                start = pos
                name_len, pos = read_leb128(body, pos)
                name = body[pos:pos + name_len].decode()
                _, pos = read_leb128(body, pos + name_len + 1)  # kind byte, then index
                if name in drop:
                    removed.append(name)
                else:
                    kept.append(body[start:pos])
            body = leb128(len(kept)) + b"".join(kept)
        out += bytes([section_id]) + leb128(len(body)) + body
    return bytes(out), removed


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    source, target, adapter_dir = sys.argv[1:]
    implemented = implemented_callbacks(adapter_dir)
    drop = {export for export, methods in {**STREAM_CALLBACKS, **UNUSED_CALLBACKS}.items()
            if not implemented.intersection(methods)}
    module, removed = strip(Path(source).read_bytes(), drop)
    Path(target).write_bytes(module)
    print(f"{target}: dropped unimplemented callbacks {', '.join(sorted(removed)) or '(none)'}")


if __name__ == "__main__":
    main()
