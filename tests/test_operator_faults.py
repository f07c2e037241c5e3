"""Cancellation and shutdown of the stage operators, attacked at every wait.

tests/test_operators.py pins what each operator does; this file asks what
happens at each of their awaits when the flow ends in every way it can: aborted
(``stop(drain=False)``), drained (``stop()``), drained with a timeout that turns
into an abort, cancelled from outside, failed by a fatal error elsewhere (the
producer, the error handler, a context manager's exit, a scaling strategy), or
confused by user code raising asyncio's ``CancelledError`` while nothing
cancels it. The waits: an ordered stage's flusher blocked sending downstream,
its workers waiting for room in the reorder window or for the intake lock, a
retry's backoff, a rate limit's queue, a timed call, a batch's ``max_wait``
timer and its blocked send, a fan-out generator suspended at its ``yield`` and
its own cleanup, the deadline watchers of a custom clock, and workers retired
by the scaler while they wait.

Every scenario checks what the README promises ("Guarantees" and "What happens
when"): the flow ends promptly (``fail_after(GUARD)`` only turns a hang into a
failure; no test sleeps to order events), the outcome is exactly the documented
one (``stop()`` returns, the caller's cancellation propagates, the fatal error
comes out as itself), every context manager that entered exits, no task of the
flow is left, and ``received == processed + errors + dropped`` on every stage.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import _probe
import anyio
import pytest
from _probe import Results
from anyio.lowlevel import checkpoint

import flowrhythm._cleanup
from flowrhythm import (
    FixedScaling,
    Flow,
    RateLimit,
    Retry,
    ScalingStrategy,
    StageStats,
)
from flowrhythm._ordered import WINDOW_PER_WORKER
from flowrhythm.testing import ManualClock

pytestmark = pytest.mark.anyio

#: a deadlock guard only: no test depends on how long anything takes
GUARD = 5
#: the drain timeout of ``stop(timeout=...)`` in the "drain_timeout" endings
DRAIN_TIMEOUT = 0.05
#: the four ways a flow can be cut short while something inside it waits
CUTS = ["abort", "drain_timeout", "outer_cancel", "fatal"]


# -- faults ------------------------------------------------------------------------


class SourceError(Exception):
    """The producer fails: fatal."""


class ItemError(Exception):
    """A per-item failure: the item goes to the error handler."""


class ExitError(Exception):
    """A cleanup (a context manager's exit, a generator's finally) fails."""


class HandlerError(Exception):
    """The error handler fails: fatal."""


class ClockError(Exception):
    """A custom clock fails."""


# -- the flow's surroundings, as the test sees them ---------------------------------


_FAIL = object()


class Feed:
    """The producer: yields what the test puts; ends when the test closes it;
    raises :class:`SourceError` (fatal) when the test calls :meth:`fail`."""

    def __init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[Any](math.inf)
        self.produced: list[Any] = []
        self.finished = False  # the producer's own cleanup ran
        self.error = SourceError("source lost")

    async def produce(self) -> AsyncIterator[Any]:
        try:
            async with self._receive:
                async for item in self._receive:
                    if item is _FAIL:
                        raise self.error
                    self.produced.append(item)
                    yield item
        finally:
            self.finished = True

    def put(self, *items: Any) -> None:
        for item in items:
            self._send.send_nowait(item)

    def fail(self) -> None:
        self._send.send_nowait(_FAIL)

    def end(self) -> None:
        self._send.close()

    def close(self) -> None:
        self._send.close()
        self._receive.close()


@pytest.fixture
def feed() -> Any:
    feed = Feed()
    yield feed
    feed.close()


class Lifecycle:
    """Per-worker context managers: entered and exited, each exit awaiting (so it
    completes under a cancellation only if the flow shields it)."""

    def __init__(self) -> None:
        self.entered: Counter[str] = Counter()
        self.exited: Counter[str] = Counter()

    def around(
        self, name: str, fn: Callable[[Any], Any], *, exit: Any = None
    ) -> Callable[[], Any]:
        @asynccontextmanager
        async def factory() -> AsyncIterator[Callable[[Any], Any]]:
            self.entered[name] += 1
            try:
                yield fn
            finally:
                await checkpoint()
                await checkpoint()
                self.exited[name] += 1
                if exit is not None:
                    await exit()

        factory.__name__ = name
        return factory

    def assert_balanced(self) -> None:
        assert self.entered == self.exited, (self.entered, self.exited)


#: the consumer and the error handler
Sink = Results


class Stuck:
    """A consumer that holds the first item it takes until the test releases it
    (or the flow is cut), then consumes the rest."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.entered: list[Any] = []
        self.release = anyio.Event()

    async def consume(self, item: Any) -> None:
        self.entered.append(item)
        await self.release.wait()
        self.sink.consumed.append(item)


class Tasks:
    """The tasks alive when a test began: none of the flow's may outlive it."""

    def __init__(self) -> None:
        self.baseline = {info.id for info in anyio.get_running_tasks()}

    def assert_none_left(self) -> None:
        new = [
            info.name
            for info in anyio.get_running_tasks()
            if info.id not in self.baseline
        ]
        assert not new, f"tasks still running: {new}"


async def wait_until(condition: Callable[[], bool]) -> None:
    """Let the flow's tasks run until ``condition()`` holds (never a timed wait;
    the guard catches a condition that never comes)."""
    while not condition():
        await checkpoint()


def stage(flow: Flow, name: str) -> StageStats:
    return flow.stats()[name]


def assert_conserved(flow: Flow, feed: Feed | None = None) -> dict[str, StageStats]:
    """Conservation in the stats (:func:`_probe.assert_conserved`), and with a feed,
    stage one received what it produced and the producer's cleanup ran."""
    stats = _probe.assert_conserved(flow)
    if feed is not None:
        assert next(iter(stats.values())).received == len(feed.produced)
        assert feed.finished
    return stats


def dropped(flow: Flow) -> int:
    return sum(s.dropped for s in flow.stats().values())


def notes(exc: BaseException) -> list[str]:
    return [n for n in getattr(exc, "__notes__", ()) if n.startswith("flowrhythm:")]


async def cut(
    flow: Flow,
    how: str,
    ready: Callable[[], Awaitable[None]],
    feed: Feed,
) -> BaseException | None:
    """Start ``flow`` in ``async with flow:``, wait for ``ready()``, then end it:

    * ``abort``: ``stop(drain=False)`` returns ``None``;
    * ``drain_timeout``: ``stop(timeout=DRAIN_TIMEOUT)`` returns ``None`` (the
      scenarios are stuck, so the drain becomes an abort);
    * ``outer_cancel``: the scope around the block is cancelled, and the
      cancellation propagates (the scope catches it);
    * ``fatal``: the producer raises; the block raises that very error.

    Returns the exception the block raised (only for ``fatal``).
    """
    raised: BaseException | None = None
    with anyio.fail_after(GUARD), anyio.CancelScope() as outer:
        try:
            async with flow:
                await flow.start()
                await ready()
                if how == "abort":
                    assert await flow.stop(drain=False) is None
                elif how == "drain_timeout":
                    assert await flow.stop(timeout=DRAIN_TIMEOUT) is None
                elif how == "outer_cancel":
                    outer.cancel()
                    await anyio.sleep_forever()
                else:
                    assert how == "fatal"
                    feed.fail()
                    await anyio.sleep_forever()
        except SourceError as exc:
            raised = exc
    assert outer.cancelled_caught == (how == "outer_cancel")
    if how == "fatal":
        assert raised is feed.error
        assert notes(raised) == ["flowrhythm: raised by the producer"]
    else:
        assert raised is None
    return raised


# -- ordered: the flusher, the window, the intake lock -------------------------------


