"""A stage at run time: its input channel, its worker pool and the worker loop."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio import EndOfStream, WouldBlock
from anyio.abc import TaskStatus
from anyio.lowlevel import checkpoint

from ._channel import Channel
from ._cleanup import in_cancelled_scope
from ._controller import Controller
from ._errors import add_note, spurious_cancellation
from ._loops import (
    CHECKPOINT_EVERY,
    END,
    RETIRED,
    batch_loop,
    fan_out_loop,
    filter_loop,
)
from ._operators import CallPolicy
from ._ordered import Reorder, ordered_loop
from ._plan import StagePlan
from ._stats import StageCounters

if TYPE_CHECKING:
    from ._run import Run
    from .scaling import ScalingPolicy

ItemCall = Callable[[Any], Awaitable[Any]]
Receive = Callable[[], Awaitable[Any]]


class Stage:
    """Runs one transformer or the consumer: a pool of workers over one input.

    The stage lives until its input is exhausted and its last worker is gone,
    then closes its output: that is how the next stage learns its input ended,
    so a graceful drain cascades stage by stage with no sentinel items.
    """

    def __init__(
        self,
        run: Run,
        plan: StagePlan,
        strategy: ScalingPolicy,
        counters: StageCounters,
        inbox: Channel,
        outbox: Channel | None,
    ) -> None:
        self.run = run
        self.plan = plan
        self.counters = counters
        self.inbox = inbox
        self.outbox = outbox
        self.next: Stage | None = None
        self.controller = Controller(self, strategy)
        self._task_group: anyio.abc.TaskGroup | None = None
        self._input_closed = False  # upstream closed its side
        self.exhausted = False  # a worker saw the end of the input
        self.done = anyio.Event()
        #: cancel scopes of workers blocked in receive, newest last; only used
        #: when the strategy can shrink the pool
        self._idle_scopes: dict[anyio.CancelScope, None] = {}
        #: workers on their way out, and workers waiting for them to be gone
        self.retiring = 0
        self.deferred = 0
        #: tasks of retired workers on their way out (still counted in retiring)
        self._leaving: set[int] = set()
        self.policy = CallPolicy(
            plan.call.role,
            counters,
            run.timebase,
            run.cleanups,
            timeout=plan.timeout,
            retry=plan.retry,
            rate_limit=plan.rate_limit,
        )
        counters.emitted_is_processed = plan.loop in ("map", "ordered") and not (
            plan.fan_out
        )
        self.order: Reorder | None = Reorder(self) if plan.ordered else None
        self._work = self._pick_loop(plan.loop)

    def _pick_loop(self, name: str) -> Callable[[ItemCall], Awaitable[None]]:
        if name == "map":
            return self._loop
        if name == "consumer":
            return self._consume_loop
        if name == "ordered":
            return functools.partial(ordered_loop, self)
        loops = {"filter": filter_loop, "fan_out": fan_out_loop, "batch": batch_loop}
        return functools.partial(loops[name], self)

    # -- lifetime -------------------------------------------------------------------

    async def supervise(
        self, initial_workers: int, *, task_status: TaskStatus[None]
    ) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                for _ in range(initial_workers):
                    self.spawn(initial=True)
                self.controller.start(tg)
                task_status.started()
                self._check_done()
                await self.done.wait()
        except anyio.get_cancelled_exc_class():
            # Aborted, or cancelled from outside: bound the cleanups from now on.
            self.run.cancelling()
            raise
        finally:
            self.close_channels()
            if self.next is not None:
                self.next.input_closed()

    def close_channels(self) -> None:
        if self.outbox is not None:
            self.outbox.close_send()
        self.inbox.close_receive()

    def input_closed(self) -> None:
        """Upstream will send nothing more (its side of our inbox is closed)."""
        self._input_closed = True
        self._check_done()

    def _check_done(self) -> None:
        counters = self.counters
        queued = counters.offered > counters.taken
        if not counters.workers and (
            self.exhausted or (self._input_closed and not queued)
        ):
            self.done.set()
        elif queued and not self.active_workers:
            # Items left with nobody to take them (a pool scaled to zero, or its
            # last worker retired as an item arrived): they always get a worker.
            self.spawn()

    # -- the pool -------------------------------------------------------------------

    def spawn(self, *, initial: bool = False) -> bool:
        """Start one more worker; ``False`` once the stage is winding down."""
        if self.exhausted or self._task_group is None or in_cancelled_scope():
            # Never replace workers that a cancellation is taking down.
            return False
        counters = self.counters
        # Counted before the task runs so stats are exact at every await boundary;
        # a new worker is idle until it holds an item.
        counters.workers += 1
        counters.idle += 1
        self._task_group.start_soon(
            self._worker, initial, name=f"{self.plan.name} worker"
        )
        return True

    def retire_idle(self, count: int) -> int:
        """Retire up to ``count`` workers that are waiting for input; return how many.

        Only the scope around an idle worker's receive is cancelled, never a worker
        holding an item. A channel wakes a receiver rather than handing it an item,
        so a retired worker leaves the item queued; if the wake-up and the
        cancellation land in the same step and the wake-up wins, the worker keeps
        its item and stays (see ``_receive_or_retire``).
        """
        retired = 0
        while retired < count and self._idle_scopes:
            scope, _ = self._idle_scopes.popitem()
            scope.cancel()
            retired += 1
        self.retiring += retired
        return retired

    @property
    def full(self) -> bool:
        """Whether a send to this stage would have to wait right now."""
        counters = self.counters
        return (
            not counters.idle
            and counters.offered - counters.taken >= self.inbox.capacity
        )

    @property
    def active_workers(self) -> int:
        """The pool size the scaler aims at: workers not on their way out, plus
        workers that start as soon as those are gone."""
        return self.counters.workers - self.retiring + self.deferred

    # -- one worker -----------------------------------------------------------------

    async def _worker(self, initial: bool) -> None:
        call = self.plan.call
        counters = self.counters
        entered = False
        try:
            if call.fn is not None:
                entered = True
                if initial:
                    self.run.worker_ready()
                await self._work(call.fn)
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
                    await self._work(fn)
                except BaseException as exc:
                    await self.run.cleanups.exit(cm, exc)
                    raise
                await self.run.cleanups.exit(cm, None)
        except anyio.get_cancelled_exc_class() as exc:
            if in_cancelled_scope():
                raise
            self.run.fail(spurious_cancellation(exc, call.role), "")
        except anyio.BrokenResourceError as exc:
            # The next stage closed its input: the run is being cancelled (this
            # worker got there late, e.g. out of a shielded section). The item
            # counts as dropped there.
            if not in_cancelled_scope():
                self.run.fail(exc, f"raised in {call.role}")
        except BaseException as exc:
            self.run.fail(exc, f"raised in {call.role}")
        finally:
            if not entered:
                counters.idle -= 1
            counters.workers -= 1
            if self._leaving:
                task = anyio.get_current_task().id
                if task in self._leaving:
                    self._leaving.discard(task)
                    self.retiring -= 1
            if self.deferred and self.spawn():
                self.deferred -= 1
            self._check_done()

    async def _loop(self, fn: Callable[[Any], Awaitable[Any]]) -> None:
        """Receive, call, send: the hot path of a transformer.

        The channels' deques are used directly while nothing waits on either side
        (an append, a pop); the channel's methods only when a task is parked there
        or the buffer is full or empty. A worker that never blocks checkpoints every
        ``CHECKPOINT_EVERY`` items and refreshes the stage's timestamps there, so
        the common path costs no clock read and no event-loop round trip. The
        scaler's sampling gates are one integer comparison each. Items this stage
        finished are counted once, as items offered to the next stage.
        """
        assert self.next is not None
        assert self.outbox is not None
        fn = self.policy.wrap(fn)
        counters = self.counters
        controller = self.controller
        inbox = self.inbox
        in_buffer = inbox.buffer
        take = in_buffer.popleft
        in_senders = inbox.senders
        outbox = self.outbox
        out_buffer = outbox.buffer
        put = out_buffer.append
        out_receivers = outbox.receivers
        on_error = self.run.route_error
        downstream = self.next.counters
        next_controller = self.next.controller
        # Fixed pools never open a gate: a local flag skips both comparisons.
        sampled = controller.gated
        next_sampled = next_controller.gated
        budget = CHECKPOINT_EVERY

        # This worker was counted idle when spawned; it is idle until it has an item.
        item = await self.receive_blocking()
        if item is END or item is RETIRED:
            self.exhausted = item is END
            return
        while True:
            counters.taken += 1
            if sampled and counters.taken >= counters.dequeue_gate:
                controller.on_dequeue_gate()
            try:
                result = await fn(item)
            except Exception as exc:
                await on_error(self, item, exc)
            else:
                downstream.offered += 1
                if next_sampled and downstream.offered >= downstream.enqueue_gate:
                    next_controller.on_enqueue_gate()
                if not out_receivers and len(out_buffer) < outbox.limit:
                    put(result)
                else:
                    try:
                        outbox.send_nowait(result)
                    except WouldBlock:
                        await self.send_blocking(result)
                        budget = CHECKPOINT_EVERY
            del item  # not held while waiting for the next one
            budget -= 1
            if not budget:
                budget = CHECKPOINT_EVERY
                await self.pause()
            if in_buffer and not in_senders:
                item = take()
                continue
            try:
                item = inbox.receive_nowait()
            except WouldBlock:
                counters.idle += 1
                item = await self.receive_blocking()
                if item is END or item is RETIRED:
                    break
                budget = CHECKPOINT_EVERY
            except EndOfStream:
                item = END
                break
        self.exhausted = item is END

    async def _consume_loop(self, fn: Callable[[Any], Awaitable[Any]]) -> None:
        """The consumer's hot path: ``_loop`` without the send downstream (kept as
        a separate loop so neither pays a per-item branch)."""
        fn = self.policy.wrap(fn)
        counters = self.counters
        controller = self.controller
        inbox = self.inbox
        in_buffer = inbox.buffer
        take = in_buffer.popleft
        in_senders = inbox.senders
        on_error = self.run.route_error
        sampled = controller.gated
        budget = CHECKPOINT_EVERY

        item = await self.receive_blocking()
        if item is END or item is RETIRED:
            self.exhausted = item is END
            return
        while True:
            counters.taken += 1
            if sampled and counters.taken >= counters.dequeue_gate:
                controller.on_dequeue_gate()
            try:
                await fn(item)
            except Exception as exc:
                await on_error(self, item, exc)
            else:
                counters.processed += 1
            del item
            budget -= 1
            if not budget:
                budget = CHECKPOINT_EVERY
                await self.pause()
            if in_buffer and not in_senders:
                item = take()
                continue
            try:
                item = inbox.receive_nowait()
            except WouldBlock:
                counters.idle += 1
                item = await self.receive_blocking()
                if item is END or item is RETIRED:
                    break
                budget = CHECKPOINT_EVERY
            except EndOfStream:
                item = END
                break
        self.exhausted = item is END

    async def receive_blocking(self, receive: Receive | None = None) -> Any:
        """Wait for the next item as an idle worker; or ``END``, or ``RETIRED``.

        The caller has already counted this worker as idle. ``receive`` replaces
        the input's own receive (an ordered stage's intake, a batch's deadline).
        """
        if receive is None:
            receive = self.inbox.receive
        counters = self.counters
        counters.nonempty_since = None
        try:
            # Only a pool above its floor can lose a worker: at the floor, waiting
            # needs no cancel scope (most of an idle receive's cost). A worker that
            # waits unscoped and outlives a growth is simply not picked to retire.
            controller = self.controller
            if controller.can_shrink and self.active_workers > controller.min_workers:
                return await self._receive_or_retire(receive)
            try:
                item = await receive()
            except EndOfStream:
                return END
        finally:
            counters.idle -= 1
        counters.last_dequeue_at = self.run.clock()
        return item

    async def _receive_or_retire(self, receive: Receive) -> Any:
        item: Any = RETIRED
        with anyio.CancelScope() as scope:
            self._idle_scopes[scope] = None
            try:
                item = await receive()
            except EndOfStream:
                item = END
            finally:
                self._idle_scopes.pop(scope, None)
        if item is END or item is RETIRED:
            if scope.cancel_called:
                # Leaving: counted as retiring until its task is gone (its context
                # manager may still take a while to exit), see _worker.
                self._leaving.add(anyio.get_current_task().id)
            return item
        if scope.cancel_called:
            # Picked for retirement, but an item arrived in the very same step (the
            # cancellation was not delivered): keep the item, stay. The pool is one
            # larger than the scaler asked for, so a spawn waiting for this worker
            # to go is not needed any more.
            self.retiring -= 1
            if self.deferred:
                self.deferred -= 1
        self.counters.last_dequeue_at = self.run.clock()
        return item

    # -- building blocks of the operator loops (not the two hot loops above) ----------

    def took(self) -> None:
        """Count an item a worker has just taken."""
        counters = self.counters
        counters.taken += 1
        if counters.taken >= counters.dequeue_gate:
            self.controller.on_dequeue_gate()

    async def take(self, receive: Receive | None = None) -> Any:
        """Return the next item for a worker holding none (``END``, ``RETIRED``)."""
        try:
            return self.inbox.receive_nowait()
        except WouldBlock:
            self.counters.idle += 1
            return await self.receive_blocking(receive)
        except EndOfStream:
            return END

    async def emit(self, output: Any) -> None:
        """Send ``output`` to the next stage, waiting for room if need be."""
        if not self.offer(output):
            await self.send_blocking(output)

    def offer(self, output: Any) -> bool:
        """Count ``output`` as sent on and hand it over if that needs no wait;
        ``False``: the caller must ``await send_blocking(output)`` (``emit`` without
        a coroutine per output, for loops that send on most items at once)."""
        assert self.outbox is not None
        assert self.next is not None
        downstream = self.next.counters
        downstream.offered += 1
        if downstream.offered >= downstream.enqueue_gate:
            self.next.controller.on_enqueue_gate()
        try:
            self.outbox.send_nowait(output)
        except WouldBlock:
            return False
        return True

    async def send_blocking(self, result: Any) -> None:
        assert self.outbox is not None
        assert self.next is not None
        counters = self.counters
        counters.blocked += 1
        counters.blocked_sends += 1
        try:
            self.next.counters.last_enqueue_at = self.run.clock()
            await self.outbox.send_waiting(result)
        finally:
            counters.blocked -= 1

    async def pause(self) -> None:
        """Let other tasks run, between two items (every ``CHECKPOINT_EVERY``).

        Meanwhile the worker counts as ready, not busy: it holds no item and only
        waits for its turn on the event loop. Sampled from another task, a stage
        whose workers are often ready is CPU-bound, and more workers would not help.
        """
        self.refresh()
        counters = self.counters
        counters.ready += 1
        try:
            await checkpoint()
        finally:
            counters.ready -= 1

    def refresh(self) -> None:
        """Stamp the time-based stats; called every ``CHECKPOINT_EVERY`` items."""
        now = self.run.clock()
        counters = self.counters
        counters.last_dequeue_at = now
        if counters.offered > counters.taken:
            if counters.nonempty_since is None:
                counters.nonempty_since = now
        else:
            counters.nonempty_since = None
        if self.next is not None:
            self.next.counters.last_enqueue_at = now
