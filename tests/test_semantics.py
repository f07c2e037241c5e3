"""The guarantees: conservation (also when aborted), balanced context managers on
every exit path, no orphans, order, back-pressure, and loud failure as the original
exception."""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import _probe
import anyio
import pytest
from anyio.lowlevel import checkpoint

from flowrhythm import FixedScaling, Flow

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.anyio

#: a deadlock guard only: no test depends on how long anything takes
GUARD = 10


# -- probe ---------------------------------------------------------------------------


class Boom(Exception):
    """What a stage raises for an item it rejects."""

    def __init__(self, stage: str, item: int) -> None:
        super().__init__(stage, item)
        self.stage = stage
        self.item = item


class Probe(_probe.Probe):
    def __init__(self) -> None:
        super().__init__()
        self.finally_ran = 0


def check_accounting(flow: Flow, probe: Probe, *, aborted: bool) -> None:
    """Conservation, and each stage's errors are the items it rejected."""
    _probe.check_accounting(flow, probe, aborted=aborted)
    stats = flow.stats()
    errors = Counter(exc.stage for _, exc in probe.handled if isinstance(exc, Boom))
    for name, stage in stats.items():
        assert stage.errors == errors[name], name


def failing_every(name: str, modulus: int, residue: int) -> Any:
    async def transform(x: int) -> int:
        if x % modulus == residue:
            raise Boom(name, x)
        return x

    return transform


def pipeline(
    probe: Probe,
    consumer: Any,
    *,
    n: int | None = None,
    fail_at: int | None = None,
    workers: tuple[int, int, int] = (2, 2, 2),
    buffer_size: int = 2,
) -> Flow:
    """producer -> t1 (fails x % 7 == 3) -> t2 (fails x % 11 == 5) -> sink."""
    flow = Flow(buffer_size=buffer_size)
    flow.set_producer(probe.producer(n, fail_at=fail_at))
    flow.add_transformer(
        probe.stage("t1", failing_every("t1", 7, 3)),
        scaling_strategy=FixedScaling(workers[0]),
    )
    flow.add_transformer(
        probe.stage("t2", failing_every("t2", 11, 5)),
        scaling_strategy=FixedScaling(workers[1]),
    )
    flow.set_consumer(
        probe.stage("sink", consumer), scaling_strategy=FixedScaling(workers[2])
    )
    flow.set_error_handler(probe.handler)
    return flow


# -- conservation when the flow drains ---------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "buffer_size"),
    [((1, 1, 1), 0), ((3, 2, 4), 1), ((2, 4, 3), 64)],
)
async def test_conservation_on_a_full_run(
    anyio_backend: Any, workers: tuple[int, int, int], buffer_size: int
) -> None:
    probe = Probe()

    async def consume(x: int) -> None:
        probe.consumed.append(x)

    flow = pipeline(probe, consume, n=400, workers=workers, buffer_size=buffer_size)
    with anyio.fail_after(GUARD):
        await flow.run()
    check_accounting(flow, probe, aborted=False)
    assert flow.stats()["t1"].errors == len([x for x in range(400) if x % 7 == 3])
    probe.assert_balanced()
    assert probe.enters == dict(zip(("t1", "t2", "sink"), workers, strict=True))
    probe.assert_no_orphans()


# -- conservation when the flow is cut -------------------------------------------------

ABORTS = [
    "stop_outside",
    "stop_inside",
    "stop_timeout",
    "outer_cancel",
    "block_error",
    "producer_fails",
    "handler_fails",
]
SHAPES = [
    pytest.param((1, 1, 1), 0, id="1-1-1-buf0"),
    pytest.param((3, 2, 2), 1, id="3-2-2-buf1"),
    pytest.param((2, 4, 3), 5, id="2-4-3-buf5"),
]


class BlockError(Exception):
    pass


class HandlerError(Exception):
    pass


