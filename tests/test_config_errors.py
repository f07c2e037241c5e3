"""Every misconfiguration fails loudly, with a message that says what is wrong."""

from __future__ import annotations

import asyncio
import functools
import math
import re
import tracemalloc
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from flowrhythm import (
    FixedScaling,
    Flow,
    RateLimit,
    Retry,
    ScalingStrategy,
    UtilizationScaling,
)

# -- well-formed pieces -------------------------------------------------------------


async def gen():  # type: ignore[no-untyped-def]
    for i in range(3):
        yield i


async def double(x: int) -> int:
    return x * 2


async def sink(x: int) -> None:
    pass


async def handler(item: Any, exc: BaseException) -> None:
    pass


def ready_flow(**kwargs: Any) -> Flow:
    flow = Flow(**kwargs)
    flow.set_producer(gen)
    flow.add_transformer(double)
    flow.set_consumer(sink)
    return flow


# -- ill-formed pieces ---------------------------------------------------------------


def sync_transform(x: int) -> int:
    return x


def sync_gen():  # type: ignore[no-untyped-def]
    yield 1


async def coroutine_producer() -> list[int]:
    return [1, 2]


async def needs_arg_gen(n: int):  # type: ignore[no-untyped-def]
    yield n


async def two_args(x: int, y: int) -> int:
    return x + y


async def one_arg_handler(item: Any) -> None:
    pass


async def agen_stage(x: int):  # type: ignore[no-untyped-def]
    yield x


def _coroutine_object() -> Any:
    return double(1)  # closed by the library when it rejects it


Misconfig = Callable[[Flow], object]

