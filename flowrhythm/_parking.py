"""Parking a task until another task wakes it, the cheapest way each loop allows.

The channel parks a task whenever it has to wait, so this is on the path of every
wait between stages. An ``anyio.Event`` costs about three times what the loop's
own primitive does (its constructor looks the backend up, and its wait goes
through two wrappers), so the channel uses a future on asyncio and trio's
``wait_task_rescheduled`` on trio, with anyio's ``Event`` as the portable fallback.

A parked task is woken at most once. ``wake`` says whether it woke anybody: a task
whose cancellation already won (its future cancelled, its trio wait aborted) will
not take the item, so the waker moves on to the next task in line. ``woken`` tells
the parked task, when its cancellation arrives, whether a wake-up reached it first
(possible on asyncio and with the fallback), so that it can pass that wake-up on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

import anyio
from anyio.lowlevel import current_token


class Parked(Protocol):
    """One task waiting in a channel (``item`` is a waiting sender's item)."""

    item: Any
    woken: bool

    def wait(self) -> Awaitable[Any]: ...

    def wake(self) -> bool: ...


class _OnAsyncio:
    __slots__ = ("future", "item", "woken")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[None] = loop.create_future()
        self.item: Any = None
        self.woken = False

    def wait(self) -> Awaitable[None]:
        return self.future

    def wake(self) -> bool:
        if self.future.done():
            return False  # cancelled while parked: the task is on its way out
        self.woken = True
        self.future.set_result(None)
        return True


class OnAnyio:
    """The portable way, on any loop (tests check the channel with it too)."""

    __slots__ = ("event", "item", "woken")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.item: Any = None
        self.woken = False

    def wait(self) -> Awaitable[None]:
        return self.event.wait()

    def wake(self) -> bool:
        self.woken = True
        self.event.set()
        return True


def parking() -> Callable[[], Parked]:
    """How to park a task on the event loop this is called on."""
    native = current_token().native_token
    if isinstance(native, asyncio.AbstractEventLoop):
        return partial(_OnAsyncio, native)
    if type(native).__module__.startswith("trio"):
        from ._parking_trio import OnTrio

        return OnTrio
    return OnAnyio
