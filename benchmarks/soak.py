"""Soak: random flows with random faults, for a while, on every backend.

Run from the repository root::

    python -m benchmarks.soak --seconds 60 --backend all      # nox -s soak
    python -m benchmarks.soak --seconds 10 --backend trio --seed 7
    python -m benchmarks.soak --backend asyncio --replay 123456789   # one run
    python -m benchmarks.soak --seconds 60 --no-operators    # plain stages only

For ``--seconds`` per backend, in one event loop per backend, it builds random
flows one after another: 1-4 stages (the last one is the consumer) with
``FixedScaling``, ``UtilizationScaling`` or a churn strategy that adds and retires
workers at random, buffers of 0-64, per-worker context managers, stages whose
items randomly fail, ``sleep(0)`` or take a few milliseconds, and an error
handler that is absent, a function or a context manager. Each run gets one fault:
none, an abort (``stop(drain=False)`` from another task after a random delay), a
drain with a small timeout, a fatal producer error, a fatal ``BaseException``
from a stage, or the caller's scope being cancelled after a random delay. The
flow is hosted by ``run()``, ``tg.start(flow.run)`` or ``async with flow``.

Unless ``--no-operators``, the stages also draw the operators: fan-out
generators (0-3 outputs per item, a batch split into its items; some raise after
a few outputs, some checkpoint or sleep between outputs), filters, batches
(``max_size`` 1-8, sometimes a ``max_wait`` of 1-10 ms), ordered stages (map or
fan-out, 1-16 workers, fixed, utilization or churn scaling), per-call timeouts
of 1-10 ms that some calls overrun, ``Retry`` (1-4 attempts, backoff 0-1 ms,
waits of at most 2 ms, with or without jitter, on item errors, timeouts or both;
failing items fail their first 1-3 attempts) and ``RateLimit`` (2,000-20,000
calls/s or more, bursts of 1-256; raised as needed to keep a run well under a
second of throttling). About a third of the runs keep every stage
order-preserving (ordered, or one worker). The same seed draws the same plain
scenario with and without operators: the operators come from a second random
stream.

An item is its lineage: the producer's ``(n,)``, a fan-out output ``(*parent,
k)``; a batch is a list of items, and a fan-out on a batch yields its items.
Items stay unique, so every stage's calls can be checked against what the stage
before it sent.

After every run it checks the invariants: conservation in the stats (per stage
received = processed + errors + dropped, each stage received what the previous
one emitted, the first received what was produced), the stats against the run's
own counts (errors = items the handler saw, for every stage; emitted = outputs
returned, kept or yielded, exactly for unordered stages, at most for ordered
ones; filtered = items rejected; timeouts at most the calls cancelled, retries at
least the extra attempts, both exact in a run without a fault), the content
(every item a stage was called with was sent by the stage before it, flattening
batches; exactly that set when nothing was dropped; no output twice, no item
consumed twice, no item called more often than its ``Retry`` allows), the
operators' bounds (an ordered stage's reorder_window_peak <= 4 x the most workers
its strategy allows, batches of 1..max_size items and at most one partial batch
without ``max_wait``, no more attempts than a rate limit's burst + rate x
elapsed), the order (a one-worker stage whose input comes through stages that
all keep order, ordered or one-worker, and batches, is called in model order:
lineages strictly increasing, a batch by its first item; when that holds for the
consumer, the whole flow's output is checked), every fan-out generator finished
or closed, every context manager that entered exited, the producer closed, no
stage ran more calls at once than its ``max_workers``, no task left running, and
the right exception (or none) came out. Memory is sampled after a warm-up and at
the end (RSS and the number of objects the garbage collector tracks); it must
stay flat.

Every run derives from one seed (``--seed``), so a sequence of scenarios is
reproducible; what happens inside a run depends on scheduling too. A violation
prints the run's seed: ``--replay SEED`` runs that scenario alone. Exits 1 if
any invariant was violated.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import random
import re
import resource
import sys
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

import anyio
from anyio.lowlevel import checkpoint

from flowrhythm import (
    FixedScaling,
    Flow,
    RateLimit,
    Retry,
    ScalingStrategy,
    StageStats,
    UtilizationScaling,
)

from . import _harness as h

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

#: a run that takes longer than this (seconds) is a hang: a violation
RUN_GUARD = 30.0
#: memory is measured after this share of the time (the warm-up) and at the end
WARMUP_SHARE = 0.1
#: RSS may grow by at most this much between the warm-up and the end (bytes) ...
RSS_SLACK = 16 * 1024 * 1024
#: ... and the garbage collector may track at most this many more objects
OBJECT_SLACK = 5_000
#: the documented bound of an ordered stage's reorder window, per worker
WINDOW_PER_WORKER = 4
#: a stage's deliberate waits (throttling, overrun timeouts, backoff) are kept
#: to about this many seconds per run, so runs stay short
WAIT_BUDGET = 0.3
#: at most this many problems are recorded per run while it runs
MAX_PROBLEMS = 12

FAULTS = (
    "none",
    "abort",
    "drain_timeout",
    "producer_error",
    "stage_fatal",
    "outer_cancel",
)
#: how often each fault is picked
FAULT_WEIGHTS = (3, 2, 2, 1, 1, 2)
MODES = ("run", "task_group", "async_with")
#: what a transformer stage is, with operators (the consumer is always "map")
KINDS = ("map", "fan_out", "filter", "batch")
KIND_WEIGHTS = (4, 3, 2, 2)
#: what a Retry retries: ItemError, TimeoutError, or any Exception
RETRY_ON: dict[str, tuple[type[Exception], ...]] = {
    "item": (),  # filled in below, once ItemError exists
    "timeout": (TimeoutError,),
    "all": (Exception,),
}


class ItemError(Exception):
    """A per-item failure: the item goes to the error handler."""

    def __init__(self, stage: int, item: Any) -> None:
        super().__init__(stage, item)
        self.stage = stage


RETRY_ON["item"] = (ItemError,)


class ProducerError(Exception):
    """The producer's fatal error."""


class StageFatal(BaseException):
    """A stage's fatal error: not an Exception, so not an item failure."""


# -- items ------------------------------------------------------------------------------
#
# A leaf item is its lineage, a tuple of ints: the producer's (n,), a fan-out
# output (*parent, k). A batch is a list of items. Every item stays unique.

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def ident(item: Any) -> Any:
    """A hashable identity: the leaf itself, a batch as the tuple of its idents."""
    if type(item) is tuple:
        return item
    return tuple(map(ident, item))


def order_key(item: Any) -> tuple[int, ...]:
    """Where an item stands in model order: its lineage (a batch's first item's)."""
    while type(item) is list:
        item = item[0]
    return item  # type: ignore[no-any-return]


def item_hash(key: Any) -> int:
    """What the per-item decisions are drawn from: a producer's item is its
    number (as in the plain soak); anything else is hashed."""
    if len(key) == 1 and type(key[0]) is int:
        return int(key[0])
    return hash(key) & _MASK32


