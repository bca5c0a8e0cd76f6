"""The fast Wasm boundary: wasmtime's *unchecked* function API through ctypes.

Everything that touches wasmtime-py internals or raw C symbols lives here,
so the rest of the sandbox uses the public API. ``available()`` says whether
this path can be used: the pinned wasmtime major version and every raw
symbol must be present; otherwise the sandbox falls back to the stock path
and logs which one is active.

Why it is faster: the stock path builds type objects and ``Val`` wrappers on
every crossing (~20-27 us); here a host function receives the raw argument
array and writes its result in place (~1 us), and a call into an export
passes a preallocated raw buffer (~3 us).

Invariants kept from the stock path (the sandbox tests run on both):
- a host function's Python exception never crosses into Wasm: it becomes a
  trap of that call, and the original exception is kept for classification;
- an out-of-bounds pointer returns the function's documented error code;
- guest memory is accessed only through ``FastMemory``, which bounds-checks
  every (ptr, len) after masking to u32. The engine is configured with
  ``memory_may_move = False`` (memory is reserved up front, 4 GiB for 32-bit
  memories), so the base address is fixed; the cached size is refreshed
  from wasmtime whenever an access goes beyond it, i.e. after ``memory.grow``.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
from collections.abc import Callable
from typing import Any

import wasmtime

from hostfuncs.context import AppContext
from hostfuncs.memory import U32, GuestMemoryError
from hostfuncs.registry import HostFunc

PINNED_MAJOR = 50
_REQUIRED = (
    "wasmtime_linker_define_func_unchecked",
    "wasmtime_func_call_unchecked",
    "wasmtime_func_unchecked_callback_t",
    "wasmtime_trap_new",
    "wasmtime_memory_data",
    "wasmtime_memory_data_size",
    "wasmtime_val_raw",
)


def available() -> tuple[bool, str]:
    try:
        from wasmtime import _bindings as b
    except ImportError as e:  # pragma: no cover - depends on the installed wasmtime
        return False, f"wasmtime raw bindings not importable ({e})"
    version = importlib.metadata.version("wasmtime")
    if int(version.split(".")[0]) != PINNED_MAJOR:
        return False, f"wasmtime {version} is not the pinned major version {PINNED_MAJOR}"
    missing = [s for s in _REQUIRED if not hasattr(b, s)]
    if missing:
        return False, f"wasmtime {version} lacks {', '.join(missing)}"
    return True, f"unchecked raw calls (wasmtime {version})"


@functools.cache
def _b() -> Any:
    """wasmtime's raw bindings, looked up once (an import statement per call goes
    through importlib's ``_handle_fromlist``: 340 ns here, against 60)."""
    from wasmtime import _bindings

    return _bindings


class FastMemory:
    """GuestMemory with a cached base and size (see the module docstring)."""

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        b = _b()
        self._ctx = store._context()
        self._mem = ctypes.byref(memory._memory)
        self._data = b.wasmtime_memory_data
        self._data_size = b.wasmtime_memory_data_size
        self._base = 0
        self._size = -1
        self._view: memoryview = memoryview(b"")
        self._refresh()

    def _refresh(self) -> None:
        size = self._data_size(self._ctx, self._mem)
        if size != self._size:
            self._base = ctypes.addressof(self._data(self._ctx, self._mem).contents) if size else 0
            self._size = size
            self._view = (
                memoryview((ctypes.c_ubyte * size).from_address(self._base)).cast("B")
                if size
                else memoryview(b"")
            )

    def size(self) -> int:
        self._refresh()
        return self._size

    def _check(self, ptr: int, length: int) -> tuple[int, int]:
        ptr &= U32
        length &= U32
        end = ptr + length
        if end > self._size:
            self._refresh()  # grown since we looked?
            if end > self._size:
                raise GuestMemoryError(f"range [{ptr:#x}, +{length}) outside memory of {self._size} bytes")
        return ptr, end

    def read(self, ptr: int, length: int) -> bytes:
        start, end = self._check(ptr, length)
        return self._view[start:end].tobytes()

    def write(self, ptr: int, data: bytes) -> None:
        start, end = self._check(ptr, len(data))
        self._view[start:end] = data


