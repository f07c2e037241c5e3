"""User code raising what only the event loop should raise."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from flowrhythm import Flow

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> Any:
    # Only asyncio lets user code construct its cancellation exception.
    return "asyncio"


async def _produce() -> AsyncIterator[int]:
    for item in range(10):
        yield item


async def _sink(item: int) -> None:
    pass


async def test_a_stage_raising_cancelled_error_fails_the_flow_loudly() -> None:
    async def rogue(item: int) -> int:
        if item == 3:
            raise asyncio.CancelledError
        return item

    flow = Flow()
    flow.set_producer(_produce)
    flow.add_transformer(rogue)
    flow.set_consumer(_sink)
    with (
        anyio.fail_after(10),
        pytest.raises(RuntimeError, match="CancelledError") as info,
    ):
        await flow.run()
    assert isinstance(info.value.__cause__, asyncio.CancelledError)
    assert "transformer 'rogue'" in str(info.value)
    stats = flow.stats()
    for stage in stats.values():
        assert stage.received == stage.processed + stage.errors + stage.dropped


async def test_a_producer_raising_cancelled_error_fails_the_flow_loudly() -> None:
    async def rogue() -> AsyncIterator[int]:
        yield 1
        raise asyncio.CancelledError

    flow = Flow()
    flow.set_producer(rogue)
    flow.set_consumer(_sink)
    with anyio.fail_after(10), pytest.raises(RuntimeError, match="the producer raised"):
        await flow.run()
