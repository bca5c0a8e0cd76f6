"""Canonical JSON: the exact bytes signatures are made over.

Sorted keys, no whitespace, UTF-8, no floats (their text form is not
canonical across implementations), no NaN. Invariant: ``canonical(x)``
is the same bytes for equal ``x`` on every platform.
"""

from __future__ import annotations

import json
from typing import Any


class NotCanonicalError(ValueError):
    pass


def _check(obj: Any, path: str = "") -> None:
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return
    if isinstance(obj, float):
        raise NotCanonicalError(f"{path or 'value'}: floats are not allowed in signed data")
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            _check(v, f"{path}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise NotCanonicalError(f"{path}: object keys must be strings")
            _check(v, f"{path}.{k}" if path else k)
        return
    raise NotCanonicalError(f"{path or 'value'}: {type(obj).__name__} is not JSON")


def canonical(obj: Any) -> bytes:
    _check(obj)
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate, from a JSON "\ud800" escape
        raise NotCanonicalError(f"not valid Unicode: lone surrogate at offset {e.start}") from None
