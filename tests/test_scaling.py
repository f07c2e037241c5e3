"""Scaling: strategy validation, the UtilizationScaling algorithm (unit level, on
hand-built stats), and the controller driving real worker pools: custom strategies,
clamping, bad deltas, scale-up under load, scale-down when idle, scale to zero and
back, cooldown on an injected clock, sampling gates, back-pressure, per-stage state."""

from __future__ import annotations

import copy
import math
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

from flowrhythm import (
    FixedScaling,
    Flow,
    ScalingStrategy,
    StageStats,
    UtilizationScaling,
)
from flowrhythm._stats import StageCounters
from flowrhythm.scaling import live_decider

pytestmark = pytest.mark.anyio

#: a deadlock guard only: no test depends on how long anything takes
GUARD = 5


# -- helpers -------------------------------------------------------------------------


def snapshot(
    *,
    busy: int = 0,
    idle: int = 0,
    blocked: int = 0,
    queue: int = 0,
    up: float | None = None,
    down: float | None = None,
    at: float | None = 0.0,
) -> StageStats:
    """A hand-built snapshot of a stage named 'x'."""
    return StageStats(
        stage_name="x",
        busy_workers=busy,
        idle_workers=idle,
        blocked_workers=blocked,
        queue_length=queue,
        oldest_item_enqueued_at=None,
        last_enqueue_at=None,
        last_dequeue_at=None,
        last_scale_up_at=up,
        last_scale_down_at=down,
        last_error_at=None,
        received=0,
        processed=0,
        errors=0,
        dropped=0,
        sampled_at=at,
    )


async def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float = GUARD
) -> None:
    """Poll ``predicate`` (cheaply, yielding to the loop) until it holds."""
    try:
        with anyio.fail_after(timeout):
            while not predicate():
                await anyio.sleep(0.001)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what}")


def workers(flow: Flow, stage: str) -> int:
    return flow.stats()[stage].total_workers()


def stream_producer() -> tuple[Any, Callable[[], AsyncIterator[Any]]]:
    """A producer the test feeds item by item; closing ``send`` ends it."""
    send, receive = anyio.create_memory_object_stream[Any](math.inf)

    async def produce() -> AsyncIterator[Any]:
        with receive:
            async for item in receive:
                yield item

    return send, produce


def assert_balanced(flow: Flow) -> None:
    for name, stats in flow.stats().items():
        assert stats.received == stats.processed + stats.errors + stats.dropped, (
            name,
            stats,
        )
        assert stats.dropped == 0, (name, stats)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Remote(ScalingStrategy):
    """Applies the deltas the test queues, one per tick; records every snapshot.

    For one stage only: the stage uses this very instance, so the test can talk to
    it.
    """

    sampling_events = 0

    def __init__(
        self,
        min_workers: int,
        max_workers: int,
        *,
        initial: int | None = None,
        period: float = 0.001,
    ) -> None:
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.sampling_period = period
        self.initial = min_workers if initial is None else initial
        self.commands: deque[Any] = deque()
        self.seen: list[StageStats] = []

    def initial_workers(self) -> int:
        return self.initial

    def for_stage(self, stage_name: str) -> Remote:
        return self

    def on_tick(self, stats: StageStats) -> Any:
        self.seen.append(stats)
        return self.commands.popleft() if self.commands else 0

    async def ticks(self, count: int) -> None:
        """Wait until ``count`` more ticks have been seen."""
        target = len(self.seen) + count
        await wait_until(lambda: len(self.seen) >= target, f"{count} ticks")


# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"min_workers": 5, "max_workers": 2}, ValueError, ["min_workers", "max_workers"]),
        ({"min_workers": -1}, ValueError, ["min_workers"]),
        ({"max_workers": 0}, ValueError, ["max_workers"]),
        ({"min_workers": 0, "max_workers": 0}, ValueError, ["max_workers"]),
        ({"lower_utilization": 0.5, "upper_utilization": 0.5}, ValueError, ["lower_utilization", "upper_utilization"]),
        ({"lower_utilization": 0.9, "upper_utilization": 0.2}, ValueError, ["lower_utilization", "upper_utilization"]),
        ({"lower_utilization": -0.1}, ValueError, ["lower_utilization"]),
        ({"upper_utilization": 1.5}, ValueError, ["upper_utilization"]),
        ({"upscaling_rate": 0}, ValueError, ["upscaling_rate"]),
        ({"downscaling_rate": 0}, ValueError, ["downscaling_rate"]),
        ({"upscaling_rate": -2}, ValueError, ["upscaling_rate"]),
        ({"dampening": 0.0}, ValueError, ["dampening"]),
        ({"dampening": -0.5}, ValueError, ["dampening"]),
        ({"dampening": 1.01}, ValueError, ["dampening"]),
        ({"dampening": float("nan")}, ValueError, ["dampening"]),
        ({"cooldown_seconds": -1}, ValueError, ["cooldown_seconds"]),
        ({"cooldown_seconds": float("inf")}, ValueError, ["cooldown_seconds"]),
        ({"sampling_period": -0.5}, ValueError, ["sampling_period"]),
        ({"sampling_period": float("nan")}, ValueError, ["sampling_period"]),
        ({"sampling_events": -1}, ValueError, ["sampling_events"]),
        ({"min_workers": "1"}, TypeError, ["min_workers"]),
        ({"max_workers": 2.0}, TypeError, ["max_workers"]),
        ({"max_workers": True}, TypeError, ["max_workers"]),
        ({"lower_utilization": "0.2"}, TypeError, ["lower_utilization"]),
        ({"upper_utilization": None}, TypeError, ["upper_utilization"]),
        ({"upscaling_rate": 1.5}, TypeError, ["upscaling_rate"]),
        ({"downscaling_rate": "1"}, TypeError, ["downscaling_rate"]),
        ({"dampening": None}, TypeError, ["dampening"]),
        ({"cooldown_seconds": True}, TypeError, ["cooldown_seconds"]),
        ({"cooldown_seconds": "5"}, TypeError, ["cooldown_seconds"]),
        ({"sampling_period": "2"}, TypeError, ["sampling_period"]),
        ({"sampling_events": 1.0}, TypeError, ["sampling_events"]),
    ],
)  # fmt: skip
def test_utilization_scaling_rejects_bad_parameters(
    kwargs: dict[str, Any], error: type[Exception], names: list[str]
) -> None:
    with pytest.raises(error) as info:
        UtilizationScaling(**kwargs)
    for name in names:
        assert name in str(info.value)