def mix(value: int, salt: int) -> int:
    """A per-stage scramble of ``value``, so decisions do not correlate."""
    return (((value ^ salt) * 0x9E3779B97F4A7C15) & _MASK64) >> 33


def leaves(key: Any) -> list[Any]:
    """The leaf idents inside an ident."""
    if key and type(key[0]) is tuple:
        return [leaf for part in key for leaf in leaves(part)]
    return [key]


def shape_problem(item: Any, shape: tuple[int, ...]) -> str | None:
    """Whether ``item`` is nested as ``shape`` says (one max_size per batch level,
    outermost first) with every batch of 1..max_size items."""
    if not shape:
        return None if type(item) is tuple else f"expected an item, got {item!r}"
    if type(item) is not list:
        return f"expected a batch, got {item!r}"
    if not 1 <= len(item) <= shape[0]:
        return f"a batch of {len(item)} items (max_size {shape[0]})"
    for part in item:
        problem = shape_problem(part, shape[1:])
        if problem is not None:
            return problem
    return None


# -- scenarios ------------------------------------------------------------------------


@dataclass
class StageSpec:
    strategy: str  # "fixed", "utilization" or "churn"
    strategy_args: dict[str, Any]
    buffer_size: int | None  # None: the flow's default
    with_cm: bool
    fail_every: int  # 0: never; items with (hash + fail_offset) % fail_every == 0
    fail_offset: int
    yield_every: int  # 0: never; items with hash % yield_every == 0 sleep(0)
    slow_every: int  # 0: never; items with hash % slow_every == 1 sleep(slow_ms)
    slow_ms: float
    # -- operators (the defaults make a plain stage) --
    kind: str = "map"  # "map", "fan_out", "filter" or "batch"
    salt: int = 0
    ordered: bool = False
    #: a failing item fails this many attempts (0: every attempt)
    fail_attempts: int = 0
    timeout: float | None = None
    #: items whose mix % overrun_every == 0 sleep past the timeout, on their
    #: first overrun_attempts attempts (0: none)
    overrun_every: int = 0
    overrun_attempts: int = 1
    #: Retry(**retry, on=RETRY_ON[retry_on]), or None
    retry: dict[str, Any] | None = None
    retry_on: str = "all"
    #: RateLimit(per_second, burst), or None
    rate: tuple[float, int] | None = None
    #: fan-out: outputs per leaf input, mix % (fan_max + 1); a batch is split
    fan_max: int = 0
    #: fan-out: inputs with (mix >> 3) % fan_raise_every == 0 raise after some
    #: outputs (on the attempts a failing item fails)
    fan_raise_every: int = 0
    #: fan-out: between outputs, "none", "checkpoint" or "sleep" (some of them)
    fan_pace: str = "none"
    #: filter: rejects the items with mix % keep_every == 0 (0: keeps all)
    keep_every: int = 0
    #: batch
    max_size: int = 0
    max_wait: float | None = None


@dataclass
class RunSpec:
    seed: int
    stages: list[StageSpec]
    default_buffer: int
    items: int | None  # None: an endless producer
    producer_cm: bool
    handler: str  # "none", "fn" or "cm"
    mode: str
    fault: str
    #: when the fault fires: ("seconds", s) or ("steps", checkpoints)
    delay: tuple[str, float]
    drain_timeout: float
    #: the item at which the producer raises, or the stage raises StageFatal
    fault_item: int
    fault_stage: int
    operators: bool = False
    #: every stage keeps order (ordered, or one worker), the consumer has one worker
    keep_order: bool = False


def make_spec(seed: int, *, operators: bool = True) -> RunSpec:
    rng = random.Random(seed)
    stages = [_stage_spec(rng) for _ in range(rng.randint(1, 4))]
    fault = rng.choices(FAULTS, FAULT_WEIGHTS)[0]
    endless = fault in ("abort", "drain_timeout", "outer_cancel") and rng.random() < 0.7
    items = None if endless else rng.choice([0, 1, 5, 50, 300, 1000, 3000])
    # early moments (starting, entering contexts) as often as late ones
    if rng.random() < 0.5:
        delay: tuple[str, float] = ("seconds", rng.uniform(0.0, 0.03) ** 2 / 0.03)
    else:
        delay = ("steps", int(301 ** rng.random()) - 1)
    spec = RunSpec(
        seed=seed,
        stages=stages,
        default_buffer=rng.choice([0, 1, 4, 64]),
        items=items,
        producer_cm=rng.random() < 0.3,
        handler=rng.choice(["none", "fn", "cm"]),
        mode=rng.choice(MODES),
        fault=fault,
        delay=delay,
        drain_timeout=rng.choice([0.0, 0.001, 0.005, 0.02, 1.0]),
        fault_item=rng.randint(0, max((items or 500) - 1, 0)),
        fault_stage=rng.randrange(len(stages)),
    )
    if operators:
        # A second stream: the plain scenario stays the same with and without.
        _add_operators(spec, random.Random(f"operators {seed}"))
    return spec


def _stage_spec(rng: random.Random) -> StageSpec:
    kind = rng.choice(["fixed", "utilization", "churn"])
    if kind == "fixed":
        args: dict[str, Any] = {"workers": rng.randint(1, 4)}
    elif kind == "utilization":
        low = rng.randint(0, 2)
        args = {
            "min_workers": low,
            "max_workers": low + rng.randint(1, 6),
            "sampling_events": rng.randint(1, 20),
            "sampling_period": rng.choice([0.0, 0.005, 0.02]),
            "cooldown_seconds": rng.choice([0.0, 0.01, 0.05]),
            "dampening": rng.choice([0.3, 0.5, 1.0]),
        }
    else:
        low = rng.randint(0, 2)
        args = {
            "min_workers": low,
            "max_workers": max(low, 1) + rng.randint(0, 6),
            "seed": rng.getrandbits(32),
        }
    return StageSpec(
        strategy=kind,
        strategy_args=args,
        buffer_size=rng.choice([None, None, 0, 1, 2, 8, 64]),
        with_cm=rng.random() < 0.5,
        fail_every=rng.choice([0, 0, 3, 7, 50]),
        fail_offset=rng.randrange(50),
        yield_every=rng.choice([0, 1, 3, 10]),
        slow_every=rng.choice([0, 0, 0, 50, 200]),
        slow_ms=rng.uniform(1.0, 5.0),
    )