@pytest.mark.parametrize("kind", ["map", "fan_out"])
@pytest.mark.parametrize("how", CUTS)
async def test_ordered_cut_while_the_flusher_is_blocked_sending(
    anyio_backend: Any, feed: Feed, how: str, kind: str
) -> None:
    """The consumer holds the first output, so the worker flushing the next one
    waits for room downstream; the others fill the reorder window and wait for
    room in it. Cut there, the flow ends at once: the finished results waiting
    for their turn count as dropped in the ordered stage, the output handed over
    in the consumer, and every context manager exits."""
    workers = 3
    window = WINDOW_PER_WORKER * workers
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()
    stuck = Stuck(sink)

    async def work(x: int) -> int:
        await checkpoint()
        return x

    async def explode(x: int) -> AsyncIterator[int]:
        await checkpoint()
        yield 10 * x
        yield 10 * x + 1

    flow = Flow()
    flow.set_producer(feed.produce)
    flow.add_transformer(
        lifecycle.around("work", work) if kind == "map" else explode,
        name="work",
        scaling_strategy=FixedScaling(workers),
        ordered=True,
    )
    flow.set_consumer(
        lifecycle.around("sink", stuck.consume), name="sink", buffer_size=0
    )
    flow.set_error_handler(sink.handle)
    feed.put(*range(40))

    async def ready() -> None:
        await wait_until(
            lambda: (
                stage(flow, "work").blocked_workers == workers
                and stage(flow, "work").reorder_window == window
            )
        )
        await anyio.wait_all_tasks_blocked()
        s = stage(flow, "work")
        assert (s.blocked_workers, s.reorder_window, s.blocked_sends) == (
            workers,
            window,
            1,
        )
        assert stuck.entered == [0]

    await cut(flow, how, ready, feed)
    stats = assert_conserved(flow, feed)
    assert sink.consumed == []
    assert sink.failed == []
    assert stats["work"].received == 40
    assert stats["work"].reorder_window_peak == window
    assert stats["work"].emitted == 2  # one in the consumer's hands, one handed over
    assert (stats["sink"].received, stats["sink"].dropped) == (2, 2)
    assert stats["work"].dropped == 40 - stats["work"].processed
    lifecycle.assert_balanced()
    tasks.assert_none_left()


@pytest.mark.parametrize("how", CUTS)
async def test_ordered_cut_while_workers_wait_for_the_intake_lock(
    anyio_backend: Any, feed: Feed, how: str
) -> None:
    """One worker holds an item, one holds the intake lock waiting for input, two
    wait for the lock. Cut there: the lock's waiters are cancelled like any wait,
    nothing hangs, and the held item is dropped."""
    workers = 4
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()
    holding = anyio.Event()

    async def work(x: int) -> int:
        if x == 0:
            holding.set()
            await anyio.sleep_forever()
        return x

    flow = Flow()
    flow.set_producer(feed.produce)
    flow.add_transformer(
        lifecycle.around("work", work),
        name="work",
        scaling_strategy=FixedScaling(workers),
        ordered=True,
    )
    flow.set_consumer(sink.consume, name="sink")
    flow.set_error_handler(sink.handle)
    feed.put(0)

    async def ready() -> None:
        await holding.wait()
        await anyio.wait_all_tasks_blocked()
        s = stage(flow, "work")
        assert (s.busy_workers, s.idle_workers) == (1, workers - 1)

    await cut(flow, how, ready, feed)
    stats = assert_conserved(flow, feed)
    assert sink.consumed == []
    assert (stats["work"].received, stats["work"].dropped) == (1, 1)
    lifecycle.assert_balanced()
    tasks.assert_none_left()


def ordered_flow(
    feed: Feed,
    sink: Sink,
    lifecycle: Lifecycle,
    fn: Callable[[Any], Any],
    *,
    workers: int,
    clock: ManualClock | None = None,
    ordered: bool = True,
    **options: Any,
) -> Flow:
    flow = Flow(clock=clock)
    flow.set_producer(feed.produce)
    flow.add_transformer(
        lifecycle.around("work", fn),
        name="work",
        scaling_strategy=FixedScaling(workers),
        ordered=ordered,
        **options,
    )
    flow.set_consumer(lifecycle.around("sink", sink.consume), name="sink")
    flow.set_error_handler(sink.handle)
    return flow


@pytest.mark.parametrize("how", CUTS)
async def test_ordered_cut_while_the_head_backs_off(
    anyio_backend: Any, feed: Feed, how: str
) -> None:
    """ordered + retry: the head of the order fails its first attempt and backs
    off (the clock never moves); the items after it finish and wait for their
    turn until the window is full. Cut there: the backoff is cancelled at once,
    the head is not retried, everything in the window is dropped."""
    workers = 3
    window = WINDOW_PER_WORKER * workers
    clock = ManualClock()
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()
    attempts: Counter[int] = Counter()

    async def flaky(x: int) -> int:
        attempts[x] += 1
        if x == 0:
            raise ConnectionError(x)
        return x

    flow = ordered_flow(
        feed,
        sink,
        lifecycle,
        flaky,
        workers=workers,
        clock=clock,
        retry=Retry(attempts=5, backoff=1.0),
    )
    feed.put(*range(30))

    async def ready() -> None:
        await wait_until(lambda: stage(flow, "work").reorder_window == window)
        await clock.wait_for_sleepers(1)
        await anyio.wait_all_tasks_blocked()
        s = stage(flow, "work")
        assert (s.busy_workers, s.blocked_workers, s.retries) == (1, workers - 1, 1)

    await cut(flow, how, ready, feed)
    stats = assert_conserved(flow, feed)
    assert sink.consumed == []
    assert sink.failed == []
    assert attempts[0] == 1
    assert stats["work"].retries == 1
    assert (stats["work"].received, stats["work"].dropped) == (30, 30)
    assert clock.sleepers == 0
    lifecycle.assert_balanced()
    tasks.assert_none_left()


async def test_ordered_drain_waits_for_the_head_in_backoff(
    anyio_backend: Any, feed: Feed
) -> None:
    """A drain lets the head's retry finish, backoff included, and the window then
    flows out in order; nothing is dropped."""
    workers = 3
    window = WINDOW_PER_WORKER * workers
    clock = ManualClock()
    sink = Sink()
    lifecycle = Lifecycle()
    attempts: Counter[int] = Counter()
    stopped = anyio.Event()

    async def flaky(x: int) -> int:
        attempts[x] += 1
        if x % 7 == 0 and attempts[x] == 1:
            raise ConnectionError(x)
        return x

    flow = ordered_flow(
        feed,
        sink,
        lifecycle,
        flaky,
        workers=workers,
        clock=clock,
        retry=Retry(backoff=1.0),
    )
    feed.put(*range(30))

    async def stop() -> None:
        await flow.stop()
        stopped.set()

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(
                lambda: (
                    stage(flow, "work").reorder_window == window
                    and len(feed.produced) == 30
                )
            )
            tg.start_soon(stop)
            await anyio.wait_all_tasks_blocked()
            assert not stopped.is_set()
            assert sink.consumed == []
            async with clock.autojump():
                await stopped.wait()
    stats = assert_conserved(flow, feed)
    assert sink.consumed == list(range(30))
    assert stats["work"].retries == 5  # 0, 7, 14, 21, 28
    assert dropped(flow) == 0
    lifecycle.assert_balanced()