def test_utilization_scaling_accepts_edge_values() -> None:
    s = UtilizationScaling(
        min_workers=0,
        max_workers=1,
        lower_utilization=0,
        upper_utilization=1,
        upscaling_rate=1,
        downscaling_rate=1,
        cooldown_seconds=0,
        dampening=1,
        sampling_period=0,
        sampling_events=0,
    )
    assert (s.min_workers, s.max_workers) == (0, 1)
    assert s.initial_workers() == 1  # a stage starts with a worker even with min 0
    for attr in ("lower_utilization", "upper_utilization", "cooldown_seconds"):
        assert type(getattr(s, attr)) is float
    assert type(s.dampening) is float
    assert type(s.sampling_period) is float
    assert UtilizationScaling(min_workers=3, max_workers=3).initial_workers() == 3


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), (2.0, TypeError),
     ("2", TypeError), (True, TypeError), (None, TypeError)],
)  # fmt: skip
def test_fixed_scaling_rejects_bad_worker_counts(
    value: Any, error: type[Exception]
) -> None:
    with pytest.raises(error, match="workers"):
        FixedScaling(value)


def test_fixed_scaling_is_a_constant_pool() -> None:
    s = FixedScaling(3)
    assert (s.min_workers, s.max_workers, s.initial_workers()) == (3, 3, 3)
    assert s.sampling_events == 0
    assert s.sampling_period == 0
    assert s.on_enqueue(snapshot(busy=3, queue=100)) == 0
    assert FixedScaling().initial_workers() == 1


# -- UtilizationScaling, unit level ---------------------------------------------------


def make_utilization(**kwargs: Any) -> UtilizationScaling:
    params: dict[str, Any] = {
        "min_workers": 1,
        "max_workers": 8,
        "dampening": 1.0,
        "cooldown_seconds": 5.0,
    }
    params.update(kwargs)
    return UtilizationScaling(**params).for_stage("x")


def test_grows_a_busy_stage_with_a_queue() -> None:
    s = make_utilization(upscaling_rate=3)
    assert s.on_tick(snapshot(busy=4, queue=2)) == 3
    # the same hooks drive the event-driven checks
    assert s.on_enqueue(snapshot(busy=4, queue=2)) == 3
    assert s.on_dequeue(snapshot(busy=4, queue=2)) == 3


@pytest.mark.parametrize(
    ("stats", "why"),
    [
        (snapshot(busy=4, queue=0), "nothing is waiting"),
        (snapshot(busy=4, blocked=1, queue=5), "a worker is blocked downstream"),
        (snapshot(busy=8, queue=5), "already at max_workers"),
        (snapshot(busy=6, blocked=2, queue=5), "at max_workers counting blocked"),
        (snapshot(busy=3, idle=1, queue=5), "utilization 0.75 < upper 0.8"),
    ],
)
def test_does_not_grow(stats: StageStats, why: str) -> None:
    assert make_utilization().on_tick(stats) == 0, why


def test_upper_and_lower_bounds_are_inclusive() -> None:
    s = make_utilization(lower_utilization=0.25, upper_utilization=0.75)
    assert s.on_tick(snapshot(busy=3, idle=1, queue=1)) == 2  # 0.75 >= upper
    s = make_utilization(lower_utilization=0.25, upper_utilization=0.75)
    assert s.on_tick(snapshot(busy=1, idle=3)) == -1  # 0.25 <= lower


def test_shrinks_an_idle_stage_down_to_min() -> None:
    s = make_utilization(min_workers=2, downscaling_rate=2)
    assert s.on_tick(snapshot(idle=5)) == -2
    assert s.on_tick(snapshot(idle=2)) == 0  # at min_workers
    s = make_utilization(min_workers=0)
    assert s.on_tick(snapshot(idle=1)) == -1
    assert s.on_tick(snapshot()) == 0  # zero workers: nothing to retire


def test_cooldown_counts_from_the_last_scale_event_of_either_kind() -> None:
    s = make_utilization(cooldown_seconds=5.0)
    idle = {"idle": 4}
    # last scale-up at 100: no shrink before 105, shrink at 105
    assert s.on_tick(snapshot(**idle, up=100.0, at=100.0)) == 0
    assert s.on_tick(snapshot(**idle, up=100.0, at=104.999)) == 0
    assert s.on_tick(snapshot(**idle, up=100.0, at=105.0)) == -1
    # a later scale-down restarts the cooldown
    assert s.on_tick(snapshot(**idle, up=100.0, down=105.0, at=109.0)) == 0
    assert s.on_tick(snapshot(**idle, up=100.0, down=105.0, at=110.0)) == -1
    # and so does a later scale-up
    assert s.on_tick(snapshot(**idle, up=111.0, down=105.0, at=115.0)) == 0
    assert s.on_tick(snapshot(**idle, up=111.0, down=105.0, at=116.0)) == -1
    # never scaled: no cooldown to wait for
    assert s.on_tick(snapshot(**idle, at=0.0)) == -1


