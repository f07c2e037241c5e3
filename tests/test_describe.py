"""Flow.describe() and Flow.to_mermaid(): deterministic outlines of a flow."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from flowrhythm import FixedScaling, Flow, RateLimit, Retry, UtilizationScaling
from flowrhythm.testing import ManualClock


async def producer() -> AsyncIterator[int]:
    for i in range(10):
        yield i


async def transformer(x: int) -> int:
    return x * 2


async def consumer(x: int) -> None:
    pass


async def error_handler(item: object, exc: BaseException) -> None:
    pass


def seed_flow() -> Flow:
    """The seed README's flow, plus a stage with its own buffer."""
    flow = Flow(default_scaling_strategy=UtilizationScaling(max_workers=8))
    flow.set_producer(producer)
    flow.add_transformer(
        transformer, name="double", scaling_strategy=FixedScaling(workers=2)
    )
    flow.add_transformer(transformer, name="again", buffer_size=0)
    flow.set_consumer(consumer)
    flow.set_error_handler(error_handler)
    return flow


UTILIZATION_8 = (
    "UtilizationScaling(min_workers=1, max_workers=8, lower_utilization=0.2, "
    "upper_utilization=0.8, upscaling_rate=2, downscaling_rate=1, "
    "cooldown_seconds=5.0, dampening=0.5, sampling_period=2.0, sampling_events=50)"
)


def test_describe_outlines_every_part_in_item_order() -> None:
    assert seed_flow().describe() == (
        "producer     producer\n"
        "transformer  double    buffer 64  FixedScaling(workers=2)\n"
        f"transformer  again     buffer 0   {UTILIZATION_8}\n"
        f"consumer     consumer  buffer 64  {UTILIZATION_8}\n"
        "errors       error_handler"
    )


def test_describe_an_empty_flow() -> None:
    assert Flow().describe() == (
        "producer  (not set)\nconsumer  (not set)\nerrors    logged (no error handler)"
    )


def test_describe_follows_the_default_strategy_until_the_start() -> None:
    flow = Flow(buffer_size=8)
    flow.set_producer(producer)
    flow.set_consumer(consumer, name="sink")
    flow.set_default_scaling_strategy(FixedScaling(3))
    assert flow.describe() == (
        "producer  producer\n"
        "consumer  sink  buffer 8  FixedScaling(workers=3)\n"
        "errors    logged (no error handler)"
    )


def test_describe_names_other_producer_and_handler_shapes() -> None:
    @asynccontextmanager
    async def numbers_from_socket() -> AsyncIterator[AsyncIterator[int]]:
        yield producer()

    @asynccontextmanager
    async def handler_with_log() -> AsyncIterator[
        Callable[[object, BaseException], Awaitable[None]]
    ]:
        yield error_handler

    flow = Flow()
    flow.set_producer(numbers_from_socket)
    flow.set_consumer(consumer)
    flow.set_error_handler(handler_with_log)
    assert flow.describe().splitlines()[0] == "producer  numbers_from_socket"
    assert flow.describe().splitlines()[-1] == "errors    handler_with_log"

    send, receive = anyio.create_memory_object_stream[int](0)
    with send, receive:
        flow = Flow()
        flow.set_producer(receive)
        assert flow.describe().splitlines()[0] == (
            "producer  MemoryObjectReceiveStream"
        )


def test_describe_shows_unprintable_names_as_repr() -> None:
    flow = Flow()
    flow.set_producer(producer)
    flow.set_consumer(consumer, name="two\nlines")
    assert "consumer  'two\\nlines'  buffer 64" in flow.describe()


def test_to_mermaid() -> None:
    assert seed_flow().to_mermaid() == textwrap.dedent(
        """\
        flowchart LR
            producer(["producer<br/>producer"])
            stage1["double<br/>Fixed 2"]
            stage2["again<br/>Utilization 1–8"]
            stage3(["consumer<br/>Utilization 1–8"])
            errors{{"error_handler<br/>error handler"}}
            producer --> stage1
            stage1 --> stage2
            stage2 --> stage3
            stage1 -.-> errors
            stage2 -.-> errors
            stage3 -.-> errors"""
    )


def test_to_mermaid_escapes_names() -> None:
    flow = Flow()
    flow.set_producer(producer)
    flow.set_consumer(consumer, name='say "hi" <b>#1</b>')
    lines = flow.to_mermaid().splitlines()
    assert lines[2] == (
        '    stage1(["say #quot;hi#quot; #lt;b#gt;#35;1#lt;/b#gt;<br/>Fixed 1"])'
    )