@pytest.mark.parametrize(
    "retry",
    [None, "other", "timeout"],
    ids=["no_retry", "retry_not_on_timeout", "retry_on_timeout"],
)
async def test_ordered_timeout_frees_the_window_behind_a_hung_head(
    anyio_backend: Any, feed: Feed, retry: str | None
) -> None:
    """ordered + timeout: the head hangs, the window fills behind it; its timeout
    ends the wait. Without a retry, or with a Retry whose ``on`` does not cover
    TimeoutError, the head goes to the error handler with the TimeoutError after
    one attempt (no "gave up" note) and is skipped; with one that covers it, the
    second attempt delivers it in its place. The order holds either way."""
    workers = 3
    window = WINDOW_PER_WORKER * workers
    count = 3 * window
    clock = ManualClock()
    sink = Sink()
    lifecycle = Lifecycle()
    attempts: Counter[int] = Counter()

    async def work(x: int) -> int:
        attempts[x] += 1
        if x == 0 and attempts[x] == 1:
            await anyio.sleep_forever()
        await checkpoint()
        return x

    options: dict[str, Any] = {"timeout": 1.0}
    if retry == "other":
        options["retry"] = Retry(attempts=3, on=ConnectionError, backoff=0.5)
    elif retry == "timeout":
        options["retry"] = Retry(attempts=3, on=TimeoutError, backoff=0.5, jitter=False)
    flow = ordered_flow(
        feed, sink, lifecycle, work, workers=workers, clock=clock, **options
    )
    feed.put(*range(count))
    feed.end()
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(lambda: stage(flow, "work").reorder_window == window)
            await anyio.wait_all_tasks_blocked()
            assert sink.consumed == []
            assert stage(flow, "work").timeouts == 0
            async with clock.autojump():
                await flow.wait()
    stats = assert_conserved(flow, feed)
    s = stats["work"]
    if retry == "timeout":
        assert sink.consumed == list(range(count))
        assert sink.failed == []
        assert (s.timeouts, s.retries, attempts[0]) == (1, 1, 2)
        assert clock() == 1.5  # the timeout, then the backoff
    else:
        assert sink.consumed == list(range(1, count))
        ((item, exc),) = sink.failed
        assert item == 0
        assert type(exc) is TimeoutError
        assert notes(exc) == []  # one attempt: nothing to say about retries
        assert (s.timeouts, s.retries, attempts[0]) == (1, 0, 1)
        assert clock() == 1.0
    assert s.reorder_window_peak == window
    lifecycle.assert_balanced()


async def test_ordered_rate_limited_keeps_order_and_rate(
    anyio_backend: Any, feed: Feed
) -> None:
    """ordered + rate_limit: workers queue for tokens while holding numbered items;
    the output keeps input order and the calls keep the rate."""
    workers, count = 4, 40
    clock = ManualClock()
    sink = Sink()
    lifecycle = Lifecycle()
    started: list[float] = []

    async def work(x: int) -> int:
        started.append(clock())
        for _ in range(x % 3):
            await checkpoint()
        return x

    flow = ordered_flow(
        feed,
        sink,
        lifecycle,
        work,
        workers=workers,
        clock=clock,
        rate_limit=RateLimit(per_second=10, burst=2),
    )
    feed.put(*range(count))
    feed.end()
    with anyio.fail_after(GUARD):
        async with clock.autojump():
            await flow.run()
    stats = assert_conserved(flow, feed)
    assert sink.consumed == list(range(count))
    for i in range(2, count):  # at most burst=2 calls in any 0.1 s
        assert started[i] - started[i - 2] >= 0.1 - 1e-9
    assert stats["work"].throttled_waits > 0
    lifecycle.assert_balanced()


@pytest.mark.parametrize("how", CUTS)
async def test_ordered_cut_while_workers_are_throttled(
    anyio_backend: Any, feed: Feed, how: str
) -> None:
    """Every worker waits for a token (the clock never moves) while holding a
    numbered item. Cut there: the waits end at once, the items are dropped, the
    throttled gauge is back to zero, every context manager exits."""
    workers = 3
    clock = ManualClock()
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()

    async def work(x: int) -> None:
        await checkpoint()

    flow = ordered_flow(
        feed,
        sink,
        lifecycle,
        work,
        workers=workers,
        clock=clock,
        rate_limit=RateLimit(per_second=1),
    )
    feed.put(*range(10))

    async def ready() -> None:
        await wait_until(lambda: stage(flow, "work").throttled_workers == workers)
        await anyio.wait_all_tasks_blocked()
        assert stage(flow, "work").throttled_workers == workers
        assert sink.consumed == [None]  # the first call had the burst's token

    await cut(flow, how, ready, feed)
    stats = assert_conserved(flow, feed)
    assert sink.consumed == [None]
    assert stats["work"].throttled_workers == 0
    assert stats["work"].dropped == 10 - 1
    assert clock.sleepers == 0
    lifecycle.assert_balanced()
    tasks.assert_none_left()


# -- timeout and retry ------------------------------------------------------------


async def test_timeout_with_a_retry_that_does_not_cover_timeout_error(
    anyio_backend: Any, feed: Feed
) -> None:
    """A Retry whose ``on`` leaves out TimeoutError: a timed-out attempt is not
    retried. Item 0 times out at its first attempt (no note: one attempt);
    item 1 fails with a retried ConnectionError, then times out at its second:
    the TimeoutError goes to the handler, noted "gave up after 2 attempts"."""
    clock = ManualClock()
    sink = Sink()
    lifecycle = Lifecycle()
    attempts: Counter[int] = Counter()

    async def call(x: int) -> None:
        attempts[x] += 1
        if x == 1 and attempts[x] == 1:
            raise ConnectionError(x)
        if x in (0, 1):
            await anyio.sleep_forever()
        sink.consumed.append(x)

    flow = Flow(clock=clock)
    flow.set_producer(feed.produce)
    flow.set_consumer(
        lifecycle.around("call", call),
        name="call",
        timeout=2.0,
        retry=Retry(attempts=3, on=ConnectionError, backoff=1.0, jitter=False),
    )
    flow.set_error_handler(sink.handle)
    feed.put(0, 1, 2)
    feed.end()
    with anyio.fail_after(GUARD):
        async with clock.autojump():
            await flow.run()
    stats = assert_conserved(flow, feed)
    assert sink.consumed == [2]
    assert dict(attempts) == {0: 1, 1: 2, 2: 1}
    (e0, e1) = (exc for _, exc in sink.failed)
    assert sink.failed_items == [0, 1]
    assert type(e0) is type(e1) is TimeoutError
    assert notes(e0) == []
    assert notes(e1) == ["flowrhythm: consumer 'call' gave up after 2 attempts"]
    s = stats["call"]
    assert (s.timeouts, s.retries, s.errors, s.processed) == (2, 1, 2, 1)
    assert clock() == 2.0 + 1.0 + 2.0
    lifecycle.assert_balanced()


@pytest.mark.parametrize("ordered", [False, True])
async def test_timeout_and_abort_in_the_same_step(
    anyio_backend: Any, feed: Feed, ordered: bool
) -> None:
    """The clock reaches a call's deadline and the flow is aborted before any task
    runs: whichever wins, the flow ends at once and every item is accounted for
    (a TimeoutError reaching the error handler during the abort is counted as an
    error; one that does not, as dropped)."""
    workers = 2
    clock = ManualClock()
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()
    running = 0

    async def hang(x: int) -> int:
        nonlocal running
        running += 1
        await anyio.sleep_forever()
        return x

    flow = ordered_flow(
        feed,
        sink,
        lifecycle,
        hang,
        workers=workers,
        clock=clock,
        timeout=1.0,
        ordered=ordered,
    )
    feed.put(*range(5))
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(lambda: running == workers)
            await clock.wait_for_sleepers(workers)
            clock.advance(1.0)  # the watchers are due, but have not run yet
            await flow.stop(drain=False)  # aborts before its first await
    stats = assert_conserved(flow, feed)
    assert sink.consumed == []
    assert stats["work"].errors == len(sink.failed) <= workers
    assert all(type(exc) is TimeoutError for _, exc in sink.failed)
    assert clock.sleepers == 0
    lifecycle.assert_balanced()
    tasks.assert_none_left()


# -- batch ------------------------------------------------------------------------


