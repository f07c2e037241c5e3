"""The stage operators of issue 7, by behaviour, on asyncio, uvloop and trio:
fan-out, filter, ordered output, batching, per-item timeouts, retries and rate
limits, and how they keep the core's guarantees (conservation, back-pressure,
balanced context managers, drain and abort).

No test waits on the wall clock. Time (max_wait, backoff, rate limits, timeouts)
runs on a ``ManualClock`` the test moves; the order in which calls finish comes
from Events the test sets. ``fail_after(GUARD)`` only turns a deadlock into a
failure. Every run ends with the conservation check of every stage.
"""

from __future__ import annotations

import math
import random
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import pytest
from _probe import Results, assert_conserved
from anyio.lowlevel import checkpoint

from flowrhythm import (
    FixedScaling,
    Flow,
    RateLimit,
    Retry,
    ScalingStrategy,
    StageStats,
    UtilizationScaling,
)
from flowrhythm._ordered import WINDOW_PER_WORKER
from flowrhythm.testing import ManualClock

pytestmark = pytest.mark.anyio

#: a deadlock guard only: no test depends on how long anything takes
GUARD = 10


# -- helpers -------------------------------------------------------------------------


class Boom(Exception):
    """What a stage raises for an item it rejects."""


class Fatal(BaseException):
    """A BaseException that is not an Exception (like KeyboardInterrupt)."""


def source(items: Iterable[Any]) -> Callable[[], AsyncIterator[Any]]:
    """A producer yielding ``items``, then ending (which drains the flow)."""
    values = list(items)

    async def produce() -> AsyncIterator[Any]:
        for value in values:
            yield value

    return produce


class Feed:
    """A producer the test feeds by hand; it ends when the test closes the feed."""

    def __init__(self) -> None:
        self.send, self._receive = anyio.create_memory_object_stream[Any](math.inf)

    async def produce(self) -> AsyncIterator[Any]:
        async with self._receive:
            async for item in self._receive:
                yield item

    def put(self, *items: Any) -> None:
        for item in items:
            self.send.send_nowait(item)

    def close(self) -> None:
        self.send.close()
        self._receive.close()


@contextmanager
def feeding() -> Iterator[Feed]:
    feed = Feed()
    try:
        yield feed
    finally:
        feed.close()


class Lifecycle:
    """Counts how often the per-worker context manager of a stage is entered and
    exited."""

    def __init__(self) -> None:
        self.entered = 0
        self.exited = 0

    def around(self, fn: Callable[[Any], Any]) -> Callable[[], Any]:
        @asynccontextmanager
        async def factory() -> AsyncIterator[Callable[[Any], Any]]:
            self.entered += 1
            try:
                yield fn
            finally:
                await checkpoint()  # completes under an abort only if shielded
                self.exited += 1

        return factory

    def assert_balanced(self, workers: int) -> None:
        assert (self.entered, self.exited) == (workers, workers)


class FutileSleeps(Exception):
    """Code kept asking for waits too short to move the clock: a livelock."""


class TracingClock(ManualClock):
    """A ManualClock that records every wait requested from it, and fails a
    caller that keeps asking for waits too short to move the clock (which would
    spin forever instead of waiting)."""

    def __init__(self) -> None:
        super().__init__()
        self.requested: list[float] = []
        self.futile = 0

    async def sleep(self, seconds: float) -> None:
        self.requested.append(seconds)
        if seconds > 0 and self() + seconds <= self():
            self.futile += 1
            if self.futile > 100:
                raise FutileSleeps(f"asked for {seconds!r} s at {self()!r}")
        await super().sleep(seconds)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Let the flow's tasks run until ``condition()`` holds (never a timed wait;
    the test's guard catches a condition that never comes)."""
    while not condition():
        await checkpoint()


def new_flow(
    producer: Any, results: Results, *, clock: ManualClock | None = None
) -> Flow:
    """A flow from ``producer`` into ``results``; the test adds the stages."""
    flow = Flow(clock=clock)
    flow.set_producer(producer)
    flow.set_consumer(results.consume)
    flow.set_error_handler(results.handle)
    return flow


async def run_flow(flow: Flow, *, clock: ManualClock | None = None) -> None:
    """Run ``flow`` to its end (with ``clock``: inside ``clock.autojump()``, so
    every wait on it ends as soon as nothing else can happen first), then check
    conservation."""
    with anyio.fail_after(GUARD):
        if clock is None:
            await flow.run()
        else:
            async with clock.autojump():
                await flow.run()
    assert_conserved(flow)


def notes(exc: BaseException) -> list[str]:
    return list(getattr(exc, "__notes__", ()))


def assert_within_rate(times: list[float], per_second: float, burst: int) -> None:
    """Every window [a, b] holds at most ``burst + per_second * (b - a)`` calls."""
    times = sorted(times)
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            calls = j - i + 1
            allowed = burst + per_second * (times[j] - start) + 1e-9
            assert calls <= allowed, (
                f"{calls} calls in [{start}, {times[j]}] exceed the rate limit"
            )


# -- fan-out -------------------------------------------------------------------------


async def test_fan_out_emits_zero_one_or_many_outputs_per_input(
    anyio_backend: Any,
) -> None:
    """An async generator stage sends on every value it yields, in the order yielded;
    an input that yields nothing is consumed by the stage. processed counts inputs,
    emitted counts outputs."""
    results = Results()

    async def explode(x: int) -> AsyncIterator[tuple[int, int]]:
        for k in range(x):  # x outputs for input x: 0, 1 and many
            yield (x, k)

    flow = new_flow(source(range(5)), results)
    flow.add_transformer(explode)
    await run_flow(flow)

    assert results.consumed == [(x, k) for x in range(5) for k in range(x)]
    stats = flow.stats()["explode"]
    assert (stats.received, stats.processed, stats.errors) == (5, 5, 0)
    assert stats.emitted == 10
    assert flow.stats()["consume"].received == 10


async def test_fan_out_keeps_each_inputs_outputs_in_order_with_many_workers(
    anyio_backend: Any,
) -> None:
    """With several workers, outputs of different inputs interleave, but the outputs
    of one input still arrive in the order it yielded them."""
    results = Results()
    rng = random.Random(7)
    pauses = {x: [rng.randrange(4) for _ in range(5)] for x in range(40)}

    async def explode(x: int) -> AsyncIterator[tuple[int, int]]:
        for k, pause in enumerate(pauses[x]):
            for _ in range(pause):
                await checkpoint()
            yield (x, k)

    flow = new_flow(source(range(40)), results)
    flow.add_transformer(explode, scaling_strategy=FixedScaling(6))
    await run_flow(flow)

    assert sorted(results.consumed) == [(x, k) for x in range(40) for k in range(5)]
    for x in range(40):
        assert [k for y, k in results.consumed if y == x] == list(range(5))


async def test_fan_out_input_failing_after_outputs_keeps_them_downstream(
    anyio_backend: Any,
) -> None:
    """An input whose generator raises after yielding k outputs: the k outputs stay
    downstream, the input goes to the error handler once, and the stage counts it as
    an error, not as processed."""
    results = Results()

    async def explode(x: int) -> AsyncIterator[tuple[int, int]]:
        yield (x, 0)
        yield (x, 1)
        if x == 2:
            raise Boom(x)
        yield (x, 2)

    flow = new_flow(source(range(4)), results)
    flow.add_transformer(explode)
    await run_flow(flow)

    expected = [(x, k) for x in range(4) for k in range(3) if (x, k) != (2, 2)]
    assert results.consumed == expected
    assert results.failed_items == [2]
    assert isinstance(results.failed[0][1], Boom)
    stats = flow.stats()["explode"]
    assert (stats.received, stats.processed, stats.errors) == (4, 3, 1)
    assert stats.emitted == 11
    assert stats.last_error_at is not None


