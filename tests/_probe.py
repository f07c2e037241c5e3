"""What a flow did, seen from the user's callables: the probes the tests share,
and the conservation checks on them."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import pairwise
from typing import Any

import anyio
from anyio.lowlevel import checkpoint

from flowrhythm import Flow, StageStats


def current_task() -> object:
    """The running task object (kept alive by whoever holds it, unlike its id)."""
    try:
        return asyncio.current_task()
    except RuntimeError:  # not asyncio: trio
        import trio

        return trio.lowlevel.current_task()


class Probe:
    """Records items produced, consumed and handled, context managers entered and
    exited, and the tasks the flow ran the callables in."""

    def __init__(self) -> None:
        self.produced: list[int] = []
        self.consumed: list[int] = []
        self.handled: list[tuple[Any, BaseException]] = []
        self.enters: Counter[str] = Counter()
        self.exits: Counter[str] = Counter()
        self.tasks: list[object] = []  # strong references: ids cannot be reused
        self.baseline = {info.id for info in anyio.get_running_tasks()}
        self.producer_closed = False

    def note_task(self) -> None:
        self.tasks.append(current_task())

    def producer(self, n: int | None = None, *, fail_at: int | None = None) -> Any:
        """0, 1, ... (``n`` items, or without end); raises ``ConnectionError``
        instead of yielding ``fail_at``."""

        async def produce() -> AsyncIterator[int]:
            self.note_task()
            try:
                i = 0
                while n is None or i < n:
                    if i == fail_at:
                        raise ConnectionError(f"source lost at {i}")
                    self.produced.append(i)
                    yield i
                    i += 1
            finally:
                self.producer_closed = True

        return produce

    def stage(self, name: str, fn: Any) -> Any:
        """A per-worker context manager factory around ``fn``; its exit awaits, so
        under cancellation it only completes if the flow shields it."""

        @asynccontextmanager
        async def factory() -> AsyncIterator[Any]:
            self.enters[name] += 1
            self.note_task()
            try:
                yield fn
            finally:
                await checkpoint()
                self.exits[name] += 1

        factory.__name__ = name
        return factory

    async def handler(self, item: Any, exc: BaseException) -> None:
        self.handled.append((item, exc))

    async def collect(self, item: int) -> None:
        self.consumed.append(item)

    def assert_balanced(self) -> None:
        assert self.enters == self.exits, (self.enters, self.exits)

    def assert_no_orphans(self, *, strict: bool = True) -> None:
        """No task the flow's callables ran in is still alive; with ``strict``, no
        task at all exists that did not exist when the probe was made (call it
        once whatever hosted the flow has exited)."""
        running = anyio.get_running_tasks()
        alive = {info.id for info in running}
        orphans = [task for task in self.tasks if id(task) in alive]
        assert not orphans, orphans
        if strict:
            new = [info.name for info in running if info.id not in self.baseline]
            assert not new, f"tasks still running: {new}"


def check_accounting(flow: Flow, probe: Probe, *, aborted: bool) -> None:
    """Conservation, in the stats and against the probe: every item produced ended
    exactly once (consumed, handled, or, only if ``aborted``, dropped)."""
    stats = flow.stats()
    names = list(stats)
    for stage in stats.values():
        assert stage.received == stage.processed + stage.errors + stage.dropped, stage
        assert stage.dropped >= 0, stage
    for upstream, downstream in pairwise(names):
        assert stats[downstream].received == stats[upstream].processed
    # an item the producer yielded counts as received by stage one, handed over or not
    assert stats[names[0]].received == len(probe.produced)
    assert stats[names[-1]].processed == len(probe.consumed)
    assert sum(s.errors for s in stats.values()) == len(probe.handled)
    dropped = sum(s.dropped for s in stats.values())
    assert len(probe.produced) == len(probe.consumed) + len(probe.handled) + dropped
    finished = probe.consumed + [item for item, _ in probe.handled]
    assert len(finished) == len(set(finished)), "an item ended twice"
    assert set(finished) <= set(probe.produced)
    if not aborted:
        assert dropped == 0, stats
        assert sorted(finished) == sorted(probe.produced)


class Results:
    """The consumer and the error handler of a test flow: what reached them."""

    def __init__(self) -> None:
        self.consumed: list[Any] = []
        self.failed: list[tuple[Any, BaseException]] = []

    async def consume(self, item: Any) -> None:
        self.consumed.append(item)

    async def handle(self, item: Any, exc: BaseException) -> None:
        self.failed.append((item, exc))

    @property
    def failed_items(self) -> list[Any]:
        return [item for item, _ in self.failed]


def assert_conserved(flow: Flow) -> dict[str, StageStats]:
    """Once a run has ended: every stage balances (received = processed + errors +
    dropped), received what the stage before it emitted, and has no worker or
    reorder window left."""
    assert flow.state == "finished"
    stats = dict(flow.stats())
    for stage in stats.values():
        assert stage.received == stage.processed + stage.errors + stage.dropped, stage
        assert min(stage.processed, stage.errors, stage.dropped, stage.emitted) >= 0
        assert stage.filtered <= stage.processed, stage
        assert stage.total_workers() == 0, stage
        assert stage.reorder_window == 0, stage
    for upstream, downstream in pairwise(stats.values()):
        assert downstream.received == upstream.emitted, (upstream, downstream)
    return stats
