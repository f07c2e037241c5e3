"""The pipelines the throughput benchmark races against each other.

Every contender pushes ``n_items`` ints from the same async generator through the
same three trivial stages into a counting consumer, then checks what arrived.
``workers`` is the number of workers of each stage (the three transformers and
the consumer); the producer is always one task.

Each contender is ``async def run_<name>(n_items: int, workers: int) -> None`` and
raises :class:`BenchmarkError` if the consumer did not see exactly the expected
items. Future benchmark scripts (peer libraries, memory, scaling) can reuse the
workload helpers below.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio import EndOfStream, WouldBlock
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.lowlevel import checkpoint
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from flowrhythm import (
    FixedScaling,
    Flow,
    ScalingStrategy,
    StageStats,
    UtilizationScaling,
)

#: the capacity of every stage's input buffer, in every contender (flowrhythm's
#: default, passed explicitly so a change of default cannot skew the comparison)
BUFFER_SIZE = 64
#: the hand-written fast pipeline yields to the event loop at least this often,
#: like flowrhythm does, so both pay for fairness and cancellation equally
CHECKPOINT_EVERY = 64

Stage = Callable[[int], Awaitable[int]]


class BenchmarkError(AssertionError):
    """A contender lost, duplicated or corrupted items."""


# -- the workload -------------------------------------------------------------------


async def produce(n_items: int) -> AsyncIterator[int]:
    """The producer: 0, 1, ..., n_items - 1."""
    for i in range(n_items):
        yield i


# Three distinct functions, not one reused: flowrhythm needs unique stage names and
# each stage should pay for its own call. No awaits inside, so the measured cost is
# the pipeline's, not the work's.
async def step_a(x: int) -> int:
    return x + 1


async def step_b(x: int) -> int:
    return x + 1


async def step_c(x: int) -> int:
    return x + 1


STAGES: tuple[Stage, ...] = (step_a, step_b, step_c)

#: read by child processes, which import this module afresh
STAGE_DELAY_ENV = "FLOWRHYTHM_BENCH_STAGE_DELAY"


def _waiting(name: str, seconds: float) -> Stage:
    """A stage that awaits ``seconds`` (a stand-in for I/O), then adds 1."""

    async def stage(x: int) -> int:
        await anyio.sleep(seconds)
        return x + 1

    # flowrhythm names a stage after its function: the three must differ
    stage.__name__ = stage.__qualname__ = name
    return stage


def use_stage_delay(seconds: float) -> None:
    """Make every stage await ``seconds`` before answering (0: the trivial stages).

    Rebinds ``STAGES``, which every contender reads when it runs, and records the
    delay in the environment for the child processes of another interpreter.
    """
    global STAGES
    os.environ[STAGE_DELAY_ENV] = repr(seconds)
    if seconds:
        STAGES = tuple(_waiting(f"wait_{n}", seconds) for n in "abc")
    else:
        STAGES = (step_a, step_b, step_c)


if os.environ.get(STAGE_DELAY_ENV):
    use_stage_delay(float(os.environ[STAGE_DELAY_ENV]))


@dataclass(slots=True)
class Tally:
    """The consumer's state: how many items arrived and their sum."""

    count: int = 0
    total: int = 0
    consume: Callable[[int], Awaitable[None]] = field(init=False)

    def __post_init__(self) -> None:
        # A closure, not a bound method, so it looks like any user's async function.
        async def consume(x: int) -> None:
            self.count += 1
            self.total += x

        self.consume = consume

    def verify(self, n_items: int, contender: str) -> None:
        """Raise unless exactly the outputs of ``n_items`` inputs arrived."""
        expected_total = n_items * (n_items - 1) // 2 + len(STAGES) * n_items
        if self.count != n_items or self.total != expected_total:
            raise BenchmarkError(
                f"{contender}: consumer saw {self.count} items summing to "
                f"{self.total}, expected {n_items} items summing to {expected_total}"
            )


# -- 1. flowrhythm ------------------------------------------------------------------


async def run_flowrhythm(n_items: int, workers: int) -> None:
    await _run_flow(n_items, lambda: FixedScaling(workers=workers), "flowrhythm")


