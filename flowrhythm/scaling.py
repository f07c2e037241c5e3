"""Scaling strategies: how many workers each stage runs."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._stats import StageCounters, StageStats

__all__ = (
    "FixedScaling",
    "ScalingPolicy",
    "ScalingStrategy",
    "UtilizationScaling",
)


@runtime_checkable
class ScalingPolicy(Protocol):
    """The shape the runtime needs from a scaling strategy.

    Every hook is synchronous and returns a change in the worker count: positive
    adds workers, negative retires idle ones, zero leaves the pool alone. The
    runtime clamps the result to ``[min_workers, max_workers]``.
    """

    min_workers: int
    max_workers: int

    def initial_workers(self) -> int: ...
    def on_enqueue(self, stats: StageStats) -> int: ...
    def on_dequeue(self, stats: StageStats) -> int: ...
    def on_tick(self, stats: StageStats) -> int: ...


class ScalingStrategy:
    """Base class for scaling strategies; subclass it to write your own.

    The defaults keep ``initial_workers()`` workers and never change the pool.
    A strategy whose ``min_workers == max_workers`` is never consulted at all.

    A strategy instance may be the default of many stages: the runtime gives each
    stage the result of :meth:`for_stage`, by default a shallow copy, so attributes
    a hook assigns are per stage. Mutable containers created in ``__init__`` are
    shared by the copies unless you override :meth:`for_stage`.

    Time: ``stats.sampled_at`` and the ``last_*_at`` fields come from the flow's
    clock (``Flow(clock=...)``, injectable for tests); the ``on_tick`` period is
    measured on the event loop's clock.
    """

    #: the pool never shrinks below this
    min_workers: int = 1
    #: the pool never grows beyond this
    max_workers: int = 1
    #: consult ``on_enqueue``/``on_dequeue`` once every this many events of each kind
    #: (1 = every event, 0 = never)
    sampling_events: int = 1
    #: seconds between ``on_tick`` calls while the stage runs (0 = never)
    sampling_period: float = 1.0

    def initial_workers(self) -> int:
        """Return how many workers the stage starts with."""
        return self.min_workers

    def on_enqueue(self, stats: StageStats) -> int:
        """Called (behind the sampling gate) when items enter the stage's input."""
        return 0

    def on_dequeue(self, stats: StageStats) -> int:
        """Called (behind the sampling gate) when workers take items."""
        return 0

    def on_tick(self, stats: StageStats) -> int:
        """Called every ``sampling_period`` seconds, even when no item moves."""
        return 0

    def for_stage(self, stage_name: str) -> ScalingStrategy:
        """Return the instance one stage will use; by default a shallow copy."""
        return copy.copy(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_workers={self.min_workers}, max_workers={self.max_workers})"


class FixedScaling(ScalingStrategy):
    """Keep a constant number of workers for the stage.

    A fixed pool is never consulted while the flow runs: its stage's hot path has
    no sampling at all.

    :param workers: the number of workers, at least 1
    """

    sampling_events = 0
    sampling_period = 0.0

    def __init__(self, workers: int = 1) -> None:
        _check_int("workers", workers, minimum=1)
        self.workers = workers
        self.min_workers = self.max_workers = workers

    def __repr__(self) -> str:
        return f"FixedScaling(workers={self.workers})"


