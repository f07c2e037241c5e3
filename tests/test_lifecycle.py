"""The lifecycle: run, tg.start, async with, start/wait, stop (drain, abort, timeout,
from inside), and what is refused: starting twice, stopping what never started."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import _probe
import anyio
import pytest
from _probe import check_accounting

from flowrhythm import FixedScaling, Flow

pytestmark = pytest.mark.anyio

#: a deadlock guard only: no test depends on how long anything takes
GUARD = 10


# -- probe: what the flow did, seen from the user's callables ------------------------


class Probe(_probe.Probe):
    def __init__(self) -> None:
        super().__init__()
        self.consumer_finally = 0


async def identity(x: int) -> int:
    return x


def build(
    probe: Probe,
    consumer: Any,
    *,
    n: int | None = None,
    workers: int = 2,
    buffer_size: int = 4,
) -> Flow:
    flow = Flow(buffer_size=buffer_size)
    flow.set_producer(probe.producer(n))
    flow.add_transformer(
        probe.stage("t1", identity), scaling_strategy=FixedScaling(workers)
    )
    flow.add_transformer(
        probe.stage("t2", identity), scaling_strategy=FixedScaling(workers)
    )
    flow.set_consumer(
        probe.stage("sink", consumer), scaling_strategy=FixedScaling(workers)
    )

    async def handler(item: Any, exc: BaseException) -> None:
        probe.handled.append((item, exc))

    flow.set_error_handler(handler)
    return flow


def collecting(probe: Probe) -> Any:
    async def consume(x: int) -> None:
        probe.consumed.append(x)

    return consume


def stuck_after(probe: Probe, count: int, reached: anyio.Event) -> Any:
    """A consumer that takes ``count`` items, then blocks on every later one."""

    async def consume(x: int) -> None:
        try:
            if len(probe.consumed) >= count:
                reached.set()
                await anyio.sleep_forever()
            probe.consumed.append(x)
        finally:
            probe.consumer_finally += 1

    return consume


# -- ways to run -----------------------------------------------------------------------


async def test_run_to_completion(anyio_backend: Any) -> None:
    probe = Probe()
    flow = build(probe, collecting(probe), n=300)
    with anyio.fail_after(GUARD):
        assert await flow.run() is None
    assert len(probe.consumed) == 300
    assert probe.enters == {"t1": 2, "t2": 2, "sink": 2}
    probe.assert_balanced()
    assert probe.producer_closed
    probe.assert_no_orphans()
    check_accounting(flow, probe, aborted=False)


async def test_task_group_start_signals_once_workers_are_ready(
    anyio_backend: Any,
) -> None:
    probe = Probe()
    release = anyio.Event()
    seen_at_start: dict[str, int] = {}

    async def gated(x: int) -> None:
        await release.wait()
        probe.consumed.append(x)

    flow = build(probe, gated, n=50, workers=3)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            seen_at_start.update(probe.enters)
            release.set()
    assert seen_at_start == {"t1": 3, "t2": 3, "sink": 3}
    assert len(probe.consumed) == 50
    probe.assert_balanced()
    probe.assert_no_orphans()
    check_accounting(flow, probe, aborted=False)


async def test_async_with_waits_for_the_flow_when_the_block_ends(
    anyio_backend: Any,
) -> None:
    probe = Probe()
    block_done = anyio.Event()

    async def late() -> AsyncIterator[int]:
        await block_done.wait()  # nothing moves until the block's body is over
        for i in range(40):
            probe.produced.append(i)
            yield i

    flow = build(probe, collecting(probe))
    flow.set_producer(late)
    with anyio.fail_after(GUARD):
        async with flow:
            await flow.start()
            block_done.set()
            assert probe.consumed == []
    assert len(probe.consumed) == 40
    probe.assert_balanced()
    probe.assert_no_orphans()
    check_accounting(flow, probe, aborted=False)


async def test_async_with_wait_inside_the_block(anyio_backend: Any) -> None:
    probe = Probe()
    flow = build(probe, collecting(probe), n=30)
    with anyio.fail_after(GUARD):
        async with flow:
            await flow.start()
            await flow.wait()
            assert len(probe.consumed) == 30
    probe.assert_balanced()
    probe.assert_no_orphans()


class BlockError(Exception):
    pass


async def test_exception_in_the_block_aborts_the_flow_and_propagates(
    anyio_backend: Any,
) -> None:
    probe = Probe()
    reached = anyio.Event()
    flow = build(probe, stuck_after(probe, 5, reached))
    error = BlockError("from the block")

    async def block() -> None:
        async with flow:
            await flow.start()
            await reached.wait()
            raise error

    with anyio.fail_after(GUARD), pytest.raises(BlockError) as info:
        await block()
    assert info.value is error
    probe.assert_balanced()
    assert probe.consumer_finally >= 1
    probe.assert_no_orphans()
    check_accounting(flow, probe, aborted=True)
    assert sum(s.dropped for s in flow.stats().values()) >= 1


async def test_leaving_the_block_without_starting(anyio_backend: Any) -> None:
    flow = build(Probe(), collecting(Probe()), n=3)
    with pytest.raises(RuntimeError, match=r"never started.*flow\.start\(\)"):
        async with flow:
            pass


async def test_block_error_without_start_is_not_masked(anyio_backend: Any) -> None:
    flow = build(Probe(), collecting(Probe()), n=3)
    with pytest.raises(BlockError):
        async with flow:
            raise BlockError


async def test_background_start_and_wait(
    anyio_backend: Any, anyio_backend_name: str
) -> None:
    probe = Probe()
    flow = build(probe, collecting(probe), n=100)
    if anyio_backend_name == "trio":
        with pytest.raises(RuntimeError, match=r"needs asyncio.*async with flow"):
            await flow.start()
        # the refusal did not use the flow up
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                await tg.start(flow.run)
    else:
        with anyio.fail_after(GUARD):
            await flow.start()
            assert probe.enters == {"t1": 2, "t2": 2, "sink": 2}
            await flow.wait()
    assert len(probe.consumed) == 100
    probe.assert_balanced()
    probe.assert_no_orphans()
    check_accounting(flow, probe, aborted=False)


# -- stop ------------------------------------------------------------------------------


def _asyncio_only(name: str) -> None:
    if name != "asyncio":
        pytest.skip("background start() is asyncio-only")


MODES = ["task_group", "async_with", "background"]


@asynccontextmanager
async def running(flow: Flow, mode: str, backend: str) -> AsyncIterator[None]:
    """Start ``flow`` in ``mode``; on leaving, wait for it to end."""
    if mode == "task_group":
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            yield
    elif mode == "async_with":
        async with flow:
            await flow.start()
            yield
    else:
        _asyncio_only(backend)
        await flow.start()
        yield
        await flow.wait()


@pytest.mark.parametrize("mode", MODES)
async def test_stop_drains_everything_inside(
    anyio_backend: Any, anyio_backend_name: str, mode: str
) -> None:
    probe = Probe()
    ten = anyio.Event()

    async def consume(x: int) -> None:
        probe.consumed.append(x)
        if len(probe.consumed) == 10:
            ten.set()

    flow = build(probe, consume)  # an endless producer
    with anyio.fail_after(GUARD):
        async with running(flow, mode, anyio_backend_name):
            await ten.wait()
            assert await flow.stop() is None
            assert flow.stats()["sink"].busy_workers == 0
            assert probe.producer_closed
            probe.assert_balanced()
            probe.assert_no_orphans(strict=False)
    probe.assert_no_orphans()
    assert len(probe.consumed) >= 10
    check_accounting(flow, probe, aborted=False)


@pytest.mark.parametrize("mode", MODES)
async def test_stop_without_drain_aborts(
    anyio_backend: Any, anyio_backend_name: str, mode: str
) -> None:
    probe = Probe()
    reached = anyio.Event()
    flow = build(probe, stuck_after(probe, 10, reached))
    with anyio.fail_after(GUARD):
        async with running(flow, mode, anyio_backend_name):
            await reached.wait()
            await flow.stop(drain=False)
            probe.assert_balanced()
            probe.assert_no_orphans(strict=False)
    probe.assert_no_orphans()
    assert probe.consumer_finally >= 11
    assert len(probe.consumed) == 10
    check_accounting(flow, probe, aborted=True)
    assert flow.stats()["sink"].dropped >= 1


@pytest.mark.parametrize("timeout", [0, 0.01])
async def test_stop_timeout_turns_a_stuck_drain_into_an_abort(
    anyio_backend: Any, timeout: float
) -> None:
    probe = Probe()
    reached = anyio.Event()
    flow = build(probe, stuck_after(probe, 3, reached))
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await reached.wait()
            await flow.stop(timeout=timeout)
            probe.assert_balanced()
            probe.assert_no_orphans(strict=False)
    probe.assert_no_orphans()
    assert probe.producer_closed
    check_accounting(flow, probe, aborted=True)
    assert flow.stats()["sink"].dropped >= 1


async def test_stop_timeout_that_is_not_reached_drains(anyio_backend: Any) -> None:
    probe = Probe()
    ten = anyio.Event()

    async def consume(x: int) -> None:
        probe.consumed.append(x)
        if len(probe.consumed) == 10:
            ten.set()

    flow = build(probe, consume)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await ten.wait()
            await flow.stop(timeout=GUARD * 10)
    probe.assert_balanced()
    check_accounting(flow, probe, aborted=False)


async def test_stop_from_inside_a_consumer_requests_a_drain(anyio_backend: Any) -> None:
    probe = Probe()
    returned: list[int] = []

    async def consume(x: int) -> None:
        if x == 20:
            await flow.stop()  # must not wait for the flow, which waits for us
            returned.append(x)
        probe.consumed.append(x)

    flow = build(probe, consume, workers=1)
    with anyio.fail_after(GUARD):
        await flow.run()
    assert returned == [20]
    assert probe.producer_closed
    probe.assert_balanced()
    probe.assert_no_orphans()
    check_accounting(flow, probe, aborted=False)


async def test_stop_from_inside_a_transformer_without_drain_aborts(
    anyio_backend: Any,
) -> None:
    probe = Probe()
    cut = anyio.Event()
    after_stop: list[int] = []

    async def cutting(x: int) -> int:
        if x == 15:
            await flow.stop(drain=False)
            after_stop.append(x)
            cut.set()
            await anyio.sleep_forever()  # the abort cancels this
        return x

    flow = Flow(buffer_size=2)
    flow.set_producer(probe.producer())
    flow.add_transformer(probe.stage("t1", cutting), scaling_strategy=FixedScaling(2))
    flow.set_consumer(probe.stage("sink", collecting(probe)))
    with anyio.fail_after(GUARD):
        await flow.run()  # an abort is not an error
    assert after_stop == [15]
    assert 15 not in probe.consumed
    probe.assert_balanced()
    probe.assert_no_orphans()
    check_accounting(flow, probe, aborted=True)
    assert flow.stats()["t1"].dropped >= 1


async def test_stop_from_inside_the_producer(anyio_backend: Any) -> None:
    probe = Probe()

    async def produce() -> AsyncIterator[int]:
        i = 0
        while True:
            if i == 25:
                await flow.stop()
            probe.produced.append(i)
            yield i
            i += 1

    flow = build(probe, collecting(probe))
    flow.set_producer(produce)
    with anyio.fail_after(GUARD):
        await flow.run()
    assert 25 <= len(probe.produced) <= 26
    probe.assert_balanced()
    check_accounting(flow, probe, aborted=False)


async def test_stop_from_inside_the_producer_keeps_the_item_it_then_yields(
    anyio_backend: Any,
) -> None:
    """The producer asks for a drain, then yields one more item while the first
    stage is busy (so the hand-over has to wait): that item is inside the flow and
    a drain must deliver it, not drop it."""
    probe = Probe()
    busy = anyio.Event()
    release = anyio.Event()

    async def first(x: int) -> int:
        if x == 0:
            busy.set()
            await release.wait()
        return x

    async def produce() -> AsyncIterator[int]:
        probe.produced.append(0)
        yield 0
        await busy.wait()  # stage one holds item 0 and has no room for more
        await flow.stop()
        release.set()
        probe.produced.append(1)
        yield 1

    flow = Flow(buffer_size=0)
    flow.set_producer(produce)
    flow.add_transformer(first)
    flow.set_consumer(collecting(probe))
    with anyio.fail_after(GUARD):
        await flow.run()
    assert probe.consumed == [0, 1]
    check_accounting(flow, probe, aborted=False)


async def test_stop_from_the_error_handler(anyio_backend: Any) -> None:
    probe = Probe()

    async def failing(x: int) -> int:
        if x == 30:
            raise ValueError(x)
        return x

    async def handler(item: Any, exc: BaseException) -> None:
        await flow.stop()
        probe.handled.append((item, exc))

    flow = Flow()
    flow.set_producer(probe.producer())
    flow.add_transformer(failing)
    flow.set_consumer(collecting(probe))
    flow.set_error_handler(handler)
    with anyio.fail_after(GUARD):
        await flow.run()
    assert [item for item, _ in probe.handled] == [30]
    check_accounting(flow, probe, aborted=False)


async def test_stop_before_start_is_refused(anyio_backend: Any) -> None:
    flow = build(Probe(), collecting(Probe()), n=3)
    with pytest.raises(
        RuntimeError, match=r"cannot stop a flow that was never started"
    ):
        await flow.stop()
    with pytest.raises(
        RuntimeError, match=r"cannot stop a flow that was never started"
    ):
        await flow.stop(drain=False)
    with pytest.raises(
        RuntimeError, match=r"cannot wait for a flow that was never started"
    ):
        await flow.wait()
    # the refusals did not use the flow up
    with anyio.fail_after(GUARD):
        await flow.run()


@pytest.mark.parametrize("drain", [True, False])
async def test_stop_after_the_end_is_a_no_op(anyio_backend: Any, drain: bool) -> None:
    probe = Probe()
    flow = build(probe, collecting(probe), n=10)
    with anyio.fail_after(GUARD):
        await flow.run()
        before = _counts(flow)
        assert await flow.stop(drain=drain) is None
        assert await flow.stop(drain=drain, timeout=0) is None
        await flow.wait()
    assert _counts(flow) == before
    check_accounting(flow, probe, aborted=False)


def _counts(flow: Flow) -> dict[str, tuple[int, ...]]:
    return {
        name: (
            s.received,
            s.processed,
            s.errors,
            s.dropped,
            s.busy_workers,
            s.idle_workers,
            s.blocked_workers,
            s.queue_length,
        )
        for name, s in flow.stats().items()
    }


async def test_stop_after_a_failed_run_does_not_raise_again(anyio_backend: Any) -> None:
    async def produce() -> AsyncIterator[int]:
        yield 1
        raise ConnectionError("gone")

    flow = Flow()
    flow.set_producer(produce)
    flow.set_consumer(identity)
    with anyio.fail_after(GUARD), pytest.raises(ConnectionError):
        await flow.run()
    await flow.stop()
    await flow.stop(drain=False)


# -- refused twice -----------------------------------------------------------------------


async def test_run_twice_is_refused(anyio_backend: Any) -> None:
    probe = Probe()
    flow = build(probe, collecting(probe), n=5)
    with anyio.fail_after(GUARD):
        await flow.run()
    with pytest.raises(RuntimeError, match=r"already started \(it is finished\)"):
        await flow.run()
    with pytest.raises(RuntimeError, match=r"already"):
        async with flow:
            await flow.start()
    assert len(probe.consumed) == 5


async def test_start_twice_in_a_block_is_refused(anyio_backend: Any) -> None:
    probe = Probe()
    flow = build(probe, collecting(probe), n=5)
    with anyio.fail_after(GUARD):
        async with flow:
            await flow.start()
            with pytest.raises(RuntimeError, match=r"already started"):
                await flow.start()
    assert len(probe.consumed) == 5
    probe.assert_balanced()


async def test_run_while_running_is_refused(anyio_backend: Any) -> None:
    probe = Probe()
    reached = anyio.Event()
    flow = build(probe, stuck_after(probe, 1, reached))
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            with pytest.raises(
                RuntimeError, match=r"already started \(it is running\)"
            ):
                await flow.run()
            with pytest.raises(RuntimeError, match=r"already"):
                async with flow:
                    pass
            await flow.stop(drain=False)
    probe.assert_balanced()


async def test_background_start_twice_is_refused(
    anyio_backend: Any, anyio_backend_name: str
) -> None:
    _asyncio_only(anyio_backend_name)
    probe = Probe()
    flow = build(probe, collecting(probe), n=5)
    with anyio.fail_after(GUARD):
        await flow.start()
        with pytest.raises(RuntimeError, match=r"already started"):
            await flow.start()
        await flow.wait()
    assert len(probe.consumed) == 5


# -- cancellation from outside --------------------------------------------------------


async def test_cancelling_the_caller_of_run(anyio_backend: Any) -> None:
    probe = Probe()
    reached = anyio.Event()
    with anyio.CancelScope() as scope:
        consumer = stuck_after(probe, 7, reached)

        async def cancelling(x: int) -> None:
            if len(probe.consumed) == 7:
                scope.cancel()
            await consumer(x)

        flow = build(probe, cancelling)
        with anyio.fail_after(GUARD):
            await flow.run()
    assert scope.cancelled_caught
    probe.assert_balanced()
    probe.assert_no_orphans()
    assert probe.producer_closed
    check_accounting(flow, probe, aborted=True)


async def test_move_on_after_around_run(anyio_backend: Any) -> None:
    probe = Probe()
    reached = anyio.Event()
    flow = build(probe, stuck_after(probe, 5, reached))
    with anyio.fail_after(GUARD):
        with anyio.move_on_after(0.05) as scope:
            await flow.run()  # can only end by being cancelled
    assert scope.cancelled_caught
    probe.assert_balanced()
    probe.assert_no_orphans()
    check_accounting(flow, probe, aborted=True)


async def test_cancelling_the_async_with_block(anyio_backend: Any) -> None:
    probe = Probe()
    reached = anyio.Event()
    flow = build(probe, stuck_after(probe, 5, reached))
    with anyio.fail_after(GUARD), anyio.CancelScope() as scope:
        async with flow:
            await flow.start()
            await reached.wait()
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    probe.assert_balanced()
    probe.assert_no_orphans()
    check_accounting(flow, probe, aborted=True)


async def test_cancelling_the_task_group_hosting_the_flow(anyio_backend: Any) -> None:
    probe = Probe()
    reached = anyio.Event()
    flow = build(probe, stuck_after(probe, 5, reached))
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await reached.wait()
            tg.cancel_scope.cancel()
    probe.assert_balanced()
    probe.assert_no_orphans()
    check_accounting(flow, probe, aborted=True)


async def test_cancelling_wait_cancels_a_background_flow(
    anyio_backend: Any, anyio_backend_name: str
) -> None:
    _asyncio_only(anyio_backend_name)
    probe = Probe()
    reached = anyio.Event()
    flow = build(probe, stuck_after(probe, 5, reached))
    with anyio.fail_after(GUARD):
        await flow.start()
        try:
            with anyio.CancelScope() as scope:
                await reached.wait()
                scope.cancel()
                await flow.wait()
            assert scope.cancelled_caught
            probe.assert_balanced()
            probe.assert_no_orphans()
        finally:
            await flow.stop(drain=False)  # no leftover tasks for later tests
    check_accounting(flow, probe, aborted=True)


async def test_run_in_an_already_cancelled_scope(anyio_backend: Any) -> None:
    """Cancelled before it could start: nothing runs, nothing is left behind."""
    probe = Probe()
    flow = build(probe, collecting(probe), n=10)
    with anyio.fail_after(GUARD), anyio.CancelScope() as scope:
        scope.cancel()
        await flow.run()
    assert scope.cancelled_caught
    assert probe.produced == []
    probe.assert_balanced()
    probe.assert_no_orphans()
    check_accounting(flow, probe, aborted=True)


async def test_drain_requested_while_the_producer_wakes_keeps_its_item(
    anyio_backend: Any,
) -> None:
    """The producer's source has just been woken (its wait is over, the task is
    scheduled but has not run) when a drain is requested from outside. It then
    yields an item while the first stage is busy, so the hand-over has to wait:
    that item is inside the flow and the drain must deliver it."""
    probe = Probe()
    go = anyio.Event()
    busy = anyio.Event()
    release = anyio.Event()
    stop_called = anyio.Event()

    async def first(x: int) -> int:
        if x == 0:
            busy.set()
            await release.wait()
        return x

    async def produce() -> AsyncIterator[int]:
        probe.produced.append(0)
        yield 0
        await go.wait()
        probe.produced.append(1)
        yield 1
        await anyio.sleep_forever()  # only the drain ends the source

    async def release_when_settled() -> None:
        await stop_called.wait()
        await anyio.wait_all_tasks_blocked()
        release.set()

    flow = Flow(buffer_size=0)
    flow.set_producer(produce)
    flow.add_transformer(first)
    flow.set_consumer(collecting(probe))
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            tg.start_soon(release_when_settled)
            await busy.wait()
            await anyio.wait_all_tasks_blocked()  # the source waits for 'go'
            go.set()  # wakes the producer...
            stop_called.set()
            await flow.stop()  # ...and asks for a drain before it has run
    assert probe.consumed == probe.produced
    check_accounting(flow, probe, aborted=False)
