"""One execution of a plan: the task group, the streams, the producer, shutdown."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import anyio
from anyio import WouldBlock
from anyio.abc import TaskStatus
from anyio.lowlevel import checkpoint

from ._channel import Channel
from ._cleanup import Cleanups, in_cancelled_scope
from ._errors import add_note, spurious_cancellation
from ._loops import CHECKPOINT_EVERY
from ._plan import Plan
from ._stage import Stage
from ._stats import StageCounters
from ._time import Timebase
from .scaling import ScalingPolicy, ScalingStrategy, _check_policy

logger = logging.getLogger("flowrhythm")

#: the run whose tasks the current task belongs to (stop() must not wait for itself)
current_run: ContextVar[Run | None] = ContextVar("flowrhythm_current_run", default=None)


async def log_error(item: Any, exc: BaseException) -> None:
    """The error handler of a flow that was given none: log and go on."""
    logger.error("item %r failed", item, exc_info=exc)


class Run:
    """Everything one run of a flow owns. Created and used inside the event loop."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.timebase = Timebase(plan.clock)
        self.clock = self.timebase.now
        self.counters = [StageCounters(stage.name) for stage in plan.stages]
        self.state = "created"  # -> running -> finished
        self.started = False
        self.finished = anyio.Event()
        self.fatal: BaseException | None = None
        self.ended_at: float | None = None
        self.drain_requested = False
        self.abort_requested = False
        self._scope = anyio.CancelScope()
        self.cleanups = Cleanups()
        self._producer_scope: anyio.CancelScope | None = None
        self._producer_sending = False
        self._handoff_scope: anyio.CancelScope | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._last_stage_done: anyio.Event | None = None
        self._pending_ready = 0
        self._ready = anyio.Event()
        self._error_fn: Callable[[Any, BaseException], Any] = log_error

    # -- control, callable from any task -------------------------------------------

    def _outcome(self) -> str:
        if self.fatal is not None:
            return f"failed: {self.fatal!r}"
        return "aborted" if self.abort_requested else "drained"

    def request_drain(self) -> None:
        """Stop the producer; let everything already inside the flow finish."""
        if not self.drain_requested:
            logger.debug("flow drain requested")
        self.drain_requested = True
        # Interrupt the producer while it waits on its source or a checkpoint. An
        # item it is already handing over is inside the flow and gets delivered; so
        # does one its source yields before the cancellation lands (the producer
        # itself may have asked for the drain): _hand_over shields it.
        if self._producer_scope is not None and not self._producer_sending:
            self._producer_scope.cancel()

    def abort(self) -> None:
        """Cancel every task of the run at once."""
        if not self.abort_requested:
            logger.debug("flow abort requested")
        self.abort_requested = True
        self.drain_requested = True
        self.cancelling()
        self._scope.cancel()

    def cancelling(self) -> None:
        """The run is being cancelled (aborted, or from outside): bound cleanups,
        and stop shielding an item the producer is handing over."""
        self.cleanups.cancelling()
        if self._handoff_scope is not None:
            self._handoff_scope.cancel()

    def abort_after(self, seconds: float) -> None:
        """Abort unless the run has finished within ``seconds`` (from inside)."""
        if self._task_group is None:
            return  # the stages have not started: the drain ends the run at once
        self._task_group.start_soon(self._abort_after, seconds, name="drain timeout")

    async def _abort_after(self, seconds: float) -> None:
        last = self._last_stage_done
        assert last is not None
        with anyio.move_on_after(seconds):
            await last.wait()
        if not last.is_set():
            self.abort()

    def fail(self, exc: BaseException, note: str) -> None:
        """Record a fatal error and abort; the first one is what the run raises."""
        if self.fatal is None:
            if not _has_our_note(exc):
                add_note(exc, note)
            self.fatal = exc
        elif exc is not self.fatal:
            also = f"also {note}" if note else "also raised"
            add_note(self.fatal, f"{also} while the flow was stopping: {exc!r}")
            logger.error("flow error while stopping after a failure", exc_info=exc)
        self.abort()

    def worker_ready(self) -> None:
        self._pending_ready -= 1
        if self._pending_ready == 0:
            self._ready.set()

    # -- the run itself -------------------------------------------------------------

    async def execute(self, task_status: TaskStatus[None]) -> None:
        token = current_run.set(self)
        self.state = "running"
        try:
            with self._scope:
                await self._run_with_error_handler(task_status)
            if not self.started and self.fatal is None:
                # Aborted while starting: the caller of start() gets control back;
                # the flow is already over.
                task_status.started()
        except anyio.get_cancelled_exc_class():
            # Cancelled from outside: a fatal error seen while stopping still wins.
            if self.fatal is None:
                raise
        finally:
            self.ended_at = self.clock()
            for counters in self.counters:
                counters.settle()
            self.state = "finished"
            logger.debug("flow finished (%s)", self._outcome())
            self.finished.set()
            current_run.reset(token)
        if self.fatal is not None:
            raise self.fatal

    async def _run_with_error_handler(self, task_status: TaskStatus[None]) -> None:
        handler = self.plan.error_handler
        if handler is None:
            await self._run_stages(task_status)
            return
        if handler.fn is not None:
            self._error_fn = handler.fn
            await self._run_stages(task_status)
            return
        assert handler.factory is not None
        try:
            cm = handler.factory()
            self._error_fn = await handler.enter(cm)
        except anyio.get_cancelled_exc_class() as exc:
            if in_cancelled_scope():
                raise
            self.fail(spurious_cancellation(exc, "the error handler's context"), "")
            return
        except BaseException as exc:
            self.fail(exc, "raised while entering the error handler's context")
            return
        try:
            await self._run_stages(task_status)
        except BaseException as exc:
            await self._exit_error_handler(cm, exc)
            raise
        await self._exit_error_handler(cm, None)

    async def _exit_error_handler(self, cm: Any, exc: BaseException | None) -> None:
        try:
            await self.cleanups.exit(cm, exc)
        except anyio.get_cancelled_exc_class() as exit_exc:
            if exit_exc is exc or in_cancelled_scope():
                raise
            self.fail(
                spurious_cancellation(exit_exc, "the error handler's context"), ""
            )
        except BaseException as exit_exc:
            if exit_exc is exc:
                return
            self.fail(exit_exc, "raised while exiting the error handler's context")

    async def _run_stages(self, task_status: TaskStatus[None]) -> None:
        plan = self.plan
        # Ask every strategy first: a bad one fails the run before any stream exists.
        try:
            strategies = [plan.scaling_for(stage_plan) for stage_plan in plan.stages]
            initials = [
                _initial_workers(strategy, stage_plan.call.role)
                for strategy, stage_plan in zip(strategies, plan.stages, strict=True)
            ]
        except Exception as exc:
            self.fail(exc, "raised while preparing the scaling strategies")
            return
        first = inbox = Channel(plan.buffer_for(plan.stages[0]))
        stages: list[Stage] = []
        for index, stage_plan in enumerate(plan.stages):
            outbox: Channel | None = None
            if index + 1 < len(plan.stages):
                outbox = Channel(plan.buffer_for(plan.stages[index + 1]))
            stage = Stage(
                self, stage_plan, strategies[index], self.counters[index], inbox, outbox
            )
            if stages:
                stages[-1].next = stage
                stages[-1].counters.output = stage.counters
            stages.append(stage)
            if outbox is not None:
                inbox = outbox
        self._pending_ready = sum(initials)

        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                self.timebase.bind(tg, self.fail)
                self._last_stage_done = stages[-1].done
                # Started in order, so each stage takes items before anything sends.
                for stage, initial in zip(stages, initials, strict=True):
                    await tg.start(
                        stage.supervise, initial, name=f"{stage.plan.name} stage"
                    )
                if self._pending_ready:
                    await self._ready.wait()
                tg.start_soon(self._produce, first, stages[0], name="producer")
                self.started = True
                logger.debug(
                    "flow started: %s",
                    ", ".join(
                        f"{stage.plan.name} x{initial}"
                        for stage, initial in zip(stages, initials, strict=True)
                    ),
                )
                task_status.started()
                try:
                    await stages[-1].done.wait()
                except anyio.get_cancelled_exc_class():
                    # Cancelled from outside (or aborted): bound every cleanup from
                    # now on, even one that keeps its stage's task group open.
                    self.cancelling()
                    raise
        finally:
            # Stages and the producer close their own ends; a run that failed
            # before starting them must not leak the rest.
            first.close_send()
            for stage in stages:
                stage.close_channels()

    async def _produce(self, send: Channel, first: Stage) -> None:
        counters = first.counters
        controller = first.controller
        clock = self.clock
        buffer = send.buffer
        put = buffer.append
        receivers = send.receivers
        # A fixed pool's gate never opens: a local flag skips the comparison.
        sampled = controller.gated
        try:
            with anyio.CancelScope() as self._producer_scope:
                if self.drain_requested:
                    return
                async with self.plan.source(self.cleanups) as iterator:
                    # (mypy narrows the flag to False; other tasks set it meanwhile)
                    if self.drain_requested:
                        return  # type: ignore[unreachable]
                    budget = CHECKPOINT_EVERY
                    async for item in iterator:
                        counters.offered += 1
                        if sampled and counters.offered >= counters.enqueue_gate:
                            controller.on_enqueue_gate()
                        if not receivers and len(buffer) < send.limit:
                            put(item)
                        else:
                            try:
                                send.send_nowait(item)
                            except WouldBlock:
                                counters.last_enqueue_at = clock()
                                await self._hand_over(send, item)
                                budget = CHECKPOINT_EVERY
                        del item
                        budget -= 1
                        if not budget:
                            budget = CHECKPOINT_EVERY
                            counters.last_enqueue_at = clock()
                            await checkpoint()
                        # A drain pulls nothing more from the source.
                        if self.drain_requested:
                            break  # type: ignore[unreachable]
        except anyio.get_cancelled_exc_class() as exc:
            if in_cancelled_scope():
                raise
            self.fail(spurious_cancellation(exc, "the producer"), "")
        except anyio.BrokenResourceError as exc:
            # Stage one closed its input: only a cancellation of the run does that
            # while the producer still runs (a shielded source, or scheduling).
            # The item counts as dropped; the cancellation is the outcome.
            if not in_cancelled_scope():
                self.fail(exc, "raised by the producer")
        except BaseException as exc:
            self.fail(exc, "raised by the producer")
        finally:
            send.close_send()
            first.input_closed()

    async def _hand_over(self, send: Channel, item: Any) -> None:
        """Wait until stage 1 takes ``item`` (``send_nowait`` would block); a drain
        never interrupts this."""
        if not self.drain_requested:
            self._producer_sending = True
            try:
                await send.send_waiting(item)
            finally:
                self._producer_sending = False
            return
        # A drain was requested after the source produced this item: its cancel may
        # be pending on this task already. The item is inside the flow, so deliver
        # it shielded; only an abort or outer cancellation (see cancelling()) ends it.
        with anyio.CancelScope(shield=True) as self._handoff_scope:
            if self.abort_requested:
                self._handoff_scope.cancel()
            # If stage 1 is gone, the item counts as dropped.
            with contextlib.suppress(anyio.BrokenResourceError):
                await send.send_waiting(item)
        self._handoff_scope = None

    async def route_error(self, stage: Stage, item: Any, exc: Exception) -> None:
        """Hand a failed item to the error handler; its own failure is fatal."""
        stage.counters.last_error_at = self.clock()
        try:
            await self._error_fn(item, exc)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as handler_exc:
            add_note(
                handler_exc,
                f"raised by the error handler for an item that failed in "
                f"{stage.plan.call.role}",
            )
            raise
        stage.counters.errors += 1


def _has_our_note(exc: BaseException) -> bool:
    notes = getattr(exc, "__notes__", ())
    return any(note.startswith("flowrhythm:") for note in notes)


def _initial_workers(strategy: ScalingPolicy, role: str) -> int:
    if not isinstance(strategy, ScalingStrategy):
        raise TypeError(
            f"the scaling strategy of {role}: for_stage() must return a "
            f"ScalingStrategy, got {strategy!r}"
        )
    _check_policy(strategy, f"the scaling strategy of {role}")
    count = strategy.initial_workers()
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(
            f"the scaling strategy of {role}: initial_workers() must return an int, "
            f"got {count!r}"
        )
    low, high = strategy.min_workers, strategy.max_workers
    if not 0 <= low <= count <= high:
        raise ValueError(
            f"the scaling strategy of {role}: initial_workers() returned {count}, "
            f"outside [min_workers={low}, max_workers={high}]"
        )
    return count