class UtilizationScaling(ScalingStrategy):
    """Grow a stage whose workers are busy, shrink one whose workers sit idle.

    Each time it is consulted (every ``sampling_events`` enqueues or dequeues, and
    every ``sampling_period`` seconds) it updates a moving average of the stage's
    utilization, ``busy / (busy + idle + ready)``, weighting the new sample by
    ``dampening``. Then:

    * it **grows** by ``upscaling_rate`` when the average is at or above
      ``upper_utilization``, items are waiting in the stage's input and their
      number has not dropped since the last decision (a backlog being worked off
      needs no more workers: growing then would overshoot), and no send to the
      next stage had to wait (such a stage is short of room downstream, not of
      workers). Growth is limited by sampling alone, so a burst is met within a
      few samples;
    * it **shrinks** by ``downscaling_rate`` when the average is at or below
      ``lower_utilization``, some workers are idle, nothing is queued, and
      ``cooldown_seconds`` have passed since the stage's last scale event of
      either kind: a shrink needs sustained idleness, and every scale event is
      followed by a quiet period. The band between the two thresholds is the
      hysteresis that keeps the pool from flapping; a pool settles where its
      utilization falls inside it, so a narrow band near 1.0 sizes it tightly
      and a wide one leaves headroom.

    Ready workers (between items, waiting for the event loop: the stage is short
    of CPU, not of workers) count as not busy, so a CPU-bound stage does not grow.
    Workers blocked sending downstream count neither as busy nor as idle, and a
    stage that had to wait for room downstream since the last decision
    (``blocked_sends`` grew) is never grown. With
    ``min_workers=0`` an idle stage scales to zero and gets a worker back as soon
    as an item is queued for it. Each stage uses its own copy of the strategy, so
    one instance can be the default for a whole flow.

    :param min_workers: the pool never shrinks below this (0 allows scale to zero)
    :param max_workers: the pool never grows beyond this
    :param lower_utilization: below this share of busy workers the stage shrinks
    :param upper_utilization: above this share of busy workers the stage grows
    :param upscaling_rate: workers added per scale-up decision
    :param downscaling_rate: workers retired per scale-down decision
    :param cooldown_seconds: how long the pool holds its size after any scale event
        before it may shrink (growth is never delayed)
    :param dampening: weight of the newest utilization sample in the moving average
        (1.0 = no smoothing)
    :param sampling_period: seconds between periodic checks
    :param sampling_events: enqueue/dequeue events between event-driven checks
    """

    def __init__(
        self,
        min_workers: int = 1,
        max_workers: int = 8,
        lower_utilization: float = 0.2,
        upper_utilization: float = 0.8,
        upscaling_rate: int = 2,
        downscaling_rate: int = 1,
        cooldown_seconds: float = 5.0,
        dampening: float = 0.5,
        sampling_period: float = 2.0,
        sampling_events: int = 50,
    ) -> None:
        _check_int("min_workers", min_workers, minimum=0)
        _check_int("max_workers", max_workers, minimum=1)
        if min_workers > max_workers:
            raise ValueError(
                f"min_workers ({min_workers}) must not exceed max_workers ({max_workers})"
            )
        _check_real("lower_utilization", lower_utilization)
        _check_real("upper_utilization", upper_utilization)
        if not 0.0 <= lower_utilization < upper_utilization <= 1.0:
            raise ValueError(
                "utilization bounds must satisfy 0 <= lower_utilization < "
                f"upper_utilization <= 1, got lower_utilization={lower_utilization!r} "
                f"and upper_utilization={upper_utilization!r}"
            )
        _check_int("upscaling_rate", upscaling_rate, minimum=1)
        _check_int("downscaling_rate", downscaling_rate, minimum=1)
        _check_real("cooldown_seconds", cooldown_seconds, minimum=0.0)
        _check_real("dampening", dampening)
        if not 0.0 < dampening <= 1.0:
            raise ValueError(f"dampening must be in (0, 1], got {dampening!r}")
        _check_real("sampling_period", sampling_period, minimum=0.0)
        _check_int("sampling_events", sampling_events, minimum=0)
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.lower_utilization = float(lower_utilization)
        self.upper_utilization = float(upper_utilization)
        self.upscaling_rate = upscaling_rate
        self.downscaling_rate = downscaling_rate
        self.cooldown_seconds = float(cooldown_seconds)
        self.dampening = float(dampening)
        self.sampling_period = float(sampling_period)
        self.sampling_events = sampling_events

        self._average: float | None = None
        self._blocked_sends = 0
        self._queue: int | None = None

    def initial_workers(self) -> int:
        return max(self.min_workers, 1)

    def on_enqueue(self, stats: StageStats) -> int:
        return self._decide_stats(stats)

    def on_dequeue(self, stats: StageStats) -> int:
        # The worker asking has just taken an item: it is busy by definition, and
        # counting it would make a one-worker stage read as fully used on every
        # dequeue. Sample the rest of the pool.
        return self._decide_stats(stats, caller_busy=True)

    def on_tick(self, stats: StageStats) -> int:
        return self._decide_stats(stats)

    def for_stage(self, stage_name: str) -> UtilizationScaling:
        clone = copy.copy(self)
        clone._average = None
        clone._blocked_sends = 0
        clone._queue = None
        return clone

    def _decide_stats(self, stats: StageStats, *, caller_busy: bool = False) -> int:
        return self._decide(
            stats.busy_workers,
            stats.idle_workers,
            stats.ready_workers,
            stats.blocked_workers,
            stats.blocked_sends,
            stats.queue_length,
            stats.total_workers(),
            stats.sampled_at,
            stats.last_scale_up_at,
            stats.last_scale_down_at,
            caller_busy,
        )

    def _decide_live(
        self, counters: StageCounters, now: float, caller_busy: bool
    ) -> int:
        """:meth:`_decide` on a running stage's live counters: the hooks' answer
        without building a :class:`StageStats` (the runtime's fast path, taken
        when no hook is overridden)."""
        idle = counters.idle
        ready = counters.ready
        blocked = counters.blocked
        workers = counters.workers
        return self._decide(
            workers - idle - blocked - counters.throttled - ready,
            idle,
            ready,
            blocked,
            counters.blocked_sends,
            counters.offered - counters.taken,
            workers,
            now,
            counters.last_scale_up_at,
            counters.last_scale_down_at,
            caller_busy,
        )

    def _decide(
        self,
        busy: int,
        idle: int,
        ready: int,
        blocked: int,
        blocked_sends: int,
        queue: int,
        total: int,
        now: float | None,
        last_scale_up_at: float | None,
        last_scale_down_at: float | None,
        caller_busy: bool,
    ) -> int:
        # Ready workers (waiting for the event loop between items) are not busy:
        # a stage that is short of CPU, not of workers, must not grow.
        working = busy + idle + ready
        if caller_busy and busy:
            busy -= 1
            working -= 1
        average = self._average
        if working:  # a pool whose workers all wait on downstream says nothing
            sample = busy / working
            average = (
                sample
                if average is None
                else self.dampening * sample + (1.0 - self.dampening) * average
            )
            self._average = average
        if average is None:
            return 0
        # Any send that had to wait since the last decision means downstream, not
        # this stage, limits the flow: more workers here would only wait too.
        held_back = blocked > 0 or blocked_sends > self._blocked_sends
        self._blocked_sends = blocked_sends
        # A queue that shrank since the last decision is already being worked off:
        # growing more would overshoot (the backlog keeps every worker busy).
        draining = self._queue is not None and queue < self._queue
        self._queue = queue
        if (
            average >= self.upper_utilization
            and queue > 0
            and not draining
            and not held_back
            and total < self.max_workers
        ):
            return self.upscaling_rate
        if (
            average <= self.lower_utilization
            and total > self.min_workers
            and idle > 0
            and queue == 0
        ):
            events = [
                t for t in (last_scale_up_at, last_scale_down_at) if t is not None
            ]
            if now is None or not events or now - max(events) >= self.cooldown_seconds:
                return -self.downscaling_rate
        return 0

    def __repr__(self) -> str:
        return (
            f"UtilizationScaling(min_workers={self.min_workers}, "
            f"max_workers={self.max_workers}, "
            f"lower_utilization={self.lower_utilization}, "
            f"upper_utilization={self.upper_utilization}, "
            f"upscaling_rate={self.upscaling_rate}, "
            f"downscaling_rate={self.downscaling_rate}, "
            f"cooldown_seconds={self.cooldown_seconds}, dampening={self.dampening}, "
            f"sampling_period={self.sampling_period}, "
            f"sampling_events={self.sampling_events})"
        )


