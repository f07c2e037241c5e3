"""Property tests: random pipelines (1-4 stages, 1-4 workers, buffers from 0), random
failing items and random cut points; every produced item ends exactly once and the
stats agree with what the callables saw.

Each example runs in its own event loop (``anyio.run``): hypothesis and async
fixtures do not mix, so the tests are sync and parametrized over the backends.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrhythm import (
    FixedScaling,
    Flow,
    ScalingStrategy,
    StageStats,
    UtilizationScaling,
)

BACKENDS: list[Any] = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("trio", {}), id="trio"),
]
if sys.platform == "win32":
    del BACKENDS[1]

# max_examples comes from the profile loaded in conftest.py (25, or 400 in stress).
SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=False,
)

#: a deadlock guard only
GUARD = 10


@dataclass(frozen=True)
class StageSpec:
    workers: int
    buffer_size: int
    failing: frozenset[int]
    with_cm: bool
    #: "fixed", "utilization" (may scale to zero) or "churn" (random deltas)
    strategy: str = "fixed"
    #: items that make the stage wait a little (a real timer, not a checkpoint)
    sleepy: bool = False
    seed: int = 0


class Churn(ScalingStrategy):
    """Adds and retires workers at random on every event."""

    sampling_events = 1
    sampling_period = 0.005

    def __init__(self, max_workers: int, seed: int) -> None:
        self.min_workers = 0
        self.max_workers = max_workers
        self.rng = random.Random(seed)

    def initial_workers(self) -> int:
        return self.rng.randint(0, self.max_workers)

    def on_enqueue(self, stats: StageStats) -> int:
        return self.rng.randint(-2, 2)

    on_dequeue = on_tick = on_enqueue


def strategy_for(spec: StageSpec) -> ScalingStrategy:
    if spec.strategy == "utilization":
        return UtilizationScaling(
            min_workers=0,
            max_workers=spec.workers + 1,
            cooldown_seconds=0,
            sampling_events=1,
            sampling_period=0.005,
        )
    if spec.strategy == "churn":
        return Churn(spec.workers + 1, spec.seed)
    return FixedScaling(spec.workers)


@dataclass(frozen=True)
class Scenario:
    items: int
    stages: tuple[StageSpec, ...]  # the last one is the consumer
    #: None: run to the end; else (how, after how many consumed items)
    cut: tuple[str, int] | None
    handler_cm: bool


stage_specs = st.builds(
    StageSpec,
    workers=st.integers(1, 4),
    buffer_size=st.integers(0, 3),
    failing=st.frozensets(st.integers(0, 59), max_size=6),
    with_cm=st.booleans(),
    strategy=st.sampled_from(["fixed", "utilization", "churn"]),
    sleepy=st.booleans(),
    seed=st.integers(0, 2**16),
)
scenarios = st.builds(
    Scenario,
    items=st.integers(0, 60),
    stages=st.lists(stage_specs, min_size=1, max_size=5).map(tuple),
    cut=st.one_of(
        st.none(),
        st.tuples(
            st.sampled_from(
                [
                    "abort_outside",
                    "abort_inside",
                    "cancel",
                    "drain_outside",
                    "drain_inside",
                ]
            ),
            st.integers(0, 40),
        ),
    ),
    handler_cm=st.booleans(),
)


class Boom(Exception):
    def __init__(self, stage: str, item: int) -> None:
        super().__init__(stage, item)
        self.stage = stage


async def run_scenario(scenario: Scenario) -> None:
    produced: list[int] = []
    consumed: list[int] = []
    handled: list[tuple[int, Boom]] = []
    enters: Counter[str] = Counter()
    exits: Counter[str] = Counter()
    handler_log: list[str] = []
    cut_fired = anyio.Event()
    names = [f"s{index}" for index in range(len(scenario.stages))]
    how, at = scenario.cut if scenario.cut is not None else ("none", -1)
    aborting = how in ("abort_outside", "abort_inside", "cancel")

    async def produce() -> AsyncIterator[int]:
        for i in range(scenario.items):
            produced.append(i)
            yield i

    def make_call(name: str, spec: StageSpec, is_consumer: bool) -> Any:
        async def call(x: int) -> int:
            if x % 5 == 0:
                await checkpoint()
            if spec.sleepy and x % 7 == 0:
                await anyio.sleep(0.001)
            if x in spec.failing:
                raise Boom(name, x)
            if is_consumer:
                if len(consumed) == at and not cut_fired.is_set():
                    cut_fired.set()
                    if how == "abort_inside":
                        await flow.stop(drain=False)
                    elif how == "drain_inside":
                        await flow.stop()
                    elif how == "cancel":
                        outer.cancel()
                if aborting and cut_fired.is_set():
                    await anyio.sleep_forever()  # keep items in flight until cut
                consumed.append(x)
            return x

        if not spec.with_cm:
            return call

        @asynccontextmanager
        async def factory() -> AsyncIterator[Any]:
            enters[name] += 1
            try:
                yield call
            finally:
                await checkpoint()
                exits[name] += 1

        return factory

    async def handler(item: int, exc: BaseException) -> None:
        assert isinstance(exc, Boom)
        handled.append((item, exc))

    @asynccontextmanager
    async def handler_factory() -> AsyncIterator[Any]:
        handler_log.append("enter")
        try:
            yield handler
        finally:
            await checkpoint()
            handler_log.append("exit")

    flow = Flow()
    flow.set_producer(produce)
    for index, spec in enumerate(scenario.stages):
        is_consumer = index == len(scenario.stages) - 1
        configure = flow.set_consumer if is_consumer else flow.add_transformer
        configure(
            make_call(names[index], spec, is_consumer),
            name=names[index],
            scaling_strategy=strategy_for(spec),
            buffer_size=spec.buffer_size,
        )
    flow.set_error_handler(handler_factory if scenario.handler_cm else handler)

    with anyio.fail_after(GUARD), anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            if how in ("abort_outside", "drain_outside"):
                await _first_of(cut_fired, flow)
                if cut_fired.is_set():
                    await flow.stop(drain=how == "drain_outside")

    # -- what must hold ------------------------------------------------------------
    stats = flow.stats()
    assert list(stats) == names
    cut_happened = cut_fired.is_set() and aborting
    for name in names:
        stage = stats[name]
        assert stage.received == stage.processed + stage.errors + stage.dropped, stage
        assert stage.dropped >= 0
        assert stage.total_workers() == 0
        if not cut_happened:
            assert stage.dropped == 0, stage
    for upstream, downstream in pairwise(names):
        assert stats[downstream].received == stats[upstream].processed
    assert stats[names[0]].received == len(produced)
    assert stats[names[-1]].processed == len(consumed)
    errors = Counter(exc.stage for _, exc in handled)
    for name in names:
        assert stats[name].errors == errors[name]
    # each failure happened in the first stage that rejects the item
    for item, exc in handled:
        first = next(
            n
            for n, spec in zip(names, scenario.stages, strict=True)
            if item in spec.failing
        )
        assert exc.stage == first
    dropped = sum(stats[name].dropped for name in names)
    assert len(produced) == len(consumed) + len(handled) + dropped
    finished = consumed + [item for item, _ in handled]
    assert len(finished) == len(set(finished)), "an item ended twice"
    assert set(finished) <= set(produced)
    if not cut_happened:
        assert sorted(finished) == produced
        if how == "none":
            assert produced == list(range(scenario.items))
        if all(
            spec.strategy == "fixed" and spec.workers == 1 for spec in scenario.stages
        ):
            assert consumed == sorted(consumed)
    # every context manager that entered has exited
    assert enters == exits, (enters, exits)
    for name, spec in zip(names, scenario.stages, strict=True):
        if spec.with_cm and spec.strategy == "fixed" and not cut_happened:
            assert enters[name] == spec.workers
    if scenario.handler_cm:
        assert handler_log == ["enter", "exit"]


async def _first_of(event: anyio.Event, flow: Flow) -> None:
    """Return once ``event`` is set or the flow has ended, whichever comes first."""
    async with anyio.create_task_group() as tg:

        async def on_event() -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        async def on_end() -> None:
            await flow.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(on_event)
        tg.start_soon(on_end)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(scenario=scenarios)
def test_every_item_ends_exactly_once(
    backend: tuple[str, dict[str, Any]], scenario: Scenario
) -> None:
    name, options = backend
    anyio.run(partial(run_scenario, scenario), backend=name, backend_options=options)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    stages=st.lists(
        st.tuples(st.integers(1, 4), st.integers(0, 3)), min_size=1, max_size=4
    ),
    items=st.integers(0, 200),
)
def test_clean_runs_deliver_everything(
    backend: tuple[str, dict[str, Any]], stages: list[tuple[int, int]], items: int
) -> None:
    """No failures, no cuts: the consumer gets every item; single workers keep order."""

    async def main() -> None:
        got: list[int] = []

        async def produce() -> AsyncIterator[int]:
            for i in range(items):
                yield i

        async def step(x: int) -> int:
            if x % 3 == 0:
                await checkpoint()
            return x

        async def consume(x: int) -> None:
            got.append(x)

        flow = Flow()
        flow.set_producer(produce)
        for index, (workers, buffer_size) in enumerate(stages[:-1]):
            flow.add_transformer(
                step,
                name=f"t{index}",
                scaling_strategy=FixedScaling(workers),
                buffer_size=buffer_size,
            )
        workers, buffer_size = stages[-1]
        flow.set_consumer(
            consume, scaling_strategy=FixedScaling(workers), buffer_size=buffer_size
        )
        with anyio.fail_after(GUARD):
            await flow.run()
        if all(workers == 1 for workers, _ in stages):
            assert got == list(range(items))
        else:
            assert sorted(got) == list(range(items))
        for stage in flow.stats().values():
            assert (stage.received, stage.processed, stage.errors, stage.dropped) == (
                items,
                items,
                0,
                0,
            )

    name, options = backend
    anyio.run(main, backend=name, backend_options=options)