def _add_operators(spec: RunSpec, rng: random.Random) -> None:
    spec.operators = True
    spec.keep_order = keep_order = rng.random() < 0.3
    last = len(spec.stages) - 1
    for index, stage in enumerate(spec.stages):
        stage.salt = rng.getrandbits(32)
        stage.kind = kind = (
            "map" if index == last else rng.choices(KINDS, KIND_WEIGHTS)[0]
        )
        if kind == "batch":
            stage.max_size = rng.randint(1, 8)
            stage.max_wait = rng.choice([None, None, 0.001, 0.003, 0.01])
            stage.strategy, stage.strategy_args = "fixed", {"workers": 1}
            stage.with_cm = False
            stage.fail_every = stage.yield_every = stage.slow_every = 0
            continue
        if kind in ("map", "fan_out") and index != last:
            stage.ordered = rng.random() < (0.6 if keep_order else 0.35)
        if stage.ordered:
            stage.strategy, stage.strategy_args = _ordered_strategy(rng)
        elif keep_order or (index == last and rng.random() < 0.15):
            stage.strategy, stage.strategy_args = _one_worker_strategy(rng)
        if kind == "fan_out":
            stage.with_cm = False  # a factory may not yield a generator function
            stage.fan_max = rng.randint(0, 3)
            stage.fan_raise_every = rng.choice([0, 0, 2, 5, 20])
            stage.fan_pace = rng.choice(["none", "checkpoint", "sleep"])
        elif kind == "filter":
            stage.keep_every = rng.choice([0, 2, 3, 10])
        stage.fail_attempts = rng.choice([0, 1, 1, 2, 3])
        if rng.random() < 0.35:
            stage.timeout = rng.choice([0.001, 0.002, 0.005, 0.01])
            stage.overrun_every = rng.choice([0, 7, 20, 100])
            stage.overrun_attempts = rng.randint(1, 3)
        if kind != "filter" and rng.random() < 0.35:
            backoff = rng.choice([0.0, 0.0001, 0.0005, 0.001])
            stage.retry = {
                "attempts": rng.randint(1, 4),
                "backoff": backoff,
                "max_backoff": rng.choice([backoff, min(4 * backoff, 0.002), 0.001]),
                "jitter": rng.random() < 0.5,
            }
            stage.retry_on = rng.choice(["all", "item", "timeout"])
        if kind != "filter" and rng.random() < 0.25:
            stage.rate = (rng.uniform(2000.0, 20000.0), rng.choice([1, 4, 32, 256]))
    if spec.fault == "stage_fatal":
        # a batch stage runs no function: the fault goes to the next one that does
        while spec.stages[spec.fault_stage].kind == "batch":
            spec.fault_stage += 1
    _keep_short(spec)


def _ordered_strategy(rng: random.Random) -> tuple[str, dict[str, Any]]:
    kind = rng.choice(["fixed", "utilization", "churn"])
    if kind == "fixed":
        return kind, {"workers": rng.randint(1, 16)}
    low = rng.randint(0, 2)
    if kind == "utilization":
        return kind, {
            "min_workers": low,
            "max_workers": min(low + rng.randint(1, 14), 16),
            "sampling_events": rng.randint(1, 20),
            "sampling_period": rng.choice([0.0, 0.005, 0.02]),
            "cooldown_seconds": rng.choice([0.0, 0.01]),
            "dampening": rng.choice([0.5, 1.0]),
        }
    high = min(max(low, 1) + rng.randint(0, 15), 16)
    return kind, {"min_workers": low, "max_workers": high, "seed": rng.getrandbits(32)}


def _one_worker_strategy(rng: random.Random) -> tuple[str, dict[str, Any]]:
    kind = rng.choice(["fixed", "utilization", "churn"])
    if kind == "fixed":
        return kind, {"workers": 1}
    if kind == "utilization":
        return kind, {
            "min_workers": 0,
            "max_workers": 1,
            "sampling_events": rng.randint(1, 20),
            "sampling_period": rng.choice([0.0, 0.005]),
            "cooldown_seconds": 0.0,
            "dampening": 1.0,
        }
    return kind, {
        "min_workers": rng.randint(0, 1),
        "max_workers": 1,
        "seed": rng.getrandbits(32),
    }


def _keep_short(spec: RunSpec) -> None:
    """Bound each stage's deliberate waits from a rough (high) estimate of the
    items reaching it: throttling, overrun timeouts and retry backoff."""
    estimate = float(spec.items if spec.items is not None else 3000)
    sizes: list[int] = []  # the max_size of each batch level, innermost last
    for stage in spec.stages:
        calls = estimate * (stage.retry["attempts"] if stage.retry else 1)
        if stage.rate is not None:
            per_second, burst = stage.rate
            stage.rate = (max(per_second, calls / WAIT_BUDGET), burst)
        if stage.timeout is not None and stage.overrun_every:
            waits = calls * stage.timeout * stage.overrun_attempts / WAIT_BUDGET
            stage.overrun_every = max(stage.overrun_every, math.ceil(waits))
        if (
            stage.retry is not None
            and stage.retry["max_backoff"] > 0
            and stage.fail_every
        ):
            failing = estimate / stage.fail_every * stage.retry["attempts"]
            waits = failing * stage.retry["max_backoff"]
            scale = min(1.0, WAIT_BUDGET / waits) if waits else 1.0
            stage.retry["backoff"] *= scale
            stage.retry["max_backoff"] *= scale
        if stage.kind == "batch":
            sizes.append(stage.max_size)
        elif stage.kind == "fan_out":
            estimate *= sizes.pop() if sizes else max(stage.fan_max, 1)


class Churn(ScalingStrategy):
    """Adds or retires up to three workers at random on every event and tick."""

    sampling_events = 1
    sampling_period = 0.002

    def __init__(self, min_workers: int, max_workers: int, seed: int) -> None:
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.rng = random.Random(seed)

    def initial_workers(self) -> int:
        return self.rng.randint(self.min_workers, self.max_workers)

    def for_stage(self, stage_name: str) -> Churn:
        return Churn(self.min_workers, self.max_workers, self.rng.getrandbits(32))

    def _churn(self, stats: StageStats) -> int:
        return self.rng.randint(-3, 3)

    on_enqueue = on_dequeue = on_tick = _churn


def make_strategy(spec: StageSpec) -> ScalingStrategy:
    if spec.strategy == "fixed":
        return FixedScaling(**spec.strategy_args)
    if spec.strategy == "utilization":
        return UtilizationScaling(**spec.strategy_args)
    return Churn(**spec.strategy_args)


def max_workers(spec: StageSpec) -> int:
    if spec.strategy == "fixed":
        return int(spec.strategy_args["workers"])
    return int(spec.strategy_args["max_workers"])


@dataclass
class Layout:
    """What follows from a run's stages: per stage, the nesting of its input
    (one max_size per batch level, outermost first), whether its input comes in
    model order, whether its calls are checked for that order, and the batch
    stage right before it (its index), if there is one."""

    shapes: list[tuple[int, ...]]
    in_order: list[bool]
    check_order: list[bool]
    after_batch: list[int | None]

    @classmethod
    def of(cls, spec: RunSpec) -> Layout:
        shapes, in_order, check_order, after_batch = [], [], [], []
        shape: tuple[int, ...] = ()
        ordered = True
        previous: StageSpec | None = None
        for index, stage in enumerate(spec.stages):
            shapes.append(shape)
            in_order.append(ordered)
            one_worker = max_workers(stage) == 1
            check_order.append(ordered and one_worker and stage.kind != "batch")
            after_batch.append(
                index - 1
                if previous is not None
                and previous.kind == "batch"
                and stage.kind != "batch"
                else None
            )
            if stage.kind == "batch":
                shape = (stage.max_size, *shape)
            elif stage.kind == "fan_out" and shape:
                shape = shape[1:]
            ordered = ordered and (stage.kind == "batch" or stage.ordered or one_worker)
            previous = stage
        return cls(shapes, in_order, check_order, after_batch)


