"""Churn: a strategy that adds and retires workers at random on every event must not
lose, duplicate or leak anything, on every backend.

Checked after each run: every item that did not fail reached the consumer exactly
once, every failed item reached the error handler exactly once, every per-worker
context manager that entered also exited, no stage ran more calls at once than its
``max_workers``, and every stage's stats balance with nothing dropped.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrhythm import Flow, ScalingStrategy, StageStats

pytestmark = pytest.mark.anyio

BACKENDS = [
    pytest.param("asyncio", {}, id="asyncio"),
    pytest.param("asyncio", {"use_uvloop": True}, id="uvloop"),
    pytest.param("trio", {}, id="trio"),
]


class Churn(ScalingStrategy):
    """Adds or retires up to three workers at random on every event and tick."""

    sampling_events = 1
    sampling_period = 0.001

    def __init__(
        self,
        rng: random.Random,
        min_workers: int,
        max_workers: int,
        consulted: Counter[str],
    ) -> None:
        # one seeded stream and one tally per run, shared by the stages
        self.rng = rng
        self.consulted = consulted
        self.min_workers = min_workers
        self.max_workers = max_workers

    def initial_workers(self) -> int:
        return self.rng.randint(self.min_workers, self.max_workers)

    def for_stage(self, stage_name: str) -> Churn:
        # no per-stage state; share the rng and the tally explicitly
        return Churn(self.rng, self.min_workers, self.max_workers, self.consulted)

    def _churn(self, stats: StageStats) -> int:
        self.consulted[stats.stage_name] += 1
        return self.rng.randint(-3, 3)

    on_enqueue = on_dequeue = on_tick = _churn


@dataclass
class Scenario:
    seed: int
    items: int
    stages: int  # transformers + the consumer
    buffers: list[int]  # one per stage
    min_workers: list[int]  # one per stage
    max_workers: int
    fail_every: int = 97  # items i with i % fail_every == stage index fail there


@dataclass
class Outcome:
    consumed: list[int] = field(default_factory=list)
    handled: list[tuple[int, str]] = field(default_factory=list)
    enters: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    consulted: Counter[str] = field(default_factory=Counter)


def fails_at(scenario: Scenario, item: int) -> int | None:
    """The stage (0-based) where ``item`` fails, if any."""
    for index in range(scenario.stages):
        if item % scenario.fail_every == index * 13 % scenario.fail_every:
            return index
    return None


async def churn(scenario: Scenario) -> tuple[Flow, Outcome]:
    rng = random.Random(scenario.seed)
    out = Outcome()
    flow = Flow()

    def stage(index: int) -> tuple[str, Callable[[], Any]]:
        name = f"s{index}"

        async def call(item: int) -> int:
            out.in_flight[name] += 1
            out.peak[name] = max(out.peak[name], out.in_flight[name])
            try:
                if item % 3 == index % 3:
                    await checkpoint()
                if fails_at(scenario, item) == index:
                    raise ValueError(item)
                if index == scenario.stages - 1:
                    out.consumed.append(item)
                return item
            finally:
                out.in_flight[name] -= 1

        @asynccontextmanager
        async def per_worker() -> AsyncIterator[Callable[[int], Awaitable[int]]]:
            out.enters[name] += 1
            try:
                if rng.random() < 0.2:
                    await checkpoint()
                yield call
            finally:
                out.exits[name] += 1

        return name, per_worker

    async def produce() -> AsyncIterator[int]:
        for item in range(scenario.items):
            yield item
            if item % 5 == 0:
                await checkpoint()

    async def on_error(item: int, exc: BaseException) -> None:
        assert isinstance(exc, ValueError)
        assert exc.args == (item,)
        out.handled.append((item, f"s{fails_at(scenario, item)}"))

    flow.set_producer(produce)
    flow.set_error_handler(on_error)
    for index in range(scenario.stages):
        strategy = Churn(
            rng, scenario.min_workers[index], scenario.max_workers, out.consulted
        )
        name, factory = stage(index)
        add = (
            flow.set_consumer if index == scenario.stages - 1 else flow.add_transformer
        )
        add(
            factory,
            name=name,
            scaling_strategy=strategy,
            buffer_size=scenario.buffers[index],
        )
    with anyio.fail_after(30):
        await flow.run()
    return flow, out


def check(scenario: Scenario, flow: Flow, out: Outcome) -> None:
    expected_failed = Counter(
        (item, f"s{where}")
        for item in range(scenario.items)
        if (where := fails_at(scenario, item)) is not None
    )
    expected_consumed = Counter(
        item for item in range(scenario.items) if fails_at(scenario, item) is None
    )
    consumed = Counter(out.consumed)
    missing = expected_consumed - consumed
    extra = consumed - expected_consumed
    assert missing + extra == Counter(), (
        f"lost {sum(missing.values())} items (e.g. {list(missing)[:5]}), "
        f"duplicated or invented {sum(extra.values())} (e.g. {list(extra)[:5]})"
    )
    assert Counter(out.handled) == expected_failed
    assert out.enters == out.exits, "a per-worker context manager did not exit"
    assert all(count == 0 for count in out.in_flight.values())
    stats = flow.stats()
    assert list(stats) == [f"s{i}" for i in range(scenario.stages)]
    reached = scenario.items
    for index, (name, s) in enumerate(stats.items()):
        failed_here = sum(
            1 for (_, where) in expected_failed.elements() if where == name
        )
        assert s.received == reached, (name, s)
        assert s.errors == failed_here, (name, s)
        assert s.processed == reached - failed_here, (name, s)
        assert s.received == s.processed + s.errors + s.dropped, (name, s)
        assert s.dropped == 0, (name, s)
        assert s.total_workers() == 0, (name, s)
        reached -= failed_here
        assert out.peak[name] <= scenario.max_workers, (
            f"{name} ran {out.peak[name]} calls at once with max_workers="
            f"{scenario.max_workers}"
        )
        del index
    # the churn really happened: strategies were consulted per event
    # (a stage whose min equals its max is fixed: never consulted)
    assert set(out.consulted) == {
        name
        for name, low in zip(stats, scenario.min_workers, strict=True)
        if low < scenario.max_workers
    }


async def test_random_churn_conserves_every_item(anyio_backend: Any) -> None:
    scenario = Scenario(
        seed=1234,
        items=20_000,
        stages=3,
        buffers=[4, 0, 16],
        min_workers=[0, 1, 0],
        max_workers=8,
    )
    flow, out = await churn(scenario)
    check(scenario, flow, out)
    # the pools really changed size, many times
    assert sum(out.enters.values()) > 3 * 8


@pytest.mark.parametrize(("backend", "options"), BACKENDS)
@settings(
    # Each example pushes up to 3,000 items: a share of the profile's budget.
    max_examples=max(10, settings.default.max_examples // 3),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    items=st.integers(100, 3000),
    stages=st.integers(1, 3),
    buffers=st.lists(st.sampled_from([0, 0, 1, 2, 5, 64]), min_size=3, max_size=3),
    min_workers=st.lists(st.integers(0, 2), min_size=3, max_size=3),
    extra=st.integers(0, 7),
    fail_every=st.integers(5, 200),
)
def test_random_churn_property(
    backend: str,
    options: dict[str, Any],
    seed: int,
    items: int,
    stages: int,
    buffers: list[int],
    min_workers: list[int],
    extra: int,
    fail_every: int,
) -> None:
    scenario = Scenario(
        seed=seed,
        items=items,
        stages=stages,
        buffers=buffers[:stages],
        min_workers=min_workers[:stages],
        max_workers=max(*min_workers, 1) + extra,
        fail_every=fail_every,
    )
    flow, out = anyio.run(churn, scenario, backend=backend, backend_options=options)
    check(scenario, flow, out)