@pytest.mark.parametrize("how", ABORTS)
@pytest.mark.parametrize(("workers", "buffer_size"), SHAPES)
async def test_conservation_when_cut(
    anyio_backend: Any, how: str, workers: tuple[int, int, int], buffer_size: int
) -> None:
    """Cut a busy flow (items everywhere: buffers, workers, the producer's hand)
    and account for every item the producer yielded."""
    probe = Probe()
    reached = anyio.Event()
    # the fatal-error cuts come from inside the flow: the consumer keeps going
    stalls = how not in ("producer_fails", "handler_fails")
    threshold = 25 if stalls else math.inf

    with anyio.CancelScope() as outer:

        async def consume(x: int) -> None:
            try:
                if len(probe.consumed) >= threshold:
                    reached.set()
                    if how == "stop_inside":
                        await flow.stop(drain=False)
                    elif how == "outer_cancel":
                        outer.cancel()
                    await anyio.sleep_forever()
                probe.consumed.append(x)
            finally:
                probe.finally_ran += 1

        flow = pipeline(
            probe,
            consume,
            fail_at=40 if how == "producer_fails" else None,
            workers=workers,
            buffer_size=buffer_size,
        )
        if how == "handler_fails":

            async def handler(item: Any, exc: BaseException) -> None:
                if len(probe.handled) == 4:
                    raise HandlerError(item)
                probe.handled.append((item, exc))

            flow.set_error_handler(handler)

        expected: type[BaseException] | None = {
            "block_error": BlockError,
            "producer_fails": ConnectionError,
            "handler_fails": HandlerError,
        }.get(how)
        caught: Exception | None = None
        with anyio.fail_after(GUARD):
            try:
                if how in ("stop_outside", "stop_timeout"):
                    async with anyio.create_task_group() as tg:
                        await tg.start(flow.run)
                        await reached.wait()
                        if how == "stop_outside":
                            await flow.stop(drain=False)
                        else:
                            await flow.stop(timeout=0.01)
                elif how == "block_error":
                    async with flow:
                        await flow.start()
                        await reached.wait()
                        raise BlockError
                else:
                    await flow.run()
            except Exception as exc:
                caught = exc
    if expected is None:
        assert caught is None
    else:
        assert type(caught) is expected, caught
    assert outer.cancelled_caught == (how == "outer_cancel")
    probe.assert_balanced()
    probe.assert_no_orphans()
    assert probe.producer_closed
    check_accounting(flow, probe, aborted=True)
    if stalls:
        assert len(probe.consumed) == threshold
    else:
        assert len(probe.consumed) < 40


async def test_item_held_by_the_producer_counts_as_dropped_by_stage_one(
    anyio_backend: Any,
) -> None:
    """Stage one is busy and has no buffer: the producer's next item waits in its
    hand. An abort then cuts it; it was yielded, so stage one received and dropped
    it."""
    probe = Probe()
    busy = anyio.Event()

    async def first(x: int) -> int:
        busy.set()
        await anyio.sleep_forever()
        return x  # pragma: no cover

    flow = Flow(buffer_size=0)
    flow.set_producer(probe.producer())
    flow.add_transformer(first)
    flow.set_consumer(probe.stage("sink", lambda_consume(probe)))
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await busy.wait()
            await anyio.wait_all_tasks_blocked()  # the producer now holds item 1
            await flow.stop(drain=False)
    assert probe.produced == [0, 1]
    stats = flow.stats()
    assert (stats["first"].received, stats["first"].dropped) == (2, 2)
    assert stats["first"].processed == 0
    check_accounting(flow, probe, aborted=True)


def lambda_consume(probe: Probe) -> Any:
    async def consume(x: int) -> None:
        probe.consumed.append(x)

    return consume


# -- context managers: every one that entered exits ------------------------------------


async def test_normal_exit_interrupted_by_an_abort_still_completes(
    anyio_backend: Any,
) -> None:
    """A worker leaves its context normally (input ended); while its exit awaits,
    the flow is aborted. The exit must still run to the end, as it does when the
    worker itself is cancelled."""
    exiting = anyio.Event()
    release = anyio.Event()
    completed: list[str] = []

    @asynccontextmanager
    async def sink_cm() -> AsyncIterator[Any]:
        async def consume(x: int) -> None:
            pass

        yield consume
        exiting.set()
        await release.wait()  # e.g. 'await conn.close()'
        completed.append("closed")

    async def produce() -> AsyncIterator[int]:
        yield 1

    flow = Flow()
    flow.set_producer(produce)
    flow.set_consumer(sink_cm)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await exiting.wait()
            tg.start_soon(partial(flow.stop, drain=False))
            await anyio.wait_all_tasks_blocked()  # the abort was requested
            release.set()
    assert completed == ["closed"]