# -- one run ----------------------------------------------------------------------------


@dataclass
class StageLedger:
    """What one stage's function saw (nothing for a batch stage)."""

    attempts: int = 0  # calls (generator runs) started, retries included
    calls: dict[Any, int] = field(default_factory=dict)  # ident -> attempts
    in_flight: int = 0
    peak: int = 0
    raised: int = 0  # attempts that raised ItemError
    cancelled: int = 0  # attempts that ended cancelled (timeouts among them)
    outputs: list[Any] = field(default_factory=list)  # idents returned/kept/yielded
    rejected: int = 0  # filter: items the predicate turned down
    finished: int = 0  # fan-out: generator runs that reached their end
    partial: int = 0  # fan-out: outputs of runs that then failed or were cut
    open_generators: int = 0
    handled: int = 0  # failed items the error handler (or the log) got
    last_key: Any = None  # the order key of the last item called (order checks)
    batches: int = 0  # batches received from the batch stage right before
    batch_items: int = 0
    partial_batches: int = 0


@dataclass
class Ledger:
    """What the run's own callables saw."""

    stages: list[StageLedger]
    produced: int = 0
    enters: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)
    producer_started: bool = False
    producer_closed: bool = False
    fatal: BaseException | None = None  # what the fault raised, if it did
    stop_called: bool = False
    problems: list[str] = field(default_factory=list)  # seen while running

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)

    def handled_by(self, exc: BaseException) -> None:
        """Count a failed item the error handler (or the default log) got."""
        index = stage_of(exc)
        if index is None or not 0 <= index < len(self.stages):
            self.problem(f"the error handler got an unexpected exception: {exc!r}")
        else:
            self.stages[index].handled += 1

    @property
    def consumed(self) -> list[Any]:
        return self.stages[-1].outputs


_TIMED_OUT = re.compile(r"'s(\d+)' took longer than")


def stage_of(exc: BaseException) -> int | None:
    """Which stage an item failed in, from what the error handler got."""
    if isinstance(exc, ItemError):
        return exc.stage
    if isinstance(exc, TimeoutError):
        found = _TIMED_OUT.search(str(exc))
        if found is not None:
            return int(found.group(1))
    return None


#: the ledger of the run in progress, for the log handler (a flow without an
#: error handler logs every failed item)
_current: Ledger | None = None


@dataclass
class Outcome:
    items: int = 0
    consumed: int = 0
    errors: int = 0
    dropped: int = 0
    fault_fired: bool = False
    #: the consumer's calls were checked for model order
    order_checked: bool = False
    #: operator counts: stage kinds and options, and totals from the stats
    ops: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


def build(spec: RunSpec, layout: Layout, ledger: Ledger) -> Flow:
    flow = Flow(buffer_size=spec.default_buffer)
    last = len(spec.stages) - 1

    async def produce() -> AsyncIterator[tuple[int]]:
        ledger.producer_started = True
        try:
            item = 0
            while spec.items is None or item < spec.items:
                if spec.fault == "producer_error" and item == spec.fault_item:
                    ledger.fatal = ProducerError(f"source lost at {item}")
                    raise ledger.fatal
                ledger.produced += 1
                yield (item,)
                item += 1
                if item % 16 == 0:
                    await checkpoint()
        finally:
            ledger.producer_closed = True

    @asynccontextmanager
    async def produce_cm() -> AsyncIterator[AsyncIterator[tuple[int]]]:
        ledger.enters["producer"] += 1
        try:
            yield produce()
        finally:
            ledger.exits["producer"] += 1
            await checkpoint()

    flow.set_producer(produce_cm if spec.producer_cm else produce)

    for index, stage in enumerate(spec.stages):
        name = f"s{index}"
        if stage.kind == "batch":
            flow.add_batch(
                stage.max_size,
                max_wait=stage.max_wait,
                name=name,
                buffer_size=stage.buffer_size,
            )
            continue
        target: Any = _stage_call(spec, layout, index, ledger)
        if stage.with_cm:
            target = _per_worker(name, target, ledger)
        options: dict[str, Any] = {}
        if stage.timeout is not None:
            options["timeout"] = stage.timeout
        if stage.retry is not None:
            options["retry"] = Retry(on=RETRY_ON[stage.retry_on], **stage.retry)
        if stage.rate is not None:
            options["rate_limit"] = RateLimit(stage.rate[0], burst=stage.rate[1])
        if stage.ordered:
            options["ordered"] = True
        common: dict[str, Any] = {
            "name": name,
            "scaling_strategy": make_strategy(stage),
            "buffer_size": stage.buffer_size,
        }
        if index == last:
            flow.set_consumer(target, **common, **options)
        elif stage.kind == "filter":
            flow.add_filter(target, **common, **options)
        else:
            flow.add_transformer(target, **common, **options)

    async def handle(item: Any, exc: BaseException) -> None:
        if item_hash(ident(item)) % 4 == 0:
            await checkpoint()
        ledger.handled_by(exc)  # nothing awaits after this

    if spec.handler == "fn":
        flow.set_error_handler(handle)
    elif spec.handler == "cm":
        flow.set_error_handler(_per_worker("handler", handle, ledger))
    return flow