async def test_fan_out_waits_for_room_downstream(anyio_backend: Any) -> None:
    """Back-pressure: a fan-out input with many outputs feeding a consumer with no
    buffer produces the next output only once the previous one was taken; nothing
    piles up (one output in the consumer's hands, one being handed over)."""
    results = Results()
    total = 12
    generated = 0
    gates = [anyio.Event() for _ in range(total)]
    holding: list[int] = []

    async def explode(x: int) -> AsyncIterator[int]:
        nonlocal generated
        for k in range(total):
            generated += 1
            yield k

    async def slow_consume(k: int) -> None:
        holding.append(k)
        await gates[k].wait()
        results.consumed.append(k)

    flow = new_flow(source([0]), results)
    flow.add_transformer(explode)
    flow.set_consumer(slow_consume, buffer_size=0)
    stats = lambda: flow.stats()["explode"]
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            for k in range(total):
                # The consumer holds output k; the stage waits to hand over k + 1
                # (every output but the first had to wait for the consumer).
                last = k == total - 1
                await wait_until(
                    lambda k=k, last=last: (
                        holding[-1:] == [k]
                        and (
                            last
                            or (stats().blocked_workers, stats().blocked_sends)
                            == (1, k + 1)
                        )
                    )
                )
                assert generated == min(k + 2, total)
                gates[k].set()
    assert_conserved(flow)
    assert results.consumed == list(range(total))
    assert flow.stats()["explode"].blocked_sends == total - 1


async def test_fan_out_timeout_bounds_each_step_not_the_whole_input(
    anyio_backend: Any,
) -> None:
    """With a timeout, each step of the generator (the time to produce the next
    output) is bounded: an input may take longer than the timeout in all, and a
    step that takes too long fails the input with TimeoutError after its earlier
    outputs went on."""
    clock = TracingClock()
    results = Results()

    async def steps(x: int) -> AsyncIterator[tuple[int, int]]:
        if x == 0:
            for k in range(2):
                await clock.sleep(0.6)  # 1.2 s in all, 0.6 s per step
                yield (x, k)
        elif x == 1:
            yield (x, 0)
            await anyio.Event().wait()  # a step that never ends
        else:
            yield (x, 0)

    flow = new_flow(source(range(3)), results, clock=clock)
    flow.add_transformer(steps, timeout=1.0)
    await run_flow(flow, clock=clock)

    assert results.consumed == [(0, 0), (0, 1), (1, 0), (2, 0)]
    assert results.failed_items == [1]
    assert isinstance(results.failed[0][1], TimeoutError)
    stats = flow.stats()["steps"]
    assert (stats.processed, stats.errors, stats.timeouts, stats.emitted) == (
        2,
        1,
        1,
        4,
    )
    assert clock() == pytest.approx(2.2)


async def test_fan_out_timeout_does_not_count_waiting_for_room_downstream(
    anyio_backend: Any,
) -> None:
    """The time a fan-out stage waits to hand an output over (back-pressure) is not
    part of its timeout."""
    clock = TracingClock()
    results = Results()
    gate = anyio.Event()

    async def explode(x: int) -> AsyncIterator[int]:
        for k in range(3):
            yield k

    async def gated_consume(k: int) -> None:
        await gate.wait()
        results.consumed.append(k)

    flow = new_flow(source([0]), results, clock=clock)
    flow.add_transformer(explode, timeout=1.0)
    flow.set_consumer(gated_consume, buffer_size=0)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(lambda: flow.stats()["explode"].blocked_workers == 1)
            clock.advance(10.0)  # ten timeouts' worth, spent waiting to send
            gate.set()
    assert_conserved(flow)
    assert results.consumed == [0, 1, 2]
    assert results.failed == []
    assert flow.stats()["explode"].timeouts == 0


async def test_fan_out_retried_only_while_nothing_was_emitted(
    anyio_backend: Any,
) -> None:
    """Retry re-runs a fan-out input whose generator failed before yielding
    anything; one that failed after yielding is not retried (its outputs would be
    sent twice) and goes to the error handler after one attempt."""
    clock = TracingClock()
    results = Results()
    attempts: Counter[int] = Counter()

    async def explode(x: int) -> AsyncIterator[tuple[int, str]]:
        attempts[x] += 1
        if x == 0 and attempts[x] == 1:
            raise ConnectionError("before any output")
        if x == 2:
            raise ConnectionError(f"attempt {attempts[x]}")
        yield (x, "a")
        if x == 1:
            raise ConnectionError("after an output")
        yield (x, "b")

    flow = new_flow(source(range(3)), results, clock=clock)
    flow.add_transformer(explode, retry=Retry(attempts=3, backoff=0.5, jitter=False))
    await run_flow(flow, clock=clock)

    assert results.consumed == [(0, "a"), (0, "b"), (1, "a")]
    assert attempts == {0: 2, 1: 1, 2: 3}
    assert results.failed_items == [1, 2]
    after_output, gave_up = (exc for _, exc in results.failed)
    assert str(after_output) == "after an output"
    assert not any("gave up" in note for note in notes(after_output))
    assert str(gave_up) == "attempt 3"
    assert "flowrhythm: transformer 'explode' gave up after 3 attempts" in notes(
        gave_up
    )
    stats = flow.stats()["explode"]
    assert (stats.processed, stats.errors, stats.retries, stats.emitted) == (
        1,
        2,
        3,
        3,
    )
    assert clock.requested == [0.5, 0.5, 1.0]


async def test_fan_out_takes_one_rate_limit_token_per_input(
    anyio_backend: Any,
) -> None:
    """A rate-limited fan-out stage takes one token per input (per attempt), however
    many outputs the input yields."""
    clock = TracingClock()
    results = Results()
    started: list[float] = []

    async def explode(x: int) -> AsyncIterator[int]:
        started.append(clock())
        for k in range(5):
            yield 10 * x + k

    flow = new_flow(source(range(3)), results, clock=clock)
    flow.add_transformer(explode, rate_limit=RateLimit(per_second=1))
    await run_flow(flow, clock=clock)

    assert started == [0.0, 1.0, 2.0]
    assert len(results.consumed) == 15


async def test_abort_closes_a_suspended_fan_out_generator(anyio_backend: Any) -> None:
    """An abort while a fan-out stage waits to send runs the generator's own
    cleanup (its finally) and counts the input as dropped."""
    results = Results()
    cleaned_up = anyio.Event()
    gate = anyio.Event()

    async def explode(x: int) -> AsyncIterator[int]:
        try:
            for k in range(100):
                yield k
        finally:
            cleaned_up.set()

    async def gated_consume(k: int) -> None:
        await gate.wait()

    flow = new_flow(source([0]), results)
    flow.add_transformer(explode)
    flow.set_consumer(gated_consume, buffer_size=0)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(lambda: flow.stats()["explode"].blocked_workers == 1)
            await flow.stop(drain=False)
    stats = assert_conserved(flow)
    assert cleaned_up.is_set()
    assert (stats["explode"].received, stats["explode"].dropped) == (1, 1)
    assert stats["explode"].emitted == 2  # one in the consumer, one handed over
    assert stats["gated_consume"].dropped == 2


# -- filter --------------------------------------------------------------------------


