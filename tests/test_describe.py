"""Flow.describe() and Flow.to_mermaid(): deterministic outlines of a flow."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import pytest

from flowrhythm import FixedScaling, Flow, UtilizationScaling


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