def _stage_call(spec: RunSpec, layout: Layout, index: int, ledger: Ledger) -> Any:
    """The function of stage ``index``: a map, the consumer, a filter's predicate
    or a fan-out generator function, recording what it sees in the ledger."""
    stage = spec.stages[index]
    own = ledger.stages[index]
    fatal_here = spec.fault == "stage_fatal" and spec.fault_stage == index
    cancelled = anyio.get_cancelled_exc_class()
    shape = layout.shapes[index]
    check_order = layout.check_order[index]
    allowed = stage.retry["attempts"] if stage.retry is not None else 1
    batch_before = layout.after_batch[index]
    full_size = spec.stages[batch_before].max_size if batch_before is not None else 0
    name = f"s{index}"
    salt = stage.salt
    overrun_sleep = (stage.timeout or 0.0) * 2 + 0.001

    def begin(item: Any) -> tuple[Any, int]:
        key = ident(item)
        attempt = own.calls.get(key, 0) + 1
        own.calls[key] = attempt
        own.attempts += 1
        own.in_flight += 1
        own.peak = max(own.peak, own.in_flight)
        if attempt == 1:
            if shape or type(item) is not tuple:
                problem = shape_problem(item, shape)
                if problem is not None:
                    ledger.problem(f"{name} was called with {problem}")
            if batch_before is not None:
                own.batches += 1
                own.batch_items += len(item)
                own.partial_batches += len(item) < full_size
            if check_order:
                position = order_key(item)
                if own.last_key is not None and not position > own.last_key:
                    ledger.problem(
                        f"{name} (one worker, input in order) got {position} "
                        f"after {own.last_key}: out of model order"
                    )
                own.last_key = position
        elif attempt > allowed:
            ledger.problem(
                f"{name} was called {attempt} times with {key} (retry allows "
                f"{allowed}): delivered twice?"
            )
        return key, attempt

    def fails(value: int, attempt: int) -> bool:
        return bool(
            stage.fail_every
            and (value + stage.fail_offset) % stage.fail_every == 0
            and (not stage.fail_attempts or attempt <= stage.fail_attempts)
        )

    async def behave(item: Any, value: int, attempt: int) -> None:
        """The fault, the item's failure, an overrun, a slow item, a checkpoint."""
        if (
            fatal_here
            and ledger.fatal is None
            and order_key(item)[0] >= spec.fault_item
        ):
            ledger.fatal = StageFatal(f"{name} gave up at {order_key(item)}")
            raise ledger.fatal
        if fails(value, attempt) and stage.kind != "fan_out":
            own.raised += 1
            raise ItemError(index, item)
        if (
            stage.overrun_every
            and mix(value, salt) % stage.overrun_every == 0
            and attempt <= stage.overrun_attempts
            and stage.kind != "fan_out"
        ):
            await anyio.sleep(overrun_sleep)  # cut by the timeout
        if stage.slow_every and value % stage.slow_every == 1:
            await anyio.sleep(stage.slow_ms / 1000)
        elif stage.yield_every and value % stage.yield_every == 0:
            await checkpoint()

    if stage.kind == "map":

        async def call(item: Any) -> Any:
            key, attempt = begin(item)
            try:
                await behave(item, item_hash(key), attempt)
                own.outputs.append(key)
                return item
            except cancelled:
                own.cancelled += 1
                raise
            finally:
                own.in_flight -= 1

        return call

    if stage.kind == "filter":

        async def keep(item: Any) -> bool:
            key, attempt = begin(item)
            try:
                value = item_hash(key)
                await behave(item, value, attempt)
                if stage.keep_every and mix(value, salt) % stage.keep_every == 0:
                    own.rejected += 1
                    return False
                own.outputs.append(key)
                return True
            except cancelled:
                own.cancelled += 1
                raise
            finally:
                own.in_flight -= 1

        return keep

    assert stage.kind == "fan_out"

    async def split(item: Any) -> AsyncIterator[Any]:
        key, attempt = begin(item)
        own.open_generators += 1
        given = 0
        try:
            value = item_hash(key)
            scrambled = mix(value, salt)
            await behave(item, value, attempt)
            if type(item) is list:
                outputs = list(item)  # a batch: split it into its items
            else:
                outputs = [(*item, k) for k in range(scrambled % (stage.fan_max + 1))]
            failing = fails(value, attempt)
            raise_at = -1
            if failing:
                raise_at = 0  # before any output: worth a retry
            elif (
                stage.fan_raise_every
                and (scrambled >> 3) % stage.fan_raise_every == 0
                and (not stage.fail_attempts or attempt <= stage.fail_attempts)
            ):
                raise_at = (scrambled >> 7) % (len(outputs) + 1)
            overrun_at = -1
            if (
                stage.overrun_every
                and scrambled % stage.overrun_every == 0
                and attempt <= stage.overrun_attempts
            ):
                overrun_at = (scrambled >> 11) % (len(outputs) + 1)
            for k, output in enumerate(outputs):
                if k == raise_at:
                    own.raised += 1
                    raise ItemError(index, item)
                if k == overrun_at:
                    await anyio.sleep(overrun_sleep)  # this step is cut by the timeout
                if stage.fan_pace == "checkpoint":
                    await checkpoint()
                elif stage.fan_pace == "sleep" and (scrambled + k) % 8 == 0:
                    await anyio.sleep(0.0001 * (1 + (scrambled >> 15) % 5))
                own.outputs.append(ident(output))
                given += 1
                yield output
            if raise_at == len(outputs):
                own.raised += 1
                raise ItemError(index, item)
            if overrun_at == len(outputs):
                await anyio.sleep(overrun_sleep)  # the last step is cut
            own.finished += 1
            given = 0
        except cancelled:
            own.cancelled += 1
            raise
        finally:
            own.partial += given
            own.in_flight -= 1
            own.open_generators -= 1

    return split


def _per_worker(name: str, fn: Any, ledger: Ledger) -> Any:
    @asynccontextmanager
    async def factory() -> AsyncIterator[Any]:
        await checkpoint()
        ledger.enters[name] += 1
        try:
            yield fn
        finally:
            ledger.exits[name] += 1
            await checkpoint()

    return factory


async def _delay(spec: RunSpec) -> None:
    how, amount = spec.delay
    if how == "seconds":
        await anyio.sleep(amount)
    else:
        for _ in range(int(amount)):
            await checkpoint()