def deadline_setter(store: wasmtime.Store) -> Callable[[int], None]:
    """``store.set_epoch_deadline`` without re-deriving the context each call."""
    b = _b()
    fn = getattr(b, "_wasmtime_context_set_epoch_deadline", b.wasmtime_context_set_epoch_deadline)
    return functools.partial(fn, store._context())


class HostError:
    """The exception a host function raised during the current call, if any."""

    __slots__ = ("exc",)

    def __init__(self) -> None:
        self.exc: BaseException | None = None


def _trap_address(message: str) -> int:
    b = _b()
    data = message.encode("utf-8", "replace")
    trap = b.wasmtime_trap_new(ctypes.create_string_buffer(data), len(data))
    return ctypes.cast(trap, ctypes.c_void_p).value or 0


def make_callback(f: HostFunc, ctx: AppContext, errors: HostError) -> Any:
    """A raw callback for ``f``: reads params from the raw array, writes the result into it."""
    b = _b()
    impl = f.impl
    oob = f.on_bounds
    params = f.params
    n_params = len(params)
    result = f.results[0] if f.results else None

    def call(_env: Any, _caller: Any, raw: Any, _n: int) -> int:
        try:
            if n_params == 0:
                r = impl(ctx)
            elif n_params == 1:
                r = impl(ctx, getattr(raw[0], params[0]))
            elif n_params == 2:
                r = impl(ctx, getattr(raw[0], params[0]), getattr(raw[1], params[1]))
            else:
                r = impl(ctx, *[getattr(raw[i], params[i]) for i in range(n_params)])
        except GuestMemoryError:
            ctx.stats.host_errors += 1
            r = oob
        except BaseException as e:
            errors.exc = e
            return _trap_address(f"host function {f.qualname} raised {type(e).__name__}: {e}")
        if result is not None:
            setattr(raw[0], result, r)
        return 0

    return b.wasmtime_func_unchecked_callback_t(call)


_NO_FINALIZER: Any = ctypes.CFUNCTYPE(None, ctypes.c_void_p)()  # NULL: nothing to free


def define(linker: wasmtime.Linker, f: HostFunc, functype: wasmtime.FuncType, callback: Any) -> None:
    b = _b()
    mod = f.module.encode()
    name = f.name.encode()
    err = b.wasmtime_linker_define_func_unchecked(
        linker.ptr(),
        ctypes.create_string_buffer(mod),
        len(mod),
        ctypes.create_string_buffer(name),
        len(name),
        functype.ptr(),
        callback,
        None,
        _NO_FINALIZER,
    )
    if err:
        raise wasmtime.WasmtimeError._from_ptr(err)


class FastCaller:
    """Calls ``() -> i32`` / ``() -> ()`` exports through the unchecked API."""

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func, results: int) -> None:
        b = _b()
        # the raw ctypes function, not its Python wrapper: one frame less per call
        self._call_unchecked = getattr(b, "_wasmtime_func_call_unchecked", b.wasmtime_func_call_unchecked)
        self._ctx = store._context()
        self._func = ctypes.byref(func._func)
        self._raw = (b.wasmtime_val_raw * max(1, results))()
        self._trap = ctypes.POINTER(b.wasm_trap_t)()
        self._trap_ref = ctypes.byref(self._trap)
        self._results = results
        self._n = len(self._raw)

    def __call__(self) -> int | None:
        """The i32 result; raises wasmtime.Trap / WasmtimeError like the stock call."""
        err = self._call_unchecked(self._ctx, self._func, self._raw, self._n, self._trap_ref)
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)
        if self._trap:
            trap = wasmtime.Trap._from_ptr(self._trap)
            self._trap = ctypes.POINTER(_b().wasm_trap_t)()
            self._trap_ref = ctypes.byref(self._trap)
            raise trap
        return int(self._raw[0].i32) if self._results else None
