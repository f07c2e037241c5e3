"""The public surface: exported names, where they say they live, the seed README
example run as written, and the shape of the stats."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import re
import subprocess
import sys
import textwrap
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest

import flowrhythm
from flowrhythm import (
    FixedScaling,
    Flow,
    ScalingStrategy,
    StageStats,
    UtilizationScaling,
)

#: every name the seed README imports or documents
SEED_NAMES = {
    "Flow",
    "FixedScaling",
    "UtilizationScaling",
    "ScalingStrategy",
    "StageStats",
}

#: the "Flow Interface" example of the seed README, verbatim, wrapped in a main()
SEED_EXAMPLE = """
from flowrhythm import Flow, FixedScaling, UtilizationScaling

async def producer():
    for i in range(10):
        yield i

async def transformer(x):
    return x * 2

async def consumer(x):
    print("Got:", x)

async def error_handler(item, exc):
    print("Error:", item, exc)

flow = Flow(default_scaling_strategy=UtilizationScaling(max_workers=8))
flow.set_producer(producer)
flow.add_transformer(transformer, name="double", scaling_strategy=FixedScaling(workers=2))
flow.set_consumer(consumer)
flow.set_error_handler(error_handler)

# Run the flow
await flow.start()
await flow.wait()
"""


def _wrapped_example() -> str:
    body = textwrap.indent(SEED_EXAMPLE, "    ")
    return f"import asyncio\n\nasync def main():\n{body}\n\nasyncio.run(main())\n"


def _expected_example_output() -> set[str]:
    return {f"Got: {i * 2}" for i in range(10)}


# -- exported names ----------------------------------------------------------------


def test_seed_names_are_exported() -> None:
    for name in SEED_NAMES:
        assert name in flowrhythm.__all__, name
        assert hasattr(flowrhythm, name), name


def test_all_lists_only_existing_unique_public_names() -> None:
    names = list(flowrhythm.__all__)
    assert len(names) == len(set(names))
    for name in names:
        assert hasattr(flowrhythm, name), name
        assert not name.startswith("_") or name == "__version__", name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, Any] = {}
    exec("from flowrhythm import *", namespace)  # noqa: S102
    namespace.pop("__builtins__")
    assert set(namespace) == set(flowrhythm.__all__)


def test_public_objects_live_in_the_package() -> None:
    checked = 0
    for name in flowrhythm.__all__:
        obj = getattr(flowrhythm, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "flowrhythm", (name, obj.__module__)
            checked += 1
    assert checked >= len(SEED_NAMES)


def test_version_is_a_pep440_string() -> None:
    assert isinstance(flowrhythm.__version__, str)
    assert re.fullmatch(
        r"\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", flowrhythm.__version__
    )


def test_configuration_parameters_are_keyword_only() -> None:
    kw_only = inspect.Parameter.KEYWORD_ONLY
    init = inspect.signature(Flow)
    for param in ("default_scaling_strategy", "buffer_size", "clock"):
        assert init.parameters[param].kind is kw_only, param
    for method, params in {
        "add_transformer": ("name", "scaling_strategy", "buffer_size"),
        "set_consumer": ("name", "scaling_strategy", "buffer_size"),
        "run": ("task_status",),
        "stop": ("drain", "timeout"),
    }.items():
        signature = inspect.signature(getattr(Flow, method))
        for param in params:
            assert signature.parameters[param].kind is kw_only, (method, param)
    stop = inspect.signature(Flow.stop)
    assert stop.parameters["drain"].default is True
    assert stop.parameters["timeout"].default is None


def test_flow_has_every_seed_method() -> None:
    for method in (
        "set_producer",
        "add_transformer",
        "set_consumer",
        "set_error_handler",
        "set_default_scaling_strategy",
        "start",
        "wait",
        "stop",
        "run",
        "stats",
    ):
        assert callable(getattr(Flow, method)), method
    for method in ("start", "wait", "stop", "run"):
        assert inspect.iscoroutinefunction(getattr(Flow, method)), method


# -- the seed README example, as written -----------------------------------------


def test_seed_example_runs_verbatim_in_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", _wrapped_example()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 10, lines
    assert set(lines) == _expected_example_output()
    assert result.stderr == ""


def test_seed_example_runs_verbatim_under_asyncio_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(_wrapped_example(), "<seed-example>", "exec"), namespace)  # noqa: S102
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10, lines
    assert set(lines) == _expected_example_output()


def test_seed_scaling_snippets_construct() -> None:
    strategy = UtilizationScaling(
        min_workers=1,
        max_workers=8,
        lower_utilization=0.2,
        upper_utilization=0.8,
        upscaling_rate=2,
        downscaling_rate=1,
        cooldown_seconds=5.0,
        dampening=0.5,
        sampling_period=2.0,
        sampling_events=50,
    )
    assert isinstance(strategy, ScalingStrategy)
    assert isinstance(FixedScaling(workers=3), ScalingStrategy)

    async def transformer(x: int) -> int:
        return x

    flow = Flow()
    flow.add_transformer(transformer, scaling_strategy=FixedScaling(workers=3))
    flow.add_transformer(transformer, name="other", scaling_strategy=strategy)
    flow.set_default_scaling_strategy(strategy)
    assert list(flow.stats()) == ["transformer", "other"]


def test_seed_resource_management_snippet() -> None:
    """The README's ``transformer_with_db`` pattern, with a fake database."""
    log: list[str] = []

    class FakeDb:
        async def process(self, x: int) -> int:
            return x + 100

        async def close(self) -> None:
            log.append("closed")

    async def connect_db() -> FakeDb:
        log.append("connected")
        return FakeDb()

    @asynccontextmanager
    async def transformer_with_db():  # type: ignore[no-untyped-def]
        db = await connect_db()

        async def transform(x):  # type: ignore[no-untyped-def]
            return await db.process(x)

        yield transform
        await db.close()

    got: list[int] = []

    async def producer():  # type: ignore[no-untyped-def]
        for i in range(5):
            yield i

    async def consumer(x: int) -> None:
        got.append(x)

    async def main() -> None:
        flow = Flow()
        flow.set_producer(producer)
        flow.add_transformer(transformer_with_db)
        flow.set_consumer(consumer)
        await flow.run()

    asyncio.run(main())
    assert got == [100, 101, 102, 103, 104]
    assert log == ["connected", "closed"]


