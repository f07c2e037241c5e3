"""Time as a run sees it: one clock for reading, sleeping and deadlines.

By default that is the event loop's clock. A flow given a clock with an async
``sleep(seconds)`` method (a test's manual clock) also waits through it, so
batching windows, retry backoff, rate limits and per-item timeouts follow that
clock instead of the wall.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self


def loop_clock() -> Callable[[], float]:
    """Return the running event loop's clock (cheaper than ``anyio.current_time``)."""
    if anyio.get_cancelled_exc_class() is asyncio.CancelledError:
        return asyncio.get_running_loop().time
    import trio

    return trio.current_time


class Timebase:
    """Reads the run's clock, sleeps on it and bounds calls by it."""

    def __init__(self, clock: Callable[[], float] | None) -> None:
        self.now: Callable[[], float] = clock or loop_clock()
        sleep = getattr(clock, "sleep", None)
        #: the clock's own sleep, if it has one (a manual clock in tests)
        self._custom_sleep: Callable[[float], Awaitable[Any]] | None = (
            sleep if callable(sleep) else None
        )
        self._task_group: anyio.abc.TaskGroup | None = None
        self._fail: Callable[[BaseException, str], None] | None = None

    def bind(
        self,
        task_group: anyio.abc.TaskGroup,
        fail: Callable[[BaseException, str], None],
    ) -> None:
        """Where a custom clock's deadline watchers run (the run's task group),
        and what to do when that clock fails in one (fail the run)."""
        self._task_group = task_group
        self._fail = fail

    async def sleep(self, seconds: float) -> None:
        if self._custom_sleep is None:
            await anyio.sleep(seconds)
            return
        try:
            await self._custom_sleep(seconds)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            if self._fail is None:
                raise
            # A broken clock is the flow's fault, not the item's (its backoff or
            # rate limit only waited on it): fail the run, as a deadline does, and
            # wait for the abort that follows.
            self._fail(exc, "raised by the flow's clock")
            await anyio.sleep_forever()

    def deadline(self, seconds: float) -> anyio.CancelScope | _WatchedScope:
        """Return a cancel scope (a context manager) that cancels itself
        ``seconds`` from now; after it exits, ``cancelled_caught`` tells a timeout."""
        if self._custom_sleep is None:
            return anyio.CancelScope(deadline=anyio.current_time() + seconds)
        assert self._task_group is not None
        assert self._fail is not None
        return _WatchedScope(
            self._task_group,
            self._fail,
            self.now,
            self._custom_sleep,
            self.now() + seconds,
        )


class _WatchedScope:
    """A cancel scope whose deadline a task sleeping on a custom clock enforces.

    The watcher is cancelled when the scope exits, so none outlives its scope
    (a manual clock that is never advanced must not keep the run alive).
    """

    def __init__(
        self,
        task_group: anyio.abc.TaskGroup,
        fail: Callable[[BaseException, str], None],
        now: Callable[[], float],
        sleep: Callable[[float], Awaitable[Any]],
        deadline: float,
    ) -> None:
        self._task_group = task_group
        self._fail = fail
        self._now = now
        self._sleep = sleep
        # Absolute: the clock may move before the watcher first runs.
        self._deadline = deadline
        self._scope = anyio.CancelScope()
        self._watcher = anyio.CancelScope()

    @property
    def cancelled_caught(self) -> bool:
        return self._scope.cancelled_caught

    def __enter__(self) -> Self:
        self._task_group.start_soon(self._watch, name="deadline")
        self._scope.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._watcher.cancel()
        return bool(self._scope.__exit__(exc_type, exc, tb))

    async def _watch(self) -> None:
        if self._watcher.cancel_called:
            return  # the scope was left before this task first ran
        with self._watcher:
            try:
                # Until the deadline has passed, in case the sleep returns early.
                while (left := self._deadline - self._now()) > 0:
                    await self._sleep(left)
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:
                self._fail(exc, "raised by the flow's clock")
                return
            self._scope.cancel()
