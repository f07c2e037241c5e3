"""Producers that are async context managers as well as async iterables."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from flowrhythm import Flow

pytestmark = pytest.mark.anyio


async def test_a_memory_stream_is_a_producer_and_is_closed(anyio_backend: Any) -> None:
    # A receive stream's __aenter__ returns the stream itself: it is entered once,
    # iterated, and closed when the flow is done with it.
    send, receive = anyio.create_memory_object_stream[int](10)
    got: list[int] = []

    async def consume(item: int) -> None:
        got.append(item)

    flow = Flow()
    flow.set_producer(receive)
    flow.set_consumer(consume)
    async with send:
        for item in range(5):
            send.send_nowait(item)
    await flow.run()
    assert got == [0, 1, 2, 3, 4]
    with pytest.raises(anyio.ClosedResourceError):
        receive.receive_nowait()


async def test_blocked_sends_count_back_pressure(anyio_backend: Any) -> None:
    release = anyio.Event()

    async def identity(item: int) -> int:
        return item

    async def slow(item: int) -> None:
        await release.wait()

    async def produce() -> Any:
        for item in range(10):
            yield item

    flow = Flow(buffer_size=0)
    flow.set_producer(produce)
    flow.add_transformer(identity)
    flow.set_consumer(slow)
    async with anyio.create_task_group() as tg:
        await tg.start(flow.run)
        await anyio.wait_all_tasks_blocked()
        stats = flow.stats()["identity"]
        assert stats.blocked_workers == 1
        assert stats.blocked_sends >= 1
        release.set()
    assert flow.stats()["slow"].processed == 10


async def test_a_strategy_that_allows_no_worker_is_rejected(anyio_backend: Any) -> None:
    from flowrhythm import ScalingStrategy

    class Nothing(ScalingStrategy):
        min_workers = 0
        max_workers = 0

    async def produce() -> Any:
        yield 1

    async def sink(item: int) -> None:
        pass

    flow = Flow()
    flow.set_producer(produce)
    flow.set_consumer(sink, scaling_strategy=Nothing())
    with pytest.raises(ValueError, match="consumer 'sink': max_workers must be >= 1"):
        await flow.run()


class _CountDown:
    """An async iterator that defines ``__anext__`` only (no ``__aiter__``)."""

    def __init__(self, n: int) -> None:
        self.n = n

    async def __anext__(self) -> int:
        if not self.n:
            raise StopAsyncIteration
        self.n -= 1
        return self.n


class _CountDownSource:
    def __init__(self, n: int) -> None:
        self.n = n

    def __aiter__(self) -> _CountDown:
        return _CountDown(self.n)


async def test_an_iterator_without_aiter_is_iterated(anyio_backend: Any) -> None:
    got: list[int] = []

    async def consume(item: int) -> None:
        got.append(item)

    flow = Flow()
    flow.set_producer(_CountDownSource(5))
    flow.set_consumer(consume)
    await flow.run()
    assert got == [4, 3, 2, 1, 0]
