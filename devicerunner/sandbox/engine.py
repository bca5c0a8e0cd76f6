"""The wasmtime sandbox: one Engine per daemon, one Store per app instance.

What this module owns:
- the Engine and its configuration (epoch interruption on, so any call
  into an app can be cut off; a fixed config so the compile cache is valid);
- the epoch ticker: a thread that advances the engine's epoch every
  ``EPOCH_PERIOD_S`` while calls into Wasm keep happening, and sleeps after
  ``IDLE_AFTER_S`` without any (a call costs one attribute write, no lock);
- the call path: the fast unchecked path (devicerunner.sandbox.fastpath) when
  available, else the stock wasmtime-py API; both give identical results;
- bounded compiles (``compile_bounded``): a module not compiled before is
  compiled in a child process under memory and time limits
  (devicerunner.sandbox.compiler), never in this process, so a compile bomb costs
  the child, not the daemon; the daemon compiles every module this way;
- the AOT compile cache, keyed by wasmtime version, engine config and the
  module's sha256, holding only artifacts this process compiled itself:
  each file carries an HMAC under a device-local key, and a file whose HMAC
  does not match is never deserialized (deserializing foreign bytes would
  run foreign machine code);
- link-time capability enforcement: a module importing anything outside
  its grant fails here, naming every offending ``module.function`` and the
  capability it would need, before any of its code runs;
- calls into an app, with a CPU deadline and classification of whatever
  comes back (ok, non-zero code, trap, overrun).

It never: blocks on I/O inside a call, lets an exception from a call
escape to the caller unclassified, or shares wasmtime type objects between
engines (that aborts the process).

Size: over 400 lines on purpose -- the engine config, the compile cache key,
the linker and the call classification must agree with each other (a cache
entry is only valid for this exact engine config), so they stay together.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import importlib.metadata
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import wasmtime

from devicerunner.errors import (
    AbiError,
    AppInitError,
    CompileLimitError,
    LinkError,
    ModuleInvalidError,
    SandboxError,
)
from devicerunner.runtime.fsutil import atomic_write, makedirs
from devicerunner.sandbox import compiler
from devicerunner.sandbox.compiler import ENGINE_CONFIG, describe
from devicerunner.sandbox.compiler import memory_pages as _memory_pages
from hostfuncs.context import AppContext
from hostfuncs.memory import GuestMemoryError, check_range
from hostfuncs.registry import CAPABILITIES, NAMESPACE_TO_CAPABILITY, REGISTRY, HostFunc
from hostfuncs.wasi import AppExit

log = logging.getLogger(__name__)

EPOCH_PERIOD_S = 0.010
IDLE_AFTER_S = 2.0
MIN_HARD_LIMIT_S = 0.050
WASMTIME_VERSION = importlib.metadata.version("wasmtime")
MAX_COMPILED_IN_MEMORY = 32
"""Compiled modules kept in memory (least recently used dropped first): one
per release ever seen grew without bound on a long-lived daemon or simulator.
A dropped one comes back from the disk cache in ~40 us."""
COMPILE_OUTPUT_SLACK = 4096
"""Bytes a compiler child may write beyond its memory cap (headers): more is refused."""

ABI_EXPORTS: dict[str, bool] = {"dr_init": True, "dr_tick": True, "dr_health": False}
"""ABI v1 exports: name -> required. Each is () -> i32."""


def hard_limit_s(tick_budget_ms: float) -> float:
    """How long one call may run before it is cut: max(2 x budget, 50 ms).

    The epoch ticker adds up to one period of lateness, so the deadline is
    set one period early to keep the promise.
    """
    return max(2 * tick_budget_ms / 1000.0, MIN_HARD_LIMIT_S) - EPOCH_PERIOD_S


class _EpochTicker:
    """Advances the engine epoch every period while calls keep coming.

    Deadlines are relative to the epoch at the start of each call, so extra
    increments between calls are harmless; what matters is that the epoch
    moves while a call runs. ``touch`` (once per call) is an attribute write
    unless the ticker is asleep, which only happens after IDLE_AFTER_S.
    """

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._used = False
        self.sleeping = True
        self._stopped = False
        self.epoch = 0
        """Mirrors the engine epoch; bumped *before* the engine's, so a reader
        that sees an old value never trusts a deadline the engine has moved past."""
        self._thread = threading.Thread(target=self._run, name="epoch-ticker", daemon=True)
        self._thread.start()

    def touch(self) -> None:
        self._used = True
        if self.sleeping:
            with self._cond:
                self.sleeping = False
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        idle_periods = int(IDLE_AFTER_S / EPOCH_PERIOD_S)
        quiet = 0
        with self._cond:
            while not self._stopped:
                if self.sleeping:
                    self._cond.wait()
                    quiet = 0
                    continue
                self._cond.wait(EPOCH_PERIOD_S)
                self.epoch += 1
                self._engine.increment_epoch()
                if self._used:
                    self._used, quiet = False, 0
                else:
                    quiet += 1
                    if quiet >= idle_periods:
                        self.sleeping = True


class Outcome(Enum):
    OK = "ok"
    ERROR = "error"  # the export returned non-zero
    TRAP = "trap"
    OVERRUN = "overrun"  # cut by the CPU deadline


class CallResult(NamedTuple):
    # a NamedTuple, not a frozen dataclass: built on every tick, ~4x cheaper
    outcome: Outcome
    code: int
    message: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


class StockMemory:
    """GuestMemory over a wasmtime Memory, re-reading base and size every call
    (so ``memory.grow`` moving the buffer can never leave a stale pointer)."""

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory) -> None:
        self._store = store
        self._memory = memory

    def size(self) -> int:
        return self._memory.data_len(self._store)

    def _base(self) -> int:
        return ctypes.addressof(self._memory.data_ptr(self._store).contents)

    def read(self, ptr: int, length: int) -> bytes:
        ptr, length = check_range(ptr, length, self._memory.data_len(self._store))
        return ctypes.string_at(self._base() + ptr, length)

    def write(self, ptr: int, data: bytes) -> None:
        ptr, _ = check_range(ptr, len(data), self._memory.data_len(self._store))
        ctypes.memmove(self._base() + ptr, data, len(data))


@dataclass(frozen=True)
class CompiledModule:
    sha256: str
    module: wasmtime.Module
    meta: dict[str, Any]
    """Import and export signatures, computed once at compile time and kept in
    the (HMAC-protected) cache entry: walking wasmtime-py's type objects costs
    more than deserializing the module."""
    from_cache: bool

    @property
    def imports(self) -> list[tuple[str, str, str, tuple[str, ...], tuple[str, ...]]]:
        return [(m, n, k, tuple(p), tuple(r)) for m, n, k, p, r in self.meta["imports"]]

    @property
    def exports(self) -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]:
        return {n: (k, tuple(p), tuple(r)) for n, (k, p, r) in self.meta["exports"].items()}

    @property
    def memory_pages(self) -> int:
        """Initial size, in 64 KiB pages, of the exported memory (0 if none)."""
        pages = self.meta.get("memory_pages")
        if pages is None:  # a cache entry written before this field existed
            pages = self.meta["memory_pages"] = _memory_pages(self.module)
        return int(pages)


@dataclass(frozen=True)
class CompileLimits:
    """What compiling one candidate module may cost (devicerunner.sandbox.compiler)."""

    memory_bytes: int = 1024**3
    """Address space of the compiler process (RLIMIT_AS), interpreter included (~50 MB)."""
    timeout_s: float = 120.0


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 16 * 1024 * 1024
    tick_budget_ms: float = 10.0
    table_elements: int = 10_000


class Sandbox:
    """One per daemon (or per simulated device group).

    ``path``: "fast" (unchecked raw calls; error if unavailable), "stock"
    (the public wasmtime-py API) or "auto" (fast when available, else stock,
    with a warning saying why).
    """

    def __init__(self, cache_dir: Path | None = None, path: str = "auto") -> None:
        from devicerunner.sandbox import fastpath

        ok, why = fastpath.available()
        if path == "auto":
            path = "fast" if ok else "stock"
            if not ok:
                log.warning("sandbox: stock call path active (fast path unavailable: %s)", why)
        elif path == "fast" and not ok:
            raise SandboxError(f"fast call path unavailable: {why}")
        elif path not in ("fast", "stock"):
            raise ValueError(f"unknown sandbox path {path!r}")
        self.path = path
        log.debug("sandbox: %s call path", path)
        self.engine = wasmtime.Engine(compiler.engine_config())
        self._ticker = _EpochTicker(self.engine)
        self._functypes: dict[tuple[tuple[str, ...], tuple[str, ...]], wasmtime.FuncType] = {}
        self._modules: OrderedDict[str, CompiledModule] = OrderedDict()
        self.max_modules = MAX_COMPILED_IN_MEMORY
        self._lock = threading.Lock()
        self._compiling: dict[str, threading.Lock] = {}
        """sha256 -> held while a child compiles it (one child per module at a time)."""
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._cache_key: bytes | None = None

    def close(self) -> None:
        self._ticker.stop()

    @property
    def modules_in_memory(self) -> int:
        """Compiled modules held in memory (at most ``max_modules``)."""
        with self._lock:
            return len(self._modules)

    # -- compile + cache --------------------------------------------------

    def _hmac_key(self) -> bytes:
        assert self.cache_dir is not None
        if self._cache_key is None:
            key_path = self.cache_dir / ".cache-key"
            try:
                with open(key_path, "rb") as f:
                    key = f.read(33)  # a key is 32 bytes: anything else is replaced
            except FileNotFoundError:
                key = b""
            if len(key) != 32:
                makedirs(self.cache_dir, 0o700)
                key = os.urandom(32)
                atomic_write(key_path, key, mode=0o600)
            self._cache_key = key
        return self._cache_key

    def _cache_path(self, sha: str) -> Path:
        assert self.cache_dir is not None
        ident = f"{WASMTIME_VERSION}|{ENGINE_CONFIG}|{sha}".encode()
        return self.cache_dir / (hashlib.sha256(ident).hexdigest()[:40] + ".cwasm")

    def compile(self, wasm: bytes) -> CompiledModule:
        """Compile (or load from cache) ``wasm``; raises ModuleInvalidError."""
        if is_component(wasm):
            raise ModuleInvalidError(COMPONENT_REFUSED)
        sha = hashlib.sha256(wasm).hexdigest()
        hit = self._recall(sha)
        if hit is not None:
            return hit
        cached = self._load_cached(sha, max_bytes=_cache_bound(wasm))
        if cached is not None:
            module, meta = cached
            from_cache = True
        else:
            from_cache = False
            try:
                module = wasmtime.Module(self.engine, wasm)
            except wasmtime.WasmtimeError as e:
                raise ModuleInvalidError(f"not a valid WebAssembly module: {_first_line(e)}") from e
            meta = describe(module)
            self._store_cached(sha, module, meta)
        return self._remember(CompiledModule(sha, module, meta, from_cache))

    def _recall(self, sha: str) -> CompiledModule | None:
        with self._lock:
            hit = self._modules.get(sha)
            if hit is not None:
                self._modules.move_to_end(sha)
        return hit

    def _remember(self, compiled: CompiledModule) -> CompiledModule:
        with self._lock:
            self._modules[compiled.sha256] = compiled
            self._modules.move_to_end(compiled.sha256)
            while len(self._modules) > self.max_modules:
                self._modules.popitem(last=False)
        return compiled

    def _load_cached(self, sha: str, max_bytes: int) -> tuple[wasmtime.Module, dict[str, Any]] | None:
        """A cache entry this device wrote, else None (and the module is compiled
        again). ``max_bytes``: a larger file is not even read (planted, or damaged)."""
        if self.cache_dir is None:
            return None
        path = self._cache_path(sha)
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size > max_bytes:
                    log.warning("compile cache entry %s is implausibly large; recompiling", path.name)
                    return None
                blob = f.read()
        except OSError:
            return None
        tag, payload = blob[:32], blob[32:]
        expect = hmac.new(self._hmac_key(), payload, hashlib.sha256).digest()
        if not hmac.compare_digest(tag, expect):
            log.warning("compile cache entry %s failed its HMAC; recompiling", path.name)
            return None
        try:
            meta, serialized = compiler.unpack(payload)
            return wasmtime.Module.deserialize(self.engine, serialized), meta
        except (wasmtime.WasmtimeError, ValueError) as e:
            log.warning("compile cache entry %s refused (%s); recompiling", path.name, e)
            return None

    def _store_cached(self, sha: str, module: wasmtime.Module, meta: dict[str, Any]) -> None:
        if self.cache_dir is not None:
            self._store_payload(sha, compiler.pack(meta, bytes(module.serialize())))

    def _store_payload(self, sha: str, payload: bytes) -> None:
        if self.cache_dir is None:
            return
        try:
            tag = hmac.new(self._hmac_key(), payload, hashlib.sha256).digest()
            makedirs(self.cache_dir, 0o700)
            atomic_write(self._cache_path(sha), tag + payload, mode=0o600)
        except OSError as e:  # a full disk must not stop the app from running
            log.warning("could not write compile cache: %s", e)

    def compile_bounded(self, wasm: bytes, limits: CompileLimits) -> CompiledModule:
        """Like ``compile``, but a module not compiled before is compiled in a
        child process under ``limits`` (devicerunner.sandbox.compiler); its output
        goes into the HMAC-protected cache and is deserialized here. Raises
        ModuleInvalidError, or CompileLimitError when the child ran out of
        memory or time (the daemon is never at risk)."""
        if is_component(wasm):
            raise ModuleInvalidError(COMPONENT_REFUSED)
        sha = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            gate = self._compiling.setdefault(sha, threading.Lock())
        try:
            with gate:  # devices sharing this sandbox (the simulator) wait for one child
                return self._compile_bounded(sha, wasm, limits)
        finally:
            with self._lock:
                self._compiling.pop(sha, None)

    def _compile_bounded(self, sha: str, wasm: bytes, limits: CompileLimits) -> CompiledModule:
        hit = self._recall(sha)
        if hit is not None:
            return hit
        cached = self._load_cached(sha, max_bytes=_cache_bound(wasm))
        if cached is not None:
            module, meta = cached
            compiled = CompiledModule(sha, module, meta, True)
        else:
            payload = _compile_in_child(wasm, limits)
            try:
                meta, serialized = compiler.unpack(payload)
                module = wasmtime.Module.deserialize(self.engine, serialized)
            except (wasmtime.WasmtimeError, ValueError) as e:
                raise ModuleInvalidError(f"compiler output refused: {_first_line(e)}") from e
            self._store_payload(sha, payload)
            compiled = CompiledModule(sha, module, meta, False)
        return self._remember(compiled)

    # -- linking ----------------------------------------------------------

    def check_imports(self, compiled: CompiledModule, grant: Iterable[str]) -> list[HostFunc]:
        """The host functions ``compiled`` imports, or LinkError naming every bad one."""
        grant = frozenset(grant)
        problems: list[str] = []
        bad: list[str] = []
        needed: list[HostFunc] = []
        for module, name, kind, params, results in compiled.imports:
            qual = f"{module}.{name}"
            cap = NAMESPACE_TO_CAPABILITY.get(module)
            f = REGISTRY.get((module, name))
            if kind != "func":
                problems.append(f"{qual}: only functions may be imported")
            elif cap is None:
                hint = _IMPORT_HINTS.get(qual, "")
                problems.append(f"{qual}: no capability provides namespace {module!r}{hint}")
            elif cap not in grant:
                problems.append(f"{qual}: needs capability '{cap}', which is not granted")
            elif f is None:
                problems.append(f"{qual}: capability '{cap}' has no function {name!r}")
            elif (params, results) != (f.params, f.results):
                problems.append(f"{qual}: imported as {_fmt_sig(params, results)}, ABI v1 has {f.signature}")
            else:
                needed.append(f)
                continue
            bad.append(qual)
        if problems:
            granted = ", ".join(sorted(grant)) or "nothing"
            raise LinkError(
                "module fails to link (grant: " + granted + "):\n  " + "\n  ".join(problems),
                imports=bad,
            )
        return needed

    def _functype(self, params: tuple[str, ...], results: tuple[str, ...]) -> wasmtime.FuncType:
        key = (params, results)
        ft = self._functypes.get(key)
        if ft is None:
            ft = wasmtime.FuncType([_valtype(t) for t in params], [_valtype(t) for t in results])
            self._functypes[key] = ft
        return ft

    # -- instances --------------------------------------------------------

    def instantiate(
        self,
        compiled: CompiledModule,
        ctx: AppContext,
        grant: Iterable[str],
        limits: Limits,
    ) -> AppInstance:
        """Link, instantiate and run ``_initialize`` (WASI reactors). ``dr_init``
        is *not* called here: the app lifecycle decides when."""
        needed = self.check_imports(compiled, grant)
        exports = compiled.exports
        for name, required in ABI_EXPORTS.items():
            ex = exports.get(name)
            if ex is None:
                if required:
                    raise AbiError(f"module does not export {name} (ABI v1 needs () -> i32)")
                continue
            if ex != ("func", (), ("i32",)):
                raise AbiError(f"export {name} must be a function () -> i32")
        if exports.get("memory", ("",))[0] != "memory":
            raise AbiError("module does not export its memory as 'memory' (ABI v1)")
        if "_start" in exports and "_initialize" not in exports:
            raise AbiError(COMMAND_REFUSED)
        _check_initial_memory(compiled.memory_pages, limits)

        store = wasmtime.Store(self.engine)
        store.set_limits(
            memory_size=limits.memory_bytes,
            table_elements=limits.table_elements,
            instances=1,
            tables=4,
            memories=1,
        )
        linker = wasmtime.Linker(self.engine)
        inst = AppInstance(self, store, ctx, limits)
        if self.path == "fast":
            from devicerunner.sandbox import fastpath

            for f in needed:
                cb = fastpath.make_callback(f, ctx, inst.host_error)
                inst.keepalive.append(cb)  # the C side holds only a raw pointer to it
                fastpath.define(linker, f, self._functype(f.params, f.results), cb)
        else:
            for f in needed:
                linker.define_func(f.module, f.name, self._functype(f.params, f.results), _bind(f, ctx))
        try:
            result = inst.guarded(lambda: linker.instantiate(store, compiled.module), "instantiate")
        except Exception as e:
            raise AppInitError(f"instantiation failed: {_first_line(e)}") from e
        if not result.ok:
            raise AppInitError(f"instantiation failed: {result.message}")
        inst.bind(inst.last_value, compiled)
        if "_initialize" in exports:
            r = inst.call("_initialize")
            if not r.ok:
                raise AppInitError(f"_initialize failed: {r.message}")
        return inst


class AppInstance:
    """One instantiated app: its Store, exports and memory view."""

    def __init__(self, sandbox: Sandbox, store: wasmtime.Store, ctx: AppContext, limits: Limits) -> None:
        self.sandbox = sandbox
        self.store = store
        self.ctx = ctx
        self.limits = limits
        self._deadline_ticks = max(1, math.ceil(hard_limit_s(limits.tick_budget_ms) / EPOCH_PERIOD_S))
        self._deadline_epoch = -1
        if sandbox.path == "fast":
            from devicerunner.sandbox.fastpath import deadline_setter

            self._set_deadline = deadline_setter(store)
        else:
            self._set_deadline = store.set_epoch_deadline
        self._exports: dict[str, Any] = {}
        self._callers: dict[str, Callable[[], Any]] = {}
        self.memory: wasmtime.Memory | None = None
        self.last_value: Any = None
        self.keepalive: list[Any] = []
        from devicerunner.sandbox.fastpath import HostError

        self.host_error = HostError()

    def bind(self, instance: wasmtime.Instance, compiled: CompiledModule) -> None:
        exports = instance.exports(self.store)
        fast = self.sandbox.path == "fast"
        store = self.store
        for name in (*ABI_EXPORTS, "_initialize"):
            f = exports.get(name)
            if isinstance(f, wasmtime.Func):
                self._exports[name] = f
                if fast:
                    from devicerunner.sandbox.fastpath import FastCaller

                    self._callers[name] = FastCaller(store, f, len(compiled.exports[name][2]))
                else:
                    self._callers[name] = lambda f=f: f(store)  # type: ignore[misc]
        mem = exports.get("memory")
        assert isinstance(mem, wasmtime.Memory)
        self.memory = mem
        if fast:
            from devicerunner.sandbox.fastpath import FastMemory

            self.ctx.memory = FastMemory(self.store, mem)
        else:
            self.ctx.memory = StockMemory(self.store, mem)

    def has(self, export: str) -> bool:
        return export in self._exports

    def memory_bytes(self) -> int:
        return self.memory.data_len(self.store) if self.memory is not None else 0

    def guarded(self, fn: Callable[[], Any], what: str) -> CallResult:
        """Run ``fn`` (which enters Wasm) under the CPU deadline; classify the end."""
        ticker = self.sandbox._ticker
        if ticker.epoch != self._deadline_epoch or ticker.sleeping:
            # The deadline is relative to the epoch when it is set; while the
            # epoch has not moved since, it still stands at exactly +N.
            self._deadline_epoch = ticker.epoch
            self._set_deadline(self._deadline_ticks)
        ticker.touch()
        t0 = time.perf_counter()
        try:
            self.last_value = fn()
        except wasmtime.Trap as e:
            dt = time.perf_counter() - t0
            host_exc, self.host_error.exc = self.host_error.exc, None
            if host_exc is not None:  # fast path: a host function raised
                return self._host_raised(host_exc, what, dt)
            if e.trap_code == wasmtime.TrapCode.INTERRUPT:
                return CallResult(Outcome.OVERRUN, -1, f"{what} cut after {dt * 1000:.1f} ms (CPU limit)", dt)
            return CallResult(Outcome.TRAP, -1, f"{what} trapped: {_trap_message(e)}", dt)
        except AppExit as e:
            return CallResult(Outcome.TRAP, -1, f"{what}: {e}", time.perf_counter() - t0)
        except wasmtime.WasmtimeError as e:
            if isinstance(e.__context__, AppExit):  # stock path, raised through a trap
                return CallResult(Outcome.TRAP, -1, f"{what}: {e.__context__}", time.perf_counter() - t0)
            host_exc, self.host_error.exc = self.host_error.exc, None
            if host_exc is not None:  # fast path: a host function raised
                return self._host_raised(host_exc, what, time.perf_counter() - t0)
            return CallResult(Outcome.TRAP, -1, f"{what} failed: {_first_line(e)}", time.perf_counter() - t0)
        except Exception as e:  # a host-function bug traps this app only
            return self._host_raised(e, what, time.perf_counter() - t0)
        return CallResult(Outcome.OK, 0, "", time.perf_counter() - t0)

    def _host_raised(self, e: BaseException, what: str, dt: float) -> CallResult:
        if isinstance(e, AppExit):  # the app ended itself: one line, not a host bug
            return CallResult(Outcome.TRAP, -1, f"{what}: {e}", dt)
        log.error("host function raised inside %s of app %s", what, self.ctx.app, exc_info=e)
        self.ctx.stats.host_errors += 1
        return CallResult(
            Outcome.TRAP, -1, f"{what} trapped: host function raised {type(e).__name__}: {e}", dt
        )

    def call(self, export: str) -> CallResult:
        """Call an ABI export; a non-zero i32 result is an ERROR outcome."""
        f = self._callers.get(export)
        if f is None:
            return CallResult(Outcome.TRAP, -1, f"missing export {export}", 0.0)
        r = self.guarded(f, export)
        if self.last_value and r.outcome is Outcome.OK and isinstance(self.last_value, int):
            return CallResult(
                Outcome.ERROR, self.last_value, f"{export} returned {self.last_value}", r.duration_s
            )
        if r.outcome is Outcome.TRAP and self.memory_bytes() + 65536 > self.limits.memory_bytes:
            # memory.grow past the limit returns -1; the allocator then traps
            # with its own words ("unreachable"): say which limit it hit.
            return r._replace(message=f"{r.message} ({memory_limit_hint(self.memory_bytes(), self.limits)})")
        return r


def _bind(f: HostFunc, ctx: AppContext) -> Callable[..., Any]:
    impl = f.impl
    oob = f.on_bounds

    def call(*args: Any) -> Any:
        try:
            return impl(ctx, *args)
        except GuestMemoryError:
            ctx.stats.host_errors += 1
            return oob

    return call


_VALTYPES: dict[str, Callable[[], wasmtime.ValType]] = {
    "i32": wasmtime.ValType.i32,
    "i64": wasmtime.ValType.i64,
    "f32": wasmtime.ValType.f32,
    "f64": wasmtime.ValType.f64,
}


def _valtype(t: str) -> wasmtime.ValType:
    return _VALTYPES[t]()


def _fmt_sig(params: tuple[str, ...], results: tuple[str, ...]) -> str:
    return f"({', '.join(params)}) -> ({', '.join(results)})"


def _trap_message(e: wasmtime.Trap) -> str:
    """The cause ("wasm `unreachable` instruction executed"), not the backtrace header."""
    text = e.message.strip()
    if "Caused by:" in text:
        cause = [ln.strip() for ln in text.split("Caused by:", 1)[1].splitlines() if ln.strip()]
        if cause:
            return cause[-1].removeprefix("wasm trap: ")
    return text.splitlines()[0] if text else "trap"


def _cache_bound(wasm: bytes) -> int:
    """The largest cache entry read back for a module of this size."""
    return 64 * len(wasm) + 16 * 1024 * 1024


def _compile_in_child(wasm: bytes, limits: CompileLimits) -> bytes:
    """Run devicerunner.sandbox.compiler on ``wasm`` under ``limits``; its output, or a typed error."""
    cmd = [
        sys.executable,
        "-m",
        "devicerunner.sandbox.compiler",
        str(limits.memory_bytes),
        str(max(1, math.ceil(limits.timeout_s))),
    ]
    # the child imports the very package this process runs, wherever it is installed
    pkg_root = str(Path(compiler.__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")])),
    }
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            cmd, input=wasm, capture_output=True, timeout=limits.timeout_s, check=False, env=env
        )
    except subprocess.TimeoutExpired as e:
        raise CompileLimitError(
            f"compiling the module took longer than {limits.timeout_s:g} s (compile_timeout_s)"
        ) from e
    except OSError as e:
        raise SandboxError(f"cannot start the compiler process: {e.strerror or e}") from e
    dt = time.monotonic() - t0
    rc = p.returncode
    if rc == compiler.EXIT_INVALID:
        raise ModuleInvalidError(f"not a valid WebAssembly module: {p.stderr.decode(errors='replace')[:500]}")
    if rc in (-signal.SIGABRT, compiler.EXIT_NO_MEMORY):  # an allocation failed under RLIMIT_AS
        raise CompileLimitError(
            f"compiling the module needs more than {limits.memory_bytes} bytes of memory "
            f"(compile_memory_bytes); the compiler gave up after {dt:.1f} s"
        )
    if rc == -signal.SIGXCPU:
        raise CompileLimitError(f"compiling the module used more than {limits.timeout_s:g} s of CPU")
    if rc == -signal.SIGKILL:
        raise CompileLimitError(f"the compiler was killed after {dt:.1f} s (CPU limit or out of memory)")
    if rc != 0:
        tail = p.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise SandboxError(f"compiler process failed (exit {rc}): {tail[0][:300]}")
    if len(p.stdout) > limits.memory_bytes + COMPILE_OUTPUT_SLACK:
        raise CompileLimitError("compiler output larger than its memory cap")
    log.info("compiled a %d-byte module in a child process in %.2f s", len(wasm), dt)
    return p.stdout


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_IMPORT_HINTS = {
    "env.abort": " (AssemblyScript's default abort handler: build with --use abort=<your handler>, "
    "as sdk/assemblyscript's asconfig.json does; see docs/apps.md)",
}

COMMAND_REFUSED = (
    "module is a WASI command (it exports _start and no _initialize): its libc would run "
    "constructors and destructors around every call, so state would not survive between ticks. "
    "Build a reactor instead: clang/clang++ -mexec-model=reactor; zig build-exe -fno-entry "
    "--export=dr_init --export=dr_tick (wasm32-freestanding or wasm32-wasi); rustc --crate-type cdylib "
    '(cargo: crate-type = ["cdylib"]); go build -buildmode=c-shared (GOOS=wasip1); '
    "AssemblyScript without the WASI shim (no --exportStart _start). See docs/apps.md."
)

COMPONENT_REFUSED = (
    "this is a WebAssembly component (component-model binary), not a core module: devicerunner "
    "runs core modules only (App ABI v1, docs/abi.md). Build a core module for wasm32-wasi "
    "(wasip1) or wasm32-unknown-unknown instead of wasm32-wasip2 / cargo component / "
    "componentize-*; see docs/apps.md."
)


def is_component(wasm: bytes) -> bool:
    """The preamble of a component-model binary: magic, a version, layer 1
    (a core module has version 1, layer 0)."""
    return len(wasm) >= 8 and wasm[:4] == b"\0asm" and wasm[6:8] == b"\x01\x00"


MEMORY_LIMIT_KEYS = (
    "set by the manifest's limits.memory_bytes, device.toml's apps.<name>.memory_limit_bytes "
    "or app run --memory-limit"
)


def memory_limit_hint(used: int, limits: Limits) -> str:
    return (
        f"memory is at the app's limit: {used} of {limits.memory_bytes} bytes "
        f"({limits.memory_bytes / 1048576:.1f} MiB), {MEMORY_LIMIT_KEYS}"
    )


def _check_initial_memory(pages: int, limits: Limits) -> None:
    need = pages * 65536
    if need > limits.memory_bytes:
        raise AppInitError(
            f"initial memory {pages} pages ({need / 1048576:.1f} MiB) exceeds the app's "
            f"memory limit of {limits.memory_bytes} bytes ({limits.memory_bytes / 1048576:.1f} MiB), "
            f"{MEMORY_LIMIT_KEYS}. A large initial memory is usually the stack: zig's "
            "wasm32-wasi default is 16 MiB (use --stack 65536), clang: -Wl,-z,stack-size=65536"
        )


def load_module_bytes(path: Path) -> bytes:
    """Read a .wasm, or convert a .wat; raises ModuleInvalidError."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ModuleInvalidError(f"cannot read {path}: {e.strerror or e}") from e
    if path.suffix == ".wat" or not data.startswith(b"\0asm"):
        try:
            return bytes(wasmtime.wat2wasm(data.decode("utf-8")))
        except (UnicodeDecodeError, wasmtime.WasmtimeError) as e:
            raise ModuleInvalidError(f"{path}: not a Wasm module nor valid WAT: {_first_line(e)}") from e
    return data


__all__ = [
    "CAPABILITIES",
    "AppInstance",
    "CallResult",
    "CompiledModule",
    "Limits",
    "Outcome",
    "Sandbox",
    "hard_limit_s",
    "load_module_bytes",
]