def test_growth_is_not_held_back_by_the_cooldown() -> None:
    s = make_utilization(cooldown_seconds=60.0)
    assert s.on_tick(snapshot(busy=2, queue=3, up=10.0, at=10.0)) == 2


def test_dampening_is_a_moving_average() -> None:
    s = make_utilization(dampening=0.5, lower_utilization=0.2, upper_utilization=0.8)
    assert s.on_tick(snapshot(busy=2, queue=1)) == 2  # first sample: 1.0
    assert s.on_tick(snapshot(idle=2, queue=1)) == 0  # 0.5
    assert s.on_tick(snapshot(idle=2)) == 0  # 0.25
    assert s.on_tick(snapshot(idle=2)) == -1  # 0.125 <= 0.2
    assert s.on_tick(snapshot(busy=2, queue=1)) == 0  # 0.5625 < 0.8
    assert s.on_tick(snapshot(busy=2, queue=1)) == 0  # 0.78125
    assert s.on_tick(snapshot(busy=2, queue=1)) == 2  # 0.890625


def test_for_stage_gives_each_stage_a_fresh_copy() -> None:
    shared = UtilizationScaling(dampening=0.5)
    a, b = shared.for_stage("a"), shared.for_stage("b")
    assert a is not shared
    assert b is not shared
    assert a is not b
    assert type(a) is UtilizationScaling
    assert a.on_tick(snapshot(busy=2, queue=1)) == 2  # a's average: 1.0
    # b has not seen a's sample: one idle sample is 0.0, so it shrinks
    assert b.on_tick(snapshot(idle=2, at=None)) == -1
    assert shared.on_tick(snapshot(idle=2, at=None)) == -1
    # a copy made after the shared instance was used starts afresh too
    c = shared.for_stage("c")
    assert c.on_tick(snapshot(busy=2, queue=1)) == 2


def test_custom_strategy_for_stage_is_a_copy() -> None:
    class Mine(ScalingStrategy):
        max_workers = 3

    s = Mine()
    copy = s.for_stage("a")
    assert type(copy) is Mine
    assert copy is not s
    assert (copy.min_workers, copy.max_workers) == (1, 3)
    assert copy.initial_workers() == 1
    assert copy.on_enqueue(snapshot()) == copy.on_dequeue(snapshot()) == 0
    assert copy.on_tick(snapshot()) == 0


# -- the runtime's fast path for UtilizationScaling -------------------------------------

#: one consult: (hook, workers, idle, blocked, throttled, ready, queued, taken,
#: blocked_sends, last_scale_up_at, last_scale_down_at, now)
_consults = st.tuples(
    st.sampled_from(["on_enqueue", "on_dequeue", "on_tick"]),
    st.integers(0, 4),
    st.integers(0, 4),
    st.integers(0, 2),
    st.integers(0, 1),
    st.integers(0, 2),
    st.integers(0, 3),
    st.integers(0, 10_000),
    st.integers(0, 3),
    st.one_of(st.none(), st.floats(0, 20)),
    st.one_of(st.none(), st.floats(0, 20)),
    st.floats(0, 40),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(_consults, min_size=1, max_size=30),
    st.sampled_from([0.5, 1.0, 0.3]),
    st.integers(0, 2),
    st.sampled_from([0.0, 10.0]),
)
def test_the_live_decision_is_the_hooks_decision(
    consults: list[tuple[Any, ...]], dampening: float, min_workers: int, cooldown: float
) -> None:
    """The runtime asks a plain UtilizationScaling straight from the live counters;
    over any sequence of consults it must answer exactly what its hooks answer
    when given the same moments as snapshots."""
    template = UtilizationScaling(
        min_workers=min_workers,
        max_workers=min_workers + 6,
        dampening=dampening,
        cooldown_seconds=cooldown,
    )
    live = template.for_stage("x")
    hooks = template.for_stage("x")
    decide = live_decider(live)
    assert decide is not None
    counters = StageCounters("x")
    for consult in consults:
        hook, workers, idle, blocked, throttled, ready, queued = consult[:7]
        taken, blocked_sends, up, down, now = consult[7:]
        counters.workers = workers + idle + blocked + throttled + ready
        counters.idle = idle
        counters.blocked = blocked
        counters.throttled = throttled
        counters.ready = ready
        counters.taken = taken
        counters.offered = taken + queued
        counters.blocked_sends = blocked_sends
        counters.last_scale_up_at = up
        counters.last_scale_down_at = down
        expected = getattr(hooks, hook)(counters.snapshot(now))
        assert decide(counters, now, hook == "on_dequeue") == expected, consult


def test_only_an_unmodified_utilization_scaling_takes_the_fast_path() -> None:
    class Tuned(UtilizationScaling):
        def __init__(self) -> None:
            super().__init__(max_workers=3)

    class Spied(UtilizationScaling):
        def on_dequeue(self, stats: StageStats) -> int:
            return super().on_dequeue(stats)

    class Mine(ScalingStrategy):
        max_workers = 3

    patched = UtilizationScaling()
    patched.on_tick = lambda stats: 0  # type: ignore[method-assign]
    assert live_decider(UtilizationScaling()) is not None
    assert live_decider(Tuned().for_stage("a")) is not None
    assert live_decider(Spied()) is None
    assert live_decider(patched) is None
    assert live_decider(Mine()) is None
    assert live_decider(FixedScaling(2)) is None