async def test_filter_counts_rejected_items_as_filtered_within_processed(
    anyio_backend: Any,
) -> None:
    """Items for which the predicate is false leave the flow; the stage counts them
    as filtered, and as processed."""
    results = Results()

    async def even(x: int) -> bool:
        return x % 2 == 0

    flow = new_flow(source(range(10)), results)
    flow.add_filter(even)
    await run_flow(flow)

    assert results.consumed == [0, 2, 4, 6, 8]
    stats = flow.stats()["even"]
    assert (stats.received, stats.processed, stats.filtered, stats.emitted) == (
        10,
        10,
        5,
        5,
    )
    assert stats.errors == 0


async def test_filter_predicate_raising_sends_the_item_to_the_error_handler(
    anyio_backend: Any,
) -> None:
    """A predicate that raises fails the item: it goes to the error handler and is
    counted as an error, neither filtered nor passed on."""
    results = Results()

    async def picky(x: int) -> bool:
        if x == 3:
            raise Boom(x)
        return x < 5

    flow = new_flow(source(range(8)), results)
    flow.add_filter(picky, scaling_strategy=FixedScaling(3))
    await run_flow(flow)

    assert sorted(results.consumed) == [0, 1, 2, 4]
    assert results.failed_items == [3]
    stats = flow.stats()["picky"]
    assert (stats.processed, stats.errors, stats.filtered, stats.emitted) == (
        7,
        1,
        3,
        4,
    )


async def test_filter_timeout(anyio_backend: Any) -> None:
    """A predicate slower than the filter's timeout fails its item with
    TimeoutError; the others pass or are filtered as usual."""
    clock = TracingClock()
    results = Results()

    async def keep(x: int) -> bool:
        if x == 2:
            await anyio.Event().wait()
        return x != 4

    flow = new_flow(source(range(6)), results, clock=clock)
    flow.add_filter(keep, timeout=1.0)
    await run_flow(flow, clock=clock)

    assert results.consumed == [0, 1, 3, 5]
    assert results.failed_items == [2]
    (exc,) = (exc for _, exc in results.failed)
    assert isinstance(exc, TimeoutError)
    assert str(exc) == "filter 'keep' took longer than 1.0 s"
    stats = flow.stats()["keep"]
    assert (stats.timeouts, stats.errors, stats.filtered, stats.processed) == (
        1,
        1,
        1,
        5,
    )


# -- ordered -------------------------------------------------------------------------


class Gated:
    """A stage whose calls each wait for their own gate, so the test decides in which
    order they finish."""

    def __init__(self, count: int) -> None:
        self.gates = [anyio.Event() for _ in range(count)]
        self.started: list[int] = []
        self.finished: list[int] = []
        self.released: set[int] = set()
        self._changed = anyio.Event()

    async def enter(self, x: int) -> None:
        self.started.append(x)
        self._changed.set()
        await self.gates[x].wait()
        self.finished.append(x)

    def release(self, x: int) -> None:
        self.released.add(x)
        self.gates[x].set()

    async def changed(self) -> None:
        await self._changed.wait()
        self._changed = anyio.Event()


async def release_adversarially(
    gated: Gated, window_full: Callable[[], bool], pick: Callable[[list[int]], int]
) -> None:
    """Finish items newest-first or at random, holding back the oldest running one
    (the head of the order) until the reorder window is full or the input has all
    been taken: the worst completion order for an ordered stage."""
    count = len(gated.gates)
    while len(gated.released) < count:
        running = sorted(set(gated.started) - gated.released)
        if len(running) > 1:
            gated.release(pick(running[1:]))
        elif running and (window_full() or len(gated.started) == count):
            gated.release(running[0])
        else:
            await gated.changed()


def picker(policy: str, seed: int) -> Callable[[list[int]], int]:
    if policy == "newest":
        return max
    rng = random.Random(seed)
    return rng.choice


@pytest.mark.parametrize("workers", [8, 32])
@pytest.mark.parametrize("policy", ["newest", "random"])
async def test_ordered_keeps_input_order_under_adversarial_completion(
    anyio_backend: Any, workers: int, policy: str
) -> None:
    """ordered=True emits in input order however the calls finish; the reorder
    window fills up to, and never beyond, 4 items per worker."""
    count = 2 * WINDOW_PER_WORKER * workers + 5
    gated = Gated(count)
    results = Results()

    async def work(x: int) -> int:
        await gated.enter(x)
        return x

    flow = new_flow(source(range(count)), results)
    flow.add_transformer(work, scaling_strategy=FixedScaling(workers), ordered=True)
    window = WINDOW_PER_WORKER * workers
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await release_adversarially(
                gated,
                lambda: flow.stats()["work"].reorder_window >= window,
                picker(policy, workers),
            )
    stats = assert_conserved(flow)
    assert results.consumed == list(range(count))
    assert gated.finished != sorted(gated.finished)  # the order really was mixed
    assert stats["work"].reorder_window_peak == window
    assert stats["work"].processed == stats["work"].emitted == count


async def test_ordered_fan_out_keeps_each_inputs_outputs_together(
    anyio_backend: Any,
) -> None:
    """An ordered fan-out stage emits the outputs of each input together, in the
    order yielded, and the inputs in input order, however the calls finish."""
    workers, count = 8, 80
    gated = Gated(count)
    results = Results()

    async def explode(x: int) -> AsyncIterator[tuple[int, int]]:
        yield (x, 0)  # collected before the gate: held until the input's turn
        await gated.enter(x)
        for k in range(1, x % 4):
            await checkpoint()
            yield (x, k)

    flow = new_flow(source(range(count)), results)
    flow.add_transformer(explode, scaling_strategy=FixedScaling(workers), ordered=True)
    window = WINDOW_PER_WORKER * workers
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await release_adversarially(
                gated,
                lambda: flow.stats()["explode"].reorder_window >= window,
                picker("random", 1),
            )
    stats = assert_conserved(flow)
    expected = [(x, k) for x in range(count) for k in range(max(x % 4, 1))]
    assert results.consumed == expected
    assert stats["explode"].processed == count
    assert stats["explode"].emitted == len(expected)
    assert stats["explode"].reorder_window_peak <= window


async def test_ordered_window_full_stops_intake_while_the_head_runs(
    anyio_backend: Any,
) -> None:
    """When the reorder window is full (4 items per worker taken and not emitted),
    the other workers stop taking input; the worker holding the next-needed item
    runs on, and once it finishes everything flows again, in order."""
    workers, count = 3, 40
    window = WINDOW_PER_WORKER * workers
    head = anyio.Event()
    started: list[int] = []
    results = Results()

    async def work(x: int) -> int:
        started.append(x)
        if x == 0:
            await head.wait()
        return x

    flow = new_flow(source(range(count)), results)
    flow.add_transformer(work, scaling_strategy=FixedScaling(workers), ordered=True)
    stats = lambda: flow.stats()["work"]
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(
                lambda: (
                    stats().reorder_window == window
                    and stats().idle_workers + stats().blocked_workers == workers - 1
                )
            )
            await anyio.wait_all_tasks_blocked()  # nothing else would happen
            assert sorted(started) == list(range(window))
            assert results.consumed == []
            assert stats().busy_workers == 1  # the head's worker
            # Held back by the order, like waiting for room downstream: blocked.
            assert stats().blocked_workers == workers - 1
            assert stats().queue_length == count - window
            assert stats().reorder_window_peak == window
            head.set()
    final = assert_conserved(flow)
    assert results.consumed == list(range(count))
    assert final["work"].reorder_window_peak == window


