"""A stage at run time: its input stream, its worker pool and the worker loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio import EndOfStream, WouldBlock
from anyio.lowlevel import checkpoint
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._callables import exit_async_cm
from ._errors import add_note
from ._plan import StagePlan
from ._stats import StageCounters

if TYPE_CHECKING:
    from ._run import Run
    from .scaling import ScalingStrategy

#: a worker that never has to wait still yields to the event loop this often, so
#: other tasks run and cancellation is seen within this many items
CHECKPOINT_EVERY = 64


class Stage:
    """Runs one transformer or the consumer: a pool of workers over one input."""

    def __init__(
        self,
        run: Run,
        plan: StagePlan,
        strategy: ScalingStrategy,
        counters: StageCounters,
        inbox: MemoryObjectReceiveStream[Any],
        outbox: MemoryObjectSendStream[Any] | None,
        next_counters: StageCounters | None,
    ) -> None:
        self.run = run
        self.plan = plan
        self.strategy = strategy
        self.counters = counters
        self.inbox = inbox
        self.outbox = outbox
        self.next_counters = next_counters
        self.task_group: anyio.abc.TaskGroup | None = None

    async def supervise(self, initial_workers: int) -> None:
        """Run the stage's workers; when the last one is done, close downstream.

        Closing our send side is what tells the next stage its input has ended:
        the drain cascades structurally, stage by stage.
        """
        try:
            async with anyio.create_task_group() as tg:
                self.task_group = tg
                for _ in range(initial_workers):
                    self.spawn(initial=True)
        finally:
            if self.outbox is not None:
                self.outbox.close()
            self.inbox.close()

    def spawn(self, *, initial: bool = False) -> None:
        """Start one more worker in the stage's task group."""
        assert self.task_group is not None
        counters = self.counters
        # Counted before the task runs, so stats are exact at every await boundary;
        # a new worker is idle until it holds an item.
        counters.workers += 1
        counters.idle += 1
        self.task_group.start_soon(
            self._worker, initial, name=f"{self.plan.name}-worker"
        )

    async def _worker(self, initial: bool) -> None:
        call = self.plan.call
        counters = self.counters
        entered = False
        try:
            if call.fn is not None:
                entered = True
                if initial:
                    self.run.worker_ready()
                await self._loop(call.fn)
            else:
                assert call.factory is not None
                try:
                    cm = call.factory()
                    fn = await call.enter(cm)
                except BaseException as exc:
                    if not isinstance(exc, anyio.get_cancelled_exc_class()):
                        add_note(
                            exc, f"raised while entering the context of {call.role}"
                        )
                    raise
                entered = True
                if initial:
                    self.run.worker_ready()
                try:
                    await self._loop(fn)
                except BaseException as exc:
                    await exit_async_cm(cm, exc)
                    raise
                await exit_async_cm(cm, None)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:
            self.run.fail(exc, f"raised in {call.role}")
        finally:
            if not entered:
                counters.idle -= 1
            counters.workers -= 1

    async def _loop(self, fn: Callable[[Any], Awaitable[Any]]) -> None:
        """Receive, call, send: the hot path.

        Non-blocking stream operations first; the awaiting form only when they
        would block. A worker that never blocks checkpoints every
        ``CHECKPOINT_EVERY`` items and refreshes the stage's timestamps there,
        so the common path costs no clock read and no event-loop round trip.
        """
        counters = self.counters
        clock = self.run.clock
        receive_nowait = self.inbox.receive_nowait
        receive = self.inbox.receive
        on_error = self.run.route_error
        outbox = self.outbox
        if outbox is not None:
            send_nowait = outbox.send_nowait
            send = outbox.send
            downstream = self.next_counters
            assert downstream is not None
        else:
            downstream = self.counters  # unused: the consumer sends nothing
        budget = CHECKPOINT_EVERY

        # The first item: this worker was counted idle when spawned.
        try:
            item = await receive()
        except EndOfStream:
            return
        finally:
            counters.idle -= 1
        counters.last_dequeue_at = clock()

        while True:
            counters.taken += 1
            try:
                result = await fn(item)
            except Exception as exc:
                await on_error(self, item, exc)
            else:
                counters.processed += 1
                if outbox is not None:
                    downstream.offered += 1
                    try:
                        send_nowait(result)
                    except WouldBlock:
                        counters.blocked += 1
                        try:
                            downstream.last_enqueue_at = clock()
                            await send(result)
                        finally:
                            counters.blocked -= 1
                        budget = CHECKPOINT_EVERY
            del item  # not held while waiting for the next one
            budget -= 1
            if not budget:
                budget = CHECKPOINT_EVERY
                self._refresh(clock())
                await checkpoint()
            try:
                item = receive_nowait()
            except WouldBlock:
                counters.idle += 1
                counters.nonempty_since = None
                try:
                    item = await receive()
                except EndOfStream:
                    return
                finally:
                    counters.idle -= 1
                counters.last_dequeue_at = clock()
                budget = CHECKPOINT_EVERY
            except EndOfStream:
                return

    def _refresh(self, now: float) -> None:
        """Stamp the time-based stats; called every ``CHECKPOINT_EVERY`` items."""
        counters = self.counters
        counters.last_dequeue_at = now
        if counters.offered > counters.taken:
            if counters.nonempty_since is None:
                counters.nonempty_since = now
        else:
            counters.nonempty_since = None
        if self.next_counters is not None:
            self.next_counters.last_enqueue_at = now