def batch_flow(
    feed: Feed,
    consume: Callable[[Any], Any],
    lifecycle: Lifecycle,
    *,
    max_size: int,
    max_wait: float | None = None,
    clock: ManualClock | None = None,
    sink: Sink | None = None,
) -> Flow:
    flow = Flow(clock=clock)
    flow.set_producer(feed.produce)
    flow.add_batch(max_size, max_wait=max_wait)
    flow.set_consumer(lifecycle.around("sink", consume), name="sink", buffer_size=0)
    flow.set_error_handler((sink or Sink()).handle)
    return flow


@pytest.mark.parametrize("how", CUTS)
async def test_batch_cut_while_blocked_sending_a_batch(
    anyio_backend: Any, feed: Feed, how: str
) -> None:
    """The consumer holds the first list; the batch stage has sent the second one
    and waits for room, taking no new items. Cut there: the list being handed
    over counts as sent (its items processed in the batch stage, the list dropped
    in the consumer, like any result being handed over), the item still in the
    batch stage's input as dropped there."""
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()
    stuck = Stuck(sink)
    flow = batch_flow(feed, stuck.consume, lifecycle, max_size=2)
    feed.put(*range(5))

    async def ready() -> None:
        await wait_until(lambda: stage(flow, "batch").blocked_workers == 1)
        await anyio.wait_all_tasks_blocked()
        assert stuck.entered == [[0, 1]]

    await cut(flow, how, ready, feed)
    stats = assert_conserved(flow, feed)
    assert sink.consumed == []
    b, s = stats["batch"], stats["sink"]
    assert (b.received, b.processed, b.emitted, b.dropped) == (5, 4, 2, 1)
    assert (s.received, s.processed, s.dropped) == (2, 0, 2)
    lifecycle.assert_balanced()
    tasks.assert_none_left()


async def test_batch_drained_while_blocked_sending_a_batch(
    anyio_backend: Any, feed: Feed
) -> None:
    """The same moment, ended by a drain: the list waiting for room is delivered,
    then the rest, the last one partial; nothing is dropped."""
    sink = Sink()
    lifecycle = Lifecycle()
    stuck = Stuck(sink)
    stopped = anyio.Event()
    flow = batch_flow(feed, stuck.consume, lifecycle, max_size=2)
    feed.put(*range(5))

    async def stop() -> None:
        await flow.stop()
        stopped.set()

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(
                lambda: (
                    stage(flow, "batch").blocked_workers == 1
                    and len(feed.produced) == 5
                )
            )
            tg.start_soon(stop)
            await anyio.wait_all_tasks_blocked()
            assert not stopped.is_set()
            stuck.release.set()
    stats = assert_conserved(flow, feed)
    assert sink.consumed == [[0, 1], [2, 3], [4]]
    assert dropped(flow) == 0
    assert (stats["batch"].processed, stats["batch"].emitted) == (5, 3)
    lifecycle.assert_balanced()


@pytest.mark.parametrize("ending", ["drain_timeout", "drain"])
async def test_drain_with_retries_in_backoff_and_a_pending_batch(
    anyio_backend: Any, feed: Feed, ending: str
) -> None:
    """Two workers back off (on a clock that only moves if the test lets it), the
    items after them wait in the input, and the batch stage holds a partial list.
    A drain lets the retries finish and then sends the partial list on. A drain
    whose timeout passes first becomes an abort: the backoffs end at once, the
    items in the workers' hands and in the input are dropped, and so are the
    items of the pending list, in the batch stage."""
    clock = ManualClock()
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()
    attempts: Counter[int] = Counter()

    async def flaky(x: int) -> int:
        attempts[x] += 1
        if x % 3 == 0:
            raise ConnectionError(x)
        return x

    flow = Flow(clock=clock)
    flow.set_producer(feed.produce)
    flow.add_transformer(
        lifecycle.around("flaky", flaky),
        name="flaky",
        scaling_strategy=FixedScaling(2),
        retry=Retry(attempts=2, backoff=60.0),
    )
    flow.add_batch(10)
    flow.set_consumer(lifecycle.around("sink", sink.consume), name="sink")
    flow.set_error_handler(sink.handle)
    feed.put(*range(9))
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(lambda: stage(flow, "flaky").retries == 2)
            await clock.wait_for_sleepers(2)
            await anyio.wait_all_tasks_blocked()
            assert stage(flow, "batch").received == 2  # [1, 2] pending
            if ending == "drain_timeout":
                assert await flow.stop(timeout=DRAIN_TIMEOUT) is None
            else:
                async with clock.autojump():
                    assert await flow.stop() is None
    stats = assert_conserved(flow, feed)
    f, b = stats["flaky"], stats["batch"]
    if ending == "drain_timeout":
        assert sink.consumed == []
        assert sink.failed == []
        assert (f.received, f.processed, f.dropped, f.retries) == (9, 2, 7, 2)
        assert (b.received, b.processed, b.dropped, b.emitted) == (2, 0, 2, 0)
        assert clock() == 0.0
    else:
        assert sink.consumed == [[1, 2, 4, 5, 7, 8]]
        assert sorted(sink.failed_items) == [0, 3, 6]
        assert dropped(flow) == 0
        assert (f.retries, f.errors) == (3, 3)
    if ending == "drain_timeout":
        assert dict(attempts) == {0: 1, 1: 1, 2: 1, 3: 1}  # no attempt after the cut
    else:
        assert dict(attempts) == {x: 2 if x % 3 == 0 else 1 for x in range(9)}
    assert clock.sleepers == 0
    lifecycle.assert_balanced()
    tasks.assert_none_left()


@pytest.mark.parametrize(
    "race",
    [
        "deadline_then_end",
        "end_then_deadline",
        "deadline_then_stop",
        "item_and_deadline",
    ],
)
async def test_batch_max_wait_racing_the_end_of_input(
    anyio_backend: Any, feed: Feed, race: str
) -> None:
    """A partial list's max_wait passes in the same step as its input ends (the
    producer runs out, or stop() drains), or as another item arrives. Whichever
    the batch stage sees first, every item is sent exactly once, in order, in
    lists of at most max_size, and nothing is dropped."""
    clock = ManualClock()
    sink = Sink()
    lifecycle = Lifecycle()
    sent: list[tuple[float, list[int]]] = []

    async def record(batch: list[int]) -> None:
        sent.append((clock(), batch))

    flow = batch_flow(
        feed, record, lifecycle, max_size=3, max_wait=5.0, clock=clock, sink=sink
    )
    feed.put(0, 1)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(lambda: stage(flow, "batch").received == 2)
            await clock.wait_for_sleepers(1)  # the list's timer
            await anyio.wait_all_tasks_blocked()
            assert sent == []
            if race == "deadline_then_end":
                clock.advance(5.0)
                feed.end()
            elif race == "end_then_deadline":
                feed.end()
                clock.advance(5.0)
            elif race == "deadline_then_stop":
                clock.advance(5.0)
                await flow.stop()
            else:
                feed.put(2)
                clock.advance(5.0)
                feed.put(3)
                feed.end()
    stats = assert_conserved(flow, feed)
    items = [x for _, batch in sent for x in batch]
    expected = [0, 1, 2, 3] if race == "item_and_deadline" else [0, 1]
    assert items == expected
    assert all(0 < len(batch) <= 3 for _, batch in sent)
    assert all(at == 5.0 for at, _ in sent)
    if race != "item_and_deadline":
        assert sent == [(5.0, [0, 1])]
    assert dropped(flow) == 0
    assert (stats["batch"].processed, stats["batch"].emitted) == (
        len(expected),
        len(sent),
    )
    assert sink.failed == []
    assert clock.sleepers == 0
    lifecycle.assert_balanced()


# -- retiring workers that wait in an ordered stage --------------------------------