# -- stats shape -------------------------------------------------------------------

SEED_STATS_FIELDS = {
    "stage_name",
    "busy_workers",
    "idle_workers",
    "queue_length",
    "oldest_item_enqueued_at",
    "last_enqueue_at",
    "last_dequeue_at",
    "last_scale_up_at",
    "last_scale_down_at",
    "last_error_at",
}
COUNT_FIELDS = {"blocked_workers", "received", "processed", "errors", "dropped"}


def _stats(**overrides: Any) -> StageStats:
    values: dict[str, Any] = {f.name: 0 for f in dataclasses.fields(StageStats)}
    values["stage_name"] = "s"
    for field in SEED_STATS_FIELDS - {
        "stage_name",
        "busy_workers",
        "idle_workers",
        "queue_length",
    }:
        values[field] = None
    values.update(overrides)
    return StageStats(**values)


def test_stage_stats_fields() -> None:
    assert dataclasses.is_dataclass(StageStats)
    names = {f.name for f in dataclasses.fields(StageStats)}
    assert names >= SEED_STATS_FIELDS | COUNT_FIELDS


def test_stage_stats_is_an_immutable_snapshot() -> None:
    stats = _stats(busy_workers=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.busy_workers = 2  # type: ignore[misc]


def test_snapshot_fills_every_field_from_its_counter() -> None:
    """The snapshot builds StageStats positionally (it is on the scaler's path):
    each field must get its own counter's value, whatever the field order."""
    from flowrhythm._stats import StageCounters

    counters = StageCounters("s")
    counters.output = StageCounters("next")
    for number, name in enumerate(sorted(StageCounters.__slots__), start=1):
        if name not in {"name", "output", "settled", "emitted_is_processed"}:
            setattr(counters, name, 1000 * number)
    counters.offered = counters.taken + 7  # a queue, so its start time shows
    counters.output.offered = 5
    stats = counters.snapshot(now=42.0)
    expected = StageStats(
        stage_name="s",
        busy_workers=counters.workers
        - counters.idle
        - counters.blocked
        - counters.throttled
        - counters.ready,
        idle_workers=counters.idle,
        blocked_workers=counters.blocked,
        queue_length=7,
        oldest_item_enqueued_at=counters.nonempty_since,
        last_enqueue_at=counters.last_enqueue_at,
        last_dequeue_at=counters.last_dequeue_at,
        last_scale_up_at=counters.last_scale_up_at,
        last_scale_down_at=counters.last_scale_down_at,
        last_error_at=counters.last_error_at,
        received=counters.taken,
        processed=counters.processed,
        errors=counters.errors,
        dropped=0,
        blocked_sends=counters.blocked_sends,
        emitted=5,
        filtered=counters.filtered,
        retries=counters.retries,
        timeouts=counters.timeouts,
        throttled_workers=counters.throttled,
        throttled_waits=counters.throttled_waits,
        reorder_window=counters.reorder_window,
        reorder_window_peak=counters.reorder_peak,
        ready_workers=counters.ready,
        sampled_at=42.0,
    )
    assert stats == expected
    assert (
        len(set(dataclasses.astuple(stats)[1:])) == len(dataclasses.fields(stats)) - 1
    )


@pytest.mark.parametrize(
    ("busy", "idle", "blocked", "total", "utilization"),
    [(0, 0, 0, 0, 0.0), (3, 1, 0, 4, 0.75), (1, 2, 1, 4, 0.25), (2, 0, 0, 2, 1.0)],
)
def test_stage_stats_derived_values(
    busy: int, idle: int, blocked: int, total: int, utilization: float
) -> None:
    stats = _stats(busy_workers=busy, idle_workers=idle, blocked_workers=blocked)
    assert stats.total_workers() == total
    assert stats.utilization() == pytest.approx(utilization)


def test_stats_before_a_run_lists_the_stages_in_order() -> None:
    async def first(x: int) -> int:
        return x

    async def sink(x: int) -> None:
        pass

    flow = Flow()
    assert dict(flow.stats()) == {}
    flow.add_transformer(first)
    flow.add_transformer(first, name="second")
    flow.set_consumer(sink)
    stats = flow.stats()
    assert list(stats) == ["first", "second", "sink"]
    for name, stage in stats.items():
        assert isinstance(stage, StageStats)
        assert stage.stage_name == name
        assert (stage.received, stage.processed, stage.errors, stage.dropped) == (
            0,
            0,
            0,
            0,
        )
        assert stage.total_workers() == 0
        assert stage.utilization() == 0.0
        assert stage.queue_length == 0


@pytest.mark.anyio
async def test_stats_after_a_run(anyio_backend: Any) -> None:
    async def producer():  # type: ignore[no-untyped-def]
        for i in range(20):
            yield i

    async def halve(x: int) -> int:
        if x % 5 == 0:
            raise ValueError(x)
        return x

    handled: list[int] = []

    async def handler(item: int, exc: BaseException) -> None:
        handled.append(item)

    async def sink(x: int) -> None:
        pass

    now = 1234.5
    flow = Flow(clock=lambda: now)
    flow.set_producer(producer)
    flow.add_transformer(halve, scaling_strategy=FixedScaling(3))
    flow.set_consumer(sink)
    flow.set_error_handler(handler)
    with anyio.fail_after(10):
        await flow.run()
    stats = flow.stats()
    assert list(stats) == ["halve", "sink"]
    halve_stats, sink_stats = stats["halve"], stats["sink"]
    assert (halve_stats.received, halve_stats.processed, halve_stats.errors) == (
        20,
        16,
        4,
    )
    assert (sink_stats.received, sink_stats.processed, sink_stats.errors) == (16, 16, 0)
    assert sorted(handled) == [0, 5, 10, 15]
    assert halve_stats.last_error_at == now
    assert sink_stats.last_error_at is None
    for stage in stats.values():
        assert stage.dropped == 0
        assert stage.received == stage.processed + stage.errors + stage.dropped
        assert stage.total_workers() == 0
        assert stage.busy_workers == stage.idle_workers == stage.blocked_workers == 0
        assert stage.queue_length == 0
        assert stage.oldest_item_enqueued_at is None


@pytest.mark.anyio
async def test_custom_strategy_subclass_sets_the_worker_count(
    anyio_backend: Any,
) -> None:
    class Three(ScalingStrategy):
        min_workers = 3
        max_workers = 3

    entered = 0

    @asynccontextmanager
    async def counted():  # type: ignore[no-untyped-def]
        nonlocal entered
        entered += 1

        async def call(x: int) -> int:
            return x

        yield call

    async def producer():  # type: ignore[no-untyped-def]
        for i in range(10):
            yield i

    async def sink(x: int) -> None:
        pass

    flow = Flow(default_scaling_strategy=Three())
    flow.set_producer(producer)
    flow.add_transformer(counted)
    flow.set_consumer(sink, scaling_strategy=FixedScaling(1))
    with anyio.fail_after(10):
        await flow.run()
    assert entered == 3
    assert flow.stats()["sink"].processed == 10


# -- the shapes a callable may take ------------------------------------------------------


class _Numbers:
    """An async iterable (not callable)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __aiter__(self) -> Any:
        return self._gen()

    async def _gen(self):  # type: ignore[no-untyped-def]
        for i in range(self.n):
            yield i


class _AddOne:
    """An object with an async ``__call__``."""

    async def __call__(self, x: int) -> int:
        return x + 1


class _ClassCM:
    """A class used as an async context manager factory (entered per worker)."""

    entered = 0
    exited = 0

    async def __aenter__(self) -> Any:
        type(self).entered += 1

        async def call(x: int) -> int:
            return x * 10

        return call

    async def __aexit__(self, *exc_info: object) -> None:
        type(self).exited += 1


async def _gen5():  # type: ignore[no-untyped-def]
    for i in range(5):
        yield i


@asynccontextmanager
async def _source_cm():  # type: ignore[no-untyped-def]
    yield _Numbers(5)


PRODUCERS = [
    pytest.param(_gen5, id="async-generator-function"),
    pytest.param(_Numbers(5), id="async-iterable"),
    pytest.param(lambda: _gen5(), id="callable-returning-async-iterator"),
    pytest.param(lambda: _Numbers(5), id="callable-returning-async-iterable"),
    pytest.param(_source_cm, id="async-cm-factory"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("producer", PRODUCERS)
async def test_producer_shapes(anyio_backend: Any, producer: Any) -> None:
    got: list[int] = []

    async def consume(x: int) -> None:
        got.append(x)

    flow = Flow()
    flow.set_producer(producer)
    flow.set_consumer(consume)
    with anyio.fail_after(10):
        await flow.run()
    assert got == [0, 1, 2, 3, 4]


@pytest.mark.anyio
async def test_stage_shapes(anyio_backend: Any) -> None:
    _ClassCM.entered = _ClassCM.exited = 0
    got: list[int] = []
    handled: list[Any] = []

    async def add(x: int, amount: int) -> int:
        return x + amount

    async def consume(x: int) -> None:
        if x == 40:
            raise ValueError(x)
        got.append(x)

    class Handler:
        async def __call__(self, item: Any, exc: BaseException) -> None:
            handled.append(item)

    flow = Flow()
    flow.set_producer(_gen5)
    flow.add_transformer(_AddOne(), name="callable-object")
    flow.add_transformer(partial(add, amount=1), name="partial")
    flow.add_transformer(_ClassCM, name="class-cm", scaling_strategy=FixedScaling(2))
    flow.set_consumer(consume)
    flow.set_error_handler(Handler())
    with anyio.fail_after(10):
        await flow.run()
    assert sorted(got) == [20, 30, 50, 60]
    assert handled == [40]
    assert (_ClassCM.entered, _ClassCM.exited) == (2, 2)
    assert list(flow.stats()) == ["callable-object", "partial", "class-cm", "consume"]