async def run_flowrhythm_utilization(n_items: int, workers: int) -> None:
    """The same flow with the scaling controller active on every stage.

    ``UtilizationScaling(min_workers=workers, max_workers=workers + 3)`` with
    default sampling (every 50 enqueues and dequeues, every 2 s): each pool starts
    at ``workers``, like ``FixedScaling(workers)``, but can grow and shrink, so the
    hot path pays for the sampling gates, the idle-worker cancel scopes that
    retirement needs, and every decision. At 1 worker this is (1, 4).
    """
    await _run_flow(
        n_items,
        lambda: UtilizationScaling(min_workers=workers, max_workers=workers + 3),
        "flowrhythm-utilization",
    )


class _DecideOnly(UtilizationScaling):
    """``UtilizationScaling``'s decisions through its public hooks, each handed a
    ``StageStats`` snapshot (as any custom strategy is), every answer discarded."""

    def on_enqueue(self, stats: StageStats) -> int:
        super().on_enqueue(stats)
        return 0

    def on_dequeue(self, stats: StageStats) -> int:
        super().on_dequeue(stats)
        return 0

    def on_tick(self, stats: StageStats) -> int:
        super().on_tick(stats)
        return 0


async def run_flowrhythm_sampling(n_items: int, workers: int) -> None:
    """The cost of a custom strategy's consults: a snapshot and a decision every
    ``sampling_events`` items in and out of each stage, and no scaling.

    A plain ``UtilizationScaling`` (``flowrhythm-utilization``) is asked straight
    from the live counters instead; a subclass that overrides a hook, like this
    one, gets a snapshot per consult, and the difference to ``flowrhythm`` is
    what those snapshots cost.
    """
    await _run_flow(
        n_items,
        lambda: _DecideOnly(min_workers=workers, max_workers=workers + 3),
        "flowrhythm-sampling",
    )


async def _run_flow(
    n_items: int, strategy: Callable[[], ScalingStrategy], contender: str
) -> None:
    tally = Tally()
    flow = Flow(buffer_size=BUFFER_SIZE)

    # The same generator the other contenders iterate, created when the run starts.
    flow.set_producer(lambda: produce(n_items))
    for fn in STAGES:
        flow.add_transformer(fn, name=fn.__name__, scaling_strategy=strategy())
    flow.set_consumer(tally.consume, name="consume", scaling_strategy=strategy())
    await flow.run()
    tally.verify(n_items, contender)
    # The tally catches lost items; the stats must agree with it.
    for name, stats in flow.stats().items():
        if stats.processed != n_items or stats.errors or stats.dropped:
            raise BenchmarkError(f"{contender}: stage {name!r} stats are off: {stats}")


# -- 2. anyio-naive: the obvious way to use memory object streams -------------------


async def run_anyio_naive(n_items: int, workers: int) -> None:
    tally = Tally()

    async def producer(send: ObjectSendStream[int]) -> None:
        async with send:
            async for item in produce(n_items):
                await send.send(item)

    async def worker(
        fn: Stage, receive: ObjectReceiveStream[int], send: ObjectSendStream[int]
    ) -> None:
        async with receive, send:
            async for item in receive:
                await send.send(await fn(item))

    async def consumer(receive: ObjectReceiveStream[int]) -> None:
        async with receive:
            async for item in receive:
                await tally.consume(item)

    async with anyio.create_task_group() as tg:
        send, receive = anyio.create_memory_object_stream[int](BUFFER_SIZE)
        tg.start_soon(producer, send)
        for fn in STAGES:
            next_send, next_receive = anyio.create_memory_object_stream[int](
                BUFFER_SIZE
            )
            # One clone per worker: the next stage sees the end of its input only
            # when every worker of this stage has closed its clone.
            with receive, next_send:
                for _ in range(workers):
                    tg.start_soon(worker, fn, receive.clone(), next_send.clone())
            receive = next_receive
        with receive:
            for _ in range(workers):
                tg.start_soon(consumer, receive.clone())
    tally.verify(n_items, "anyio-naive")


# -- 3. anyio-fast: non-blocking calls first, checkpoint every K items --------------