async def one_run(
    spec: RunSpec, baseline: set[int], *, early_stops: bool = False
) -> Outcome:
    global _current
    layout = Layout.of(spec)
    ledger = Ledger([StageLedger() for _ in spec.stages])
    out = Outcome()
    flow = build(spec, layout, ledger)
    # With task_group/async_with, stop() before start() has returned hits a known
    # bug (the start fails with "child exited without calling started()"), so the
    # stopper waits until the flow is launched, unless --early-stops; run() has no
    # such window.
    launched = anyio.Event()
    if early_stops:
        launched.set()
    caught: BaseException | None = None
    completed = False
    hung = False

    async def stopper() -> None:
        await launched.wait()
        await _delay(spec)
        ledger.stop_called = not completed  # else it is a no-op: nothing to cut
        if spec.fault == "abort":
            await flow.stop(drain=False)
        else:
            await flow.stop(timeout=spec.drain_timeout)

    async def canceller(scope: anyio.CancelScope) -> None:
        await _delay(spec)
        scope.cancel()

    async def host() -> None:
        if spec.mode == "run":
            launched.set()
            await flow.run()
        elif spec.mode == "task_group":
            async with anyio.create_task_group() as tg:
                await tg.start(flow.run)
                launched.set()
        else:
            async with flow:
                await flow.start()
                launched.set()

    _current = ledger
    began = anyio.current_time()
    try:
        with anyio.fail_after(RUN_GUARD):
            with anyio.CancelScope() as outer:
                async with anyio.create_task_group() as tg:
                    if spec.fault in ("abort", "drain_timeout"):
                        tg.start_soon(stopper)
                    elif spec.fault == "outer_cancel":
                        tg.start_soon(canceller, outer)
                    try:
                        await host()
                        completed = True
                    except (Exception, StageFatal, BaseExceptionGroup) as exc:
                        caught = _unwrap(exc)
                        if isinstance(caught, anyio.get_cancelled_exc_class()):
                            raise
                    tg.cancel_scope.cancel()  # the flow has ended: call off the rest
    except TimeoutError:
        hung = True
    finally:
        _current = None
    elapsed = anyio.current_time() - began

    v = out.violations
    if hung:
        v.append(f"the run did not end within {RUN_GUARD}s (a hang)")
    # -- the right exception came out ---------------------------------------------------
    expected = ledger.fatal
    if spec.fault == "outer_cancel" and outer.cancel_called:
        # A cancel that lands in the flow's last, shielded cleanup may find nothing
        # left to cut: the flow then completes normally (checked below: nothing
        # may be dropped). Otherwise the cancellation must come out.
        # (It may also land after the flow has completed, as the call-off of the
        # canceller races with its wake-up: then it cut nothing either.)
        out.fault_fired = outer.cancelled_caught and not completed
        if caught is not None or not (outer.cancelled_caught or completed):
            raised = "nothing" if caught is None else _format(caught)
            v.append(
                f"cancelled from outside: cancelled_caught={outer.cancelled_caught}, "
                f"completed={completed}, raised {raised}"
            )
    elif expected is not None:
        out.fault_fired = True
        if caught is not expected:
            v.append(f"expected {expected!r} to come out, got {caught!r}")
        elif not any(
            str(note).startswith("flowrhythm:")
            for note in getattr(caught, "__notes__", ())
        ):
            v.append(f"{caught!r} came out without a 'flowrhythm:' note")
    elif caught is not None:
        v.append(f"unexpected exception: {_format(caught)}")
    elif not completed and not hung:
        v.append("the run neither completed nor raised")
    if spec.fault in ("abort", "drain_timeout"):
        out.fault_fired = ledger.stop_called

    stats = flow.stats()
    v.extend(ledger.problems)
    v.extend(_check_stats(spec, layout, ledger, stats, elapsed))
    total_errors = sum(s.errors for s in stats.values())
    dropped = sum(s.dropped for s in stats.values())
    v.extend(_check_content(spec, ledger, exact=not dropped and not hung))
    if all(stage.kind == "map" for stage in spec.stages):
        # one item in, one item out at every stage: the plain soak's balance
        consumed = len(ledger.consumed)
        if ledger.produced != consumed + total_errors + dropped:
            v.append(
                f"produced {ledger.produced} != consumed {consumed} + "
                f"errors {total_errors} + dropped {dropped}"
            )
    cut = out.fault_fired and spec.fault != "none"
    if dropped and not cut:
        v.append(f"{dropped} items dropped although the run was not cut")
    if spec.fault == "none" and not hung and ledger.produced != spec.items:
        v.append(f"produced {ledger.produced} of {spec.items} items")

    # -- resources and tasks ----------------------------------------------------------------
    if ledger.enters != ledger.exits:
        v.append(f"context managers: entered {ledger.enters}, exited {ledger.exits}")
    if ledger.producer_started and not ledger.producer_closed:
        v.append("the producer was not closed")
    left = [info.name for info in anyio.get_running_tasks() if info.id not in baseline]
    if left:
        v.append(f"tasks still running: {left}")

    out.items = ledger.produced
    out.consumed = len(ledger.consumed)
    out.errors = total_errors
    out.dropped = dropped
    out.order_checked = layout.check_order[-1]
    if spec.operators:
        _count_operators(spec, stats, out.ops)
    return out


def _check_stats(
    spec: RunSpec,
    layout: Layout,
    ledger: Ledger,
    stats: Mapping[str, StageStats],
    elapsed: float,
) -> list[str]:
    """Conservation in the stats, and the stats against the ledger."""
    v: list[str] = []
    names = list(stats)
    last = len(names) - 1
    none = spec.fault == "none"
    for index, (name, s) in enumerate(stats.items()):
        stage = spec.stages[index]
        own = ledger.stages[index]
        if s.received != s.processed + s.errors + s.dropped:
            v.append(f"{name}: received != processed + errors + dropped: {s}")
        if s.dropped < 0:
            v.append(f"{name}: negative dropped: {s}")
        if s.total_workers() or s.queue_length:
            v.append(f"{name}: workers or queue left after the run: {s}")
        bound = WINDOW_PER_WORKER * max(max_workers(stage), 1)
        if stage.ordered and s.reorder_window_peak > bound:
            v.append(
                f"{name}: reorder_window_peak {s.reorder_window_peak} > {bound} "
                f"(4 x max_workers {max_workers(stage)})"
            )
        for what, value, allowed in (
            ("reorder_window_peak", s.reorder_window_peak, stage.ordered),
            ("filtered", s.filtered, stage.kind == "filter"),
            ("retries", s.retries, stage.retry is not None),
            ("timeouts", s.timeouts, stage.timeout is not None),
            ("throttled_waits", s.throttled_waits, stage.rate is not None),
        ):
            if value and not allowed:
                v.append(f"{name}: {what} {value} without the option")
        if stage.kind == "batch":
            v.extend(_check_batch(spec, layout, ledger, stats, index))
            continue
        if s.errors != own.handled:
            v.append(f"{name}: the error handler got {own.handled}, errors {s.errors}")
        if s.errors > own.raised + own.cancelled:
            v.append(
                f"{name}: more errors ({s.errors}) than attempts that raised "
                f"({own.raised}) or were cut ({own.cancelled})"
            )
        if own.peak > max_workers(stage):
            v.append(
                f"{name}: {own.peak} calls at once, max_workers={max_workers(stage)}"
            )
        if own.open_generators:
            v.append(f"{name}: {own.open_generators} fan-out generators not closed")
        # what the stage sent on, against what its function returned/kept/yielded
        outputs = len(own.outputs)
        if index == last:
            if s.processed != outputs:
                v.append(f"{name}: consumed {outputs} but stats say {s.processed}")
        elif stage.ordered:
            # An abort cuts what waits in the reorder window: whole inputs (counted
            # as dropped) and the outputs an input yielded before it failed (the
            # input itself went to the error handler, so nothing counts as dropped).
            short = outputs - s.emitted
            allowed = 0 if none else (outputs if s.dropped else own.partial)
            if short < 0 or short > allowed:
                v.append(
                    f"{name}: emitted {s.emitted}, its function gave {outputs} "
                    f"({own.partial} of them before a failure)"
                )
        elif s.emitted != outputs:
            v.append(f"{name}: emitted {s.emitted}, its function gave {outputs}")
        if stage.kind == "filter" and s.filtered != own.rejected:
            v.append(
                f"{name}: filtered {s.filtered}, the predicate rejected {own.rejected}"
            )
        exact = not stage.ordered or not s.dropped
        if stage.kind == "fan_out" and (
            s.processed > own.finished or (exact and s.processed != own.finished)
        ):
            v.append(
                f"{name}: processed {s.processed}, generators finished {own.finished}"
            )
        if s.timeouts > own.cancelled or (none and s.timeouts != own.cancelled):
            v.append(f"{name}: timeouts {s.timeouts}, calls cancelled {own.cancelled}")
        extra = own.attempts - len(own.calls)
        if s.retries < extra or (none and s.retries != extra):
            v.append(f"{name}: retries {s.retries}, extra attempts {extra}")
        if stage.rate is not None:
            per_second, burst = stage.rate
            most = burst + per_second * elapsed + 1
            if own.attempts > most:
                v.append(
                    f"{name}: {own.attempts} attempts in {elapsed:.4f} s exceed "
                    f"RateLimit({per_second:.0f}, burst={burst}) (at most {most:.1f})"
                )
    for up, down in pairwise(names):
        if stats[down].received != stats[up].emitted:
            v.append(
                f"{down} received {stats[down].received} but {up} emitted "
                f"{stats[up].emitted}"
            )
    first = stats[names[0]]
    if first.received != ledger.produced:
        v.append(f"produced {ledger.produced} but {names[0]} received {first.received}")
    return v