# -- a custom strategy drives the pool ------------------------------------------------


async def _concurrency_probe(
    flow: Flow, stage: str, count: int, release: anyio.Event, running: list[int]
) -> None:
    """Wait until ``count`` calls of the stage run at once (each holds one worker)."""
    await wait_until(lambda: len(running) >= count, f"{count} concurrent calls")
    assert flow.stats()[stage].busy_workers == count
    release.set()


async def test_custom_strategy_resizes_the_pool(anyio_backend: Any) -> None:
    strategy = Remote(1, 5)
    send, receive = stream_producer()
    release = anyio.Event()
    running: list[int] = []
    done: list[int] = []

    async def work(item: int) -> int:
        running.append(item)
        await release.wait()
        return item

    async def sink(item: int) -> None:
        done.append(item)

    flow = Flow()
    flow.set_producer(receive)
    flow.add_transformer(work, scaling_strategy=strategy)
    flow.set_consumer(sink)

    async def expect(count: int, what: str) -> None:
        await wait_until(lambda: workers(flow, "work") == count, what)

    async with anyio.create_task_group() as tg:
        await tg.start(flow.run)
        assert workers(flow, "work") == 1
        strategy.commands.append(2)
        await expect(3, "3 workers after +2")
        strategy.commands.append(1)
        await expect(4, "4 workers after +1")
        strategy.commands.append(-3)
        await expect(1, "1 worker after -3")
        strategy.commands.append(4)
        await expect(5, "5 workers after +4")
        # the five workers are real: five items run at once
        for item in range(5):
            await send.send(item)
        await _concurrency_probe(flow, "work", 5, release, running)
        await wait_until(lambda: len(done) == 5, "the five items")
        await send.aclose()
    assert sorted(done) == list(range(5))
    assert max(s.total_workers() for s in strategy.seen) <= 5
    assert_balanced(flow)


async def test_deltas_are_clamped_to_min_and_max(anyio_backend: Any) -> None:
    strategy = Remote(2, 4)
    send, receive = stream_producer()
    totals: list[int] = []
    flow = Flow()

    async def work(item: int) -> int:
        totals.append(workers(flow, "work"))
        return item

    async def sink(item: int) -> None:
        pass

    flow.set_producer(receive)
    flow.add_transformer(work, scaling_strategy=strategy)
    flow.set_consumer(sink)
    async with anyio.create_task_group() as tg:
        await tg.start(flow.run)
        assert workers(flow, "work") == 2
        strategy.commands.append(100)
        await wait_until(lambda: workers(flow, "work") == 4, "clamped to max")
        strategy.commands.extend([1, 50])
        await strategy.ticks(4)
        assert workers(flow, "work") == 4
        strategy.commands.append(-100)
        await wait_until(lambda: workers(flow, "work") == 2, "clamped to min")
        strategy.commands.extend([-1, -7])
        await strategy.ticks(4)
        assert workers(flow, "work") == 2
        for item in range(20):
            await send.send(item)
        await wait_until(lambda: flow.stats()["work"].processed == 20, "20 items")
        # (once the input ends, workers leave: the pool may then drop below min)
        seen = [s.total_workers() for s in strategy.seen] + totals
        await send.aclose()
    assert min(seen) >= 2
    assert max(seen) <= 4
    assert flow.stats()["work"].processed == 20
    assert_balanced(flow)


class BadDelta(ScalingStrategy):
    min_workers = 1
    max_workers = 3
    sampling_events = 1
    sampling_period = 0.001

    def __init__(self, hook: str, value: Any) -> None:
        self.hook = hook
        self.value = value

    def _answer(self, hook: str) -> Any:
        return self.value if hook == self.hook else 0

    def on_enqueue(self, stats: StageStats) -> Any:
        return self._answer("on_enqueue")

    def on_dequeue(self, stats: StageStats) -> Any:
        return self._answer("on_dequeue")

    def on_tick(self, stats: StageStats) -> Any:
        return self._answer("on_tick")


async def _endless() -> AsyncIterator[int]:
    item = 0
    while True:
        yield item
        item += 1
        await checkpoint()


async def _identity(item: Any) -> Any:
    return item


async def _discard(item: Any) -> None:
    pass


@pytest.mark.parametrize(
    ("hook", "value"),
    [("on_tick", "1"), ("on_tick", None), ("on_enqueue", 1.5), ("on_dequeue", True),
     ("on_dequeue", 2.0)],
)  # fmt: skip
async def test_a_non_int_delta_fails_the_flow(
    anyio_backend: Any, hook: str, value: Any
) -> None:
    flow = Flow()
    flow.set_producer(_endless)
    flow.add_transformer(_identity, name="stage_a")
    flow.set_consumer(_discard, name="stage_b", scaling_strategy=BadDelta(hook, value))
    with anyio.fail_after(GUARD), pytest.raises(TypeError) as info:
        await flow.run()
    text = "\n".join([str(info.value), *getattr(info.value, "__notes__", ())])
    assert hook in text
    assert repr(value) in text
    assert "stage_b" in text
    assert "stage_a" not in text
    assert_no_workers_left(flow)


def assert_no_workers_left(flow: Flow) -> None:
    for stats in flow.stats().values():
        assert stats.total_workers() == 0