class Steered(ScalingStrategy):
    """Consulted on every item entering the stage: applies the next change of
    ``deltas`` (cycling), or the one the test queued."""

    sampling_events = 1
    sampling_period = 0.0

    def __init__(
        self, initial: int, max_workers: int, deltas: tuple[int, ...] = (0,)
    ) -> None:
        self.min_workers = 1
        self.max_workers = max_workers
        self._initial = initial
        self.deltas = deltas
        self.calls = 0
        self.queued = 0

    def initial_workers(self) -> int:
        return self._initial

    def on_enqueue(self, stats: StageStats) -> int:
        if self.queued:
            delta, self.queued = self.queued, 0
            return delta
        self.calls += 1
        return self.deltas[self.calls % len(self.deltas)]

    def for_stage(self, stage_name: str) -> ScalingStrategy:
        return self  # the test steers this very instance


async def test_retiring_workers_that_wait_for_room_in_the_window(
    anyio_backend: Any, feed: Feed
) -> None:
    """The window is full behind a held head and five workers wait for room; the
    scaler retires three of them (their context managers exit at once), the head
    is released, the pool grows again, fills the window behind another held item,
    and four more waiters are retired. The output stays in input order, nothing
    is lost, every context manager exits."""
    clock = ManualClock()
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()
    strategy = Steered(initial=6, max_workers=6)
    gates = {0: anyio.Event(), 40: anyio.Event()}

    async def work(x: int) -> int:
        if x in gates:
            await gates[x].wait()
        await checkpoint()
        return x

    flow = Flow(clock=clock)
    flow.set_producer(feed.produce)
    flow.add_transformer(
        lifecycle.around("work", work),
        name="work",
        scaling_strategy=strategy,
        ordered=True,
    )
    flow.set_consumer(sink.consume, name="sink")
    flow.set_error_handler(sink.handle)
    work_stats = lambda: stage(flow, "work")

    async def window_full_behind_the_head(workers: int) -> None:
        await wait_until(
            lambda: (
                work_stats().reorder_window == WINDOW_PER_WORKER * workers
                and work_stats().blocked_workers == workers - 1
            )
        )
        await anyio.wait_all_tasks_blocked()

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            feed.put(*range(24))
            await window_full_behind_the_head(6)
            strategy.queued = -3
            feed.put(24)  # entering the stage, it has the scaler consulted
            await wait_until(lambda: work_stats().total_workers() == 3)
            assert lifecycle.exited["work"] == 3
            assert work_stats().blocked_workers == 2
            gates[0].set()
            await wait_until(lambda: len(sink.consumed) == 25)
            strategy.queued = 2
            feed.put(*range(25, 61))
            await window_full_behind_the_head(5)
            assert lifecycle.entered["work"] == 8
            strategy.queued = -4
            feed.put(61)
            await wait_until(lambda: work_stats().total_workers() == 1)
            gates[40].set()
            feed.end()
    stats = assert_conserved(flow, feed)
    assert sink.consumed == list(range(62))
    assert stats["work"].reorder_window_peak == WINDOW_PER_WORKER * 6
    assert stats["work"].last_scale_down_at is not None
    lifecycle.assert_balanced()
    tasks.assert_none_left()


@pytest.mark.parametrize("seed", range(3))
async def test_retiring_and_adding_workers_around_the_intake_lock(
    anyio_backend: Any, feed: Feed, seed: int
) -> None:
    """Items trickle in one at a time, so most workers of the ordered stage wait
    for the intake lock or hold it waiting for input, while the scaler retires
    and adds workers on every item (some held items fill the window meanwhile).
    A worker retired while it held the lock must not take an item with it: the
    output is complete and in input order."""
    count = 300
    deltas = [(-3, 0, 3, -1, 2, -5, 4, 1, -2), (-1, 1), (-5, 5, 0, -2, 2)][seed]
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()
    strategy = Steered(initial=4, max_workers=6, deltas=deltas)

    async def work(x: int) -> int:
        for _ in range((x * 7 + seed) % 5 if x % 50 else 30):
            await checkpoint()
        return x

    flow = Flow()
    flow.set_producer(feed.produce)
    flow.add_transformer(
        lifecycle.around("work", work),
        name="work",
        scaling_strategy=strategy,
        ordered=True,
    )
    flow.set_consumer(sink.consume, name="sink")
    flow.set_error_handler(sink.handle)
    feed.put(*range(count))
    feed.end()
    with anyio.fail_after(GUARD):
        await flow.run()
    stats = assert_conserved(flow, feed)
    assert sink.consumed == list(range(count))
    assert stats["work"].last_scale_down_at is not None
    assert lifecycle.entered["work"] > 6  # retired workers were replaced
    assert stats["work"].reorder_window_peak <= WINDOW_PER_WORKER * 6
    lifecycle.assert_balanced()
    tasks.assert_none_left()


async def test_a_retirement_that_does_not_happen_keeps_the_window_bound(
    anyio_backend: Any,
) -> None:
    """Five workers hold items; the sixth holds the intake lock and is handed an
    item; in the same step the scaler picks it for retirement (too late: it keeps
    the item and stays), then asks for one worker more, which must wait for the
    retiring one to be gone. The pool never has more than six workers, so the
    window must stay within 4 x 6 items. (Before 5a11a28 the spawn deferred
    for the retiree's slot outlived it: the stage counted seven workers and the
    window reached 28.)"""
    max_workers = 6
    go = anyio.Event()
    release = anyio.Event()
    sink = Sink()
    #: the change the scaler asks for as each item enters: nothing for the held
    #: items 0-4 and item 5 (handed to the idle worker), -1 at item 6, +1 at 7
    deltas = {6: -1, 7: 1}

    class Scripted(ScalingStrategy):
        sampling_events = 1
        sampling_period = 0.0
        min_workers = 1

        def __init__(self) -> None:
            self.max_workers = max_workers
            self.offered = 0

        def initial_workers(self) -> int:
            return max_workers

        def on_enqueue(self, stats: StageStats) -> int:
            delta = deltas.get(self.offered, 0)
            self.offered += 1
            return delta

    async def produce() -> AsyncIterator[int]:
        for x in range(5):
            yield x
        await go.wait()
        for x in range(5, 60):  # in one step: no await in between
            yield x

    async def work(x: int) -> int:
        if x < 5:
            await release.wait()
        return x

    flow = Flow()
    flow.set_producer(produce)
    flow.add_transformer(work, scaling_strategy=Scripted(), ordered=True)
    flow.set_consumer(sink.consume)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(lambda: stage(flow, "work").busy_workers == 5)
            await anyio.wait_all_tasks_blocked()
            assert stage(flow, "work").idle_workers == 1
            go.set()
            await wait_until(lambda: stage(flow, "work").blocked_workers == 1)
            await anyio.wait_all_tasks_blocked()
            assert stage(flow, "work").total_workers() == max_workers
            peak = stage(flow, "work").reorder_window_peak
            release.set()
    assert_conserved(flow)
    assert sink.consumed == list(range(60))
    assert peak <= WINDOW_PER_WORKER * max_workers


# -- a custom clock's deadline watchers --------------------------------------------


def timed_flow(
    feed: Feed,
    sink: Sink,
    lifecycle: Lifecycle,
    clock: ManualClock,
    consume: Callable[[Any], Any],
) -> Flow:
    """Every wait of the operators on one custom clock: timed calls (ordered
    map, filter, fan-out, consumer) and a batch timer."""

    async def double(x: int) -> int:
        return 2 * x

    async def keep(x: int) -> bool:
        return x % 3 != 1

    async def split(batch: list[int]) -> AsyncIterator[int]:
        for x in batch:
            yield x

    flow = Flow(clock=clock)
    flow.set_producer(feed.produce)
    flow.add_transformer(
        lifecycle.around("double", double),
        name="double",
        scaling_strategy=FixedScaling(2),
        ordered=True,
        timeout=1.0,
    )
    flow.add_filter(keep, timeout=1.0)
    flow.add_batch(4, max_wait=10.0)
    flow.add_transformer(split, timeout=1.0)
    flow.set_consumer(lifecycle.around("sink", consume), name="sink", timeout=30.0)
    flow.set_error_handler(sink.handle)
    return flow