def test_to_mermaid_without_an_error_handler_or_stages() -> None:
    assert Flow().to_mermaid() == textwrap.dedent(
        """\
        flowchart LR
            producer(["(not set)<br/>producer"])
            errors{{"logged<br/>no error handler"}}"""
    )


def test_brief_strategy_of_a_custom_subclass() -> None:
    from flowrhythm import ScalingStrategy

    class Zeroable(ScalingStrategy):
        min_workers = 0
        max_workers = 4

    flow = Flow()
    flow.set_producer(producer)
    flow.set_consumer(consumer, scaling_strategy=Zeroable())
    assert '    stage1(["consumer<br/>Zeroable 0–4"])' in flow.to_mermaid()


@pytest.mark.anyio
async def test_describe_after_the_run_is_unchanged(anyio_backend: object) -> None:
    flow = seed_flow()
    before = flow.describe(), flow.to_mermaid()
    await flow.run()
    assert (flow.describe(), flow.to_mermaid()) == before


# -- operators: fan-out, filter, batch, and the per-stage options ------------------------


async def split(x: int) -> AsyncIterator[int]:
    yield x
    yield -x


async def keep(x: int) -> bool:
    return x > 0


def operator_flow(clock: ManualClock | None = None) -> Flow:
    """One stage of every operator kind, with every option somewhere."""
    flow = Flow(default_scaling_strategy=UtilizationScaling(max_workers=8), clock=clock)
    flow.set_producer(producer)
    flow.add_transformer(
        transformer,
        name="fetch",
        scaling_strategy=FixedScaling(workers=8),
        ordered=True,
        timeout=2,
        retry=Retry(attempts=5, on=(ConnectionError, TimeoutError), backoff=0.5),
        rate_limit=RateLimit(10, burst=16),
    )
    flow.add_transformer(
        split, scaling_strategy=FixedScaling(workers=4), ordered=True, buffer_size=0
    )
    flow.add_transformer(split, name="split_again", scaling_strategy=FixedScaling(1))
    flow.add_filter(keep, scaling_strategy=FixedScaling(2), timeout=0.5)
    flow.add_batch(10, max_wait=1.5)
    flow.add_batch(3, name="rows", buffer_size=4)
    flow.set_consumer(
        consumer,
        scaling_strategy=FixedScaling(1),
        timeout=30,
        retry=Retry(),
        rate_limit=RateLimit(0.5),
    )
    flow.set_error_handler(error_handler)
    return flow


FETCH_RETRY = (
    "Retry(attempts=5, on=(ConnectionError, TimeoutError), backoff=0.5, "
    "max_backoff=10.0, jitter=True)"
)
DEFAULT_RETRY = (
    "Retry(attempts=3, on=(Exception,), backoff=0.1, max_backoff=10.0, jitter=True)"
)


def test_describe_shows_operator_kinds_and_options() -> None:
    assert operator_flow().describe() == (
        "producer     producer\n"
        "transformer  fetch        buffer 64  FixedScaling(workers=8)  ordered  "
        f"timeout=2  retry={FETCH_RETRY}  "
        "rate_limit=RateLimit(per_second=10, burst=16)\n"
        "fan-out      split        buffer 0   FixedScaling(workers=4)  ordered\n"
        "fan-out      split_again  buffer 64  FixedScaling(workers=1)\n"
        "filter       keep         buffer 64  FixedScaling(workers=2)  timeout=0.5\n"
        "batch        batch        buffer 64  FixedScaling(workers=1)  max_size=10  "
        "max_wait=1.5\n"
        "batch        rows         buffer 4   FixedScaling(workers=1)  max_size=3\n"
        "consumer     consumer     buffer 64  FixedScaling(workers=1)  timeout=30  "
        f"retry={DEFAULT_RETRY}  rate_limit=RateLimit(per_second=0.5, burst=1)\n"
        "errors       error_handler"
    )


def test_to_mermaid_shows_operator_options() -> None:
    assert operator_flow().to_mermaid() == textwrap.dedent(
        f"""\
        flowchart LR
            producer(["producer<br/>producer"])
            stage1["fetch<br/>Fixed 8<br/>ordered<br/>timeout=2<br/>retry={FETCH_RETRY}<br/>rate_limit=RateLimit(per_second=10, burst=16)"]
            stage2["split<br/>fan-out<br/>Fixed 4<br/>ordered"]
            stage3["split_again<br/>fan-out<br/>Fixed 1"]
            stage4["keep<br/>filter<br/>Fixed 2<br/>timeout=0.5"]
            stage5["batch<br/>batch<br/>max_size=10<br/>max_wait=1.5"]
            stage6["rows<br/>batch<br/>max_size=3"]
            stage7(["consumer<br/>Fixed 1<br/>timeout=30<br/>retry={DEFAULT_RETRY}<br/>rate_limit=RateLimit(per_second=0.5, burst=1)"])
            errors{{{{"error_handler<br/>error handler"}}}}
            producer --> stage1
            stage1 --> stage2
            stage2 --> stage3
            stage3 --> stage4
            stage4 --> stage5
            stage5 --> stage6
            stage6 --> stage7
            stage1 -.-> errors
            stage2 -.-> errors
            stage3 -.-> errors
            stage4 -.-> errors
            stage7 -.-> errors"""
    )