async def test_a_strategy_that_raises_fails_the_flow_with_its_error(
    anyio_backend: Any,
) -> None:
    class Boom(Remote):
        def on_tick(self, stats: StageStats) -> int:
            raise LookupError("strategy exploded")

    flow = Flow()
    flow.set_producer(_endless)
    flow.add_transformer(_identity, name="shaky", scaling_strategy=Boom(1, 2))
    flow.set_consumer(_discard)
    with anyio.fail_after(GUARD), pytest.raises(LookupError, match="exploded") as info:
        await flow.run()
    assert "shaky" in "\n".join(getattr(info.value, "__notes__", ()))


class _Halt(BaseException):
    """Not an Exception (like KeyboardInterrupt)."""


async def test_a_strategy_raising_a_base_exception_is_blamed_on_the_strategy(
    anyio_backend: Any,
) -> None:
    """The enqueue hook of the second stage runs in a worker of the first (the one
    sending the item): what it raises is still the strategy's failure, with the
    strategy's note, whatever it derives from."""

    class Halting(ScalingStrategy):
        min_workers, max_workers = 1, 2
        sampling_events, sampling_period = 1, 0.0

        def on_enqueue(self, stats: StageStats) -> int:
            raise _Halt("strategy halted")

    flow = Flow()
    flow.set_producer(_endless)
    flow.add_transformer(_identity, name="first")
    flow.add_transformer(_identity, name="second", scaling_strategy=Halting())
    flow.set_consumer(_discard)
    with anyio.fail_after(GUARD), pytest.raises(_Halt) as info:
        await flow.run()
    notes = "\n".join(getattr(info.value, "__notes__", ()))
    assert "scaling strategy of transformer 'second'" in notes
    assert "'first'" not in notes


# -- UtilizationScaling on real pools -------------------------------------------------


async def test_scale_up_under_load_stays_within_max(anyio_backend: Any) -> None:
    strategy = UtilizationScaling(
        min_workers=1,
        max_workers=4,
        sampling_events=1,
        sampling_period=0.005,
        cooldown_seconds=0.05,
    )
    flow = Flow()
    totals: list[int] = []
    in_flight = 0
    peak_in_flight = 0

    async def produce() -> AsyncIterator[int]:
        for item in range(3000):
            yield item

    async def work(item: int) -> int:
        nonlocal in_flight, peak_in_flight
        in_flight += 1
        peak_in_flight = max(peak_in_flight, in_flight)
        totals.append(workers(flow, "work"))
        for _ in range(3):
            await checkpoint()
        in_flight -= 1
        return item

    consumed: list[int] = []

    async def sink(item: int) -> None:
        consumed.append(item)

    flow.set_producer(produce)
    flow.add_transformer(work, scaling_strategy=strategy)
    flow.set_consumer(sink)
    with anyio.fail_after(GUARD * 2):
        await flow.run()
    assert sorted(consumed) == list(range(3000))
    assert max(totals) > 1, "the stage never scaled up under load"
    assert max(totals) <= 4
    assert 1 < peak_in_flight <= 4
    assert_balanced(flow)


async def test_a_cpu_bound_pipeline_does_not_grow(anyio_backend: Any) -> None:
    """Stages whose calls never wait are short of CPU, not of workers: between
    items their workers wait for the event loop (ready), and the worker consulting
    at a dequeue does not count itself, so UtilizationScaling sees no busy
    workers and never grows them, however long their queues."""
    strategy = UtilizationScaling(
        min_workers=1, max_workers=4, sampling_events=1, sampling_period=0
    )
    flow = Flow(default_scaling_strategy=strategy)

    async def produce() -> AsyncIterator[int]:
        for item in range(5000):
            yield item

    flow.set_producer(produce)
    for name in ("a", "b", "c"):
        flow.add_transformer(_identity, name=name)
    flow.set_consumer(_discard, name="sink")
    with anyio.fail_after(GUARD * 2):
        await flow.run()
    for stats in flow.stats().values():
        assert stats.last_scale_up_at is None, stats
        assert stats.processed == 5000
    assert_balanced(flow)


async def test_scale_down_to_min_when_idle(anyio_backend: Any) -> None:
    strategy = UtilizationScaling(
        min_workers=2,
        max_workers=6,
        sampling_events=1,
        sampling_period=0.002,
        cooldown_seconds=0.01,
    )
    finish = anyio.Event()
    release = anyio.Event()
    totals: list[int] = []
    flow = Flow()

    async def produce() -> AsyncIterator[int]:
        for item in range(100):
            yield item
        await finish.wait()

    async def work(item: int) -> int:
        totals.append(workers(flow, "work"))
        await release.wait()
        return item

    consumed: list[int] = []

    async def sink(item: int) -> None:
        consumed.append(item)

    flow.set_producer(produce)
    flow.add_transformer(work, scaling_strategy=strategy)
    flow.set_consumer(sink)
    async with anyio.create_task_group() as tg:
        await tg.start(flow.run)
        assert workers(flow, "work") == 2
        # every worker is stuck on an item and more are queued: the stage grows
        await wait_until(
            lambda: flow.stats()["work"].busy_workers == 6, "six busy workers"
        )
        assert workers(flow, "work") == 6
        release.set()
        await wait_until(lambda: len(consumed) == 100, "the burst")
        await wait_until(lambda: workers(flow, "work") == 2, "shrink to min")
        # and it stays there
        await anyio.sleep(0.05)
        assert workers(flow, "work") == 2
        finish.set()
    assert sorted(consumed) == list(range(100))
    assert max(totals) <= 6
    assert flow.stats()["work"].last_scale_down_at is not None
    assert_balanced(flow)


