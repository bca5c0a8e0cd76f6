"""Regenerate the host-function and error-code tables in docs/abi.md.

    python -m hostfuncs.docgen          # rewrite docs/abi.md in place
    python -m hostfuncs.docgen --check  # exit 1 if it is out of date

The tables sit between ``<!-- BEGIN GENERATED -->`` and ``<!-- END GENERATED -->``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hostfuncs  # noqa: F401 - registers every capability
from hostfuncs import codes
from hostfuncs.registry import abi_details, abi_table

BEGIN = "<!-- BEGIN GENERATED -->"
END = "<!-- END GENERATED -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "abi.md"


def generated() -> str:
    rows = ["| code | name | meaning |", "|---|---|---|"]
    for code in sorted(codes.NAMES, reverse=True):
        rows.append(f"| {code} | `{codes.NAMES[code]}` | {codes.DOCS[code]} |")
    return "\n".join(
        [
            "### Host functions",
            "",
            abi_table(),
            "",
            "### Error codes",
            "",
            *rows,
            "",
            "### Parameters and results",
            "",
            abi_details(),
        ]
    )


def render(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{generated()}\n{END}{tail}"


def main() -> int:
    text = DOC.read_text()
    new = render(text)
    if "--check" in sys.argv:
        if new != text:
            print("docs/abi.md is out of date: run python -m hostfuncs.docgen", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