async def test_failing_exit_interrupted_by_an_abort_still_completes(
    anyio_backend: Any,
) -> None:
    """A worker leaves its context because of a fatal error (the error handler
    raised); while its exit awaits, the flow is aborted. The exit must still run
    to the end."""
    exiting = anyio.Event()
    release = anyio.Event()
    completed: list[str] = []
    outcomes: list[BaseException] = []

    @asynccontextmanager
    async def sink_cm() -> AsyncIterator[Any]:
        async def consume(x: int) -> None:
            raise ValueError(x)

        try:
            yield consume
        finally:
            exiting.set()
            await release.wait()  # e.g. 'await conn.close()'
            completed.append("closed")

    async def handler(item: Any, exc: BaseException) -> None:
        raise HandlerError(item)

    async def produce() -> AsyncIterator[int]:
        yield 1

    flow = Flow()
    flow.set_producer(produce)
    flow.set_consumer(sink_cm)
    flow.set_error_handler(handler)

    async def run() -> None:
        try:
            await flow.run()
        except HandlerError as exc:
            outcomes.append(exc)

    async def abort() -> None:
        try:
            await flow.stop(drain=False)
        except HandlerError as exc:  # stop() raises the flow's failure too
            outcomes.append(exc)

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await exiting.wait()
            tg.start_soon(abort)
            await anyio.wait_all_tasks_blocked()  # the abort was requested
            release.set()
    assert completed == ["closed"]
    assert outcomes
    assert all(type(exc) is HandlerError for exc in outcomes)


async def test_error_handler_context_is_entered_once_per_run(
    anyio_backend: Any,
) -> None:
    probe = Probe()
    log: list[str] = []

    @asynccontextmanager
    async def handler_cm() -> AsyncIterator[Any]:
        log.append("enter")
        try:
            yield probe.handler
        finally:
            await checkpoint()
            log.append("exit")

    async def consume(x: int) -> None:
        probe.consumed.append(x)

    flow = pipeline(probe, consume, n=200, workers=(3, 3, 2))
    flow.set_error_handler(handler_cm)
    with anyio.fail_after(GUARD):
        await flow.run()
    assert log == ["enter", "exit"]
    assert len(probe.handled) > 20
    check_accounting(flow, probe, aborted=False)


@pytest.mark.parametrize("how", ["drain", "abort", "outer_cancel", "failure"])
async def test_error_handler_and_producer_contexts_exit(
    anyio_backend: Any, how: str
) -> None:
    probe = Probe()
    log: list[str] = []
    reached = anyio.Event()

    @asynccontextmanager
    async def handler_cm() -> AsyncIterator[Any]:
        log.append("handler enter")
        try:
            yield probe.handler
        finally:
            await checkpoint()
            log.append("handler exit")

    @asynccontextmanager
    async def source() -> AsyncIterator[Any]:
        log.append("source enter")
        try:
            yield probe.producer(
                None if how != "drain" else 100,
                fail_at=50 if how == "failure" else None,
            )()
        finally:
            await checkpoint()
            log.append("source exit")

    async def consume(x: int) -> None:
        if len(probe.consumed) == 30 and how in ("abort", "outer_cancel"):
            reached.set()
            await anyio.sleep_forever()
        probe.consumed.append(x)

    flow = pipeline(probe, consume)
    flow.set_producer(source)
    flow.set_error_handler(handler_cm)
    caught: ExceptionGroup[Exception] | None = None
    with anyio.fail_after(GUARD), anyio.CancelScope() as outer:
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(flow.run)
                if how in ("abort", "outer_cancel"):
                    await reached.wait()
                    if how == "abort":
                        await flow.stop(drain=False)
                    else:
                        outer.cancel()
        except ExceptionGroup as group:  # the task group wraps the failure
            caught = group
    if how == "failure":
        assert caught is not None
        assert caught.subgroup(ConnectionError) is not None
    else:
        assert caught is None
    assert sorted(log) == [
        "handler enter",
        "handler exit",
        "source enter",
        "source exit",
    ]
    assert log.index("source exit") < log.index("handler exit")
    assert probe.producer_closed
    check_accounting(flow, probe, aborted=how != "drain")


class EnterError(Exception):
    pass


async def test_failed_enter_still_exits_the_workers_that_entered(
    anyio_backend: Any,
) -> None:
    entered: list[int] = []
    exited: list[int] = []
    calls = 0

    def factory() -> Any:
        nonlocal calls
        index = calls
        calls += 1

        @asynccontextmanager
        async def cm() -> AsyncIterator[Any]:
            if index == 2:
                while len(entered) < 3:  # fail once the three others are inside
                    await checkpoint()
                raise EnterError(index)
            entered.append(index)
            try:
                yield identity
            finally:
                await checkpoint()
                exited.append(index)

        return cm()

    flow = Flow()
    flow.set_producer(Probe().producer())
    flow.add_transformer(factory, name="pool", scaling_strategy=FixedScaling(4))
    flow.set_consumer(identity)
    with anyio.fail_after(GUARD), pytest.raises(EnterError) as info:
        await flow.run()
    assert info.value.args == (2,)
    assert sorted(entered) == [0, 1, 3]
    assert sorted(exited) == [0, 1, 3]
    assert _flowrhythm_notes(info.value)