def _check_batch(
    spec: RunSpec,
    layout: Layout,
    ledger: Ledger,
    stats: Mapping[str, StageStats],
    index: int,
) -> list[str]:
    v: list[str] = []
    stage = spec.stages[index]
    s = stats[f"s{index}"]
    if s.emitted > s.processed or (s.processed and not s.emitted):
        v.append(f"s{index}: {s.emitted} batches of {s.processed} items")
    if s.processed > s.emitted * stage.max_size:
        v.append(
            f"s{index}: {s.processed} items in {s.emitted} batches of max_size "
            f"{stage.max_size}"
        )
    after = index + 1
    if after < len(spec.stages) and layout.after_batch[after] == index:
        seen = ledger.stages[after]
        if stage.max_wait is None and seen.partial_batches > 1:
            v.append(
                f"s{index}: {seen.partial_batches} partial batches without max_wait "
                "(only the last may be partial)"
            )
        total_dropped = sum(other.dropped for other in stats.values())
        if not total_dropped and (seen.batches, seen.batch_items) != (
            s.emitted,
            s.processed,
        ):
            v.append(
                f"s{index}: emitted {s.emitted} batches of {s.processed} items, "
                f"s{after} got {seen.batches} of {seen.batch_items}"
            )
    return v


def _check_content(spec: RunSpec, ledger: Ledger, *, exact: bool) -> list[str]:
    """Every item a stage's function was called with was sent by the stage before
    it (batches flattened); exactly those when nothing was dropped. No output
    twice, no item consumed twice."""
    v: list[str] = []
    sent: set[Any] = {(n,) for n in range(ledger.produced)}
    sender = "the producer"
    levels = 0  # batch stages since the sender
    for index, stage in enumerate(spec.stages):
        if stage.kind == "batch":
            levels += 1
            continue
        own = ledger.stages[index]
        got: set[Any] = set(own.calls)
        for _ in range(levels):
            flat = {part for batch in got for part in batch}
            if len(flat) != sum(map(len, got)):
                v.append(f"s{index}: an item came in two batches")
            got = flat
        extra = got - sent
        if extra:
            v.append(
                f"s{index} was called with {len(extra)} items {sender} never sent, "
                f"e.g. {min(extra)}"
            )
        if exact and len(got) != len(sent):
            missing = sent - got
            v.append(
                f"nothing was dropped, but {len(missing)} items {sender} sent never "
                f"reached s{index}, e.g. {min(missing) if missing else None}"
            )
        outputs = own.outputs
        sent = set(outputs)
        if len(sent) != len(outputs):
            twice = [key for key, n in Counter(outputs).items() if n > 1]
            v.append(f"s{index} gave {len(twice)} outputs twice, e.g. {twice[0]}")
        sender = f"s{index}"
        levels = 0
    consumed = [leaf for key in ledger.consumed for leaf in leaves(key)]
    if len(set(consumed)) != len(consumed):
        v.append("an item was consumed twice")
    return v


def _count_operators(
    spec: RunSpec, stats: Mapping[str, StageStats], ops: Counter[str]
) -> None:
    for stage, s in zip(spec.stages, stats.values(), strict=True):
        ops[stage.kind] += 1
        if stage.kind == "fan_out":
            ops["fan-out outputs"] += s.emitted
        elif stage.kind == "batch":
            ops["batches"] += s.emitted
        ops["ordered"] += stage.ordered
        ops["timeout"] += stage.timeout is not None
        ops["retry"] += stage.retry is not None
        ops["rate_limit"] += stage.rate is not None
        ops["filtered"] += s.filtered
        ops["retries"] += s.retries
        ops["timeouts"] += s.timeouts
        ops["throttled waits"] += s.throttled_waits
        if stage.ordered:
            peak = s.reorder_window_peak
            ops["max reorder peak"] = max(ops["max reorder peak"], peak)
    ops["keep_order runs"] += spec.keep_order


def _unwrap(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).rstrip()


# -- one backend --------------------------------------------------------------------------


@dataclass
class Report:
    backend: str
    operators: bool = True
    seconds: float = 0.0
    runs: int = 0
    items: int = 0
    consumed: int = 0
    errors: int = 0
    dropped: int = 0
    order_checked: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    fired: Counter[str] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    log_records: Counter[str] = field(default_factory=Counter)
    rss_start: int = 0
    rss_end: int = 0
    objects_start: int = 0
    objects_end: int = 0
    peak_rss: int = 0
    violations: list[dict[str, Any]] = field(default_factory=list)


class _CountingHandler(logging.Handler):
    """Counts the flowrhythm logger's records instead of printing them (a flow
    without an error handler logs every failed item)."""

    def __init__(self, counts: Counter[str]) -> None:
        super().__init__(logging.DEBUG)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        failed = message.startswith("item ")
        kind = "item failed" if failed else message[:60]
        self.counts[f"{record.levelname}: {kind}"] += 1
        if failed and _current is not None and record.exc_info:
            exc = record.exc_info[1]
            if exc is not None:
                _current.handled_by(exc)


