"""The scaling controller of one stage: when to ask the strategy, and what to do."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import anyio

from ._errors import add_note
from .scaling import live_decider

logger = logging.getLogger("flowrhythm")

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._stage import Stage
    from ._stats import StageStats
    from .scaling import ScalingPolicy

#: a sampling gate that never opens
NEVER = sys.maxsize


class Controller:
    """Asks a stage's strategy for changes and applies them to its pool.

    The hot path only compares a counter with a gate (``StageCounters.enqueue_gate``
    / ``dequeue_gate``); when one opens, the strategy is consulted with a fresh
    snapshot and the gate moves ``sampling_events`` further. A timer consults
    ``on_tick`` every ``sampling_period`` seconds, so an idle stage shrinks even
    when no item moves.
    """

    def __init__(self, stage: Stage, strategy: ScalingPolicy) -> None:
        self.stage = stage
        self.strategy = strategy
        self.min_workers = strategy.min_workers
        self.max_workers = strategy.max_workers
        self.can_shrink = self.min_workers < self.max_workers
        fixed = not self.can_shrink
        #: whether this stage's gates can ever open (a fixed pool's never do)
        self.gated = not fixed
        self.events = 0 if fixed else int(getattr(strategy, "sampling_events", 1))
        self.period = 0.0 if fixed else float(getattr(strategy, "sampling_period", 0.0))
        counters = stage.counters
        counters.enqueue_gate = counters.dequeue_gate = self.events or NEVER
        #: the built-in strategy's decision on live counters (no snapshot), if any
        self._live = live_decider(strategy)

    def start(self, task_group: anyio.abc.TaskGroup) -> None:
        if self.period > 0:
            task_group.start_soon(self._tick, name=f"{self.stage.plan.name} scaler")
        if self.stage.active_workers == 0:
            self._arm_from_zero()

    # -- gates, called on the hot path when a counter reaches them -------------------

    def on_enqueue_gate(self) -> None:
        counters = self.stage.counters
        if self.stage.active_workers == 0:
            # Items are queued for a stage scaled to zero: it always gets a worker,
            # whatever the strategy says (0 busy of 0 workers reads as idle).
            self._scale_to(1, self.stage.run.clock())
        if self.events:
            counters.enqueue_gate = counters.offered + self.events
            self._consult("on_enqueue")
        else:
            counters.enqueue_gate = NEVER

    def on_dequeue_gate(self) -> None:
        counters = self.stage.counters
        counters.dequeue_gate = counters.taken + self.events
        self._consult("on_dequeue", caller_busy=True)

    async def _tick(self) -> None:
        done = self.stage.done
        while not done.is_set():
            with anyio.move_on_after(self.period):
                await done.wait()
            if not done.is_set():
                self._consult("on_tick")

    # -- decisions --------------------------------------------------------------------

    def _consult(self, name: str, *, caller_busy: bool = False) -> None:
        """Ask the strategy's hook ``name`` for a change and apply it.

        ``caller_busy``: the worker asking holds the item it just took (on_dequeue).
        """
        stage = self.stage
        now = stage.run.clock()
        try:
            if self._live is not None:
                delta = self._live(stage.counters, now, caller_busy)
            else:
                hook: Callable[[StageStats], int] = getattr(self.strategy, name)
                delta = hook(stage.counters.snapshot(now))
                if isinstance(delta, bool) or not isinstance(delta, int):
                    raise TypeError(
                        f"{name}() must return an int (the change in workers), "
                        f"got {delta!r}"
                    )
        except BaseException as exc:
            # Whatever it derives from, it is the strategy's failure: left to
            # propagate it would be blamed on the worker that opened the gate
            # (upstream's, for an enqueue gate).
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            add_note(exc, f"raised by the scaling strategy of {stage.plan.call.role}")
            stage.run.fail(exc, "")
            return
        if delta:
            self._scale_to(stage.active_workers + delta, now)

    def _scale_to(self, target: int, now: float) -> None:
        stage = self.stage
        counters = stage.counters
        target = min(max(target, self.min_workers), self.max_workers)
        if target == 0 and counters.offered > counters.taken:
            target = 1
        active = stage.active_workers
        if target > active and active:
            if stage.next is not None and stage.next.full:
                # Downstream cannot take an item right now: this stage is not short
                # of workers, its downstream is. More would only wait to send.
                return
            if counters.throttled:
                # Workers wait for the stage's rate limit: more could not call any
                # faster, and the limit is the external quota.
                return
        if target > active:
            # Workers on their way out still run: never exceed max_workers tasks.
            # What does not fit now starts as soon as a retiring worker is gone.
            wanted = target - active
            room = max(self.max_workers - counters.workers, 0)
            started = sum(stage.spawn() for _ in range(min(wanted, room)))
            stage.deferred += wanted - min(wanted, room)
            if stage.order is not None:
                # The reorder window is 4 items per active worker: it grew too.
                stage.order.room_changed()
            if started or stage.deferred:
                counters.last_scale_up_at = now
                logger.debug(
                    "stage %r: %d -> %d workers", stage.plan.name, active, target
                )
        elif target < active:
            surplus = active - target
            cancelled = min(surplus, stage.deferred)
            stage.deferred -= cancelled
            if stage.retire_idle(surplus - cancelled) or cancelled:
                counters.last_scale_down_at = now
                logger.debug(
                    "stage %r: %d -> %d workers",
                    stage.plan.name,
                    active,
                    stage.active_workers,
                )
            if stage.active_workers == 0:
                self._arm_from_zero()

    def _arm_from_zero(self) -> None:
        counters = self.stage.counters
        counters.enqueue_gate = min(counters.enqueue_gate, counters.offered + 1)