async def identity(x: Any) -> Any:
    return x


# -- order ---------------------------------------------------------------------------------


@pytest.mark.parametrize("buffer_size", [0, 1, 64])
@pytest.mark.parametrize("stages", [0, 1, 3])
async def test_single_worker_stages_keep_order(
    anyio_backend: Any, buffer_size: int, stages: int
) -> None:
    got: list[int] = []

    async def produce() -> AsyncIterator[int]:
        for i in range(300):
            yield i

    async def inc(x: int) -> int:
        if x % 10 == 0:
            await checkpoint()
        return x + 1

    async def consume(x: int) -> None:
        got.append(x)

    flow = Flow(buffer_size=buffer_size)
    flow.set_producer(produce)
    for index in range(stages):
        flow.add_transformer(inc, name=f"inc{index}")
    flow.set_consumer(consume)
    with anyio.fail_after(GUARD):
        await flow.run()
    assert got == [i + stages for i in range(300)]


# -- back-pressure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("buffers", "workers"),
    [((0,), (1,)), ((0, 0), (1, 1)), ((3, 0, 2), (2, 1, 3)), ((8, 8), (4, 2))],
)
async def test_producer_lead_is_bounded(
    anyio_backend: Any, buffers: tuple[int, ...], workers: tuple[int, ...]
) -> None:
    produced = 0
    finished = 0
    tokens_in, tokens_out = anyio.create_memory_object_stream[None](math.inf)

    async def produce() -> AsyncIterator[int]:
        nonlocal produced
        i = 0
        while True:
            produced += 1
            yield i
            i += 1

    async def consume(x: int) -> None:
        nonlocal finished
        await tokens_out.receive()
        finished += 1

    flow = Flow()
    flow.set_producer(produce)
    *transformer_specs, consumer_spec = list(zip(buffers, workers, strict=True))
    for index, (buffer_size, count) in enumerate(transformer_specs):
        flow.add_transformer(
            identity,
            name=f"t{index}",
            buffer_size=buffer_size,
            scaling_strategy=FixedScaling(count),
        )
    flow.set_consumer(
        consume,
        buffer_size=consumer_spec[0],
        scaling_strategy=FixedScaling(consumer_spec[1]),
    )
    # every buffer full, every worker holding an item, one in the producer's hand
    capacity = sum(buffers) + sum(workers) + 1
    leads: list[int] = []
    with tokens_in, tokens_out, anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            for release in (0, 1, 5, 17, 3, 40):
                for _ in range(release):
                    tokens_in.send_nowait(None)
                await anyio.wait_all_tasks_blocked()
                leads.append(produced - finished)
            await flow.stop(drain=False)
    assert finished == 66
    assert max(leads) <= capacity + 1, (leads, capacity)
    assert min(leads) >= sum(buffers), (leads, capacity)  # the pipeline did fill up


# -- stats while running -------------------------------------------------------------------


async def test_stats_while_blocked(anyio_backend: Any) -> None:
    """t (2 workers) -> c (1 worker), every buffer 1; c holds its first item."""
    produced = 0
    release = anyio.Event()

    async def produce() -> AsyncIterator[int]:
        nonlocal produced
        for i in range(100):
            produced += 1
            yield i

    async def c(x: int) -> None:
        await release.wait()

    flow = Flow(buffer_size=1)
    flow.set_producer(produce)
    flow.add_transformer(identity, name="t", scaling_strategy=FixedScaling(2))
    flow.set_consumer(c)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            await anyio.wait_all_tasks_blocked()
            stats = flow.stats()
            produced_then = produced
            release.set()
    t_stats, c_stats = stats["t"], stats["c"]
    assert (c_stats.busy_workers, c_stats.idle_workers, c_stats.blocked_workers) == (
        1,
        0,
        0,
    )
    assert c_stats.utilization() == 1.0
    assert (t_stats.busy_workers, t_stats.idle_workers, t_stats.blocked_workers) == (
        0,
        0,
        2,
    )
    assert t_stats.utilization() == 0.0
    assert t_stats.total_workers() == 2
    # c: one in its buffer and two handed over by t's blocked workers
    assert c_stats.queue_length == 3
    assert c_stats.received == 1
    # t: one in its buffer and one in the producer's hand
    assert t_stats.queue_length == 2
    assert t_stats.received == 4
    assert produced_then == 6
    final = flow.stats()
    assert final["c"].processed == 100
    assert final["t"].total_workers() == final["c"].total_workers() == 0


