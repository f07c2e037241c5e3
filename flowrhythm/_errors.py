"""Helpers for the one exception a failed flow raises."""

from __future__ import annotations

import sys


def add_note(exc: BaseException, note: str) -> None:
    """Attach ``note`` to ``exc`` (PEP 678), also on Python 3.10."""
    note = f"flowrhythm: {note}"
    if sys.version_info >= (3, 11):
        exc.add_note(note)
    else:  # the attribute the exceptiongroup backport prints
        notes = [*getattr(exc, "__notes__", ()), note]
        setattr(exc, "__notes__", notes)  # noqa: B010
