"""Flow: the builder (set_*/add_*) and the lifecycle (run, start/wait/stop, async with)."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from ._callables import (
    StageCallable,
    callable_name,
    is_fan_out,
    producer_source,
    stage_callable,
)
from ._describe import describe, to_mermaid
from ._errors import add_note
from ._operators import RateLimit, Retry
from ._plan import Plan, Source, StagePlan
from ._run import Run, current_run
from ._stats import StageCounters, StageStats
from ._types import Consumer, ErrorHandler, Producer, Transformer
from .scaling import FixedScaling, ScalingStrategy, _check_int

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from rich.console import Console
    from typing_extensions import Self

    from .monitor import FlowView

#: the default capacity of each stage's input buffer
DEFAULT_BUFFER_SIZE = 64


class Flow:
    """A pipeline: one producer, chained transformer stages, one consumer.

    Configure it with the ``set_*``/``add_*`` methods, then run it in one of three
    ways: ``await flow.run()`` (or ``await tg.start(flow.run)`` in your own task
    group), ``async with flow: await flow.start()``, or, on asyncio,
    ``await flow.start(); await flow.wait()``.

    :param default_scaling_strategy: the strategy of stages configured without one
        (default: one worker per stage)
    :param buffer_size: the capacity of each stage's input buffer, unless the stage
        sets its own
    :param clock: the time source for stats and scaling (default: the event loop's
        clock); if it also has an async ``sleep(seconds)`` method, batching
        windows, retry backoff, rate limits and timeouts wait on it too (see
        :class:`flowrhythm.testing.ManualClock`)
    """

    def __init__(
        self,
        *,
        default_scaling_strategy: ScalingStrategy | None = None,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._default_scaling: ScalingStrategy = FixedScaling(1)
        if default_scaling_strategy is not None:
            self._default_scaling = _check_strategy(
                default_scaling_strategy, "default_scaling_strategy"
            )
        _check_int("buffer_size", buffer_size, minimum=0)
        if clock is not None and not callable(clock):
            raise TypeError(
                f"clock must be a callable returning seconds, got {clock!r}"
            )
        self._buffer_size = buffer_size
        self._clock = clock
        self._source: Source | None = None
        self._producer_name: str | None = None
        self._transformers: list[StagePlan] = []
        self._consumer: StagePlan | None = None
        self._error_handler: Any = None
        self._run: Run | None = None
        self._host: TaskGroup | None = None
        self._background: asyncio.Task[None] | None = None
        self._failure_delivered = False

    # -- configuration --------------------------------------------------------------

    def set_producer(self, producer: Producer) -> None:
        """Set where items come from.

        :param producer: an async generator function, an async iterable, a
            zero-argument callable returning one, or an async context manager
            factory yielding one; it runs as exactly one task
        """
        self._check_configurable()
        self._source = producer_source(producer)
        self._producer_name = callable_name(producer) or type(producer).__name__

    def add_transformer(
        self,
        transformer: Transformer,
        *,
        name: str | None = None,
        scaling_strategy: ScalingStrategy | None = None,
        buffer_size: int | None = None,
        ordered: bool = False,
        timeout: float | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        """Append a stage that maps each item to a new one, or to 0..n new ones.

        :param transformer: ``async def f(item) -> result``; an async generator
            function ``async def f(item): yield ...`` (fan-out: every value it
            yields is sent on); or a zero-argument factory of async context
            managers yielding an async function (entered once per worker)
        :param name: the stage's name in stats (default: the callable's name)
        :param scaling_strategy: this stage's strategy (default: the flow's)
        :param buffer_size: capacity of this stage's input buffer (default: the
            flow's)
        :param ordered: emit in input order, however many workers run
        :param timeout: seconds one call may take; a slower call is cancelled and
            fails with ``TimeoutError`` (for fan-out: each step of the generator)
        :param retry: call again on failure, see :class:`Retry`
        :param rate_limit: calls per second for the whole stage, see
            :class:`RateLimit`
        """
        self._check_configurable()
        name = self._stage_name(name, transformer, "transformer")
        role = f"transformer {name!r}"
        _check_bool(f"{role}: ordered", ordered)
        self._transformers.append(
            self._stage_plan(
                "transformer",
                name,
                transformer,
                scaling_strategy,
                buffer_size,
                fan_out=is_fan_out(transformer),
                ordered=ordered,
                timeout=timeout,
                retry=retry,
                rate_limit=rate_limit,
            )
        )

    def add_filter(
        self,
        predicate: Consumer,
        *,
        name: str | None = None,
        scaling_strategy: ScalingStrategy | None = None,
        buffer_size: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Append a stage that passes on the items for which ``predicate`` is true.

        Rejected items leave the flow; the stage counts them as ``filtered`` (and
        as ``processed``). With several workers, items may be reordered.

        :param predicate: ``async def keep(item) -> bool``, or a context manager
            factory yielding one
        :param timeout: seconds one call may take, as for :meth:`add_transformer`
        """
        self._check_configurable()
        name = self._stage_name(name, predicate, "filter")
        self._transformers.append(
            self._stage_plan(
                "filter",
                name,
                predicate,
                scaling_strategy,
                buffer_size,
                timeout=timeout,
            )
        )

    def add_batch(
        self,
        max_size: int,
        *,
        max_wait: float | None = None,
        name: str | None = None,
        buffer_size: int | None = None,
    ) -> None:
        """Append a stage that groups items into lists of up to ``max_size``.

        A partial list is sent on once ``max_wait`` seconds have passed since it
        took its first item (``None``: only full lists, and the last one), and when
        the input ends (a drain). On an abort, the items of a pending list count as
        dropped. The stage is one task; it takes no scaling strategy. Split batches
        again with a fan-out transformer.

        :param max_size: the largest list sent on (>= 1)
        :param max_wait: seconds a partial list may wait (> 0), or ``None``
        :param name: the stage's name (default: ``"batch"``, numbered if taken)
        :param buffer_size: capacity of this stage's input buffer
        """
        self._check_configurable()
        if name is None:
            taken = {plan.name for plan in self._stage_plans()}
            candidates = itertools.chain(
                ("batch",), (f"batch_{n}" for n in itertools.count(2))
            )
            name = next(name for name in candidates if name not in taken)
        name = self._stage_name(name, None, "batch")
        role = f"batch {name!r}"
        _check_int(f"{role}: max_size", max_size, minimum=1)
        if max_wait is not None:
            _check_positive_seconds(f"{role}: max_wait", max_wait)
        if buffer_size is not None:
            _check_int(f"{role}: buffer_size", buffer_size, minimum=0)
        self._transformers.append(
            StagePlan(
                name,
                "batch",
                StageCallable(role, _never_called, None),
                FixedScaling(1),
                buffer_size,
                max_size=max_size,
                max_wait=max_wait,
            )
        )

    def set_consumer(
        self,
        consumer: Consumer,
        *,
        name: str | None = None,
        scaling_strategy: ScalingStrategy | None = None,
        buffer_size: int | None = None,
        timeout: float | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        """Set the sink: ``async def f(item)``, or a context manager factory as for
        :meth:`add_transformer`, which also explains the other options. Its return
        value is ignored."""
        self._check_configurable()
        previous, self._consumer = self._consumer, None
        try:
            name = self._stage_name(name, consumer, "consumer")
            self._consumer = self._stage_plan(
                "consumer",
                name,
                consumer,
                scaling_strategy,
                buffer_size,
                timeout=timeout,
                retry=retry,
                rate_limit=rate_limit,
            )
        except BaseException:
            self._consumer = previous
            raise

    def set_error_handler(self, error_handler: ErrorHandler) -> None:
        """Set what receives failed items: ``async def handler(item, exc)``, or a
        zero-argument factory of async context managers yielding one (entered once
        per run). Without one, failures are logged on the ``flowrhythm`` logger."""
        self._check_configurable()
        self._error_handler = stage_callable(error_handler, "error handler", arity=2)

    def set_default_scaling_strategy(self, strategy: ScalingStrategy) -> None:
        """Set the strategy of every stage configured without its own."""
        self._check_configurable()
        self._default_scaling = _check_strategy(strategy, "default_scaling_strategy")

    # -- lifecycle ------------------------------------------------------------------

    async def run(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the flow to completion in the calling task.

        Works with ``await task_group.start(flow.run)``: started is signalled once
        every stage has its initial workers.

        :raises RuntimeError: if the flow was started before
        :raises BaseException: the flow's first fatal error, as itself
        """
        run = self._begin()
        try:
            await run.execute(task_status)
        except BaseException as exc:
            if exc is run.fatal:
                self._failure_delivered = True
            raise

    async def start(self) -> None:
        """Start the flow and return once every stage has its initial workers.

        Inside ``async with flow:`` the flow runs in the block's task group. Outside
        one, on asyncio, it runs in a background task the flow owns; join it with
        :meth:`wait`. Trio has no such tasks: use ``async with`` or
        ``nursery.start(flow.run)``.
        """
        if self._host is not None:
            await self._host.start(self._run_hosted)
            return
        if anyio.get_cancelled_exc_class() is not asyncio.CancelledError:
            raise RuntimeError(
                "flow.start() outside 'async with flow:' needs asyncio; on this event "
                "loop, use 'async with flow: await flow.start()' or "
                "'await nursery.start(flow.run)'"
            )
        run = self._begin()
        loop = asyncio.get_running_loop()
        status = _FutureStatus(loop.create_future())
        self._background = loop.create_task(_run_quietly(run, status))
        try:
            await asyncio.wait(
                {status.future, self._background}, return_when="FIRST_COMPLETED"
            )
        except BaseException:
            run.abort()
            raise
        if not status.future.done():
            assert run.fatal is not None
            self._failure_delivered = True
            raise run.fatal

    async def wait(self) -> None:
        """Wait until the flow has finished; raise its fatal error, if it had one.

        Cancelling ``wait()`` on a flow started outside ``async with`` (a background
        flow) aborts the flow, waits for its cleanup, and re-raises the
        cancellation; inside a block or task group the flow belongs to that scope
        and keeps running.

        :raises RuntimeError: if the flow was never started
        """
        run = self._require_run("wait for")
        if current_run.get() is run:
            raise RuntimeError(
                "flow.wait() was called from inside the flow, which would wait for "
                "itself forever; call flow.stop() to end it from inside"
            )
        try:
            await self._join(run)
        except anyio.get_cancelled_exc_class():
            if self._background is not None:
                # The waiter owns a background flow: nobody is left to await its
                # outcome, so it stops too, before the cancellation goes on.
                run.abort()
                with anyio.CancelScope(shield=True):
                    await self._join(run)
            raise
        self._raise_failure(run)

    async def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the flow and wait until it has finished.

        :param drain: ``True`` stops the producer and lets every item already inside
            finish; ``False`` aborts at once (workers cancelled, context managers
            exited, unfinished items counted as dropped)
        :param timeout: seconds a drain may take before it turns into an abort
        :raises RuntimeError: if the flow was never started

        Called from inside the flow (a stage, the producer, the error handler), it
        only requests the stop and returns, since the flow cannot wait for itself.
        """
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
                raise TypeError(f"timeout must be a number of seconds, got {timeout!r}")
            if not timeout >= 0:  # also NaN
                raise ValueError(f"timeout must be >= 0, got {timeout!r}")
        run = self._require_run("stop")
        if run.state == "finished":
            return
        if drain:
            run.request_drain()
        else:
            run.abort()
        if current_run.get() is run:
            # The flow cannot wait for itself; a timeout still bounds the drain.
            if drain and timeout is not None:
                run.abort_after(timeout)
            return
        if drain and timeout is not None:
            with anyio.move_on_after(timeout):
                await run.finished.wait()
            if not run.finished.is_set():
                run.abort()
        await self._join(run)
        self._raise_failure(run)

    def stats(self) -> Mapping[str, StageStats]:
        """Return a snapshot of every stage, by stage name, in pipeline order.

        Readable before, during and after a run; once a run has ended,
        ``received == processed + errors + dropped`` holds for every stage.
        """
        if self._run is not None:
            # After the run, the event loop (and its clock) may be gone.
            now = self._run.ended_at
            if now is None:
                now = self._run.clock()
            return {
                counters.name: counters.snapshot(now) for counters in self._run.counters
            }
        return {
            plan.name: StageCounters(plan.name).snapshot()
            for plan in self._stage_plans()
        }

    @property
    def state(self) -> str:
        """``"not started"``, ``"running"`` or ``"finished"``."""
        if self._run is None:
            return "not started"
        return "finished" if self._run.state == "finished" else "running"

    def describe(self) -> str:
        """Return a plain-text outline of the flow: producer, stages, error handler."""
        return describe(self)

    def to_mermaid(self) -> str:
        """Return the flow as a Mermaid ``flowchart LR`` diagram."""
        return to_mermaid(self)

    def monitor(
        self, *, refresh_per_second: float = 4.0, console: Console | None = None
    ) -> AbstractAsyncContextManager[FlowView]:
        """Show a live terminal view of the stages while an ``async with`` block
        runs; see :func:`flowrhythm.monitor.monitor` (needs ``flowrhythm[rich]``)."""
        from .monitor import monitor

        return monitor(self, refresh_per_second=refresh_per_second, console=console)

    # -- async with -----------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._host is not None or self._run is not None:
            raise RuntimeError("this flow was already entered or started")
        host = anyio.create_task_group()
        await host.__aenter__()
        self._host = host
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        host, run = self._host, self._run
        assert host is not None
        self._host = None
        cancelled = anyio.get_cancelled_exc_class()
        if exc is not None and not isinstance(exc, cancelled):
            # The block failed: abort the flow, then let the block's error propagate.
            if run is not None:
                run.abort()
            await host.__aexit__(None, None, None)
            if run is not None and run.fatal is not None and run.fatal is not exc:
                add_note(exc, f"the flow also failed while stopping: {run.fatal!r}")
            return None
        if exc is not None:
            # Cancelled: from outside, or by us because the flow failed. A fatal
            # error of the flow wins over the cancellation, as with run().
            try:
                handled = await host.__aexit__(exc_type, exc, tb)
            except BaseException:
                if (
                    run is not None
                    and run.fatal is not None
                    and not self._failure_delivered
                ):
                    self._failure_delivered = True
                    raise run.fatal from None
                raise
            if (
                run is not None
                and run.fatal is not None
                and not self._failure_delivered
            ):
                self._failure_delivered = True
                raise run.fatal
            return handled
        await host.__aexit__(None, None, None)
        if run is None:
            raise RuntimeError(
                "the flow was never started: call 'await flow.start()' inside "
                "'async with flow:'"
            )
        if run.fatal is not None and not self._failure_delivered:
            self._raise_failure(run)
        return None

    # -- internals ------------------------------------------------------------------

    async def _run_hosted(self, *, task_status: TaskStatus[None]) -> None:
        run = self._begin()
        try:
            await run.execute(task_status)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException:
            if not run.started:
                raise  # host.start() raises it in the block
            # Stop the block's body; __aexit__ raises the failure as itself.
            if self._host is not None:
                self._host.cancel_scope.cancel()

    def _begin(self) -> Run:
        if self._run is not None:
            raise RuntimeError(
                f"this flow was already started (it is {self._run.state})"
            )
        run = Run(self._plan())
        self._run = run
        return run

    async def _join(self, run: Run) -> None:
        await run.finished.wait()
        if self._background is not None:
            await asyncio.wait({self._background})

    def _raise_failure(self, run: Run) -> None:
        if run.fatal is not None:
            self._failure_delivered = True
            raise run.fatal

    def _require_run(self, what: str) -> Run:
        if self._run is None:
            raise RuntimeError(f"cannot {what} a flow that was never started")
        return self._run

    def _check_configurable(self) -> None:
        if self._run is not None:
            raise RuntimeError("a flow cannot be configured after it has started")

    def _stage_plans(self) -> list[StagePlan]:
        plans = list(self._transformers)
        if self._consumer is not None:
            plans.append(self._consumer)
        return plans

    def _stage_name(self, name: str | None, obj: object, kind: str) -> str:
        if name is None:
            name = callable_name(obj) or kind
        elif not isinstance(name, str) or not name:
            raise TypeError(f"{kind} name must be a non-empty str, got {name!r}")
        taken = {plan.name for plan in self._stage_plans()}
        if name in taken:
            raise ValueError(
                f"a stage named {name!r} already exists; pass a unique name= to "
                f"tell the stages apart"
            )
        return name

    def _stage_plan(
        self,
        kind: str,
        name: str,
        obj: object,
        scaling_strategy: ScalingStrategy | None,
        buffer_size: int | None,
        *,
        fan_out: bool = False,
        ordered: bool = False,
        timeout: float | None = None,
        retry: Retry | None = None,
        rate_limit: RateLimit | None = None,
    ) -> StagePlan:
        role = f"{kind} {name!r}"
        call = stage_callable(obj, role, arity=1, fan_out=fan_out)
        if scaling_strategy is not None:
            _check_strategy(scaling_strategy, f"{role}: scaling_strategy")
        if buffer_size is not None:
            _check_int(f"{role}: buffer_size", buffer_size, minimum=0)
        if timeout is not None:
            _check_positive_seconds(f"{role}: timeout", timeout)
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(
                f"{role}: retry must be a flowrhythm.Retry, e.g. Retry(attempts=3), "
                f"got {retry!r}"
            )
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            raise TypeError(
                f"{role}: rate_limit must be a flowrhythm.RateLimit, e.g. "
                f"RateLimit(per_second=10), got {rate_limit!r}"
            )
        return StagePlan(
            name,
            kind,
            call,
            scaling_strategy,
            buffer_size,
            fan_out=fan_out,
            ordered=ordered,
            timeout=timeout,
            retry=retry,
            rate_limit=rate_limit,
        )

    def _plan(self) -> Plan:
        if self._source is None:
            raise RuntimeError(
                "the flow has no producer: call flow.set_producer() first"
            )
        if self._consumer is None:
            raise RuntimeError(
                "the flow has no consumer: call flow.set_consumer() first"
            )
        return Plan(
            source=self._source,
            stages=tuple(self._stage_plans()),
            error_handler=self._error_handler,
            default_scaling=self._default_scaling,
            default_buffer_size=self._buffer_size,
            clock=self._clock,
        )

    def __repr__(self) -> str:
        names = " -> ".join(plan.name for plan in self._stage_plans()) or "no stages"
        state = self._run.state if self._run is not None else "not started"
        return f"<Flow {names} ({state})>"


def _check_bool(what: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}")


def _check_positive_seconds(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"{what} must be a finite number of seconds > 0, got {value!r}"
        )


async def _never_called(item: Any) -> Any:  # a batch stage calls no function
    raise AssertionError("unreachable")  # pragma: no cover


def _check_strategy(strategy: object, what: str) -> ScalingStrategy:
    if not isinstance(strategy, ScalingStrategy):
        raise TypeError(
            f"{what} must be a ScalingStrategy (FixedScaling, UtilizationScaling or a "
            f"subclass), got {strategy!r}"
        )
    return strategy


class _FutureStatus(TaskStatus[None]):
    """A task status that resolves an asyncio future (for the background task)."""

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def started(self, value: None = None) -> None:
        if not self.future.done():
            self.future.set_result(None)


async def _run_quietly(run: Run, status: _FutureStatus) -> None:
    # The outcome lives on the run (fatal) and is raised by wait()/stop().
    try:
        await run.execute(status)
    except BaseException:
        if run.fatal is None:
            raise