def test_options_left_at_their_defaults_are_not_shown() -> None:
    flow = Flow()
    flow.set_producer(producer)
    flow.add_transformer(
        transformer, ordered=False, timeout=None, retry=None, rate_limit=None
    )
    flow.add_transformer(split, ordered=False)
    flow.add_filter(keep, timeout=None)
    flow.add_batch(1, max_wait=None)
    flow.set_consumer(consumer, timeout=None, retry=None, rate_limit=None)
    assert flow.describe() == (
        "producer     producer\n"
        "transformer  transformer  buffer 64  FixedScaling(workers=1)\n"
        "fan-out      split        buffer 64  FixedScaling(workers=1)\n"
        "filter       keep         buffer 64  FixedScaling(workers=1)\n"
        "batch        batch        buffer 64  FixedScaling(workers=1)  max_size=1\n"
        "consumer     consumer     buffer 64  FixedScaling(workers=1)\n"
        "errors       logged (no error handler)"
    )
    labels = [line.strip() for line in flow.to_mermaid().splitlines()[2:7]]
    assert labels == [
        'stage1["transformer<br/>Fixed 1"]',
        'stage2["split<br/>fan-out<br/>Fixed 1"]',
        'stage3["keep<br/>filter<br/>Fixed 1"]',
        'stage4["batch<br/>batch<br/>max_size=1"]',
        'stage5(["consumer<br/>Fixed 1"])',
    ]


def test_a_batch_is_one_task_whatever_the_default_strategy() -> None:
    flow = Flow(default_scaling_strategy=FixedScaling(4), buffer_size=2)
    flow.set_producer(producer)
    flow.add_batch(5)
    flow.add_batch(2, max_wait=0.25)
    flow.set_consumer(consumer)
    assert flow.describe().splitlines()[1:4] == [
        "batch     batch     buffer 2  FixedScaling(workers=1)  max_size=5",
        "batch     batch_2   buffer 2  FixedScaling(workers=1)  max_size=2  max_wait=0.25",
        "consumer  consumer  buffer 2  FixedScaling(workers=4)",
    ]


def test_option_values_are_shown_as_configured() -> None:
    class LocalError(Exception):
        pass

    flow = Flow()
    flow.set_producer(producer)
    flow.set_consumer(
        consumer,
        timeout=0.001,
        retry=Retry(attempts=1, on=LocalError, backoff=0, max_backoff=0, jitter=False),
    )
    retry = (
        "Retry(attempts=1, on=(test_option_values_are_shown_as_configured.<locals>"
        ".LocalError,), backoff=0, max_backoff=0, jitter=False)"
    )
    assert flow.describe().splitlines()[1] == (
        f"consumer  consumer  buffer 64  FixedScaling(workers=1)  timeout=0.001  "
        f"retry={retry}"
    )
    # Mermaid reads <...> as HTML: the label escapes it
    assert flow.to_mermaid().splitlines()[2] == (
        '    stage1(["consumer<br/>Fixed 1<br/>timeout=0.001<br/>retry='
        + retry.replace("<", "#lt;").replace(">", "#gt;")
        + '"])'
    )


def test_to_mermaid_names_fan_out_and_filter_stages() -> None:
    flow = Flow()
    flow.set_producer(producer)
    flow.add_transformer(split)
    flow.add_filter(keep)
    flow.set_consumer(consumer)
    lines = flow.to_mermaid().splitlines()
    assert "fan-out" in lines[2]
    assert "filter" in lines[3]


@pytest.mark.anyio
async def test_describe_of_operators_after_the_run_is_unchanged(
    anyio_backend: object,
) -> None:
    clock = ManualClock()
    flow = operator_flow(clock)
    before = flow.describe(), flow.to_mermaid()
    with anyio.fail_after(10):
        async with clock.autojump():
            await flow.run()
    assert flow.stats()["consumer"].processed > 0
    assert (flow.describe(), flow.to_mermaid()) == before