async def test_growing_an_ordered_stage_wakes_workers_waiting_for_room(
    anyio_backend: Any,
) -> None:
    """The window is 4 items per worker at the current pool size: when the pool
    grows, a worker waiting for room must look again at once, not only when the
    head item is emitted. The new worker here is stuck entering its context, so
    only the waiting worker can use the extra room."""
    count = 40
    head = anyio.Event()
    enter_gate = anyio.Event()
    grow = False
    entered = 0
    results = Results()

    class GrowOnce(ScalingStrategy):
        min_workers, max_workers = 2, 3
        sampling_events, sampling_period = 0, 0.001

        def on_tick(self, stats: StageStats) -> int:
            nonlocal grow
            if grow:
                grow = False
                return 1
            return 0

    async def work(x: int) -> int:
        if x == 0:
            await head.wait()
        return x

    @asynccontextmanager
    async def worker_context() -> AsyncIterator[Callable[[int], Any]]:
        nonlocal entered
        entered += 1
        if entered > 2:  # the worker the growth adds
            await enter_gate.wait()
        yield work

    flow = new_flow(source(range(count)), results)
    flow.add_transformer(
        worker_context, name="work", scaling_strategy=GrowOnce(), ordered=True
    )
    stats = lambda: flow.stats()["work"]
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(
                lambda: (
                    stats().reorder_window == 2 * WINDOW_PER_WORKER
                    and stats().blocked_workers == 1
                )
            )
            grow = True
            # The window grows to 3 x 4; the waiting worker fills it.
            await wait_until(lambda: stats().reorder_window == 3 * WINDOW_PER_WORKER)
            assert results.consumed == []
            enter_gate.set()
            head.set()
    assert_conserved(flow)
    assert results.consumed == list(range(count))


@pytest.mark.parametrize("fan_out", [False, True], ids=["map", "fan_out"])
async def test_ordered_failed_item_never_holds_back_later_items(
    anyio_backend: Any, fan_out: bool
) -> None:
    """A failed item is skipped in the order before its error handler runs: the items
    after it reach the consumer even while the handler is still busy with it (the
    handler waits until they have)."""
    workers, count, bad = 4, 24, 3
    results = Results()
    later_arrived = anyio.Event()

    async def work(x: int) -> int:
        await checkpoint()
        if x == bad:
            raise Boom(x)
        return x

    async def explode(x: int) -> AsyncIterator[int]:
        await checkpoint()
        yield 10 * x
        if x == bad:
            raise Boom(x)
        yield 10 * x + 1

    async def consume(item: int) -> None:
        results.consumed.append(item)
        if item >= (10 * (count - 1) if fan_out else count - 1):
            later_arrived.set()

    async def blocking_handler(item: int, exc: BaseException) -> None:
        await later_arrived.wait()
        await results.handle(item, exc)

    flow = new_flow(source(range(count)), results)
    flow.add_transformer(
        explode if fan_out else work,
        name="stage",
        scaling_strategy=FixedScaling(workers),
        ordered=True,
    )
    flow.set_consumer(consume)
    flow.set_error_handler(blocking_handler)
    await run_flow(flow)

    if fan_out:
        expected = [
            out for x in range(count) for out in (10 * x, 10 * x + 1)
        ]  # the failed input's first output went on; its second was never made
        expected.remove(10 * bad + 1)
    else:
        expected = [x for x in range(count) if x != bad]
    assert results.consumed == expected
    assert results.failed_items == [bad]
    stats = flow.stats()["stage"]
    assert (stats.errors, stats.processed) == (1, count - 1)