CONFIG_ERRORS: list[Any] = [
    # producers
    pytest.param(
        lambda f: f.set_producer(sync_gen),
        TypeError,
        r"producer must be .*synchronous generator function",
        id="producer-sync-generator",
    ),
    pytest.param(
        lambda f: f.set_producer(coroutine_producer),
        TypeError,
        r"producer must be .*coroutine function",
        id="producer-coroutine-function",
    ),
    pytest.param(
        lambda f: f.set_producer([1, 2, 3]),
        TypeError,
        r"producer must be .*wrap it in an async generator",
        id="producer-list",
    ),
    pytest.param(
        lambda f: f.set_producer(42),
        TypeError,
        r"producer must be .*42",
        id="producer-int",
    ),
    pytest.param(
        lambda f: f.set_producer(_coroutine_object()),
        TypeError,
        r"producer must be .*coroutine object",
        id="producer-coroutine-object",
    ),
    pytest.param(
        lambda f: f.set_producer(needs_arg_gen),
        TypeError,
        r"producer must be .*cannot be called without arguments",
        id="producer-needs-arguments",
    ),
    # transformers
    pytest.param(
        lambda f: f.add_transformer(sync_transform),
        TypeError,
        r"transformer 'sync_transform' must be .*synchronous function",
        id="transformer-sync",
    ),
    pytest.param(
        lambda f: f.add_transformer(sync_transform, name="named"),
        TypeError,
        r"transformer 'named' must be .*synchronous function",
        id="transformer-sync-named",
    ),
    pytest.param(
        lambda f: f.add_transformer(functools.partial(sync_transform)),
        TypeError,
        r"transformer 'sync_transform' must be .*synchronous function",
        id="transformer-sync-partial",
    ),
    pytest.param(
        lambda f: f.set_consumer(agen_stage),
        TypeError,
        r"consumer 'agen_stage' must be .*async generator function.*only "
        r"add_transformer\(\) takes those",
        id="consumer-async-generator",
    ),
    pytest.param(
        lambda f: f.add_transformer(_coroutine_object()),
        TypeError,
        r"transformer 'double' must be .*coroutine object",
        id="transformer-coroutine-object",
    ),
    pytest.param(
        lambda f: f.add_transformer(two_args),
        TypeError,
        r"transformer 'two_args' must be .*one argument",
        id="transformer-wrong-arity",
    ),
    pytest.param(
        lambda f: f.add_transformer(42, name="x"),
        TypeError,
        r"transformer 'x' must be .*42",
        id="transformer-not-callable",
    ),
    # consumers
    pytest.param(
        lambda f: f.set_consumer(sync_transform),
        TypeError,
        r"consumer 'sync_transform' must be .*synchronous function",
        id="consumer-sync",
    ),
    pytest.param(
        lambda f: f.set_consumer(print),
        TypeError,
        r"consumer 'print' must be",
        id="consumer-print",
    ),
    pytest.param(
        lambda f: f.set_consumer(two_args),
        TypeError,
        r"consumer 'two_args' must be .*one argument",
        id="consumer-wrong-arity",
    ),
    # error handlers
    pytest.param(
        lambda f: f.set_error_handler(sync_transform),
        TypeError,
        r"error handler must be .*synchronous function",
        id="handler-sync",
    ),
    pytest.param(
        lambda f: f.set_error_handler(one_arg_handler),
        TypeError,
        r"error handler must be .*two arguments",
        id="handler-wrong-arity",
    ),
    pytest.param(
        lambda f: f.set_error_handler(None),
        TypeError,
        r"error handler must be",
        id="handler-none",
    ),
    # names
    pytest.param(
        lambda f: f.add_transformer(double, name=""),
        TypeError,
        r"transformer name must be a non-empty str",
        id="name-empty",
    ),
    pytest.param(
        lambda f: f.set_consumer(sink, name=7),
        TypeError,
        r"consumer name must be a non-empty str",
        id="name-not-str",
    ),
    # buffers
    pytest.param(
        lambda f: f.add_transformer(double, buffer_size=-1),
        ValueError,
        r"transformer 'double': buffer_size must be >= 0",
        id="buffer-negative",
    ),
    pytest.param(
        lambda f: f.set_consumer(sink, buffer_size="3"),
        TypeError,
        r"consumer 'sink': buffer_size must be an int",
        id="buffer-str",
    ),
    pytest.param(
        lambda f: f.add_transformer(double, buffer_size=True),
        TypeError,
        r"buffer_size must be an int",
        id="buffer-bool",
    ),
    pytest.param(
        lambda f: f.add_transformer(double, buffer_size=1.5),
        TypeError,
        r"buffer_size must be an int",
        id="buffer-float",
    ),
    # strategies
    pytest.param(
        lambda f: f.add_transformer(double, scaling_strategy=3),
        TypeError,
        r"transformer 'double': scaling_strategy must be a ScalingStrategy",
        id="strategy-int",
    ),
    pytest.param(
        lambda f: f.set_consumer(sink, scaling_strategy=FixedScaling),
        TypeError,
        r"consumer 'sink': scaling_strategy must be a ScalingStrategy",
        id="strategy-class-not-instance",
    ),
    pytest.param(
        lambda f: f.set_default_scaling_strategy("fast"),
        TypeError,
        r"default_scaling_strategy must be a ScalingStrategy",
        id="default-strategy",
    ),
]