def live_decider(
    strategy: ScalingPolicy,
) -> Callable[[StageCounters, float, bool], int] | None:
    """Return the built-in strategy's decision on live counters, or ``None``.

    A :class:`UtilizationScaling` whose hooks nobody overrode answers straight
    from the stage's counters: the same answer as its hooks, without a snapshot
    per consult (which costs most of a consult). Any other strategy, subclasses
    that override a hook included, is consulted through its hooks.
    """
    if not isinstance(strategy, UtilizationScaling):
        return None
    cls = type(strategy)
    base = UtilizationScaling
    for name in ("on_enqueue", "on_dequeue", "on_tick", "_decide_stats", "_decide"):
        if getattr(cls, name) is not getattr(base, name) or name in vars(strategy):
            return None
    return strategy._decide_live


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _check_real(name: str, value: object, *, minimum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _check_policy(strategy: ScalingStrategy, what: str) -> None:
    """Validate the attributes the runtime reads from a (custom) strategy."""
    try:
        _check_int("min_workers", strategy.min_workers, minimum=0)
        _check_int("max_workers", strategy.max_workers, minimum=1)
        _check_int("sampling_events", strategy.sampling_events, minimum=0)
        _check_real("sampling_period", strategy.sampling_period, minimum=0.0)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{what}: {exc}") from None
    if strategy.min_workers > strategy.max_workers:
        raise ValueError(
            f"{what}: min_workers ({strategy.min_workers}) must not exceed "
            f"max_workers ({strategy.max_workers})"
        )