class AlwaysShrink(ScalingStrategy):
    """Asks for fewer workers on every consultation."""

    min_workers = 0
    max_workers = 3
    sampling_events = 1
    sampling_period = 0.001

    def initial_workers(self) -> int:
        return 1

    def on_enqueue(self, stats: StageStats) -> int:
        return -5

    on_dequeue = on_tick = on_enqueue


@pytest.mark.parametrize(
    "strategy",
    [
        UtilizationScaling(
            min_workers=0, max_workers=4, sampling_events=1,
            sampling_period=0.002, cooldown_seconds=0,
        ),
        UtilizationScaling(
            min_workers=0, max_workers=4, sampling_events=0,
            sampling_period=0.002, cooldown_seconds=0,
        ),
        AlwaysShrink(),
    ],
    ids=["utilization", "utilization-no-events", "always-shrink"],
)  # fmt: skip
async def test_scale_to_zero_and_back(
    anyio_backend: Any, strategy: ScalingStrategy
) -> None:
    more = anyio.Event()
    flow = Flow(default_scaling_strategy=strategy)

    async def produce() -> AsyncIterator[int]:
        for item in range(200):
            yield item
            if item % 7 == 0:
                await checkpoint()
        await more.wait()
        for item in range(200, 400):
            yield item

    consumed: list[int] = []

    async def sink(item: int) -> None:
        consumed.append(item)

    flow.set_producer(produce)
    flow.add_transformer(_identity, name="first")
    flow.add_transformer(_identity, name="second")
    flow.set_consumer(sink, name="last")
    async with anyio.create_task_group() as tg:
        await tg.start(flow.run)
        await wait_until(lambda: len(consumed) == 200, "the first batch")

        def all_at_zero() -> bool:
            return all(s.total_workers() == 0 for s in flow.stats().values())

        await wait_until(all_at_zero, "every stage at zero workers")
        more.set()
        await wait_until(lambda: len(consumed) == 400, "the second batch")
    assert Counter(consumed) == Counter(range(400))
    for stats in flow.stats().values():
        assert stats.received == stats.processed == 400
    assert_balanced(flow)


async def test_a_stage_starting_at_zero_workers_gets_one(anyio_backend: Any) -> None:
    strategy = Remote(0, 2, initial=0, period=0.001)
    flow = Flow()
    consumed: list[int] = []

    async def sink(item: int) -> None:
        consumed.append(item)

    async def produce() -> AsyncIterator[int]:
        for item in range(50):
            yield item

    flow.set_producer(produce)
    flow.add_transformer(_identity, scaling_strategy=strategy)
    flow.set_consumer(sink)
    with anyio.fail_after(GUARD):
        await flow.run()
    assert sorted(consumed) == list(range(50))
    assert_balanced(flow)


async def test_cooldown_is_measured_on_the_flow_clock(anyio_backend: Any) -> None:
    clock = FakeClock(1000.0)
    ticks: list[StageStats] = []

    class Watched(UtilizationScaling):
        def on_tick(self, stats: StageStats) -> int:
            ticks.append(stats)
            return super().on_tick(stats)

    strategy = Watched(
        min_workers=1,
        max_workers=4,
        upscaling_rate=3,
        downscaling_rate=1,
        cooldown_seconds=100.0,
        dampening=1.0,
        sampling_events=1,
        sampling_period=0.001,
    )
    started = anyio.Event()
    release = anyio.Event()
    finish = anyio.Event()
    flow = Flow(clock=clock)

    async def produce() -> AsyncIterator[int]:
        yield 0
        await started.wait()
        for item in range(1, 4):
            yield item
        await finish.wait()

    async def work(item: int) -> int:
        started.set()
        await release.wait()
        return item

    async def more_ticks(count: int) -> None:
        target = len(ticks) + count
        await wait_until(lambda: len(ticks) >= target, f"{count} ticks")

    flow.set_producer(produce)
    flow.add_transformer(work, scaling_strategy=strategy)
    flow.set_consumer(_discard)
    async with anyio.create_task_group() as tg:
        await tg.start(flow.run)
        await wait_until(lambda: workers(flow, "work") == 4, "the scale-up")
        assert flow.stats()["work"].last_scale_up_at == 1000.0
        release.set()
        await wait_until(lambda: flow.stats()["_discard"].processed == 4, "the items")
        await wait_until(lambda: flow.stats()["work"].idle_workers == 4, "idleness")
        # idle, but no fake time has passed since the scale-up: no shrink
        await more_ticks(10)
        clock.now = 1099.9
        await more_ticks(10)
        assert workers(flow, "work") == 4
        assert all(s.sampled_at in (1000.0, 1099.9) for s in ticks)
        clock.now = 1100.0
        await wait_until(lambda: workers(flow, "work") == 3, "the first shrink")
        assert flow.stats()["work"].last_scale_down_at == 1100.0
        # the shrink restarts the cooldown
        await more_ticks(10)
        clock.now = 1199.0
        await more_ticks(10)
        assert workers(flow, "work") == 3
        clock.now = 1200.0
        await wait_until(lambda: workers(flow, "work") == 2, "the second shrink")
        finish.set()
    assert_balanced(flow)


# -- retirement accounting -----------------------------------------------------------


class OnEnqueue(ScalingStrategy):
    """Answers the n-th ``on_enqueue`` with ``script[n]``; records every snapshot."""

    sampling_events = 1
    sampling_period = 0.0

    def __init__(self, min_workers: int, max_workers: int, initial: int) -> None:
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.initial = initial
        self.script: list[int] = []
        self.seen: list[StageStats] = []

    def initial_workers(self) -> int:
        return self.initial

    def for_stage(self, stage_name: str) -> OnEnqueue:
        return self  # one stage only

    def on_enqueue(self, stats: StageStats) -> int:
        self.seen.append(stats)
        n = len(self.seen) - 1
        return self.script[n] if n < len(self.script) else 0