@pytest.mark.parametrize(("misconfigure", "error", "match"), CONFIG_ERRORS)
def test_misconfiguration_is_rejected(
    misconfigure: Misconfig, error: type[Exception], match: str
) -> None:
    flow = Flow()
    with pytest.raises(error, match=match):
        misconfigure(flow)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"buffer_size": -1}, ValueError, r"buffer_size must be >= 0"),
        ({"buffer_size": "64"}, TypeError, r"buffer_size must be an int"),
        (
            {"default_scaling_strategy": 2},
            TypeError,
            r"default_scaling_strategy must be a ScalingStrategy",
        ),
        ({"clock": 5.0}, TypeError, r"clock must be a callable"),
    ],
)
def test_bad_flow_arguments(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Flow(**kwargs)


def test_flow_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Flow(FixedScaling(1))  # type: ignore[misc]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: FixedScaling(0), ValueError, r"workers must be >= 1"),
        (lambda: FixedScaling(1.5), TypeError, r"workers must be an int"),
        (
            lambda: UtilizationScaling(min_workers=5, max_workers=2),
            ValueError,
            r"min_workers \(5\) must not exceed max_workers \(2\)",
        ),
        (
            lambda: UtilizationScaling(max_workers=0),
            ValueError,
            r"max_workers must be >= 1",
        ),
        (
            lambda: UtilizationScaling(lower_utilization=0.9, upper_utilization=0.5),
            ValueError,
            r"utilization bounds",
        ),
        (
            lambda: UtilizationScaling(dampening=0.0),
            ValueError,
            r"dampening must be in \(0, 1\]",
        ),
        (
            lambda: UtilizationScaling(cooldown_seconds=-1),
            ValueError,
            r"cooldown_seconds must be >= 0",
        ),
        (
            lambda: UtilizationScaling(sampling_period=float("nan")),
            ValueError,
            r"sampling_period must be finite",
        ),
        (
            lambda: UtilizationScaling(upscaling_rate=0),
            ValueError,
            r"upscaling_rate must be >= 1",
        ),
    ],
)
def test_bad_strategy_arguments(
    make: Callable[[], ScalingStrategy], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make()


def test_duplicate_transformer_names() -> None:
    flow = Flow()
    flow.add_transformer(double)
    with pytest.raises(ValueError, match=r"a stage named 'double' already exists"):
        flow.add_transformer(double)
    flow.add_transformer(double, name="double2")  # a unique name= fixes it
    with pytest.raises(ValueError, match=r"a stage named 'double2' already exists"):
        flow.add_transformer(sink, name="double2")


def test_consumer_name_clashing_with_a_transformer() -> None:
    flow = Flow()
    flow.add_transformer(double, name="stage")
    with pytest.raises(ValueError, match=r"a stage named 'stage' already exists"):
        flow.set_consumer(sink, name="stage")


def test_transformer_name_clashing_with_the_consumer() -> None:
    flow = Flow()
    flow.set_consumer(sink)
    with pytest.raises(ValueError, match=r"a stage named 'sink' already exists"):
        flow.add_transformer(double, name="sink")


def test_failed_configuration_leaves_the_flow_unchanged() -> None:
    flow = Flow()
    flow.add_transformer(double)
    with pytest.raises(ValueError, match="buffer_size"):
        flow.add_transformer(sink, name="bad", buffer_size=-5)
    flow.set_consumer(sink)
    with pytest.raises(TypeError, match="synchronous"):
        flow.set_consumer(sync_transform, name="other")
    assert list(flow.stats()) == ["double", "sink"]
    # the rejected name was not reserved
    flow.add_transformer(double, name="bad")
    assert list(flow.stats()) == ["double", "bad", "sink"]


def test_replacing_the_consumer_keeps_one_consumer() -> None:
    flow = Flow()
    flow.set_consumer(sink)
    flow.set_consumer(sink)  # the same name again: it replaces, it does not clash
    assert list(flow.stats()) == ["sink"]


# -- misconfiguration found when the flow starts ---------------------------------------


def _without(piece: str) -> Flow:
    flow = Flow()
    if piece != "producer":
        flow.set_producer(gen)
    if piece != "consumer":
        flow.set_consumer(sink)
    return flow


MISSING = [
    pytest.param("producer", r"no producer.*set_producer", id="producer"),
    pytest.param("consumer", r"no consumer.*set_consumer", id="consumer"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("piece", "match"), MISSING)
async def test_missing_piece_on_run(anyio_backend: Any, piece: str, match: str) -> None:
    flow = _without(piece)
    with pytest.raises(RuntimeError, match=match):
        await flow.run()


@pytest.mark.anyio
@pytest.mark.parametrize(("piece", "match"), MISSING)
async def test_missing_piece_on_task_group_start(
    anyio_backend: Any, piece: str, match: str
) -> None:
    flow = _without(piece)
    async with anyio.create_task_group() as tg:
        with pytest.raises(RuntimeError, match=match):
            await tg.start(flow.run)


@pytest.mark.anyio
@pytest.mark.parametrize(("piece", "match"), MISSING)
async def test_missing_piece_in_async_with(
    anyio_backend: Any, piece: str, match: str
) -> None:
    flow = _without(piece)
    with pytest.raises(RuntimeError, match=match):
        async with flow:
            await flow.start()


@pytest.mark.anyio
@pytest.mark.parametrize(("piece", "match"), MISSING)
async def test_missing_piece_on_background_start(
    anyio_backend: Any, anyio_backend_name: str, piece: str, match: str
) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("background start() is asyncio-only")
    flow = _without(piece)
    with pytest.raises(RuntimeError, match=match):
        await flow.start()


@pytest.mark.anyio
async def test_factory_returning_no_context_manager(anyio_backend: Any) -> None:
    def not_a_factory() -> int:  # zero arguments: taken for a CM factory
        return 3

    flow = Flow()
    flow.set_producer(gen)
    flow.add_transformer(not_a_factory, name="odd")
    flow.set_consumer(sink)
    with pytest.raises(
        TypeError,
        match=r"transformer 'odd': the factory must return an async context manager",
    ) as info:
        await flow.run()
    assert any(note.startswith("flowrhythm:") for note in info.value.__notes__)


@pytest.mark.anyio
async def test_context_manager_yielding_a_sync_function(anyio_backend: Any) -> None:
    exited = 0

    @asynccontextmanager
    async def yields_sync():  # type: ignore[no-untyped-def]
        nonlocal exited
        try:
            yield sync_transform
        finally:
            exited += 1

    flow = Flow()
    flow.set_producer(gen)
    flow.set_consumer(yields_sync)
    with pytest.raises(
        TypeError,
        match=r"consumer 'yields_sync': the context manager must yield an async function",
    ):
        await flow.run()
    assert exited == 1


@pytest.mark.anyio
async def test_producer_callable_returning_no_async_iterable(
    anyio_backend: Any,
) -> None:
    flow = Flow()
    flow.set_producer(lambda: [1, 2, 3])
    flow.set_consumer(sink)
    with pytest.raises(TypeError, match=r"producer must produce an async iterable"):
        await flow.run()


# -- configuration after start ----------------------------------------------------------

RECONFIGURE = [
    pytest.param(lambda f: f.set_producer(gen), id="set_producer"),
    pytest.param(
        lambda f: f.add_transformer(double, name="late"), id="add_transformer"
    ),
    pytest.param(lambda f: f.set_consumer(sink, name="late"), id="set_consumer"),
    pytest.param(lambda f: f.set_error_handler(handler), id="set_error_handler"),
    pytest.param(
        lambda f: f.set_default_scaling_strategy(FixedScaling(2)),
        id="set_default_scaling_strategy",
    ),
]


@pytest.mark.anyio
@pytest.mark.parametrize("reconfigure", RECONFIGURE)
async def test_configuration_while_running_is_rejected(
    anyio_backend: Any, reconfigure: Misconfig
) -> None:
    gate = anyio.Event()
    errors: list[BaseException] = []

    async def gated(x: int) -> None:
        try:
            reconfigure(flow)
        except RuntimeError as exc:
            errors.append(exc)
        gate.set()

    flow = Flow()
    flow.set_producer(gen)
    flow.set_consumer(gated)
    with anyio.fail_after(10):
        await flow.run()
    assert gate.is_set()
    assert len(errors) == 3
    for exc in errors:
        assert "cannot be configured after it has started" in str(exc)
    assert list(flow.stats()) == ["gated"]


@pytest.mark.anyio
@pytest.mark.parametrize("reconfigure", RECONFIGURE)
async def test_configuration_after_the_run_is_rejected(
    anyio_backend: Any, reconfigure: Misconfig
) -> None:
    flow = ready_flow()
    with anyio.fail_after(10):
        await flow.run()
    with pytest.raises(
        RuntimeError, match=r"cannot be configured after it has started"
    ):
        reconfigure(flow)


@pytest.mark.anyio
async def test_bad_stop_arguments(anyio_backend: Any) -> None:
    flow = ready_flow()
    with pytest.raises(ValueError, match=r"timeout must be >= 0"):
        await flow.stop(timeout=-1)
    with pytest.raises(TypeError, match=r"timeout must be a number of seconds"):
        await flow.stop(timeout="soon")  # type: ignore[arg-type]


# -- operator options: fan-out, filter, batch, ordered, timeout, retry, rate_limit -------


async def fan_out(x: int):  # type: ignore[no-untyped-def]
    yield x


def sync_fan_out(x: int):  # type: ignore[no-untyped-def]
    yield x


def _bad_seconds(
    label: str, prefix: str, configure: Callable[[object, Flow], object]
) -> list[Any]:
    """The rejected values of a seconds argument (``timeout``, ``max_wait``):
    ``prefix`` is the stage and argument the message must start with."""
    rejected = [
        ("zero", 0, ValueError, "must be a finite number of seconds > 0, got 0"),
        ("negative", -1, ValueError, "must be a finite number of seconds > 0, got -1"),
        (
            "nan",
            math.nan,
            ValueError,
            "must be a finite number of seconds > 0, got nan",
        ),
        (
            "inf",
            math.inf,
            ValueError,
            "must be a finite number of seconds > 0, got inf",
        ),
        ("str", "1", TypeError, "must be a number of seconds, got '1'"),
        ("bool", True, TypeError, "must be a number of seconds, got True"),
    ]
    return [
        pytest.param(
            functools.partial(configure, value),
            error,
            rf"^{re.escape(f'{prefix} {message}')}$",
            id=f"{label}-{name}",
        )
        for name, value, error, message in rejected
    ]


OPERATOR_CONFIG_ERRORS: list[Any] = [
    # ordered
    pytest.param(
        lambda f: f.add_transformer(double, ordered=1),
        TypeError,
        r"^transformer 'double': ordered must be True or False, got 1$",
        id="ordered-int",
    ),
    pytest.param(
        lambda f: f.add_transformer(fan_out, name="split", ordered="yes"),
        TypeError,
        r"^transformer 'split': ordered must be True or False, got 'yes'$",
        id="ordered-str-fan-out",
    ),
    pytest.param(
        lambda f: f.add_transformer(double, ordered=None),
        TypeError,
        r"^transformer 'double': ordered must be True or False, got None$",
        id="ordered-none",
    ),
    # timeout, on every kind of stage that takes one
    *_bad_seconds(
        "timeout-transformer",
        "transformer 'double': timeout",
        lambda value, f: f.add_transformer(double, timeout=value),
    ),
    *_bad_seconds(
        "timeout-fan-out",
        "transformer 'fan_out': timeout",
        lambda value, f: f.add_transformer(fan_out, timeout=value),
    ),
    *_bad_seconds(
        "timeout-filter",
        "filter 'keep': timeout",
        lambda value, f: f.add_filter(double, name="keep", timeout=value),
    ),
    *_bad_seconds(
        "timeout-consumer",
        "consumer 'sink': timeout",
        lambda value, f: f.set_consumer(sink, timeout=value),
    ),
    # retry and rate_limit must be the configuration objects
    pytest.param(
        lambda f: f.add_transformer(double, retry=3),
        TypeError,
        r"^transformer 'double': retry must be a flowrhythm\.Retry, "
        r"e\.g\. Retry\(attempts=3\), got 3$",
        id="retry-int",
    ),
    pytest.param(
        lambda f: f.add_transformer(double, retry=Retry),
        TypeError,
        r"^transformer 'double': retry must be a flowrhythm\.Retry.*got <class",
        id="retry-class-not-instance",
    ),
    pytest.param(
        lambda f: f.set_consumer(sink, retry=RateLimit(1)),
        TypeError,
        r"^consumer 'sink': retry must be a flowrhythm\.Retry.*got RateLimit",
        id="retry-consumer-rate-limit",
    ),
    pytest.param(
        lambda f: f.add_transformer(fan_out, rate_limit=10),
        TypeError,
        r"^transformer 'fan_out': rate_limit must be a flowrhythm\.RateLimit, "
        r"e\.g\. RateLimit\(per_second=10\), got 10$",
        id="rate-limit-int",
    ),
    pytest.param(
        lambda f: f.set_consumer(sink, rate_limit=Retry()),
        TypeError,
        r"^consumer 'sink': rate_limit must be a flowrhythm\.RateLimit.*got Retry",
        id="rate-limit-consumer-retry",
    ),
    # filters: an async predicate of one argument
    pytest.param(
        lambda f: f.add_filter(sync_transform),
        TypeError,
        r"^filter 'sync_transform' must be .*synchronous function",
        id="filter-sync",
    ),
    pytest.param(
        lambda f: f.add_filter(agen_stage),
        TypeError,
        r"^filter 'agen_stage' must be .*async generator function.*only "
        r"add_transformer\(\) takes those",
        id="filter-async-generator",
    ),
    pytest.param(
        lambda f: f.add_filter(two_args, name="pick"),
        TypeError,
        r"^filter 'pick' must be .*one argument",
        id="filter-wrong-arity",
    ),
    pytest.param(
        lambda f: f.add_filter(double, buffer_size=-1),
        ValueError,
        r"^filter 'double': buffer_size must be >= 0, got -1$",
        id="filter-buffer-negative",
    ),
    pytest.param(
        lambda f: f.add_filter(double, scaling_strategy=2),
        TypeError,
        r"^filter 'double': scaling_strategy must be a ScalingStrategy",
        id="filter-strategy",
    ),
    pytest.param(
        lambda f: f.add_filter(double, name=""),
        TypeError,
        r"^filter name must be a non-empty str",
        id="filter-name-empty",
    ),
    # fan-out: an async generator function of one argument
    pytest.param(
        lambda f: f.add_transformer(needs_arg_gen, name="split", buffer_size=1.5),
        TypeError,
        r"^transformer 'split': buffer_size must be an int, got 1\.5$",
        id="fan-out-buffer-float",
    ),
    pytest.param(
        lambda f: f.add_transformer(sync_fan_out),
        TypeError,
        r"^transformer 'sync_fan_out' must be .*synchronous function",
        id="fan-out-sync-generator",
    ),
    # batches
    pytest.param(
        lambda f: f.add_batch(0),
        ValueError,
        r"^batch 'batch': max_size must be >= 1, got 0$",
        id="batch-size-zero",
    ),
    pytest.param(
        lambda f: f.add_batch(-3, name="rows"),
        ValueError,
        r"^batch 'rows': max_size must be >= 1, got -3$",
        id="batch-size-negative-named",
    ),
    pytest.param(
        lambda f: f.add_batch(1.5),
        TypeError,
        r"^batch 'batch': max_size must be an int, got 1\.5$",
        id="batch-size-float",
    ),
    pytest.param(
        lambda f: f.add_batch(True),
        TypeError,
        r"^batch 'batch': max_size must be an int, got True$",
        id="batch-size-bool",
    ),
    *_bad_seconds(
        "batch-max-wait",
        "batch 'batch': max_wait",
        lambda value, f: f.add_batch(3, max_wait=value),
    ),
    pytest.param(
        lambda f: f.add_batch(3, buffer_size=-1),
        ValueError,
        r"^batch 'batch': buffer_size must be >= 0, got -1$",
        id="batch-buffer-negative",
    ),
    pytest.param(
        lambda f: f.add_batch(3, buffer_size="8"),
        TypeError,
        r"^batch 'batch': buffer_size must be an int, got '8'$",
        id="batch-buffer-str",
    ),
    pytest.param(
        lambda f: f.add_batch(3, name=""),
        TypeError,
        r"^batch name must be a non-empty str, got ''$",
        id="batch-name-empty",
    ),
    pytest.param(
        lambda f: f.add_batch(3, name=7),
        TypeError,
        r"^batch name must be a non-empty str, got 7$",
        id="batch-name-int",
    ),
    # the consumer takes no fan-out
    pytest.param(
        lambda f: f.set_consumer(fan_out, name="out"),
        TypeError,
        r"^consumer 'out' must be .*async generator function.*only "
        r"add_transformer\(\) takes those",
        id="consumer-fan-out",
    ),
]


@pytest.mark.parametrize(("misconfigure", "error", "match"), OPERATOR_CONFIG_ERRORS)
def test_operator_misconfiguration_is_rejected(
    misconfigure: Misconfig, error: type[Exception], match: str
) -> None:
    flow = Flow()
    with pytest.raises(error, match=match):
        misconfigure(flow)
    assert list(flow.stats()) == []  # nothing was added


ON_MESSAGE = (
    r"^Retry: on must be an Exception subclass or a non-empty tuple of them "
    r"\(cancellation and BaseExceptions are never retried\), got "
)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        pytest.param(
            lambda: Retry(attempts=0),
            ValueError,
            r"^Retry: attempts must be >= 1, got 0$",
            id="attempts-zero",
        ),
        pytest.param(
            lambda: Retry(attempts=True),
            TypeError,
            r"^Retry: attempts must be an int, got True$",
            id="attempts-bool",
        ),
        pytest.param(
            lambda: Retry(attempts=1.5),
            TypeError,
            r"^Retry: attempts must be an int, got 1\.5$",
            id="attempts-float",
        ),
        pytest.param(
            lambda: Retry(on=BaseException),
            TypeError,
            ON_MESSAGE + r"<class 'BaseException'>$",
            id="on-base-exception",
        ),
        pytest.param(
            lambda: Retry(on=KeyboardInterrupt),
            TypeError,
            ON_MESSAGE + r"<class 'KeyboardInterrupt'>$",
            id="on-keyboard-interrupt",
        ),
        pytest.param(
            lambda: Retry(on=asyncio.CancelledError),
            TypeError,
            ON_MESSAGE + r"<class 'asyncio\.exceptions\.CancelledError'>$",
            id="on-cancelled",
        ),
        pytest.param(
            lambda: Retry(on=(ValueError, SystemExit)),
            TypeError,
            ON_MESSAGE + r"\(<class 'ValueError'>, <class 'SystemExit'>\)$",
            id="on-tuple-with-base-exception",
        ),
        pytest.param(
            lambda: Retry(on=()), TypeError, ON_MESSAGE + r"\(\)$", id="on-empty"
        ),
        pytest.param(
            lambda: Retry(on="x"), TypeError, ON_MESSAGE + r"'x'$", id="on-str"
        ),
        pytest.param(
            lambda: Retry(on=[ValueError]),
            TypeError,
            ON_MESSAGE + r"\[<class 'ValueError'>\]$",
            id="on-list",
        ),
        pytest.param(
            lambda: Retry(on=ValueError()),
            TypeError,
            ON_MESSAGE + r"ValueError\(\)$",
            id="on-instance",
        ),
        pytest.param(
            lambda: Retry(backoff=-1),
            ValueError,
            r"^Retry: backoff must be a finite number >= 0\.0, got -1$",
            id="backoff-negative",
        ),
        pytest.param(
            lambda: Retry(backoff=math.nan),
            ValueError,
            r"^Retry: backoff must be a finite number >= 0\.0, got nan$",
            id="backoff-nan",
        ),
        pytest.param(
            lambda: Retry(backoff="0.1"),
            TypeError,
            r"^Retry: backoff must be a number, got '0\.1'$",
            id="backoff-str",
        ),
        pytest.param(
            lambda: Retry(max_backoff=math.inf),
            ValueError,
            r"^Retry: max_backoff must be a finite number >= 0\.0, got inf$",
            id="max-backoff-inf",
        ),
        pytest.param(
            lambda: Retry(jitter=1),
            TypeError,
            r"^Retry: jitter must be a bool, got 1$",
            id="jitter-int",
        ),
        pytest.param(
            lambda: RateLimit(0),
            ValueError,
            r"^RateLimit: per_second must be a finite number > 0, got 0$",
            id="rate-zero",
        ),
        pytest.param(
            lambda: RateLimit(-1),
            ValueError,
            r"^RateLimit: per_second must be .*got -1$",
            id="rate-negative",
        ),
        pytest.param(
            lambda: RateLimit(math.nan),
            ValueError,
            r"^RateLimit: per_second must be a finite number.*got nan$",
            id="rate-nan",
        ),
        pytest.param(
            lambda: RateLimit(math.inf),
            ValueError,
            r"^RateLimit: per_second must be a finite number.*got inf$",
            id="rate-inf",
        ),
        pytest.param(
            lambda: RateLimit("5"),
            TypeError,
            r"^RateLimit: per_second must be a number, got '5'$",
            id="rate-str",
        ),
        pytest.param(
            lambda: RateLimit(1, burst=0),
            ValueError,
            r"^RateLimit: burst must be >= 1, got 0$",
            id="burst-zero",
        ),
        pytest.param(
            lambda: RateLimit(1, burst=1.5),
            TypeError,
            r"^RateLimit: burst must be an int, got 1\.5$",
            id="burst-float",
        ),
    ],
)
def test_bad_retry_and_rate_limit_arguments(
    make: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make()


def test_well_formed_retry_and_rate_limit_are_accepted() -> None:
    assert Retry(on=ValueError).on == (ValueError,)
    assert Retry(attempts=1, backoff=0, max_backoff=0, jitter=False).attempts == 1
    assert RateLimit(0.5).burst == 1
    flow = Flow()
    flow.add_transformer(
        double, ordered=True, timeout=0.5, retry=Retry(), rate_limit=RateLimit(2)
    )
    flow.add_transformer(fan_out, ordered=False, timeout=1)
    flow.add_filter(double, name="keep", timeout=2.5)
    flow.add_batch(1, max_wait=0.001, buffer_size=0)
    flow.set_consumer(sink, timeout=1, retry=Retry(attempts=1), rate_limit=RateLimit(9))
    assert list(flow.stats()) == ["double", "fan_out", "keep", "batch", "sink"]


def test_duplicate_operator_names() -> None:
    flow = Flow()
    flow.add_filter(double, name="keep")
    with pytest.raises(ValueError, match=r"a stage named 'keep' already exists"):
        flow.add_filter(double, name="keep")
    with pytest.raises(ValueError, match=r"a stage named 'keep' already exists"):
        flow.add_batch(3, name="keep")
    with pytest.raises(ValueError, match=r"a stage named 'keep' already exists"):
        flow.add_transformer(fan_out, name="keep")
    flow.add_batch(3)
    with pytest.raises(ValueError, match=r"a stage named 'batch' already exists"):
        flow.add_batch(3, name="batch")
    with pytest.raises(ValueError, match=r"a stage named 'batch' already exists"):
        flow.add_transformer(double, name="batch")
    flow.add_batch(2)  # unnamed batches number themselves
    flow.add_transformer(double, name="batch_3")
    flow.add_batch(1)
    with pytest.raises(ValueError, match=r"a stage named 'batch_4' already exists"):
        flow.set_consumer(sink, name="batch_4")
    assert list(flow.stats()) == ["keep", "batch", "batch_2", "batch_3", "batch_4"]


def test_naming_a_batch_costs_nothing() -> None:
    flow = Flow()
    tracemalloc.start()
    try:
        flow.add_batch(3)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list(flow.stats()) == ["batch"]
    assert peak < 1_000_000, f"add_batch() allocated {peak} bytes at its peak"


def test_failed_operator_configuration_leaves_the_flow_unchanged() -> None:
    flow = Flow()
    with pytest.raises(ValueError, match="max_wait"):
        flow.add_batch(3, max_wait=0)
    with pytest.raises(TypeError, match="ordered"):
        flow.add_transformer(double, name="bad", ordered=1)
    with pytest.raises(ValueError, match="timeout"):
        flow.add_filter(double, name="bad", timeout=-1)
    with pytest.raises(TypeError, match="retry"):
        flow.set_consumer(sink, retry=3)
    assert list(flow.stats()) == []
    # the rejected names were not reserved
    flow.add_batch(3)
    flow.add_transformer(double, name="bad")
    flow.set_consumer(sink)
    assert list(flow.stats()) == ["batch", "bad", "sink"]


@pytest.mark.anyio
@pytest.mark.parametrize("role", ["transformer", "filter", "consumer"])
async def test_context_manager_yielding_an_async_generator_function(
    anyio_backend: Any, role: str
) -> None:
    """A fan-out is an async generator function passed directly; one yielded by a
    context manager is found when the worker enters it, and fails the run."""
    exited = 0

    @asynccontextmanager
    async def yields_fan_out():  # type: ignore[no-untyped-def]
        nonlocal exited
        try:
            yield fan_out
        finally:
            exited += 1

    flow = Flow()
    flow.set_producer(gen)
    configure = {
        "transformer": flow.add_transformer,
        "filter": flow.add_filter,
        "consumer": flow.set_consumer,
    }[role]
    configure(yields_fan_out, name="split")
    if role != "consumer":
        flow.set_consumer(sink)
    with anyio.fail_after(10), pytest.raises(TypeError) as info:
        await flow.run()
    message = str(info.value)
    assert message.startswith(
        f"{role} 'split': the context manager yielded the async generator function"
    )
    assert "a fan-out stage is passed to add_transformer() directly" in message
    assert any(note.startswith("flowrhythm:") for note in info.value.__notes__)
    assert exited == 1
    for stage in flow.stats().values():
        assert stage.received == stage.processed + stage.errors + stage.dropped