@contextmanager
def counting_logs(counts: Counter[str]) -> Iterator[None]:
    """Count the flowrhythm logger's records (see ``_CountingHandler``)."""
    logger = logging.getLogger("flowrhythm")
    handler = _CountingHandler(counts)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def rss_bytes() -> int:
    """The current resident set size; the peak where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # kB on Linux


def _memory() -> tuple[int, int]:
    gc.collect()
    return rss_bytes(), len(gc.get_objects())


async def soak(
    name: str,
    seconds: float,
    seed: int,
    report: Report,
    early_stops: bool,
    operators: bool,
) -> None:
    rng = random.Random(f"{seed}")  # the same scenarios on every backend
    baseline = {info.id for info in anyio.get_running_tasks()}
    start = time.perf_counter()
    warm_until = start + seconds * WARMUP_SHARE
    measured = False
    while True:
        now = time.perf_counter()
        if now - start >= seconds:
            break
        if not measured and now >= warm_until:
            report.rss_start, report.objects_start = _memory()
            measured = True
        run_seed = rng.getrandbits(32)
        spec = make_spec(run_seed, operators=operators)
        out = await one_run(spec, baseline, early_stops=early_stops)
        report.runs += 1
        report.items += out.items
        report.consumed += out.consumed
        report.errors += out.errors
        report.dropped += out.dropped
        report.order_checked += out.order_checked
        for key, value in out.ops.items():
            if key.startswith("max "):
                report.ops[key] = max(report.ops[key], value)
            else:
                report.ops[key] += value
        report.faults[spec.fault] += 1
        report.fired[spec.fault] += out.fault_fired
        report.modes[spec.mode] += 1
        if out.violations:
            report.violations.append(
                {"run": report.runs, "seed": run_seed, "problems": out.violations}
            )
            again = run_seed if operators else f"{run_seed} --no-operators"
            print(
                f"[{name}] run {report.runs} (--replay {again}): "
                + "; ".join(out.violations),
                file=sys.stderr,
                flush=True,
            )
    report.seconds = time.perf_counter() - start
    if not measured:
        report.rss_start, report.objects_start = _memory()
    report.rss_end, report.objects_end = _memory()


def run_backend(
    name: str,
    seconds: float,
    seed: int,
    *,
    early_stops: bool = False,
    operators: bool = True,
) -> Report:
    report = Report(name, operators=operators)
    where = h.backend(name)
    with counting_logs(report.log_records):
        anyio.run(
            soak,
            name,
            seconds,
            seed,
            report,
            early_stops,
            operators,
            backend=where.anyio_backend,
            backend_options=dict(where.options),
        )
    report.peak_rss = peak_rss_bytes()
    return report


def replay(
    name: str, run_seed: int, *, early_stops: bool = False, operators: bool = True
) -> int:
    spec = make_spec(run_seed, operators=operators)
    print(f"scenario {run_seed} on {name}:")
    for key, value in asdict(spec).items():
        if key == "stages":
            for index, stage in enumerate(value):
                print(f"  stage s{index}: {stage}")
        else:
            print(f"  {key}: {value}")
    where = h.backend(name)

    async def main() -> Outcome:
        baseline = {info.id for info in anyio.get_running_tasks()}
        return await one_run(spec, baseline, early_stops=early_stops)

    logged: Counter[str] = Counter()
    with counting_logs(logged):
        out = anyio.run(
            main, backend=where.anyio_backend, backend_options=dict(where.options)
        )
    print(
        f"items {out.items}, consumed {out.consumed}, errors {out.errors}, "
        f"dropped {out.dropped}, fault fired: {out.fault_fired}"
    )
    for problem in out.violations:
        print(f"VIOLATION: {problem}")
    return 1 if out.violations else 0


# -- the report ----------------------------------------------------------------------------


def _mb(value: int) -> str:
    return f"{value / 1024 / 1024:.1f} MB"


def memory_problems(report: Report) -> list[str]:
    problems = []
    grew = report.rss_end - report.rss_start
    if grew > RSS_SLACK:
        problems.append(
            f"RSS grew by {_mb(grew)} after the warm-up (allowed: {_mb(RSS_SLACK)})"
        )
    more = report.objects_end - report.objects_start
    if more > OBJECT_SLACK:
        problems.append(
            f"{more} more objects tracked by the gc after the warm-up "
            f"(allowed: {OBJECT_SLACK})"
        )
    return problems


def print_report(report: Report) -> None:
    rate = report.items / report.seconds if report.seconds else math.nan
    print(f"\n== {report.backend}: {report.seconds:.1f} s")
    print(f"runs              {report.runs}")
    if report.operators:
        ops = report.ops
        print(
            f"stages            {ops['map']} map, {ops['fan_out']} fan-out, "
            f"{ops['filter']} filter, {ops['batch']} batch; {ops['ordered']} ordered, "
            f"{ops['timeout']} with timeout, {ops['retry']} with retry, "
            f"{ops['rate_limit']} rate-limited"
        )
        print(
            f"operators         {ops['fan-out outputs']} fan-out outputs, "
            f"{ops['filtered']} filtered, {ops['batches']} batches, "
            f"{ops['retries']} retries, {ops['timeouts']} timeouts, "
            f"{ops['throttled waits']} throttled waits, reorder window peak "
            f"{ops['max reorder peak']}"
        )
        print(
            f"order checked     consumer order in {report.order_checked} runs "
            f"({ops['keep_order runs']} drawn to keep order)"
        )
    print(
        f"items             {report.items} produced, {report.consumed} consumed, "
        f"{report.errors} failed (to the error handler), {report.dropped} dropped"
    )
    print(f"items/s           {rate:,.0f}")
    faults = ", ".join(
        f"{kind} {report.faults[kind]} (hit {report.fired[kind]})" for kind in FAULTS
    )
    print(f"faults (runs)     {faults}")
    print(f"hosted by         {', '.join(f'{m} {report.modes[m]}' for m in MODES)}")
    logged = ", ".join(f"{k}: {n}" for k, n in sorted(report.log_records.items()))
    print(f"log records       {logged or 'none'}")
    print(f"peak RSS          {_mb(report.peak_rss)} (ru_maxrss, whole process)")
    print(
        f"RSS               {_mb(report.rss_start)} after the warm-up, "
        f"{_mb(report.rss_end)} at the end ({report.rss_end - report.rss_start:+,} B)"
    )
    print(
        f"gc objects        {report.objects_start} after the warm-up, "
        f"{report.objects_end} at the end "
        f"({report.objects_end - report.objects_start:+})"
    )
    problems = memory_problems(report)
    print(f"violations        {len(report.violations) + len(problems)}")
    for problem in problems:
        print(f"  memory: {problem}")
    flag = "" if report.operators else " --no-operators"
    for violation in report.violations:
        print(f"  run {violation['run']} (--replay {violation['seed']}{flag}):")
        for problem in violation["problems"]:
            print(f"    {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="per backend (default: 60)"
    )
    parser.add_argument(
        "--backend",
        default="all",
        help="asyncio, uvloop, trio, a comma-separated list, or all (default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument(
        "--replay", type=int, metavar="SEED", help="run one scenario by its seed"
    )
    parser.add_argument(
        "--early-stops",
        action="store_true",
        help="also stop flows hosted by tg.start()/async with before their start "
        "has returned",
    )
    parser.add_argument(
        "--no-operators",
        dest="operators",
        action="store_false",
        help="plain stages only (map transformers and the consumer, no timeout, "
        "retry or rate limit): the soak as it was before the operators",
    )
    args = parser.parse_args(argv)
    names = list(h.BACKENDS) if args.backend == "all" else h.parse_csv(args.backend)
    for name in names:
        h.backend(name)  # an unknown name fails here, with the choices
    if args.replay is not None:
        return max(
            replay(
                name,
                args.replay,
                early_stops=args.early_stops,
                operators=args.operators,
            )
            for name in names
        )
    reports = []
    mix = "with operators" if args.operators else "plain stages only"
    print(f"soak: {args.seconds:g} s per backend, seed {args.seed}, {mix}")
    for name in names:
        if not h.backend_available(name):
            print(f"\n== {name}: not installed, skipped")
            continue
        report = run_backend(
            name,
            args.seconds,
            args.seed,
            early_stops=args.early_stops,
            operators=args.operators,
        )
        print_report(report)
        reports.append(report)
    failed = [r.backend for r in reports if r.violations or memory_problems(r)]
    if failed:
        print(f"\nFAILED: invariant violations on {', '.join(failed)}")
        return 1
    print("\nOK: no invariant violations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
