"""devicerunner: sandboxed WebAssembly apps on edge devices, updated over the air."""

__version__ = "0.1.0"