@pytest.mark.parametrize("how", ["drain", *CUTS])
async def test_deadline_watchers_never_keep_a_finished_flow_alive(
    anyio_backend: Any, feed: Feed, how: str
) -> None:
    """A ManualClock that nobody moves: every timed call and batch timer waits on
    it through a watcher task in the run. When the calls finish (a drain), or
    the flow is cut while calls and the batch timer wait on the clock, the run
    ends without the clock moving and leaves no sleeper and no task behind."""
    clock = ManualClock()
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()
    hang = anyio.Event()

    async def consume(x: int) -> None:
        if x == 8 and how != "drain":
            hang.set()
            await anyio.sleep_forever()  # its 30 s never pass
        sink.consumed.append(x)

    flow = timed_flow(feed, sink, lifecycle, clock, consume)
    # doubled, then filtered: 0, 2, 6, 8 (a full list), 12, 14, 18 (a partial one)
    feed.put(*range(10))
    if how == "drain":
        feed.end()
        with anyio.fail_after(GUARD):
            await flow.run()
    else:

        async def ready() -> None:
            await hang.wait()
            await wait_until(lambda: stage(flow, "batch").received == 7)
            await anyio.wait_all_tasks_blocked()
            assert clock.sleepers == 2  # the held call's deadline, the batch timer

        await cut(flow, how, ready, feed)
    assert_conserved(flow, feed)
    assert (clock(), clock.sleepers) == (0.0, 0)
    if how == "drain":
        assert sink.consumed == [0, 2, 6, 8, 12, 14, 18]
        assert dropped(flow) == 0
    else:
        assert sink.consumed == [0, 2, 6]
        # a drain sends the partial list on before its timeout cuts the flow
        pending = 0 if how == "drain_timeout" else 3
        assert stage(flow, "batch").dropped == pending
    lifecycle.assert_balanced()
    tasks.assert_none_left()