# -- failure is loud -------------------------------------------------------------------------


def _flowrhythm_notes(exc: BaseException) -> list[str]:
    return [
        note for note in getattr(exc, "__notes__", ()) if note.startswith("flowrhythm:")
    ]


async def _sink(x: Any) -> None:
    pass


def _producer_failing_after(count: int, raised: list[BaseException]) -> Any:
    async def produce() -> AsyncIterator[int]:
        for i in range(count):
            yield i
        exc = ConnectionError("upstream went away")
        raised.append(exc)
        raise exc

    return produce


@pytest.mark.parametrize(
    "mode",
    ["run", "async_with_wait", "async_with_sleep", "async_with_leave", "background"],
)
async def test_producer_failure_comes_out_as_itself(
    anyio_backend: Any, anyio_backend_name: str, mode: str
) -> None:
    if mode == "background" and anyio_backend_name != "asyncio":
        pytest.skip("background start() is asyncio-only")
    raised: list[BaseException] = []
    probe = Probe()
    flow = Flow(buffer_size=2)
    flow.set_producer(_producer_failing_after(20, raised))
    flow.add_transformer(probe.stage("t", identity), scaling_strategy=FixedScaling(3))
    flow.set_consumer(probe.stage("sink", _sink))
    caught: BaseException | None = None
    with anyio.fail_after(GUARD):
        try:
            if mode == "run":
                await flow.run()
            elif mode == "background":
                await flow.start()
                await flow.wait()
            else:
                async with flow:
                    await flow.start()
                    if mode == "async_with_wait":
                        await flow.wait()
                    elif mode == "async_with_sleep":
                        await anyio.sleep_forever()
        except ConnectionError as exc:
            caught = exc
    assert caught is not None
    assert caught is raised[0]
    assert _flowrhythm_notes(caught)
    probe.assert_balanced()
    probe.assert_no_orphans()


async def test_error_handler_failure_comes_out_as_itself(anyio_backend: Any) -> None:
    probe = Probe()
    raised: list[BaseException] = []

    async def handler(item: Any, exc: BaseException) -> None:
        error = ConnectionError(f"error sink down for {item}")
        raised.append(error)
        raise error

    async def consume(x: int) -> None:
        probe.consumed.append(x)

    flow = pipeline(probe, consume, n=100)
    flow.set_error_handler(handler)
    with anyio.fail_after(GUARD), pytest.raises(ConnectionError) as info:
        await flow.run()
    assert info.value is raised[0]
    assert len(_flowrhythm_notes(info.value)) >= 1
    probe.assert_balanced()
    probe.assert_no_orphans()


@pytest.mark.parametrize(
    "where", ["transformer", "consumer", "error_handler", "producer"]
)
async def test_context_enter_failure_comes_out_as_itself(
    anyio_backend: Any, where: str
) -> None:
    error = ConnectionError(f"cannot connect ({where})")

    @asynccontextmanager
    async def broken() -> AsyncIterator[Any]:
        raise error
        yield  # pragma: no cover

    probe = Probe()
    flow = Flow()
    flow.set_producer(broken if where == "producer" else probe.producer(10))
    flow.add_transformer(broken if where == "transformer" else identity, name="t")
    flow.set_consumer(broken if where == "consumer" else _sink, name="c")
    if where == "error_handler":
        flow.set_error_handler(broken)
    with anyio.fail_after(GUARD), pytest.raises(ConnectionError) as info:
        await flow.run()
    assert info.value is error
    assert len(_flowrhythm_notes(error)) == 1
    probe.assert_no_orphans()


@pytest.mark.parametrize("where", ["stage", "error_handler"])
async def test_context_exit_failure_comes_out_as_itself(
    anyio_backend: Any, where: str
) -> None:
    error = ConnectionError(f"close failed ({where})")

    @asynccontextmanager
    async def bad_exit() -> AsyncIterator[Any]:
        yield _sink if where == "stage" else Probe().handler
        raise error

    probe = Probe()
    flow = Flow()
    flow.set_producer(probe.producer(10))
    flow.set_consumer(bad_exit if where == "stage" else _sink, name="c")
    if where == "error_handler":
        flow.set_error_handler(bad_exit)
    with anyio.fail_after(GUARD), pytest.raises(ConnectionError) as info:
        await flow.run()
    assert info.value is error
    assert _flowrhythm_notes(error)
    assert flow.stats()["c"].processed == 10