async def run_anyio_fast(n_items: int, workers: int) -> None:
    tally = Tally()

    # Every loop below binds stream methods to local names and is written out in
    # full: an attribute lookup or a helper call per item is a visible share of a
    # microsecond budget, and this contender is the best a user could hand-write.

    async def producer(send: MemoryObjectSendStream[int]) -> None:
        with send:
            send_nowait = send.send_nowait
            budget = CHECKPOINT_EVERY
            async for item in produce(n_items):
                try:
                    send_nowait(item)
                except WouldBlock:
                    await send.send(item)
                    budget = CHECKPOINT_EVERY  # awaiting send() was a checkpoint
                budget -= 1
                if not budget:
                    budget = CHECKPOINT_EVERY
                    await checkpoint()

    async def worker(
        fn: Stage,
        receive: MemoryObjectReceiveStream[int],
        send: MemoryObjectSendStream[int],
    ) -> None:
        with receive, send:
            receive_nowait = receive.receive_nowait
            send_nowait = send.send_nowait
            budget = CHECKPOINT_EVERY
            while True:
                try:
                    item = receive_nowait()
                except WouldBlock:
                    try:
                        item = await receive.receive()
                    except EndOfStream:
                        return
                    budget = CHECKPOINT_EVERY
                except EndOfStream:
                    return
                result = await fn(item)
                try:
                    send_nowait(result)
                except WouldBlock:
                    await send.send(result)
                    budget = CHECKPOINT_EVERY
                budget -= 1
                if not budget:
                    budget = CHECKPOINT_EVERY
                    await checkpoint()

    async def consumer(receive: MemoryObjectReceiveStream[int]) -> None:
        with receive:
            receive_nowait = receive.receive_nowait
            consume = tally.consume
            budget = CHECKPOINT_EVERY
            while True:
                try:
                    item = receive_nowait()
                except WouldBlock:
                    try:
                        item = await receive.receive()
                    except EndOfStream:
                        return
                    budget = CHECKPOINT_EVERY
                except EndOfStream:
                    return
                await consume(item)
                budget -= 1
                if not budget:
                    budget = CHECKPOINT_EVERY
                    await checkpoint()

    async with anyio.create_task_group() as tg:
        send, receive = anyio.create_memory_object_stream[int](BUFFER_SIZE)
        tg.start_soon(producer, send)
        for fn in STAGES:
            next_send, next_receive = anyio.create_memory_object_stream[int](
                BUFFER_SIZE
            )
            with receive, next_send:
                for _ in range(workers):
                    tg.start_soon(worker, fn, receive.clone(), next_send.clone())
            receive = next_receive
        with receive:
            for _ in range(workers):
                tg.start_soon(consumer, receive.clone())
    tally.verify(n_items, "anyio-fast")


# -- 4. asyncio-queue: the classic asyncio.Queue pipeline (asyncio only) ------------

#: the end-of-stream marker; every worker of a stage gets one
_DONE: Any = object()


async def run_asyncio_queue(n_items: int, workers: int) -> None:
    tally = Tally()
    queues: list[asyncio.Queue[Any]] = [
        asyncio.Queue(maxsize=BUFFER_SIZE) for _ in range(len(STAGES) + 1)
    ]
    # Workers still running per stage: the last one out signals the next stage.
    running = [workers] * len(STAGES)

    async def producer() -> None:
        first = queues[0]
        async for item in produce(n_items):
            await first.put(item)
        for _ in range(workers):
            await first.put(_DONE)

    async def worker(index: int) -> None:
        fn = STAGES[index]
        get, put = queues[index].get, queues[index + 1].put
        while (item := await get()) is not _DONE:
            await put(await fn(item))
        running[index] -= 1
        # Only once every worker of the stage has stopped sending do the markers
        # go in, so they queue up behind the last item.
        if not running[index]:
            for _ in range(workers):
                await put(_DONE)

    async def consumer() -> None:
        get = queues[-1].get
        consume = tally.consume
        while (item := await get()) is not _DONE:
            await consume(item)

    # Tasks are started with anyio (asyncio.TaskGroup needs Python 3.11) so that
    # one failing task cancels the rest instead of leaving them blocked on a queue;
    # the items themselves only ever touch asyncio.Queue.
    async with anyio.create_task_group() as tg:
        tg.start_soon(producer)
        for index in range(len(STAGES)):
            for _ in range(workers):
                tg.start_soon(worker, index)
        for _ in range(workers):
            tg.start_soon(consumer)
    tally.verify(n_items, "asyncio-queue")


# -- 5. plain-loop: no pipeline at all, the floor -----------------------------------


async def run_plain_loop(n_items: int, workers: int) -> None:
    """One task awaiting the three stages and the consumer in turn.

    ``workers`` is ignored: there is nothing to run concurrently.
    """
    tally = Tally()
    a, b, c = STAGES
    consume = tally.consume
    async for item in produce(n_items):
        await consume(await c(await b(await a(item))))
    tally.verify(n_items, "plain-loop")