class SpyClock(ManualClock):
    """Records, for each sleep that starts, how many sleepers there are then
    (itself included) and how many calls are running."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.registrations: list[tuple[int, int]] = []

    async def sleep(self, seconds: float) -> None:
        self.registrations.append((self.sleepers + 1, self.running))
        await super().sleep(seconds)


async def test_a_finished_calls_watcher_never_sleeps_on_the_clock(
    anyio_backend: Any, feed: Feed
) -> None:
    """Only a call that is still running has a deadline on the clock: a test that
    waits with ``clock.wait_for_sleepers(1)`` for, say, a backoff must not be
    woken by the deadline of a call that has already returned (its next
    ``advance()`` would then miss the backoff)."""
    clock = SpyClock()
    sink = Sink()

    async def fast(x: int) -> int:
        clock.running += 1
        clock.running -= 1
        return x

    flow = Flow(clock=clock)
    flow.set_producer(feed.produce)
    flow.add_transformer(fast, timeout=1.0)
    flow.set_consumer(sink.consume)
    feed.put(*range(20))
    feed.end()
    with anyio.fail_after(GUARD):
        await flow.run()
    assert_conserved(flow, feed)
    assert sink.consumed == list(range(20))
    assert clock.registrations == []  # no call was running when a sleep began


@pytest.mark.parametrize("where", ["timeout", "max_wait", "backoff", "rate_limit"])
async def test_a_clock_failing_fails_the_flow_with_its_error(
    anyio_backend: Any, feed: Feed, where: str
) -> None:
    """ "Failure is loud": at most one exception escapes, as itself, with a note
    saying where it came from; never an exception group. Wherever the flow waits
    on a broken clock (a deadline, a retry's backoff, a rate limit), the clock's
    error fails the flow: it is not the item's error."""
    error = ClockError("the clock stopped")

    class BrokenClock(ManualClock):
        async def sleep(self, seconds: float) -> None:
            raise error

    clock = BrokenClock()
    sink = Sink()
    lifecycle = Lifecycle()

    async def hang(x: int) -> None:
        await anyio.sleep_forever()

    flow = Flow(clock=clock)
    flow.set_producer(feed.produce)

    async def flaky(x: int) -> None:
        raise ItemError(x)

    flow.set_error_handler(sink.handle)
    if where == "timeout":
        flow.set_consumer(lifecycle.around("sink", hang), name="sink", timeout=1.0)
    elif where == "max_wait":
        flow.add_batch(10, max_wait=1.0)
        flow.set_consumer(lifecycle.around("sink", sink.consume), name="sink")
    elif where == "backoff":
        flow.set_consumer(
            lifecycle.around("sink", flaky), name="sink", retry=Retry(backoff=1.0)
        )
    else:
        flow.set_consumer(
            lifecycle.around("sink", sink.consume),
            name="sink",
            rate_limit=RateLimit(per_second=1.0),
        )
    feed.put(1, 2)
    with anyio.fail_after(GUARD), pytest.raises(ClockError) as info:
        await flow.run()
    assert info.value is error
    assert "flowrhythm: raised by the flow's clock" in notes(error)
    assert sink.failed == []  # the clock's error is not an item's
    assert_conserved(flow, feed)
    lifecycle.assert_balanced()


# -- a fan-out generator's own cleanup ---------------------------------------------


class Resource:
    """What a fan-out generator holds while it yields: entered and exited, the
    exit awaiting."""

    def __init__(self) -> None:
        self.entered: list[Any] = []
        self.exited: list[Any] = []

    @asynccontextmanager
    async def open(self, x: Any) -> AsyncIterator[None]:
        self.entered.append(x)
        try:
            yield
        finally:
            await checkpoint()
            await checkpoint()
            self.exited.append(x)


def fan_out_flow(
    feed: Feed,
    explode: Callable[[Any], AsyncIterator[Any]],
    consume: Callable[[Any], Any],
    lifecycle: Lifecycle,
    *,
    workers: int = 2,
) -> Flow:
    flow = Flow()
    flow.set_producer(feed.produce)
    flow.add_transformer(
        explode, name="explode", scaling_strategy=FixedScaling(workers)
    )
    flow.set_consumer(lifecycle.around("sink", consume), name="sink", buffer_size=0)
    flow.set_error_handler(Sink().handle)
    return flow


async def suspended_at_yield(flow: Flow, workers: int = 2) -> None:
    """Both generators wait at a yield for room downstream."""
    await wait_until(lambda: stage(flow, "explode").blocked_workers == workers)
    await anyio.wait_all_tasks_blocked()


@pytest.mark.parametrize("how", CUTS)
async def test_fan_out_cleanup_that_awaits_completes_on_every_cut(
    anyio_backend: Any, feed: Feed, how: str
) -> None:
    """Two generators are suspended at their yield, waiting for room downstream,
    each inside an ``async with`` and a ``try/finally`` that await. However the
    flow is cut, the generators are closed and their cleanup runs to its end
    (shielded, like a context manager's exit); the inputs count as dropped."""
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()
    stuck = Stuck(sink)
    resource = Resource()
    cleaned: list[int] = []

    async def explode(x: int) -> AsyncIterator[tuple[int, int]]:
        async with resource.open(x):
            try:
                for k in range(100):
                    yield (x, k)
            finally:
                await checkpoint()
                cleaned.append(x)

    flow = fan_out_flow(feed, explode, stuck.consume, lifecycle)
    feed.put(0, 1)
    await cut(flow, how, lambda: suspended_at_yield(flow), feed)
    stats = assert_conserved(flow, feed)
    assert sorted(cleaned) == [0, 1]
    assert sorted(resource.exited) == sorted(resource.entered) == [0, 1]
    e, s = stats["explode"], stats["sink"]
    assert (e.received, e.processed, e.dropped) == (2, 0, 2)
    assert e.emitted == 3  # one in the consumer's hands, two being handed over
    assert (s.received, s.dropped) == (3, 3)
    lifecycle.assert_balanced()
    tasks.assert_none_left()


@pytest.mark.parametrize("how", CUTS)
async def test_fan_out_cleanup_raising_while_the_flow_is_cut(
    anyio_backend: Any, feed: Feed, how: str
) -> None:
    """A generator's cleanup that raises while the flow is cut is a fatal error,
    like a context manager's exit that raises: it comes out of run() as itself,
    noted, instead of the caller's cancellation too; after another fatal error
    it is a note on that one. (The consumer cuts the flow from inside, once both
    generators wait at their yield, so run() is the caller.)"""
    tasks = Tasks()
    lifecycle = Lifecycle()
    error = ExitError("could not close the cursor")
    closing: list[int] = []
    outer = anyio.CancelScope()

    async def explode(x: int) -> AsyncIterator[tuple[int, int]]:
        try:
            for k in range(100):
                yield (x, k)
        finally:
            closing.append(x)
            await checkpoint()
            if x == 1:
                raise error

    async def consume(item: tuple[int, int]) -> None:
        await suspended_at_yield(flow)
        if how == "abort":
            await flow.stop(drain=False)
        elif how == "drain_timeout":
            await flow.stop(timeout=DRAIN_TIMEOUT)
        elif how == "outer_cancel":
            outer.cancel()
        else:
            feed.fail()
        await anyio.sleep_forever()

    flow = fan_out_flow(feed, explode, consume, lifecycle)
    feed.put(0, 1)
    with (
        anyio.fail_after(GUARD),
        outer,
        pytest.raises((ExitError, SourceError)) as info,
    ):
        await flow.run()
    assert not outer.cancelled_caught  # the error came out instead
    if how == "fatal":
        assert info.value is feed.error
        assert any("could not close the cursor" in n for n in notes(feed.error))
    else:
        assert info.value is error
        assert notes(error) == ["flowrhythm: raised in transformer 'explode'"]
    assert sorted(closing) == [0, 1]
    stats = assert_conserved(flow, feed)
    assert stats["explode"].dropped == 2
    lifecycle.assert_balanced()
    tasks.assert_none_left()


async def test_a_cleanup_failing_under_async_with_while_the_caller_is_cancelled(
    anyio_backend: Any, feed: Feed
) -> None:
    """The same fault as above, with the flow hosted by ``async with flow:``: the
    README's "What happens when" says the error comes out instead of the
    cancellation; here nothing comes out and the flow looks merely cancelled."""
    lifecycle = Lifecycle()
    error = ExitError("could not close the cursor")

    async def explode(x: int) -> AsyncIterator[int]:
        try:
            for k in range(100):
                yield k
        finally:
            await checkpoint()
            raise error

    flow = fan_out_flow(feed, explode, Stuck(Sink()).consume, lifecycle, workers=1)
    feed.put(0)
    raised: BaseException | None = None
    with anyio.fail_after(GUARD), anyio.CancelScope() as outer:
        try:
            async with flow:
                await flow.start()
                await suspended_at_yield(flow, 1)
                outer.cancel()
                await anyio.sleep_forever()
        except ExitError as exc:
            raised = exc
    assert flow._run is not None
    assert flow._run.fatal is error  # it was recorded
    assert raised is error, "the fatal error was swallowed"
    assert not outer.cancelled_caught


#: how long a "hung" cleanup of the tests below waits on its own before giving
#: up: far longer than the flow's cleanup bound, patched to CUT_OFF
HANG = 1.0
CUT_OFF = 0.05


@pytest.mark.parametrize("how", CUTS)
async def test_fan_out_cleanup_that_hangs_is_cut_off(
    anyio_backend: Any,
    feed: Feed,
    how: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A generator's cleanup that hangs is cut off once the flow is being
    cancelled (the cleanup bound, shortened here), with a warning; the flow
    ends. (The cleanup gives up on its own after HANG seconds, so a flow that
    fails to cut it off ends too, and the test says so.)"""
    monkeypatch.setattr(flowrhythm._cleanup, "CLEANUP_TIMEOUT", CUT_OFF)
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()
    stuck = Stuck(sink)
    started: list[int] = []
    gave_up: list[int] = []

    async def explode(x: int) -> AsyncIterator[tuple[int, int]]:
        try:
            for k in range(100):
                yield (x, k)
        finally:
            started.append(x)
            with anyio.move_on_after(HANG) as own:
                await anyio.sleep_forever()
            if own.cancelled_caught:
                gave_up.append(x)

    flow = fan_out_flow(feed, explode, stuck.consume, lifecycle, workers=1)
    feed.put(0)
    with caplog.at_level(logging.WARNING, logger="flowrhythm"):
        await cut(flow, how, lambda: suspended_at_yield(flow, 1), feed)
    assert started == [0]
    assert gave_up == [], "the flow did not cut the hung cleanup off"
    assert any("cut off" in r.getMessage() for r in caplog.records)
    stats = assert_conserved(flow, feed)
    assert stats["explode"].dropped == 1
    lifecycle.assert_balanced()
    tasks.assert_none_left()


@pytest.mark.parametrize("when", ["cancelled_first", "exit_first"])
async def test_a_hung_cleanup_is_bounded_when_the_caller_is_cancelled(
    anyio_backend: Any,
    feed: Feed,
    when: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README, Guarantees: "once the flow is being cancelled, each cleanup gets at
    most 5 seconds more, so a hung exit cannot hang the flow". A consumer-only
    flow whose worker's exit hangs: the caller is cancelled while the consumer
    holds an item (``cancelled_first``), or while the exit already hangs at the
    end of a drain (``exit_first``). Either way the exit must be cut off after
    the bound (shortened here); without the self-imposed HANG this test would
    hang forever, since a shielded cleanup ignores the test's guard too."""
    monkeypatch.setattr(flowrhythm._cleanup, "CLEANUP_TIMEOUT", CUT_OFF)
    exiting = anyio.Event()
    gave_up: list[str] = []
    holding = anyio.Event()

    async def hang_on_exit() -> None:
        exiting.set()
        with anyio.move_on_after(HANG) as own:
            await anyio.sleep_forever()
        if own.cancelled_caught:
            gave_up.append("exit")

    async def consume(x: int) -> None:
        if when == "cancelled_first":
            holding.set()
            await anyio.sleep_forever()

    lifecycle = Lifecycle()
    flow = Flow()
    flow.set_producer(feed.produce)
    flow.set_consumer(lifecycle.around("sink", consume, exit=hang_on_exit))
    feed.put(0)
    if when == "exit_first":
        feed.end()
    with anyio.fail_after(GUARD), anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await (holding if when == "cancelled_first" else exiting).wait()
            outer.cancel()
    assert outer.cancelled_caught
    assert exiting.is_set()
    assert gave_up == [], "the hung exit ran until it gave up on its own"
    lifecycle.assert_balanced()


# -- a fatal error elsewhere while every operator waits ------------------------------


class ScalingError(Exception):
    pass


@pytest.mark.parametrize("source", ["error_handler", "worker_exit", "strategy"])
async def test_fatal_error_elsewhere_while_every_operator_waits(
    anyio_backend: Any, feed: Feed, source: str
) -> None:
    """One flow with every operator stuck in its own wait: a retry backing off, an
    ordered stage's flusher blocked sending and its window full, a fan-out
    generator suspended at its yield, a batch stage blocked sending, the
    consumer holding a list. Then a fatal error strikes in the first stage: its
    error handler raises, a retired worker's context exit raises, or its scaling
    strategy raises. The flow aborts at once; the error comes out as itself with
    the note saying where; everything waiting is cancelled, closed and counted."""
    clock = ManualClock()
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()
    stuck = Stuck(sink)
    exit_errors: list[ExitError] = []
    opened: list[int] = []
    closed: list[int] = []
    fail_exits = False

    class Gate(Steered):
        broken = False

        def on_enqueue(self, stats: StageStats) -> int:
            if self.broken:
                raise ScalingError("strategy bug")
            return super().on_enqueue(stats)

    strategy = Gate(initial=2, max_workers=2)

    async def keep(x: int) -> bool:
        if x < 0:
            raise ItemError(x)
        return True

    async def exit_gate() -> None:
        if fail_exits:
            exit_errors.append(ExitError("gate worker exit"))
            raise exit_errors[-1]

    async def handle(item: Any, exc: BaseException) -> None:
        raise HandlerError(item)

    async def fetch(x: int) -> int:
        if x == 1:
            raise ConnectionError(x)
        return x

    async def order(x: int) -> int:
        await checkpoint()
        return x

    async def explode(x: int) -> AsyncIterator[tuple[int, int]]:
        opened.append(x)
        try:
            yield (x, 0)
            yield (x, 1)
        finally:
            closed.append(x)

    flow = Flow(clock=clock)
    flow.set_producer(feed.produce)
    flow.add_filter(
        lifecycle.around("gate", keep, exit=exit_gate),
        name="gate",
        scaling_strategy=strategy,
    )
    flow.add_transformer(
        lifecycle.around("fetch", fetch),
        name="fetch",
        scaling_strategy=FixedScaling(2),
        retry=Retry(attempts=5, backoff=60.0),
    )
    flow.add_transformer(
        lifecycle.around("order", order),
        name="order",
        scaling_strategy=FixedScaling(2),
        ordered=True,
    )
    flow.add_transformer(explode, name="explode", buffer_size=0)
    flow.add_batch(2, buffer_size=0)
    flow.set_consumer(
        lifecycle.around("sink", stuck.consume), name="sink", buffer_size=0
    )
    flow.set_error_handler(handle)
    feed.put(*range(30))
    expected: type[BaseException] = {
        "error_handler": HandlerError,
        "worker_exit": ExitError,
        "strategy": ScalingError,
    }[source]
    raised: BaseException | None = None
    with anyio.fail_after(GUARD):
        try:
            async with flow:
                await flow.start()
                await wait_until(
                    lambda: (
                        stage(flow, "batch").blocked_workers == 1
                        and stage(flow, "explode").blocked_workers == 1
                        and stage(flow, "order").blocked_workers == 2
                        and stage(flow, "order").reorder_window == 2 * WINDOW_PER_WORKER
                        and stage(flow, "fetch").retries >= 1
                    )
                )
                await anyio.wait_all_tasks_blocked()
                assert stuck.entered == [[(0, 0), (0, 1)]]
                assert clock.sleepers == 1  # item 1's backoff
                # (the gate's two workers may swap neighbours: which item the
                # fan-out holds depends on the backend's scheduling)
                suspended = opened[-1]
                assert suspended not in closed
                if source == "error_handler":
                    feed.put(-1)
                elif source == "worker_exit":
                    fail_exits = True
                    strategy.queued = -1  # the next item has one gate worker retired
                    feed.put(100)
                else:
                    strategy.broken = True
                    feed.put(100)
                await anyio.sleep_forever()
        except expected as exc:
            raised = exc
    assert isinstance(raised, expected)

    where = {
        "error_handler": (
            "raised by the error handler for an item that failed in filter 'gate'"
        ),
        "worker_exit": "raised in filter 'gate'",
        "strategy": "raised by the scaling strategy of filter 'gate'",
    }[source]
    assert notes(raised)[0] == f"flowrhythm: {where}"
    if source == "worker_exit":
        assert raised is exit_errors[0]  # the first; the other one is a note
        assert len(exit_errors) == 2
        assert len(notes(raised)) == 2
    stats = assert_conserved(flow, feed)
    assert sink.consumed == []
    assert suspended in closed  # the generator suspended at its yield was closed
    assert sorted(closed) == sorted(opened)
    assert stats["batch"].emitted == 2
    assert clock.sleepers == 0
    lifecycle.assert_balanced()
    tasks.assert_none_left()


# -- user code raising asyncio's CancelledError while nothing cancels the flow -------


SPURIOUS = [
    "ordered",
    "ordered_fan_out",
    "fan_out_timeout",
    "filter_timeout",
    "retry",
    "rate_limit",
    "timeout_on_a_custom_clock",
    "ordered_error_handler",
]


@pytest.mark.parametrize("where", SPURIOUS)
async def test_spurious_cancellation_in_an_operator_stage_fails_loudly(
    anyio_backend: Any, anyio_backend_name: str, feed: Feed, where: str
) -> None:
    """An operator's call (or the error handler of an ordered stage's failed item)
    raises CancelledError while nothing cancels the flow. It must not pass for a
    cancellation: not retried, not a timeout, not an item failure; the flow
    fails with a RuntimeError caused by it, and still cleans up and balances."""
    if anyio_backend_name != "asyncio":
        pytest.skip("only asyncio lets user code construct its cancellation")
    tasks = Tasks()
    sink = Sink()
    lifecycle = Lifecycle()
    attempts: Counter[int] = Counter()

    async def rogue(x: int) -> int:
        attempts[x] += 1
        await checkpoint()
        if x == 3:
            if where == "ordered_error_handler":
                raise ItemError(x)
            raise asyncio.CancelledError
        return x

    async def explode(x: int) -> AsyncIterator[int]:
        yield x
        await checkpoint()
        if x == 3:
            raise asyncio.CancelledError
        yield -x

    async def predicate(x: int) -> bool:
        return bool(await rogue(x) % 2)

    async def handle(item: Any, exc: BaseException) -> None:
        raise asyncio.CancelledError

    clock = ManualClock() if where == "timeout_on_a_custom_clock" else None
    flow = Flow(clock=clock)
    flow.set_producer(feed.produce)
    many = FixedScaling(3)
    if where == "ordered":
        flow.add_transformer(
            lifecycle.around("work", rogue),
            name="work",
            scaling_strategy=many,
            ordered=True,
        )
    elif where == "ordered_fan_out":
        flow.add_transformer(explode, name="work", scaling_strategy=many, ordered=True)
    elif where == "fan_out_timeout":
        flow.add_transformer(explode, name="work", timeout=5.0)
    elif where == "filter_timeout":
        flow.add_filter(lifecycle.around("work", predicate), name="work", timeout=5.0)
    elif where == "retry":
        flow.add_transformer(
            lifecycle.around("work", rogue), name="work", retry=Retry(on=Exception)
        )
    elif where == "rate_limit":
        flow.add_transformer(
            rogue, name="work", rate_limit=RateLimit(per_second=1e6, burst=100)
        )
    elif where == "timeout_on_a_custom_clock":
        flow.add_transformer(lifecycle.around("work", rogue), name="work", timeout=5.0)
    else:
        flow.add_transformer(
            lifecycle.around("work", rogue),
            name="work",
            scaling_strategy=many,
            ordered=True,
        )
    flow.set_consumer(lifecycle.around("sink", sink.consume), name="sink")
    flow.set_error_handler(handle if where == "ordered_error_handler" else sink.handle)
    feed.put(*range(10))
    with anyio.fail_after(GUARD), pytest.raises(RuntimeError) as info:
        await flow.run()
    assert isinstance(info.value.__cause__, asyncio.CancelledError)
    assert "CancelledError" in str(info.value)
    assert notes(info.value)
    assert sink.failed == []  # never an item failure
    assert attempts[3] <= 1  # never retried
    stats = assert_conserved(flow, feed)
    assert stats["work"].timeouts == 0
    lifecycle.assert_balanced()
    tasks.assert_none_left()
