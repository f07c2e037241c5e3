"""Misconfigurations that tests/test_config_errors.py and tests/test_scaling.py do not
cover yet: each one fails with a clear exception at configuration or at start, and
the test asserts the message.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from flowrhythm import Flow, ScalingStrategy, StageStats

# -- well-formed pieces -------------------------------------------------------------


async def gen() -> AsyncIterator[int]:
    for i in range(3):
        yield i


async def sink(x: int) -> None:
    pass


# -- ill-formed pieces ---------------------------------------------------------------


async def no_args() -> None:
    pass


async def three_args(a: Any, b: Any, c: Any) -> None:
    pass


async def agen(x: int) -> AsyncIterator[int]:
    yield x


class AsyncCallTwoArgs:
    """An object with an async ``__call__`` that takes two arguments."""

    async def __call__(self, a: Any, b: Any) -> None:
        pass


class DuckPolicy:
    """Has the ScalingPolicy shape but is no ScalingStrategy subclass."""

    min_workers = 1
    max_workers = 2

    def initial_workers(self) -> int:
        return 1

    def on_enqueue(self, stats: StageStats) -> int:
        return 0

    on_dequeue = on_tick = on_enqueue


def _coroutine() -> Any:
    return three_args(1, 2, 3)  # closed by the library when it rejects it


CONFIG_ERRORS: list[Any] = [
    pytest.param(
        lambda f: f.add_transformer(no_args),
        TypeError,
        r"transformer 'no_args' must be .*taking one argument \(the item\)",
        id="transformer-async-no-arguments",
    ),
    pytest.param(
        lambda f: f.add_transformer(AsyncCallTwoArgs(), name="obj"),
        TypeError,
        r"transformer 'obj' must be .*taking one argument \(the item\)",
        id="transformer-async-call-wrong-arity",
    ),
    pytest.param(
        lambda f: f.add_transformer(lambda x: x),
        TypeError,
        r"transformer '<lambda>' must be .*synchronous function.*async def",
        id="transformer-sync-lambda",
    ),
    pytest.param(
        lambda f: f.set_consumer(agen),
        TypeError,
        r"consumer 'agen' must be .*async generator function",
        id="consumer-async-generator",
    ),
    pytest.param(
        lambda f: f.set_consumer(_coroutine(), name="c"),
        TypeError,
        r"consumer 'c' must be .*coroutine object.*without calling it",
        id="consumer-coroutine-object",
    ),
    pytest.param(
        lambda f: f.set_consumer(None),
        TypeError,
        r"consumer 'consumer' must be .*got None",
        id="consumer-none",
    ),
    pytest.param(
        lambda f: f.set_error_handler(no_args),
        TypeError,
        r"error handler must be .*taking two arguments \(item, exc\)",
        id="handler-no-arguments",
    ),
    pytest.param(
        lambda f: f.set_error_handler(three_args),
        TypeError,
        r"error handler must be .*taking two arguments \(item, exc\)",
        id="handler-three-arguments",
    ),
    pytest.param(
        lambda f: f.set_error_handler(agen),
        TypeError,
        r"error handler must be .*async generator function",
        id="handler-async-generator",
    ),
    pytest.param(
        lambda f: f.set_error_handler(_coroutine()),
        TypeError,
        r"error handler must be .*coroutine object",
        id="handler-coroutine-object",
    ),
    pytest.param(
        lambda f: f.set_error_handler(lambda item, exc: None),
        TypeError,
        r"error handler must be .*synchronous function",
        id="handler-sync-lambda",
    ),
    pytest.param(
        lambda f: f.set_producer(None),
        TypeError,
        r"producer must be .*got None",
        id="producer-none",
    ),
    pytest.param(
        lambda f: f.set_consumer(sink, scaling_strategy=DuckPolicy()),
        TypeError,
        r"consumer 'sink': scaling_strategy must be a ScalingStrategy",
        id="strategy-duck-typed-policy",
    ),
]


@pytest.mark.parametrize(("misconfigure", "error", "match"), CONFIG_ERRORS)
def test_misconfiguration_is_rejected(
    misconfigure: Callable[[Flow], object], error: type[Exception], match: str
) -> None:
    flow = Flow()
    with pytest.raises(error, match=match):
        misconfigure(flow)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (True, TypeError, r"buffer_size must be an int, got True"),
        (2.0, TypeError, r"buffer_size must be an int, got 2.0"),
        (None, TypeError, r"buffer_size must be an int, got None"),
    ],
)
def test_bad_flow_buffer_size(value: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Flow(buffer_size=value)


# -- stop()'s arguments -----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("timeout", "error", "match"),
    [
        (True, TypeError, r"timeout must be a number of seconds, got True"),
        ([1], TypeError, r"timeout must be a number of seconds, got \[1\]"),
        pytest.param(
            math.nan,
            ValueError,
            r"timeout",
        ),
    ],
)
async def test_bad_stop_timeout_is_refused_before_anything_happens(
    anyio_backend: Any, timeout: Any, error: type[Exception], match: str
) -> None:
    """Refused with the flow running, and the refusal has no effect: the flow is
    not drained, and a later stop() works."""
    release = anyio.Event()
    consumed: list[int] = []

    async def endless() -> AsyncIterator[int]:
        i = 0
        while True:
            yield i
            i += 1
            await release.wait()

    async def consume(x: int) -> None:
        consumed.append(x)

    flow = Flow()
    flow.set_producer(endless)
    flow.set_consumer(consume)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            with pytest.raises(error, match=match):
                await flow.stop(timeout=timeout)
            await anyio.wait_all_tasks_blocked()
            assert repr(flow).endswith("(running)>")
            release.set()
            await flow.stop()
    assert consumed


# -- custom strategies with bad values, found when the flow starts ----------------------


class Custom(ScalingStrategy):
    def __init__(self, **attrs: Any) -> None:
        for name, value in attrs.items():
            setattr(self, name, value)


class InitialReturns(ScalingStrategy):
    min_workers = 1
    max_workers = 2

    def __init__(self, value: Any) -> None:
        self.value = value

    def initial_workers(self) -> Any:
        return self.value


class ForStageReturns(ScalingStrategy):
    min_workers = 1
    max_workers = 2

    def for_stage(self, stage_name: str) -> Any:
        return None


class ForStageRaises(ScalingStrategy):
    min_workers = 1
    max_workers = 2

    def for_stage(self, stage_name: str) -> ScalingStrategy:
        raise LookupError(f"no settings for {stage_name}")


START_ERRORS: list[Any] = [
    pytest.param(
        InitialReturns("2"),
        TypeError,
        r"the scaling strategy of consumer 'sink': initial_workers\(\) must return "
        r"an int, got '2'",
        id="initial-workers-not-int",
    ),
    pytest.param(
        InitialReturns(5),
        ValueError,
        r"the scaling strategy of consumer 'sink': initial_workers\(\) returned 5, "
        r"outside \[min_workers=1, max_workers=2\]",
        id="initial-workers-out-of-range",
    ),
    pytest.param(
        Custom(min_workers=3, max_workers=1),
        ValueError,
        r"consumer 'sink'.*min_workers\W+3\W.*max_workers\W+1\b",
        id="min-above-max",
    ),
    pytest.param(
        Custom(min_workers=-1, max_workers=1),
        ValueError,
        r"consumer 'sink'.*min_workers.*-1",
        id="min-negative",
    ),
    pytest.param(
        # (once accepted, and the flow hung: the stage deferred its one forced
        # worker forever, as Controller._scale_to found no room under max_workers)
        Custom(min_workers=0, max_workers=0),
        ValueError,
        r"consumer 'sink'.*max_workers must be >= 1",
        id="max-zero",
    ),
    pytest.param(
        Custom(min_workers=1, max_workers=2.5),
        TypeError,
        r"consumer 'sink'.*max_workers",
        id="max-not-int",
    ),
    pytest.param(
        Custom(min_workers=1, max_workers=2, sampling_events="x"),
        TypeError,
        r"consumer 'sink'.*sampling_events",
        id="sampling-events-str",
    ),
    pytest.param(
        Custom(min_workers=1, max_workers=2, sampling_period=None),
        TypeError,
        r"consumer 'sink'.*sampling_period",
        id="sampling-period-none",
    ),
    pytest.param(
        Custom(min_workers=1, max_workers=2, sampling_events=-1),
        ValueError,
        r"consumer 'sink'.*sampling_events",
        id="sampling-events-negative",
    ),
    pytest.param(
        ForStageReturns(),
        TypeError,
        r"consumer 'sink'.*for_stage",
        id="for-stage-returns-none",
    ),
]


async def _start(flow: Flow, mode: str) -> None:
    with anyio.fail_after(5):  # a deadlock guard only
        if mode == "run":
            await flow.run()
        elif mode == "async_with":
            async with flow:
                await flow.start()
        else:
            await flow.start()
            await flow.wait()


@pytest.mark.anyio
@pytest.mark.parametrize(("strategy", "error", "match"), START_ERRORS)
async def test_bad_custom_strategy_fails_at_start(
    anyio_backend: Any, strategy: ScalingStrategy, error: type[Exception], match: str
) -> None:
    consumed: list[int] = []

    async def consume(x: int) -> None:
        consumed.append(x)

    async def configure_and_start() -> None:
        flow = Flow()
        flow.set_producer(gen)
        flow.set_consumer(consume, name="sink", scaling_strategy=strategy)
        await _start(flow, "run")

    with pytest.raises(error, match=match):  # at configuration or at start
        await configure_and_start()
    assert consumed == []  # refused before any item moved


@pytest.mark.anyio
async def test_bad_custom_strategy_fails_start_in_async_with(
    anyio_backend: Any,
) -> None:
    flow = Flow()
    flow.set_producer(gen)
    flow.set_consumer(sink, scaling_strategy=InitialReturns("2"))
    with pytest.raises(TypeError, match=r"initial_workers\(\) must return an int"):
        await _start(flow, "async_with")


@pytest.mark.anyio
async def test_bad_custom_strategy_fails_a_background_start(
    anyio_backend: Any, anyio_backend_name: str
) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("background start() is asyncio-only")
    flow = Flow()
    flow.set_producer(gen)
    flow.set_consumer(sink, scaling_strategy=InitialReturns("2"))
    with pytest.raises(TypeError, match=r"initial_workers\(\) must return an int"):
        await _start(flow, "background")
    assert flow.stats()["sink"].processed == 0


@pytest.mark.anyio
async def test_for_stage_raising_fails_at_start_with_its_error(
    anyio_backend: Any,
) -> None:
    flow = Flow()
    flow.set_producer(gen)
    flow.set_consumer(sink, scaling_strategy=ForStageRaises())
    with pytest.raises(LookupError, match="no settings for sink"):
        await _start(flow, "run")


# -- a context manager factory yielding a function of the wrong shape --------------------


@pytest.mark.anyio
@pytest.mark.parametrize("role", ["stage", "error_handler"])
async def test_context_manager_yielding_a_function_of_the_wrong_arity(
    anyio_backend: Any, role: str
) -> None:
    handled: list[BaseException] = []

    async def fails(x: int) -> int:
        raise ValueError(x)

    async def handle(item: Any, exc: BaseException) -> None:
        handled.append(exc)

    @asynccontextmanager
    async def wrong_shape() -> AsyncIterator[Any]:
        yield three_args

    flow = Flow()
    flow.set_producer(gen)
    if role == "stage":
        flow.add_transformer(wrong_shape, name="shaped")
        flow.set_error_handler(handle)
        role_text = r"transformer 'shaped'"
    else:
        flow.add_transformer(fails)
        flow.set_error_handler(wrong_shape)
        role_text = r"error handler"
    flow.set_consumer(sink)
    with pytest.raises(TypeError, match=rf"{role_text}.*argument"):
        await _start(flow, "run")
    assert handled == []
