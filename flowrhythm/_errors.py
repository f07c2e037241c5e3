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


def spurious_cancellation(exc: BaseException, where: str) -> RuntimeError:
    """Wrap a cancellation exception that user code raised while nothing was
    cancelling the flow (possible on asyncio): letting it through would make the
    flow, and its caller, look cancelled."""
    error = RuntimeError(
        f"{where} raised {type(exc).__name__} while the flow was not being "
        "cancelled; raise another exception to fail an item"
    )
    error.__cause__ = exc
    add_note(error, f"raised in {where}")
    return error
