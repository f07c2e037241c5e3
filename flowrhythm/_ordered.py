"""``ordered=True``: many workers, outputs in input order, bounded memory.

Each item gets a sequence number in the same step as the worker takes it. Only
one worker at a time may wait in the input's receive (the intake lock), and
while one does, nobody takes an item without waiting: an item handed to that
parked worker is numbered when it resumes, before any sibling can take a later
one, so numbers follow the input's order. The rest of the time, workers take
and number items without waiting.

A finished item waits in ``done`` until every earlier one has been emitted or
has failed; whichever worker finishes the next-needed item emits it and every
finished item after it (one flusher at a time keeps them in order). A failed
item is skipped at once, before its error handler runs, so it never holds back
the items after it.

The window (items taken and not yet emitted or skipped) holds at most
``WINDOW_PER_WORKER`` items per worker: when it is full, workers wait before
taking new input, and the one holding the next-needed item runs on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from ._loops import CHECKPOINT_EVERY, END, RETIRED

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._stage import Stage

#: how many items per worker an ordered stage may hold while waiting for order
WINDOW_PER_WORKER = 4


class Reorder:
    """The ordering state one ordered stage shares among its workers."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.counters = stage.counters
        self.next_seq = 0  # the number the next item taken gets
        self.next_emit = 0  # the number of the next item to emit
        #: finished items waiting for their turn: number -> (outputs, succeeded)
        self.done: dict[int, tuple[Any, bool]] = {}
        self.flushing = False
        self.intake = anyio.Lock()
        #: a worker waits in the input's receive(); an item handed to it is not
        #: numbered until it resumes
        self.parked = False
        self._room: anyio.Event | None = None

    def full(self) -> bool:
        workers = max(self.stage.active_workers, 1)
        return self.next_seq - self.next_emit >= WINDOW_PER_WORKER * workers

    def number(self, item: Any) -> tuple[int, Any]:
        seq = self.next_seq
        self.next_seq = seq + 1
        counters = self.counters
        counters.reorder_window = window = seq + 1 - self.next_emit
        counters.reorder_peak = max(counters.reorder_peak, window)
        return seq, item

    def take_nowait(self) -> Any:
        """The next item, numbered, if one can be taken without waiting; else
        ``None`` (or ``END``)."""
        if self.parked or self.full():
            return None
        try:
            item = self.stage.inbox.receive_nowait()
        except anyio.WouldBlock:
            return None
        except anyio.EndOfStream:
            return END
        return self.number(item)

    async def receive(self) -> tuple[int, Any]:
        """Wait for room in the window and for the next item (``EndOfStream``
        propagates)."""
        while True:
            while self.full():
                await self._wait_for_room()
            async with self.intake:
                if self.full():
                    continue  # a sibling took the room first
                self.parked = True
                try:
                    item = await self.stage.inbox.receive()
                finally:
                    self.parked = False
                return self.number(item)

    def room_changed(self) -> None:
        """Let workers waiting for room look again: an item left the window, or
        the pool (and with it the window's bound) grew."""
        if self._room is not None:
            self._room.set()
            self._room = None

    async def _wait_for_room(self) -> None:
        # Held back by the order, like a worker waiting for room downstream: not
        # idle (a stage stalled behind one slow item is not oversized), not busy.
        counters = self.counters
        if self._room is None:
            self._room = anyio.Event()
        counters.idle -= 1
        counters.blocked += 1
        try:
            await self._room.wait()
        finally:
            counters.blocked -= 1
            counters.idle += 1

    async def finish(self, seq: int, outputs: Any, succeeded: bool) -> None:
        """Record item ``seq`` as finished; emit whatever is now in order."""
        if self.flushing or seq != self.next_emit:
            self.done[seq] = (outputs, succeeded)
            return
        # The next item due, and nobody flushing: this worker sends it on, then
        # whatever finished after it and is now in order.
        self.flushing = True
        stage = self.stage
        offer = stage.offer
        counters = self.counters
        count_processed = not counters.emitted_is_processed
        done = self.done
        try:
            while True:
                for output in outputs:
                    if not offer(output):
                        await stage.send_blocking(output)
                if succeeded and count_processed:
                    counters.processed += 1
                self.next_emit += 1
                counters.reorder_window = self.next_seq - self.next_emit
                if self._room is not None:  # (the check inline: once per item)
                    self.room_changed()
                entry = done.pop(self.next_emit, None)
                if entry is None:
                    break
                outputs, succeeded = entry
        finally:
            self.flushing = False


async def ordered_loop(stage: Stage, fn: Callable[[Any], Any]) -> None:
    """The worker loop of an ordered transformer (plain or fan-out)."""
    order = stage.order
    assert order is not None
    policy = stage.policy
    on_error = stage.run.route_error
    fan_out = stage.plan.fan_out
    call: Callable[[Any], Awaitable[Any]] = policy.wrap(fn)
    budget = CHECKPOINT_EVERY
    taken: Any = await stage.receive_blocking(order.receive)
    while taken is not END and taken is not RETIRED:
        seq, item = taken
        del taken
        stage.took()
        failure: Exception | None = None
        if fan_out:
            outputs: list[Any] = []

            async def collect(output: Any, outputs: list[Any] = outputs) -> None:
                outputs.append(output)

            failure = await policy.fan_out(fn, item, collect)
        else:
            try:
                outputs = [await call(item)]
            except Exception as exc:
                outputs, failure = [], exc
        await order.finish(seq, outputs, failure is None)
        del outputs
        if failure is not None:
            await on_error(stage, item, failure)
            del failure
        del item
        budget -= 1
        if not budget:
            budget = CHECKPOINT_EVERY
            await stage.pause()
        taken = order.take_nowait()
        if taken is None:
            stage.counters.idle += 1
            taken = await stage.receive_blocking(order.receive)
    stage.exhausted = taken is END
