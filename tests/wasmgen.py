"""A tiny WebAssembly binary encoder for tests that need modules too large to
write as text: an ABI v1 app (memory, dr_init, dr_tick) padded with ``n``
trivial functions. Cheap to build and small on disk (~6 bytes a function),
costly to compile (~5 KB of compiler memory a function): a compile bomb."""

from __future__ import annotations

I32 = 0x7F
FUNC = 0x60
END = 0x0B
I32_CONST = 0x41


def leb(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _section(sid: int, payload: bytes) -> bytes:
    return bytes([sid]) + leb(len(payload)) + payload


def _vec(items: list[bytes]) -> bytes:
    return leb(len(items)) + b"".join(items)


def _name(s: str) -> bytes:
    return leb(len(s)) + s.encode()


def many_functions(n: int) -> bytes:
    """An app whose ``dr_init`` and ``dr_tick`` return 0, plus ``n`` unused
    functions ``() -> i32`` (function indexes 2..n+1)."""
    total = n + 2
    types = _section(1, _vec([bytes([FUNC, 0, 1, I32])]))
    funcs = _section(3, leb(total) + b"\x00" * total)
    memory = _section(5, _vec([b"\x00\x01"]))  # one memory, min 1 page, no max
    exports = _section(
        7,
        _vec([_name("memory") + b"\x02\x00", _name("dr_init") + b"\x00\x00", _name("dr_tick") + b"\x00\x01"]),
    )
    body = bytes([0, I32_CONST, 0, END])  # no locals; i32.const 0; end
    code = _section(10, leb(total) + (leb(len(body)) + body) * total)
    return b"\0asm\x01\0\0\0" + types + funcs + memory + exports + code
