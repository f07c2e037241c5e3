"""Per-stage statistics: the public snapshot and the live counters behind it."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class StageStats:
    """A point-in-time snapshot of one stage, as returned by :meth:`Flow.stats`.

    Times are in seconds on the flow's clock (the event loop's clock unless the flow
    was given another). Counters cover the whole run so far.
    """

    #: the stage's name, as given to ``add_transformer``/``set_consumer`` or derived
    #: from the callable's ``__name__``
    stage_name: str
    #: workers running the stage's callable on an item right now
    busy_workers: int
    #: workers waiting for input
    idle_workers: int
    #: workers held back: they finished an item and wait for room downstream
    #: (back-pressure), or, in an ordered stage, wait for room in the reorder window
    blocked_workers: int
    #: items in the stage's input buffer, or being handed to it by an upstream sender
    queue_length: int
    #: when the input queue last became non-empty (``None`` while it is empty); the
    #: oldest waiting item has waited at most ``now - oldest_item_enqueued_at``
    oldest_item_enqueued_at: float | None
    #: last time an item was seen entering the stage's input (refreshed at least every
    #: 64 items and whenever a sender has to wait)
    last_enqueue_at: float | None
    #: last time a worker was seen taking an item (same refresh rule)
    last_dequeue_at: float | None
    #: last time the stage gained workers after the start
    last_scale_up_at: float | None
    #: last time the stage lost workers before the end
    last_scale_down_at: float | None
    #: last time an item failed in this stage
    last_error_at: float | None
    #: items that reached the stage: taken by a worker, or (once an abort ended the run)
    #: still waiting in or being handed to its input
    received: int
    #: items the stage's callable finished (for the consumer: items consumed)
    processed: int
    #: items that failed here and were handed to the error handler
    errors: int
    #: items an abort cut while they were queued for, or in the hands of, this stage
    dropped: int
    #: how many times a worker finished an item and had to wait for room downstream
    #: (a stage whose count grows is held back by its downstream, not short of workers)
    blocked_sends: int = 0
    #: items sent downstream: one per processed item for a plain transformer, the
    #: outputs of a fan-out stage, the batches of a batch stage (0 for the consumer)
    emitted: int = 0
    #: items a filter's predicate rejected (counted within ``processed``)
    filtered: int = 0
    #: calls made again after a failed attempt (``retry=``)
    retries: int = 0
    #: call attempts cut by the stage's ``timeout=``
    timeouts: int = 0
    #: workers waiting for a token of the stage's ``rate_limit=`` (not busy, and
    #: not short of workers: the scaler does not grow a throttled stage)
    throttled_workers: int = 0
    #: how many times a call had to wait for a token
    throttled_waits: int = 0
    #: for ``ordered=True``: items received and not yet emitted or failed, and the
    #: most there have been (bounded by 4 per worker)
    reorder_window: int = 0
    reorder_window_peak: int = 0
    #: workers between two items, waiting for their turn on the event loop (they
    #: yield every 64 items that needed no wait); a stage whose workers are often
    #: ready is CPU-bound, and more workers would not make it faster
    ready_workers: int = 0
    #: when this snapshot was taken, on the same clock (``None`` before a run)
    sampled_at: float | None = None

    def total_workers(self) -> int:
        """Return the number of workers the stage runs (busy, idle, blocked,
        throttled and ready)."""
        return (
            self.busy_workers
            + self.idle_workers
            + self.blocked_workers
            + self.throttled_workers
            + self.ready_workers
        )

    def utilization(self) -> float:
        """Return the share of workers that are busy, from 0.0 to 1.0.

        A stage with no workers reads as 0.0.
        """
        total = self.total_workers()
        return self.busy_workers / total if total else 0.0


class StageCounters:
    """The live, mutable counters of one stage.

    Plain attributes updated in place by the stage's workers and by the senders
    upstream; nothing here allocates or locks on the hot path.
    """

    __slots__ = (
        "blocked",
        "blocked_sends",
        "dequeue_gate",
        "emitted_is_processed",
        "enqueue_gate",
        "errors",
        "filtered",
        "idle",
        "last_dequeue_at",
        "last_enqueue_at",
        "last_error_at",
        "last_scale_down_at",
        "last_scale_up_at",
        "name",
        "nonempty_since",
        "offered",
        "output",
        "processed",
        "ready",
        "reorder_peak",
        "reorder_window",
        "retries",
        "settled",
        "taken",
        "throttled",
        "throttled_waits",
        "timeouts",
        "workers",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        #: items handed (or being handed) to the stage's input by upstream
        self.offered = 0
        #: items a worker took from the input
        self.taken = 0
        #: items the stage finished; a plain transformer leaves it at 0 and counts
        #: them once, as ``output.offered`` (each finished item is one sent on)
        self.processed = 0
        self.emitted_is_processed = False
        self.output: StageCounters | None = None
        self.filtered = 0
        self.retries = 0
        self.timeouts = 0
        self.throttled = 0
        self.throttled_waits = 0
        #: workers between two items, waiting for their turn on the event loop
        self.ready = 0
        self.reorder_window = 0
        self.reorder_peak = 0
        self.errors = 0
        self.workers = 0
        self.idle = 0
        self.blocked = 0
        self.blocked_sends = 0
        self.nonempty_since: float | None = None
        self.last_enqueue_at: float | None = None
        self.last_dequeue_at: float | None = None
        self.last_scale_up_at: float | None = None
        self.last_scale_down_at: float | None = None
        self.last_error_at: float | None = None
        #: set once the run has ended: every offered item is then accounted for
        self.settled = False
        #: the scaler's sampling gates: consulted when offered/taken reach them
        self.enqueue_gate = 0
        self.dequeue_gate = 0

    def settle(self) -> None:
        """Mark the run as ended: every worker is gone, every item accounted for."""
        self.settled = True
        self.workers = self.idle = self.blocked = self.throttled = self.ready = 0
        self.reorder_window = 0

    def snapshot(self, now: float | None = None) -> StageStats:
        busy = self.workers - self.idle - self.blocked - self.throttled - self.ready
        emitted = self.output.offered if self.output is not None else 0
        processed = emitted if self.emitted_is_processed else self.processed
        if self.settled:
            # After the run every offered item reached the stage; whatever it did not
            # finish or route to the error handler was cut by an abort.
            received = self.offered
            dropped = self.offered - processed - self.errors
            queue_length = 0
        else:
            received = self.taken
            dropped = 0
            queue_length = self.offered - self.taken
        # Positional, in field order (a test pins it): consults of the scaler take
        # a snapshot every few dozen items, and keywords cost twice the time.
        return _build_stats(
            (
                self.name,
                busy,
                self.idle,
                self.blocked,
                queue_length,
                self.nonempty_since if queue_length else None,
                self.last_enqueue_at,
                self.last_dequeue_at,
                self.last_scale_up_at,
                self.last_scale_down_at,
                self.last_error_at,
                received,
                processed,
                self.errors,
                dropped,
                self.blocked_sends,
                emitted,
                self.filtered,
                self.retries,
                self.timeouts,
                self.throttled,
                self.throttled_waits,
                self.reorder_window,
                self.reorder_peak,
                self.ready,
                now,
            )
        )


#: the slot setters of StageStats, in field order: a frozen dataclass's __init__
#: sets each field through object.__setattr__, which is the slow part
_SETTERS = tuple(
    getattr(StageStats, field.name).__set__ for field in fields(StageStats)
)


def _build_stats(values: tuple[object, ...]) -> StageStats:
    """Make a :class:`StageStats` from all its field values, in field order."""
    stats = object.__new__(StageStats)
    for set_field, value in zip(_SETTERS, values, strict=True):
        set_field(stats, value)
    return stats