async def test_workers_being_retired_are_not_counted_beyond_max(
    anyio_backend: Any,
) -> None:
    """Retire two idle workers and add two back in the same event-loop step: the
    stats must never show more workers than ``max_workers``."""
    strategy = OnEnqueue(1, 3, initial=3)
    strategy.script = [-2, 2]
    finish = anyio.Event()
    flow = Flow()

    async def produce() -> AsyncIterator[int]:
        for item in range(3):
            yield item  # no checkpoint: the three enqueues happen in one step
        await finish.wait()

    flow.set_producer(produce)
    flow.add_transformer(_identity, name="pool", scaling_strategy=strategy)
    flow.set_consumer(_discard)
    async with anyio.create_task_group() as tg:
        await tg.start(flow.run)
        await wait_until(lambda: flow.stats()["_discard"].processed == 3, "3 items")
        await anyio.wait_all_tasks_blocked()
        after = flow.stats()["pool"].total_workers()
        finish.set()
    totals = [s.total_workers() for s in strategy.seen]
    assert after == 3
    assert max(totals) <= 3, (
        f"stats reported {max(totals)} workers with max_workers=3 "
        f"(totals seen by on_enqueue: {totals})"
    )
    assert_balanced(flow)


async def test_a_retired_worker_that_keeps_its_item_does_not_exceed_max(
    anyio_backend: Any,
) -> None:
    """Both idle workers are handed an item; in the same step one of them is picked
    for retirement and a worker is added back. The picked worker keeps its item
    (nothing is lost) and stays - the pool must still never run more items at once
    than ``max_workers``."""
    strategy = OnEnqueue(1, 2, initial=2)
    strategy.script = [0, 0, -2, 1]
    finish = anyio.Event()
    release = anyio.Event()
    running: list[int] = []
    done: list[int] = []
    flow = Flow()

    async def produce() -> AsyncIterator[int]:
        for item in range(4):
            yield item  # no checkpoint: the four enqueues happen in one step
        await finish.wait()

    async def work(item: int) -> int:
        running.append(item)
        await release.wait()
        return item

    async def sink(item: int) -> None:
        done.append(item)

    flow.set_producer(produce)
    flow.add_transformer(work, scaling_strategy=strategy)
    flow.set_consumer(sink)
    async with anyio.create_task_group() as tg:
        await tg.start(flow.run)
        await wait_until(lambda: len(running) >= 2, "two items in flight")
        await anyio.wait_all_tasks_blocked()
        at_once = list(running)
        workers_then = workers(flow, "work")
        release.set()
        await wait_until(lambda: len(done) == 4, "every item")
        finish.set()
    assert sorted(done) == [0, 1, 2, 3]
    assert len(at_once) <= 2, (
        f"items {at_once} ran at once on {workers_then} workers with max_workers=2"
    )
    assert_balanced(flow)


# -- sampling gates -------------------------------------------------------------------


class Counting(ScalingStrategy):
    """Counts its consultations per stage; never changes the pool."""

    min_workers = 1
    max_workers = 2  # min < max: the stage is consulted at all
    sampling_period = 0.0

    def __init__(self, events: int) -> None:
        self.sampling_events = events
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.sampled_at: set[float | None] = set()

    def for_stage(self, stage_name: str) -> Counting:
        clone = copy.copy(self)  # shares the tallies, whatever the default does
        clone.calls = self.calls
        clone.sampled_at = self.sampled_at
        return clone

    def _count(self, hook: str, stats: StageStats) -> int:
        self.calls[stats.stage_name, hook] += 1
        self.sampled_at.add(stats.sampled_at)
        return 0

    def on_enqueue(self, stats: StageStats) -> int:
        return self._count("on_enqueue", stats)

    def on_dequeue(self, stats: StageStats) -> int:
        return self._count("on_dequeue", stats)

    def on_tick(self, stats: StageStats) -> int:
        return self._count("on_tick", stats)


@pytest.mark.parametrize("events", [0, 1, 7, 64, 333, 1000, 5000])
async def test_sampling_gates_consult_every_n_events(
    anyio_backend: Any, events: int
) -> None:
    items = 1000
    strategy = Counting(events)
    flow = Flow(default_scaling_strategy=strategy, clock=FakeClock(42.0))

    async def produce() -> AsyncIterator[int]:
        for item in range(items):
            yield item
            if item % 5 == 0:
                await checkpoint()

    flow.set_producer(produce)
    flow.add_transformer(_identity, name="a")
    flow.set_consumer(_discard, name="b")
    with anyio.fail_after(GUARD):
        await flow.run()
    expected = items // events if events else 0
    assert dict(strategy.calls) == {
        key: expected
        for key in [
            ("a", "on_enqueue"),
            ("a", "on_dequeue"),
            ("b", "on_enqueue"),
            ("b", "on_dequeue"),
        ]
        if expected
    }
    if expected:
        assert strategy.sampled_at == {42.0}  # the flow's clock, not the loop's