async def test_only_the_first_failure_escapes(
    anyio_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The producer fails; then, while stopping, a worker's context exit fails too.
    The first is raised; the second is a note on it and a log record."""
    second = RuntimeError("cleanup failed too")

    @asynccontextmanager
    async def fragile() -> AsyncIterator[Any]:
        try:
            yield _sink
        except BaseException:
            raise second from None

    async def produce() -> AsyncIterator[int]:
        for i in range(5):
            yield i
        await anyio.wait_all_tasks_blocked()  # the consumer waits for input
        raise ConnectionError("first")

    flow = Flow()
    flow.set_producer(produce)
    flow.set_consumer(fragile)
    with (
        caplog.at_level(logging.ERROR, logger="flowrhythm"),
        anyio.fail_after(GUARD),
        pytest.raises(ConnectionError, match="first") as info,
    ):
        await flow.run()
    notes = _flowrhythm_notes(info.value)
    assert any("cleanup failed too" in note for note in notes), notes
    assert any(
        record.exc_info and record.exc_info[1] is second for record in caplog.records
    )


async def test_item_failures_go_to_the_default_handler_as_log_records(
    anyio_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[int] = []

    async def produce() -> AsyncIterator[int]:
        for i in range(10):
            yield i

    async def picky(x: int) -> int:
        if x in (3, 7):
            raise ValueError(f"bad item {x}")
        return x

    async def consume(x: int) -> None:
        got.append(x)

    flow = Flow()
    flow.set_producer(produce)
    flow.add_transformer(picky)
    flow.set_consumer(consume)
    with caplog.at_level(logging.ERROR, logger="flowrhythm"), anyio.fail_after(GUARD):
        await flow.run()
    assert got == [0, 1, 2, 4, 5, 6, 8, 9]
    records = [
        r
        for r in caplog.records
        if r.name == "flowrhythm" and r.levelno == logging.ERROR
    ]
    assert len(records) == 2
    messages = sorted(str(r.exc_info[1]) for r in records if r.exc_info)
    assert messages == ["bad item 3", "bad item 7"]
    assert flow.stats()["picky"].errors == 2


async def test_error_handler_gets_the_item_and_the_very_exception(
    anyio_backend: Any,
) -> None:
    raised: dict[int, BaseException] = {}
    seen: list[tuple[Any, BaseException]] = []

    async def produce() -> AsyncIterator[int]:
        for i in range(6):
            yield i

    async def first(x: int) -> str:
        return f"item-{x}"

    async def second(x: str) -> str:
        if x.endswith(("2", "5")):
            raised[int(x[-1])] = exc = KeyError(x)
            raise exc
        return x

    async def handler(item: Any, exc: BaseException) -> None:
        seen.append((item, exc))

    flow = Flow()
    flow.set_producer(produce)
    flow.add_transformer(first)
    flow.add_transformer(second)
    flow.set_consumer(_sink)
    flow.set_error_handler(handler)
    with anyio.fail_after(GUARD):
        await flow.run()
    assert [item for item, _ in seen] == ["item-2", "item-5"]
    assert [exc for _, exc in seen] == [raised[2], raised[5]]
    stats = flow.stats()
    assert (stats["first"].errors, stats["second"].errors) == (0, 2)


async def test_base_exception_from_a_stage_is_not_treated_as_an_item_failure(
    anyio_backend: Any,
) -> None:
    """A BaseException that is not an Exception (e.g. SystemExit-like) is not an
    item failure: it must not reach the error handler."""

    class Fatal(BaseException):
        pass

    handled: list[Any] = []

    async def produce() -> AsyncIterator[int]:
        for i in range(10):
            yield i

    async def stage(x: int) -> int:
        if x == 4:
            raise Fatal
        return x

    async def handler(item: Any, exc: BaseException) -> None:
        handled.append(item)

    flow = Flow()
    flow.set_producer(produce)
    flow.add_transformer(stage)
    flow.set_consumer(_sink)
    flow.set_error_handler(handler)
    with anyio.fail_after(GUARD), pytest.raises(Fatal):
        await flow.run()
    assert handled == []
