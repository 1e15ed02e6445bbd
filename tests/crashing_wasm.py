"""A tiny proxy-wasm module that traps (`unreachable`) on every request's headers: what a Rust
panic in a filter turns into inside the VM. The failure-policy tests load it in place of
keygate.wasm to show what Envoy does with a crashed VM under each `failure_policy`.

Written out byte by byte (WebAssembly binary format 1.0), so the tests need no toolchain.
"""
from pathlib import Path

I32 = 0x7F


def leb128(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def vector(items):
    return leb128(len(items)) + b"".join(items)


def name(text):
    return vector([bytes([c]) for c in text.encode()])


def section(section_id, payload):
    return bytes([section_id]) + leb128(len(payload)) + payload


def func_type(params, results):
    return b"\x60" + vector([bytes([p]) for p in params]) + vector([bytes([r]) for r in results])


I32_CONST_1, I32_CONST_1024, UNREACHABLE, END = b"\x41\x01", b"\x41\x80\x08", b"\x00", b"\x0b"

# (export name, (params, results), body instructions)
FUNCTIONS = [
    ("proxy_abi_version_0_2_1", ([], []), b""),
    ("proxy_on_memory_allocate", ([I32], [I32]), I32_CONST_1024),
    ("proxy_on_context_create", ([I32, I32], []), b""),
    ("proxy_on_vm_start", ([I32, I32], [I32]), I32_CONST_1),
    ("proxy_on_configure", ([I32, I32], [I32]), I32_CONST_1),
    ("proxy_on_request_headers", ([I32, I32, I32], [I32]), UNREACHABLE),
    ("proxy_on_done", ([I32], [I32]), I32_CONST_1),
    ("proxy_on_delete", ([I32], []), b""),
]


def module_bytes():
    types = section(1, vector([func_type(*sig) for _, sig, _ in FUNCTIONS]))
    functions = section(3, vector([leb128(i) for i in range(len(FUNCTIONS))]))
    memory = section(5, vector([b"\x00\x01"]))  # one 64 KiB page, no maximum
    exports = section(7, vector([name("memory") + b"\x02\x00"]
                                + [name(n) + b"\x00" + leb128(i) for i, (n, _, _) in enumerate(FUNCTIONS)]))
    bodies = []
    for _, _, instructions in FUNCTIONS:
        body = vector([]) + instructions + END  # no locals
        bodies.append(leb128(len(body)) + body)
    code = section(10, vector(bodies))
    return b"\x00asm\x01\x00\x00\x00" + types + functions + memory + exports + code


def write(path):
    path = Path(path)
    path.write_bytes(module_bytes())
    return path
