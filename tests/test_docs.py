"""Docs that must match the code."""

from __future__ import annotations

from hostfuncs import docgen


def test_abi_doc_lists_exactly_the_registered_host_functions() -> None:
    text = docgen.DOC.read_text()
    assert docgen.render(text) == text, "run: python -m hostfuncs.docgen"
