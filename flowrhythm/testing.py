"""Helpers for testing flows without waiting on the wall clock.

``Flow(clock=ManualClock())`` makes every wait of the flow (batching windows,
retry backoff, rate limits, per-item timeouts) and every timestamp in its stats
follow a clock the test moves by hand, or that jumps ahead on its own::

    clock = ManualClock()
    flow = Flow(clock=clock)
    ...
    await clock.wait_for_sleepers(1)  # a worker is backing off
    clock.advance(0.5)                # its retry is due now

or let the clock jump to the next deadline whenever every task is waiting::

    async with clock.autojump():
        await flow.run()

Waits that stay on the event loop's clock: scaling's ``sampling_period``
timer, ``stop(timeout=...)`` and the bound on cleanups after a cancellation.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.lowlevel import checkpoint

__all__ = ("ManualClock",)


class ManualClock:
    """A clock that moves only when told to.

    Call it for the time. ``await clock.sleep(seconds)`` returns once the clock
    has been advanced that far, by :meth:`advance` or, inside :meth:`autojump`,
    by itself as soon as every task is waiting.

    :param start: the time the clock reads at first
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._order = itertools.count()
        self._changed: anyio.Event | None = None

    def __call__(self) -> float:
        return self._now

    @property
    def sleepers(self) -> int:
        """How many tasks are sleeping on this clock right now."""
        return len(self._sleepers)

    async def sleep(self, seconds: float) -> None:
        """Return once the clock reads at least ``seconds`` later than now."""
        deadline = self._now + max(seconds, 0.0)
        if deadline <= self._now:
            await checkpoint()
            return
        entry = (deadline, next(self._order), anyio.Event())
        heapq.heappush(self._sleepers, entry)
        self._notify()
        try:
            await entry[2].wait()
        finally:
            if not entry[2].is_set():  # cancelled: forget the sleeper
                self._sleepers.remove(entry)
                heapq.heapify(self._sleepers)
                self._notify()

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` ahead and wake every sleeper now due."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance({seconds!r})")
        self._move_to(self._now + seconds)

    def _move_to(self, now: float) -> None:
        self._now = now
        while self._sleepers and self._sleepers[0][0] <= now:
            _, _, event = heapq.heappop(self._sleepers)
            event.set()
        self._notify()

    def advance_to_next(self) -> bool:
        """Move the clock to the earliest sleeper's deadline and wake it (and any
        due with it); ``False`` if nobody sleeps."""
        if not self._sleepers:
            return False
        # To the deadline itself: now + (deadline - now) may round below it.
        self._move_to(max(self._sleepers[0][0], self._now))
        return True

    @asynccontextmanager
    async def autojump(self) -> AsyncIterator[None]:
        """While the block runs, jump to the next deadline whenever every other
        task is blocked: the flow's waits take no wall time, and everything that
        can happen before a deadline happens before it."""

        async def jump() -> None:
            while True:
                await self.wait_for_sleepers(1)
                await _all_other_tasks_blocked()
                self.advance_to_next()

        async with anyio.create_task_group() as tg:
            tg.start_soon(jump, name="ManualClock.autojump")
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Wait until at least ``count`` tasks sleep on this clock."""
        while len(self._sleepers) < count:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None


async def _all_other_tasks_blocked() -> None:
    """Return once every other task waits on something (trio: exactly).

    anyio's ``wait_all_tasks_blocked`` polls asyncio every 0.1 s, which would
    make each jump of the clock cost that much wall time; this polls once per
    event loop iteration instead.
    """
    if anyio.get_cancelled_exc_class() is not asyncio.CancelledError:
        await anyio.wait_all_tasks_blocked()
        return
    this_task = asyncio.current_task()
    while True:
        await asyncio.sleep(0)
        if all(task is this_task or _waiting(task) for task in asyncio.all_tasks()):
            return


def _waiting(task: asyncio.Task[object]) -> bool:
    # asyncio keeps what a task awaits in this private attribute, as anyio reads it
    waiter = getattr(task, "_fut_waiter", None)
    return waiter is not None and not waiter.done()