class Sawtooth(ScalingStrategy):
    """Grows the pool by one worker per item taken for a while, then shrinks it by
    one per item, and so on: the pool size keeps changing under the window."""

    sampling_events = 1
    sampling_period = 0.0

    min_workers = 1
    max_workers = 6
    calls = 0

    def on_dequeue(self, stats: StageStats) -> int:
        self.calls += 1
        return 1 if (self.calls // 12) % 2 == 0 else -1


@pytest.mark.parametrize("strategy", ["sawtooth", "utilization"])
async def test_ordered_stays_ordered_while_the_pool_is_resized(
    anyio_backend: Any, strategy: str
) -> None:
    """An ordered stage whose pool grows and shrinks during the run still emits in
    input order, and its window stays within 4 items per worker at the most
    workers it had."""
    count = 300
    rng = random.Random(3)
    pauses = [rng.randrange(8) for _ in range(count)]
    results = Results()
    scaling: ScalingStrategy
    if strategy == "sawtooth":
        scaling = Sawtooth()
    else:
        scaling = UtilizationScaling(
            max_workers=6,
            sampling_events=1,
            sampling_period=0.0,
            dampening=1.0,
            cooldown_seconds=0.0,
        )

    async def work(x: int) -> int:
        for _ in range(pauses[x]):
            await checkpoint()
        return x

    async def in_bursts() -> AsyncIterator[int]:
        # The stage runs dry between bursts: idle workers are what a pool sheds.
        for x in range(count):
            if x % 20 == 0:
                for _ in range(30):
                    await checkpoint()
            yield x

    flow = new_flow(in_bursts, results)
    flow.add_transformer(work, scaling_strategy=scaling, ordered=True)
    await run_flow(flow)

    assert results.consumed == list(range(count))
    stats = flow.stats()["work"]
    assert stats.reorder_window_peak <= WINDOW_PER_WORKER * 6
    assert stats.last_scale_up_at is not None
    if strategy == "sawtooth":
        assert stats.last_scale_down_at is not None


async def test_abort_with_a_full_reorder_window_accounts_for_every_item(
    anyio_backend: Any,
) -> None:
    """Aborting an ordered stage whose finished items wait for a stuck head drops
    them all (finished or not, nothing was emitted), and every stage still balances."""
    workers = 2
    head = anyio.Event()
    results = Results()

    async def work(x: int) -> int:
        if x == 0:
            await head.wait()
        return x

    flow = new_flow(source(range(30)), results)
    flow.add_transformer(work, scaling_strategy=FixedScaling(workers), ordered=True)
    window = WINDOW_PER_WORKER * workers
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(lambda: flow.stats()["work"].reorder_window == window)
            await flow.stop(drain=False)
    stats = assert_conserved(flow)
    assert results.consumed == []
    assert (stats["work"].processed, stats["work"].errors) == (0, 0)
    assert stats["work"].dropped == stats["work"].received == 30


# -- batch ---------------------------------------------------------------------------


async def test_batch_by_size(anyio_backend: Any) -> None:
    """add_batch(n) sends lists of n items in input order; the rest goes on as a
    partial list when the input ends. processed counts items, emitted batches."""
    results = Results()
    flow = new_flow(source(range(10)), results)
    flow.add_batch(4)
    await run_flow(flow)

    assert results.consumed == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    stats = flow.stats()["batch"]
    assert (stats.received, stats.processed, stats.emitted) == (10, 10, 3)


async def test_batch_max_wait_flushes_a_partial_batch(anyio_backend: Any) -> None:
    """A partial batch goes on once max_wait seconds have passed since its first item
    (not since its last), and not before."""
    clock = TracingClock()
    results = Results()
    flushed: list[tuple[float, list[int]]] = []

    async def record(batch: list[int]) -> None:
        flushed.append((clock(), batch))

    with feeding() as feed:
        flow = new_flow(feed.produce, results, clock=clock)
        flow.add_batch(10, max_wait=5.0)
        flow.set_consumer(record)
        taken = lambda: flow.stats()["batch"].received
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                await tg.start(flow.run)
                feed.put(0)
                await wait_until(lambda: taken() == 1)
                await clock.wait_for_sleepers(1)  # the batch's timer
                clock.advance(3.0)
                feed.put(1)
                await wait_until(lambda: taken() == 2)
                await anyio.wait_all_tasks_blocked()
                assert flushed == []  # 3 s after the first item: too early
                clock.advance(2.0)
                await wait_until(lambda: len(flushed) == 1)
                assert flushed == [(5.0, [0, 1])]
                feed.put(2)
                feed.send.close()  # the input ends: the flow drains
    assert_conserved(flow)
    assert flushed == [(5.0, [0, 1]), (5.0, [2])]
    stats = flow.stats()["batch"]
    assert (stats.processed, stats.emitted) == (3, 2)


@pytest.mark.parametrize("max_wait", [None, 5.0])
async def test_batch_partial_flushed_on_stop(
    anyio_backend: Any, max_wait: float | None
) -> None:
    """flow.stop() drains: the pending partial batch is sent on at once (without
    waiting for its max_wait timer), nothing is dropped."""
    clock = TracingClock()
    results = Results()
    with feeding() as feed:
        flow = new_flow(feed.produce, results, clock=clock)
        flow.add_batch(10, max_wait=max_wait)
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                await tg.start(flow.run)
                feed.put(0, 1, 2)
                await wait_until(lambda: flow.stats()["batch"].received == 3)
                await flow.stop()
    stats = assert_conserved(flow)
    assert results.consumed == [[0, 1, 2]]
    assert all(stage.dropped == 0 for stage in stats.values())
    assert (clock(), clock.sleepers) == (0.0, 0)


async def test_batch_pending_items_dropped_on_abort(anyio_backend: Any) -> None:
    """stop(drain=False) ends the flow at once, without waiting for the batch timer;
    the items of the pending batch count as dropped."""
    clock = TracingClock()
    results = Results()
    with feeding() as feed:
        flow = new_flow(feed.produce, results, clock=clock)
        flow.add_batch(10, max_wait=5.0)
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                await tg.start(flow.run)
                feed.put(0, 1, 2)
                await wait_until(lambda: flow.stats()["batch"].received == 3)
                await clock.wait_for_sleepers(1)
                await flow.stop(drain=False)
    stats = assert_conserved(flow)
    assert results.consumed == []
    batch = stats["batch"]
    assert (batch.received, batch.processed, batch.dropped, batch.emitted) == (
        3,
        0,
        3,
        0,
    )
    assert clock.sleepers == 0  # the timer is gone


def test_default_batch_name_is_cheap() -> None:
    """Naming a batch stage "batch", "batch_2", ... allocates next to nothing
    (a regression test: candidate names were once built a million at a time)."""
    flow = Flow()
    tracemalloc.start()
    try:
        flow.add_batch(4)
        flow.add_batch(4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list(flow.stats()) == ["batch", "batch_2"]
    assert peak < 1_000_000, f"{peak} bytes allocated to name two batch stages"


async def test_batch_split_again_by_a_fan_out_stage(anyio_backend: Any) -> None:
    """A fan-out transformer after a batch stage gives back the items, in order;
    an unnamed batch stage is numbered after the batch stages before it."""
    results = Results()

    async def split(batch: list[int]) -> AsyncIterator[int]:
        for item in batch:
            yield item

    flow = new_flow(source(range(10)), results)
    flow.add_batch(3, name="batch")
    flow.add_transformer(split)
    flow.add_batch(5)  # named after the one before it
    await run_flow(flow)

    assert list(flow.stats()) == ["batch", "split", "batch_2", "consume"]
    assert results.consumed == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    stats = flow.stats()
    assert (stats["batch"].emitted, stats["split"].processed) == (4, 4)
    assert (stats["split"].emitted, stats["batch_2"].processed) == (10, 10)


# -- timeout -------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["transformer", "consumer"])
async def test_timeout_fails_the_slow_item_and_the_worker_survives(
    anyio_backend: Any, role: str
) -> None:
    """A call slower than timeout= is cancelled; its item goes to the error handler
    with TimeoutError, counted in timeouts. The worker and its context manager carry
    on (entered once per worker, exited once at the end), and fast calls never wait
    on the clock."""
    clock = TracingClock()
    results = Results()
    lifecycle = Lifecycle()
    passed: list[int] = []

    async def call(x: int) -> int:
        if x == 2:
            await anyio.Event().wait()  # only the timeout ends it
        passed.append(x)
        return x

    flow = new_flow(source(range(6)), results, clock=clock)
    options: dict[str, Any] = {
        "name": "call",
        "scaling_strategy": FixedScaling(2),
        "timeout": 1.0,
    }
    if role == "transformer":
        flow.add_transformer(lifecycle.around(call), **options)
    else:
        flow.set_consumer(lifecycle.around(call), **options)
    await run_flow(flow, clock=clock)

    assert sorted(passed) == [0, 1, 3, 4, 5]
    assert results.failed_items == [2]
    (exc,) = (exc for _, exc in results.failed)
    assert isinstance(exc, TimeoutError)
    assert str(exc) == f"{role} 'call' took longer than 1.0 s"
    stats = flow.stats()["call"]
    assert (stats.timeouts, stats.errors, stats.processed) == (1, 1, 5)
    lifecycle.assert_balanced(2)
    assert clock() == 1.0  # one timeout's worth of time: the fast calls took none


async def test_timeout_retried_when_retry_covers_timeout_error(
    anyio_backend: Any,
) -> None:
    """A timed-out attempt is retried when the Retry's on includes TimeoutError."""
    clock = TracingClock()
    results = Results()
    attempts = 0

    async def call(x: int) -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await anyio.Event().wait()
        return x

    flow = new_flow(source([7]), results, clock=clock)
    flow.add_transformer(
        call,
        timeout=1.0,
        retry=Retry(attempts=2, on=TimeoutError, backoff=0.5, jitter=False),
    )
    await run_flow(flow, clock=clock)

    assert results.consumed == [7]
    assert results.failed == []
    stats = flow.stats()["call"]
    assert (stats.timeouts, stats.retries, stats.processed) == (1, 1, 1)
    assert clock() == 1.5  # the timeout, then the backoff


# -- retry ---------------------------------------------------------------------------


@pytest.mark.parametrize("failures", [1, 2])
async def test_retry_succeeds_after_failures(anyio_backend: Any, failures: int) -> None:
    """An item that fails k times and then succeeds is retried in place with
    exponential backoff; retries counts the extra attempts, the error handler sees
    nothing."""
    clock = TracingClock()
    results = Results()
    attempts: Counter[int] = Counter()

    async def flaky(x: int) -> int:
        attempts[x] += 1
        if attempts[x] <= failures:
            raise ConnectionError(x)
        return x

    flow = new_flow(source(range(3)), results, clock=clock)
    flow.add_transformer(flaky, retry=Retry(attempts=3, backoff=0.25, jitter=False))
    await run_flow(flow, clock=clock)

    assert results.consumed == [0, 1, 2]
    assert results.failed == []
    assert attempts == dict.fromkeys(range(3), failures + 1)
    stats = flow.stats()["flaky"]
    assert (stats.retries, stats.processed, stats.errors) == (3 * failures, 3, 0)
    assert clock.requested == [0.25, 0.5][:failures] * 3


async def test_retry_gives_up_with_the_last_exception(anyio_backend: Any) -> None:
    """After `attempts` failed attempts, the item goes to the error handler with the
    last exception, which carries a note with the number of attempts."""
    clock = TracingClock()
    results = Results()
    attempts: Counter[int] = Counter()

    async def flaky(x: int) -> int:
        attempts[x] += 1
        raise ConnectionError(f"{x}: attempt {attempts[x]}")

    flow = new_flow(source(range(2)), results, clock=clock)
    flow.add_transformer(flaky, retry=Retry(attempts=3, backoff=0.25))
    await run_flow(flow, clock=clock)

    assert results.consumed == []
    assert results.failed_items == [0, 1]
    for x, exc in results.failed:
        assert str(exc) == f"{x}: attempt 3"
        assert "flowrhythm: transformer 'flaky' gave up after 3 attempts" in notes(exc)
    stats = flow.stats()["flaky"]
    assert (stats.retries, stats.errors, stats.processed) == (4, 2, 0)


async def test_retry_only_on_the_listed_exceptions(anyio_backend: Any) -> None:
    """Retry(on=...) retries only those exception classes; another exception goes to
    the error handler after one attempt, without a note."""
    clock = TracingClock()
    results = Results()
    attempts: Counter[int] = Counter()

    async def flaky(x: int) -> int:
        attempts[x] += 1
        if x == 0:
            raise ValueError("not worth retrying")
        if attempts[x] == 1:
            raise ConnectionError("worth retrying")
        return x

    flow = new_flow(source(range(2)), results, clock=clock)
    flow.add_transformer(flaky, retry=Retry(on=ConnectionError, backoff=0.25))
    await run_flow(flow, clock=clock)

    assert results.consumed == [1]
    assert results.failed_items == [0]
    (exc,) = (exc for _, exc in results.failed)
    assert isinstance(exc, ValueError)
    assert notes(exc) == []
    assert attempts == {0: 1, 1: 2}
    assert flow.stats()["flaky"].retries == 1


async def test_base_exception_is_never_retried_and_is_fatal(anyio_backend: Any) -> None:
    """A BaseException that is not an Exception is not retried, whatever Retry says:
    it is fatal, and the flow raises it as itself."""
    clock = TracingClock()
    results = Results()
    attempts = 0

    async def call(x: int) -> int:
        nonlocal attempts
        attempts += 1
        raise Fatal

    flow = new_flow(source(range(3)), results, clock=clock)
    flow.add_transformer(call, retry=Retry(attempts=5, backoff=0.25))
    with anyio.fail_after(GUARD), pytest.raises(Fatal):
        await flow.run()
    stats = assert_conserved(flow)
    assert attempts == 1
    assert stats["call"].retries == 0
    assert results.failed == []
    assert stats["call"].dropped >= 1


async def test_backoff_doubles_up_to_max_backoff(anyio_backend: Any) -> None:
    """Without jitter the waits between attempts are backoff * 2**(n-1), capped at
    max_backoff, and they go through the flow's clock."""
    clock = TracingClock()
    results = Results()

    async def failing(x: int) -> int:
        raise ConnectionError(x)

    flow = new_flow(source([0]), results, clock=clock)
    flow.add_transformer(
        failing, retry=Retry(attempts=5, backoff=0.1, max_backoff=0.3, jitter=False)
    )
    await run_flow(flow, clock=clock)

    assert clock.requested == pytest.approx([0.1, 0.2, 0.3, 0.3])
    assert clock() == pytest.approx(0.9)
    assert results.failed_items == [0]


async def test_backoff_jitter_stays_in_the_upper_half(anyio_backend: Any) -> None:
    """With jitter each wait is drawn from [delay/2, delay] of its attempt's delay."""
    clock = TracingClock()
    results = Results()

    async def failing(x: int) -> int:
        raise ConnectionError(x)

    flow = new_flow(source(range(5)), results, clock=clock)
    flow.add_transformer(
        failing, retry=Retry(attempts=5, backoff=0.1, max_backoff=0.3, jitter=True)
    )
    await run_flow(flow, clock=clock)

    delays = [0.1, 0.2, 0.3, 0.3] * 5
    assert len(clock.requested) == len(delays)
    for requested, delay in zip(clock.requested, delays, strict=True):
        assert delay / 2 <= requested <= delay
    assert len(set(clock.requested)) > 1


async def test_abort_during_backoff_ends_the_flow_at_once(anyio_backend: Any) -> None:
    """stop(drain=False) while a worker sleeps between attempts ends the flow without
    waiting for the backoff (the clock is never advanced); the item is dropped, not
    retried, and the context manager exits."""
    clock = TracingClock()
    results = Results()
    lifecycle = Lifecycle()
    attempts = 0

    async def failing(x: int) -> int:
        nonlocal attempts
        attempts += 1
        raise ConnectionError(x)

    flow = new_flow(source(range(3)), results, clock=clock)
    flow.add_transformer(
        lifecycle.around(failing), name="failing", retry=Retry(backoff=60.0)
    )
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await clock.wait_for_sleepers(1)
            await flow.stop(drain=False)
    stats = assert_conserved(flow)
    assert attempts == 1
    assert stats["failing"].retries == 1
    assert results.failed == []
    assert stats["failing"].dropped == 3
    assert clock.sleepers == 0
    lifecycle.assert_balanced(1)


async def test_drain_waits_for_an_in_flight_retry(anyio_backend: Any) -> None:
    """stop() (drain) lets an item in backoff finish: the drain waits until the
    clock reaches the retry, and the retried attempt delivers the item."""
    clock = TracingClock()
    results = Results()
    attempts = 0
    stopped = anyio.Event()

    async def flaky(x: int) -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError(x)
        return x

    async def stop() -> None:
        await flow.stop()
        stopped.set()

    with feeding() as feed:
        flow = new_flow(feed.produce, results, clock=clock)
        flow.add_transformer(flaky, retry=Retry(backoff=1.0, jitter=False))
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                await tg.start(flow.run)
                feed.put(5)
                await clock.wait_for_sleepers(1)
                tg.start_soon(stop)
                await anyio.wait_all_tasks_blocked()
                assert not stopped.is_set()
                assert results.consumed == []
                clock.advance(1.0)
                await stopped.wait()
    stats = assert_conserved(flow)
    assert results.consumed == [5]
    assert attempts == 2
    assert stats["flaky"].retries == 1
    assert all(stage.dropped == 0 for stage in stats.values())


async def test_cancelled_attempt_is_not_retried(anyio_backend: Any) -> None:
    """An abort cancels a running attempt; cancellation is never retried."""
    clock = TracingClock()
    results = Results()
    attempts = 0
    running = anyio.Event()

    async def hanging(x: int) -> int:
        nonlocal attempts
        attempts += 1
        running.set()
        await anyio.Event().wait()
        return x

    flow = new_flow(source([0]), results, clock=clock)
    flow.add_transformer(hanging, retry=Retry(attempts=5, on=Exception))
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await running.wait()
            await flow.stop(drain=False)
    stats = assert_conserved(flow)
    assert attempts == 1
    assert stats["hanging"].retries == 0
    assert results.failed == []
    assert stats["hanging"].dropped == 1


# -- rate limit ----------------------------------------------------------------------


async def test_rate_limit_honours_burst_then_rate(anyio_backend: Any) -> None:
    """RateLimit(per_second, burst): burst calls at once from a full bucket, then one
    every 1/per_second seconds; no window holds more than burst + rate * length."""
    clock = TracingClock()
    results = Results()
    times: list[float] = []

    async def call(x: int) -> int:
        times.append(clock())
        return x

    flow = new_flow(source(range(10)), results, clock=clock)
    flow.add_transformer(call, rate_limit=RateLimit(per_second=8, burst=3))
    await run_flow(flow, clock=clock)

    assert times == [0.0, 0.0, 0.0] + [k / 8 for k in range(1, 8)]
    assert_within_rate(times, per_second=8, burst=3)
    assert results.consumed == list(range(10))
    stats = flow.stats()["call"]
    assert stats.throttled_waits == 7
    assert stats.throttled_workers == 0


async def test_rate_limit_is_shared_by_all_workers(anyio_backend: Any) -> None:
    """The bucket is the stage's, not the worker's: eight workers together make no
    more calls than the limit allows."""
    clock = TracingClock()
    results = Results()
    times: list[float] = []

    async def call(x: int) -> int:
        times.append(clock())
        return x

    flow = new_flow(source(range(30)), results, clock=clock)
    flow.add_transformer(
        call,
        scaling_strategy=FixedScaling(8),
        rate_limit=RateLimit(per_second=4, burst=2),
    )
    await run_flow(flow, clock=clock)

    assert_within_rate(times, per_second=4, burst=2)
    assert sorted(times) == pytest.approx([0.0] + [k / 4 for k in range(29)])
    assert sorted(results.consumed) == list(range(30))


async def test_rate_limit_every_attempt_takes_a_token(anyio_backend: Any) -> None:
    """A retried attempt waits for a token like a first one, so retries cannot
    exceed the limit either (here on the consumer, which takes the same options)."""
    clock = TracingClock()
    results = Results()
    times: list[float] = []
    attempts: Counter[int] = Counter()

    async def flaky(x: int) -> None:
        times.append(clock())
        attempts[x] += 1
        if attempts[x] == 1:
            raise ConnectionError(x)
        results.consumed.append(x)

    flow = new_flow(source(range(2)), results, clock=clock)
    flow.set_consumer(
        flaky,
        rate_limit=RateLimit(per_second=1),
        retry=Retry(backoff=0.5, jitter=False),
    )
    await run_flow(flow, clock=clock)

    assert times == [0.0, 1.0, 2.0, 3.0]
    assert results.consumed == [0, 1]
    stats = flow.stats()["flaky"]
    assert (stats.retries, stats.processed, stats.throttled_waits) == (2, 2, 3)


async def test_rate_limit_wait_is_not_part_of_the_timeout(anyio_backend: Any) -> None:
    """The timeout bounds the call, not the wait for a rate-limit token before it."""
    clock = TracingClock()
    results = Results()

    async def call(x: int) -> int:
        return x

    flow = new_flow(source(range(3)), results, clock=clock)
    flow.add_transformer(call, timeout=0.5, rate_limit=RateLimit(per_second=1))
    await run_flow(flow, clock=clock)

    assert results.consumed == [0, 1, 2]
    assert flow.stats()["call"].timeouts == 0
    assert clock() == 2.0  # two waits of 1 s, each longer than the timeout


async def test_rate_limit_waiters_resumed_late_still_respect_burst(
    anyio_backend: Any,
) -> None:
    """After a stall (the event loop busy elsewhere for a second, here the clock
    jumping past every waiter's due time at once), the waiting workers must not
    all call at the same instant: no window may hold more than burst + rate *
    length calls, whatever the loop's delays."""
    clock = TracingClock()
    results = Results()
    times: list[float] = []

    async def call(x: int) -> int:
        times.append(clock())
        return x

    flow = new_flow(source(range(8)), results, clock=clock)
    flow.add_transformer(
        call,
        scaling_strategy=FixedScaling(4),
        rate_limit=RateLimit(per_second=8, burst=1),
    )
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(lambda: flow.stats()["call"].throttled_workers == 4)
            clock.advance(1.0)  # the stall
            async with clock.autojump():
                await flow.wait()
    assert_conserved(flow)
    assert times == [0.0, 1.0] + [1.0 + k / 8 for k in range(1, 7)]
    assert_within_rate(times, per_second=8, burst=1)


async def test_rate_limit_with_an_inexact_interval_on_a_manual_clock(
    anyio_backend: Any,
) -> None:
    """A rate whose interval is not exact in binary (1/10 s) works on a manual
    clock: no wait too short to move the clock, every call made when due (a
    regression test: float rounding once left the bucket a hair short of a token,
    asking for 2e-17 s waits forever)."""
    clock = TracingClock()
    results = Results()
    times: list[float] = []

    async def call(x: int) -> int:
        times.append(clock())
        return x

    flow = new_flow(source(range(10)), results, clock=clock)
    flow.add_transformer(call, rate_limit=RateLimit(per_second=10, burst=3))
    with anyio.fail_after(GUARD):
        async with clock.autojump():
            await flow.run()
    assert_conserved(flow)
    assert results.failed == [], results.failed
    assert clock.futile == 0
    assert times == pytest.approx([0.0, 0.0, 0.0] + [k / 10 for k in range(1, 8)])


async def test_throttled_workers_show_in_stats(anyio_backend: Any) -> None:
    """Workers waiting for a token count as throttled (not busy) in the stats, and
    throttled_waits counts the waits; an abort ends the waits at once."""
    clock = TracingClock()
    results = Results()
    calls = 0

    async def call(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    flow = new_flow(source(range(10)), results, clock=clock)
    flow.add_transformer(
        call, scaling_strategy=FixedScaling(4), rate_limit=RateLimit(per_second=1)
    )
    throttled = lambda: flow.stats()["call"].throttled_workers
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await wait_until(lambda: throttled() == 4)
            await clock.wait_for_sleepers(1)
            stats = flow.stats()["call"]
            assert (stats.throttled_workers, stats.busy_workers) == (4, 0)
            assert stats.throttled_waits == 4
            assert stats.total_workers() == 4
            assert stats.utilization() == 0.0
            assert calls == 1
            clock.advance(1.0)  # the next token
            await wait_until(lambda: calls == 2 and throttled() == 4)
            assert flow.stats()["call"].throttled_waits == 5  # that worker again
            await flow.stop(drain=False)
    stats = assert_conserved(flow)["call"]
    assert stats.throttled_workers == 0
    assert clock.sleepers == 0


@pytest.mark.parametrize("rate_limited", [True, False])
async def test_scaler_does_not_grow_a_throttled_stage(
    anyio_backend: Any, rate_limited: bool
) -> None:
    """A stage with one worker busy and one waiting for the rate limit reads as fully
    utilized with a growing queue; UtilizationScaling asks for more workers, but the
    stage does not grow while a worker is throttled. (Without the rate limit, the
    same load grows the stage: the control case.)"""
    clock = TracingClock()
    results = Results()
    gate = anyio.Event()

    async def call(x: int) -> int:
        await gate.wait()
        return x

    with feeding() as feed:
        flow = new_flow(feed.produce, results, clock=clock)
        flow.add_transformer(
            call,
            scaling_strategy=UtilizationScaling(
                min_workers=2,
                max_workers=8,
                sampling_events=1,
                sampling_period=0.0,
                dampening=1.0,
            ),
            rate_limit=RateLimit(per_second=1) if rate_limited else None,
        )
        stats = lambda: flow.stats()["call"]
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                await tg.start(flow.run)
                feed.put(0, 1)
                if rate_limited:
                    await wait_until(
                        lambda: (
                            (stats().busy_workers, stats().throttled_workers) == (1, 1)
                        )
                    )
                else:
                    await wait_until(lambda: stats().busy_workers == 2)
                feed.put(*range(2, 8))  # a growing queue, consulted on every item
                await wait_until(lambda: stats().received + stats().queue_length == 8)
                if rate_limited:
                    assert stats().total_workers() == 2
                    assert stats().last_scale_up_at is None
                else:
                    assert stats().total_workers() > 2
                await flow.stop(drain=False)
    assert_conserved(flow)


# -- context managers with the call options, on drain and abort ----------------------


@pytest.mark.parametrize("option", ["timeout", "retry", "rate_limit"])
@pytest.mark.parametrize("ending", ["drain", "abort"])
async def test_context_managers_exit_with_call_options(
    anyio_backend: Any, option: str, ending: str
) -> None:
    """Per-worker context managers of a stage with timeout, retry or rate_limit are
    exited once each, whether the flow is drained or aborted while its workers sit
    in the option's wait (a timed call, a backoff, the queue for a token). A drain
    lets those items finish; an abort drops them."""
    workers = 3
    clock = TracingClock()
    results = Results()
    lifecycle = Lifecycle()
    attempts: Counter[int] = Counter()
    release = anyio.Event()  # ends the timed calls (set for the drain only)

    async def call(x: int) -> int:
        attempts[x] += 1
        if option == "timeout":
            await release.wait()
        if option == "retry" and attempts[x] == 1:
            raise ConnectionError(x)
        return x

    options: dict[str, Any] = {
        "timeout": {"timeout": 5.0},
        "retry": {"retry": Retry(backoff=5.0, jitter=False)},
        "rate_limit": {"rate_limit": RateLimit(per_second=0.5)},
    }[option]
    # Every worker (for the rate limit: all but the one that got the token) is in
    # the option's wait.
    waiting: dict[str, Callable[[StageStats], bool]] = {
        "timeout": lambda s: s.busy_workers == workers,
        "retry": lambda s: s.retries == workers,
        "rate_limit": lambda s: s.throttled_workers == workers - 1,
    }
    with feeding() as feed:
        flow = new_flow(feed.produce, results, clock=clock)
        flow.add_transformer(
            lifecycle.around(call),
            name="call",
            scaling_strategy=FixedScaling(workers),
            **options,
        )
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                await tg.start(flow.run)
                feed.put(*range(workers))
                await wait_until(lambda: waiting[option](flow.stats()["call"]))
                if ending == "abort":
                    await flow.stop(drain=False)
                else:
                    release.set()
                    async with clock.autojump():
                        await flow.stop()
    stats = assert_conserved(flow)
    lifecycle.assert_balanced(workers)
    if ending == "abort":
        held = {"timeout": workers, "retry": workers, "rate_limit": workers - 1}
        assert stats["call"].dropped == held[option]
        assert sum(s.dropped for s in stats.values()) + len(results.consumed) == 3
    else:
        assert sorted(results.consumed) == list(range(workers))
        assert results.failed == []
        assert all(stage.dropped == 0 for stage in stats.values())


# -- operators combined --------------------------------------------------------------


async def test_operators_combined_conserve_items_and_order(anyio_backend: Any) -> None:
    """An ordered map, an ordered fan-out, a filter, a batch and a splitter in one
    flow, with failures in several stages: every item ends exactly once, each stage
    balances, and the output keeps input order."""
    results = Results()
    rng = random.Random(11)
    pauses = [rng.randrange(5) for _ in range(200)]

    async def double(x: int) -> int:
        for _ in range(pauses[x]):
            await checkpoint()
        if x % 37 == 5:
            raise Boom("double")
        return 2 * x

    async def explode(x: int) -> AsyncIterator[int]:
        for k in range(x % 3):
            await checkpoint()
            yield x * 10 + k
        if x % 41 == 0:
            raise Boom("explode")

    async def keep(x: int) -> bool:
        return x % 4 != 1

    async def split(batch: list[int]) -> AsyncIterator[int]:
        for x in batch:
            yield x

    flow = new_flow(source(range(200)), results)
    flow.add_transformer(double, scaling_strategy=FixedScaling(8), ordered=True)
    flow.add_transformer(explode, scaling_strategy=FixedScaling(8), ordered=True)
    flow.add_filter(keep)
    flow.add_batch(7)
    flow.add_transformer(split)
    await run_flow(flow)

    assert results.consumed == sorted(results.consumed)
    expected = [
        out
        for x in range(200)
        if x % 37 != 5
        for out in (2 * x * 10 + k for k in range(2 * x % 3))
        if out % 4 != 1
    ]
    assert results.consumed == expected
    stats = flow.stats()
    failed = Counter(exc.args[0] for _, exc in results.failed)
    assert failed == {
        "double": sum(x % 37 == 5 for x in range(200)),
        "explode": sum(2 * x % 41 == 0 for x in range(200) if x % 37 != 5),
    }
    assert stats["double"].errors == failed["double"]
    assert stats["explode"].errors == failed["explode"]
    assert sum(s.dropped for s in stats.values()) == 0


# -- the window counts the workers that run, not the ones on their way ------------


class _Scripted(ScalingStrategy):
    """Starts at ``max_workers``; ``on_enqueue`` answers from a script keyed by how
    many items were offered so far; no sampling timer."""

    min_workers = 0
    sampling_events = 1
    sampling_period = 0.0

    def __init__(self, max_workers: int, script: dict[int, int]) -> None:
        self.max_workers = max_workers
        self.script = script
        self.offered = 0

    def initial_workers(self) -> int:
        return self.max_workers

    def for_stage(self, stage_name: str) -> _Scripted:
        return self

    def on_enqueue(self, stats: StageStats) -> int:
        self.offered += 1
        return self.script.get(self.offered, 0)


@pytest.mark.parametrize(
    ("max_workers", "script", "slow_exit"),
    [
        # A retired worker is handed an item in the very step it is picked: it
        # keeps the item and stays, so the spawn deferred for its slot is void.
        pytest.param(2, {3: -1, 4: +1}, False, id="retiree-keeps-an-item"),
        # A retired worker still runs its context manager's exit: it counts as
        # retiring until its task is gone.
        pytest.param(3, {2: -1, 3: +1}, True, id="retiree-in-its-exit"),
    ],
)
async def test_window_is_bounded_while_workers_retire_and_grow_back(
    anyio_backend: Any, max_workers: int, script: dict[int, int], slow_exit: bool
) -> None:
    """Shrink then grow while a retiring worker still holds its task slot: the
    window never exceeds 4 x max_workers (found by the soak)."""
    items = 60
    head_called = anyio.Event()
    release_head = anyio.Event()
    exit_gate = anyio.Event()

    async def produce() -> AsyncIterator[int]:
        yield 0
        await head_called.wait()
        await anyio.wait_all_tasks_blocked()  # the head blocks, the others idle
        for item in range(1, items):
            yield item  # the scripted items go out in one step

    async def work(item: int) -> int:
        if item == 0:
            head_called.set()
            await release_head.wait()
        return item

    @asynccontextmanager
    async def per_worker() -> AsyncIterator[Any]:
        try:
            yield work
        finally:
            await exit_gate.wait()

    out: list[int] = []

    async def sink(item: int) -> None:
        out.append(item)

    flow = Flow(buffer_size=1)
    flow.set_producer(produce)
    flow.add_transformer(
        per_worker if slow_exit else work,
        name="ordered",
        scaling_strategy=_Scripted(max_workers, script),
        ordered=True,
    )
    flow.set_consumer(sink, scaling_strategy=FixedScaling(1), buffer_size=64)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(flow.run)
            await head_called.wait()
            while True:  # until the window stops growing
                await anyio.wait_all_tasks_blocked()
                before = flow.stats()["ordered"].reorder_window
                await anyio.wait_all_tasks_blocked()
                if flow.stats()["ordered"].reorder_window == before:
                    break
            release_head.set()
            exit_gate.set()
    assert out == list(range(items))
    assert flow.stats()["ordered"].reorder_window_peak <= 4 * max_workers