async def test_a_pool_that_cannot_change_is_never_consulted(
    anyio_backend: Any,
) -> None:
    strategy = Counting(1)
    strategy.min_workers = strategy.max_workers = 2
    strategy.sampling_period = 0.001
    flow = Flow()

    async def slow(item: int) -> int:
        await anyio.sleep(0.002)
        return item

    async def produce() -> AsyncIterator[int]:
        for item in range(20):
            yield item

    flow.set_producer(produce)
    flow.add_transformer(slow, scaling_strategy=strategy)
    flow.set_consumer(_discard)
    with anyio.fail_after(GUARD):
        await flow.run()
    assert flow.stats()["_discard"].processed == 20
    assert dict(strategy.calls) == {}


# -- back-pressure --------------------------------------------------------------------


@pytest.mark.parametrize("dampening", [0.5, 1.0])
async def test_a_stage_blocked_by_its_downstream_does_not_grow(
    anyio_backend: Any, dampening: float
) -> None:
    class Watched(UtilizationScaling):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.totals: list[int] = []
            self.samples: list[tuple[int, ...]] = []

        def _decide_stats(self, stats: StageStats, **options: Any) -> int:
            self.totals.append(stats.total_workers())
            delta = super()._decide_stats(stats, **options)
            self.samples.append(
                (
                    stats.busy_workers,
                    stats.idle_workers,
                    stats.blocked_workers,
                    stats.queue_length,
                    delta,
                )
            )
            return delta

    strategy = Watched(
        min_workers=1,
        max_workers=8,
        sampling_events=1,
        sampling_period=0.001,
        cooldown_seconds=0,
        dampening=dampening,
    )
    permits = anyio.Semaphore(0)
    flow = Flow()
    consumed: list[int] = []

    async def produce() -> AsyncIterator[int]:
        for item in range(300):
            yield item

    async def slow_sink(item: int) -> None:
        await permits.acquire()
        consumed.append(item)

    flow.set_producer(produce)
    flow.add_transformer(_identity, name="fast", scaling_strategy=strategy)
    flow.set_consumer(slow_sink, buffer_size=0)

    async with anyio.create_task_group() as tg:
        await tg.start(flow.run)

        def all_blocked() -> bool:
            s = flow.stats()["fast"]
            return s.blocked_workers == s.total_workers() and s.queue_length > 0

        await wait_until(all_blocked, "the fast stage to block on its consumer")
        start = len(strategy.totals)
        # fully blocked: only ticks consult the strategy
        await wait_until(lambda: len(strategy.totals) >= start + 20, "20 samples")
        # the consumer trickles: one item at a time
        for count in range(1, 51):
            permits.release()
            await wait_until(lambda n=count: len(consumed) >= n, "the next item")
            await wait_until(all_blocked, "the fast stage to block again")
        # (from here on the consumer is fast: growth would be legitimate)
        window = len(strategy.totals)
        for _ in range(250):
            permits.release()
    # Before the consumer first pushes back the stage may grow on its backlog; once
    # the push-back is visible it must not grow at all.
    size = strategy.totals[start]
    grew = [sample for sample in strategy.samples[start:window] if sample[-1] > 0]
    assert max(strategy.totals[start:window]) == size, (
        f"a downstream-bound stage grew; (busy, idle, blocked, queue, delta) of the "
        f"samples that asked it to grow: {grew}"
    )
    assert sorted(consumed) == list(range(300))
    assert_balanced(flow)


# -- per-stage state ------------------------------------------------------------------


async def test_each_stage_gets_its_own_copy_of_the_default(anyio_backend: Any) -> None:
    seen: dict[int, set[str]] = defaultdict(set)
    instances: dict[int, ScalingStrategy] = {}

    class Spy(UtilizationScaling):
        def _decide_stats(self, stats: StageStats, **options: Any) -> int:
            seen[id(self)].add(stats.stage_name)
            instances[id(self)] = self
            return super()._decide_stats(stats, **options)

    shared = Spy(min_workers=1, max_workers=3, sampling_events=1, sampling_period=0)
    flow = Flow(default_scaling_strategy=shared)

    async def produce() -> AsyncIterator[int]:
        for item in range(100):
            yield item

    async def busy(item: int) -> int:
        await checkpoint()
        return item

    flow.set_producer(produce)
    flow.add_transformer(busy, name="one")
    flow.add_transformer(_identity, name="two")
    flow.set_consumer(_discard, name="three")
    with anyio.fail_after(GUARD):
        await flow.run()
    assert id(shared) not in seen
    assert shared._average is None  # the shared instance was never used
    assert sorted(sorted(names) for names in seen.values()) == [
        ["one"],
        ["three"],
        ["two"],
    ]
    assert all(type(s) is Spy for s in instances.values())
    assert all(s._average is not None for s in instances.values())  # type: ignore[attr-defined]


async def test_each_stage_gets_its_own_copy_of_a_custom_strategy(
    anyio_backend: Any,
) -> None:
    owners: dict[str, set[int]] = defaultdict(set)
    keep: list[Any] = []

    class PerStage(ScalingStrategy):
        max_workers = 2
        sampling_period = 0.0

        def on_enqueue(self, stats: StageStats) -> int:
            owners[stats.stage_name].add(id(self))
            keep.append(self)
            return 0

    shared = PerStage()
    flow = Flow(default_scaling_strategy=shared)

    async def produce() -> AsyncIterator[int]:
        for item in range(10):
            yield item

    flow.set_producer(produce)
    flow.add_transformer(_identity, name="one")
    flow.set_consumer(_discard, name="two")
    with anyio.fail_after(GUARD):
        await flow.run()
    assert set(owners) == {"one", "two"}
    assert all(len(ids) == 1 for ids in owners.values())
    assert owners["one"] != owners["two"]
    assert id(shared) not in owners["one"] | owners["two"]
