r"""Log output: plain text for people, one JSON object per line for journald/scripts.

Invariant: one record is one line, whatever its message holds. Messages carry
text from apps, manifests and peers; in text format every control character
in them is shown escaped (``\n``, ``\x1b``: hostfuncs.logsafe), in JSON the
C0 controls are escaped by the encoder and C1, DEL and the Unicode line
separators as ``\\uXXXX`` (still valid JSON, the text itself unchanged).
Tracebacks (``exc_info``) are the daemon's own and keep their lines.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from hostfuncs.logsafe import escape_controls

_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def setup(level: int = logging.INFO, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        f = TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        f.converter = time.localtime
        handler.setFormatter(f)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
