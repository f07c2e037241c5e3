"""Soak: random flows with random faults, for a while, on every backend.

Run from the repository root::

    python -m benchmarks.soak --seconds 60 --backend all      # nox -s soak
    python -m benchmarks.soak --seconds 10 --backend trio --seed 7
    python -m benchmarks.soak --backend asyncio --replay 123456789   # one run

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

After every run it checks the invariants: conservation from the run's own counts
against ``stats()`` (produced = consumed + errors + dropped, per stage received =
processed + errors + dropped, each stage received what the previous processed,
no item consumed twice, nothing dropped unless the run was cut), every context
manager that entered exited, the producer closed, no stage ran more calls at
once than its ``max_workers``, no task left running, and the right exception
(or none) came out. Memory is sampled after a warm-up and at the end (RSS and
the number of objects the garbage collector tracks); it must stay flat.

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
import resource
import sys
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

import anyio
from anyio.lowlevel import checkpoint

from flowrhythm import (
    FixedScaling,
    Flow,
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


class ItemError(Exception):
    """A per-item failure: the item goes to the error handler."""

    def __init__(self, stage: int, item: int) -> None:
        super().__init__(stage, item)
        self.stage = stage


class ProducerError(Exception):
    """The producer's fatal error."""


class StageFatal(BaseException):
    """A stage's fatal error: not an Exception, so not an item failure."""


# -- scenarios ------------------------------------------------------------------------


@dataclass
class StageSpec:
    strategy: str  # "fixed", "utilization" or "churn"
    strategy_args: dict[str, Any]
    buffer_size: int | None  # None: the flow's default
    with_cm: bool
    fail_every: int  # 0: never; items with (item + fail_offset) % fail_every == 0
    fail_offset: int
    yield_every: int  # 0: never; items with item % yield_every == 0 sleep(0)
    slow_every: int  # 0: never; items with item % slow_every == 1 sleep(slow_ms)
    slow_ms: float


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


def make_spec(seed: int) -> RunSpec:
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
    return RunSpec(
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


# -- one run ----------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the run's own callables saw."""

    produced: int = 0
    consumed: list[int] = field(default_factory=list)
    raised: Counter[int] = field(default_factory=Counter)  # per-item errors, by stage
    handled: Counter[int] = field(default_factory=Counter)  # by the handler, by stage
    enters: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)
    in_flight: Counter[int] = field(default_factory=Counter)
    peak: Counter[int] = field(default_factory=Counter)
    producer_started: bool = False
    producer_closed: bool = False
    fatal: BaseException | None = None  # what the fault raised, if it did
    stop_called: bool = False


@dataclass
class Outcome:
    items: int = 0
    consumed: int = 0
    errors: int = 0
    dropped: int = 0
    fault_fired: bool = False
    violations: list[str] = field(default_factory=list)


def build(spec: RunSpec, ledger: Ledger) -> Flow:
    flow = Flow(buffer_size=spec.default_buffer)
    last = len(spec.stages) - 1

    async def produce() -> AsyncIterator[int]:
        ledger.producer_started = True
        try:
            item = 0
            while spec.items is None or item < spec.items:
                if spec.fault == "producer_error" and item == spec.fault_item:
                    ledger.fatal = ProducerError(f"source lost at {item}")
                    raise ledger.fatal
                ledger.produced += 1
                yield item
                item += 1
                if item % 16 == 0:
                    await checkpoint()
        finally:
            ledger.producer_closed = True

    @asynccontextmanager
    async def produce_cm() -> AsyncIterator[AsyncIterator[int]]:
        ledger.enters["producer"] += 1
        try:
            yield produce()
        finally:
            ledger.exits["producer"] += 1
            await checkpoint()

    flow.set_producer(produce_cm if spec.producer_cm else produce)

    for index, stage in enumerate(spec.stages):
        call = _stage_call(spec, stage, index, index == last, ledger)
        target: Any = call
        if stage.with_cm:
            target = _per_worker(f"s{index}", call, ledger)
        add = flow.set_consumer if index == last else flow.add_transformer
        add(
            target,
            name=f"s{index}",
            scaling_strategy=make_strategy(stage),
            buffer_size=stage.buffer_size,
        )

    async def handle(item: int, exc: BaseException) -> None:
        assert isinstance(exc, ItemError), exc
        if item % 4 == 0:
            await checkpoint()
        ledger.handled[exc.stage] += 1  # nothing awaits after this

    if spec.handler == "fn":
        flow.set_error_handler(handle)
    elif spec.handler == "cm":
        flow.set_error_handler(_per_worker("handler", handle, ledger))
    return flow


def _stage_call(
    spec: RunSpec, stage: StageSpec, index: int, is_last: bool, ledger: Ledger
) -> Callable[[int], Any]:
    fatal_here = spec.fault == "stage_fatal" and spec.fault_stage == index

    async def call(item: int) -> int:
        ledger.in_flight[index] += 1
        ledger.peak[index] = max(ledger.peak[index], ledger.in_flight[index])
        try:
            if fatal_here and item >= spec.fault_item and ledger.fatal is None:
                ledger.fatal = StageFatal(f"s{index} gave up at {item}")
                raise ledger.fatal
            if stage.fail_every and (item + stage.fail_offset) % stage.fail_every == 0:
                ledger.raised[index] += 1
                raise ItemError(index, item)
            if stage.slow_every and item % stage.slow_every == 1:
                await anyio.sleep(stage.slow_ms / 1000)
            elif stage.yield_every and item % stage.yield_every == 0:
                await checkpoint()
            if is_last:
                ledger.consumed.append(item)
            return item
        finally:
            ledger.in_flight[index] -= 1

    return call


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
    ledger = Ledger()
    out = Outcome()
    flow = build(spec, ledger)
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

    # -- conservation: own counts against the stats -------------------------------------
    stats = flow.stats()
    names = list(stats)
    for name, s in stats.items():
        if s.received != s.processed + s.errors + s.dropped:
            v.append(f"{name}: received != processed + errors + dropped: {s}")
        if s.dropped < 0:
            v.append(f"{name}: negative dropped: {s}")
        if s.total_workers() or s.queue_length:
            v.append(f"{name}: workers or queue left after the run: {s}")
    for up, down in pairwise(names):
        if stats[down].received != stats[up].processed:
            v.append(
                f"{down} received {stats[down].received} but {up} processed "
                f"{stats[up].processed}"
            )
    first, final = stats[names[0]], stats[names[-1]]
    if first.received != ledger.produced:
        v.append(f"produced {ledger.produced} but {names[0]} received {first.received}")
    if final.processed != len(ledger.consumed):
        v.append(f"consumed {len(ledger.consumed)} but stats say {final.processed}")
    if len(set(ledger.consumed)) != len(ledger.consumed):
        v.append("an item was consumed twice")
    for index, name in enumerate(names):
        errors = stats[name].errors
        if spec.handler == "none":
            # the default handler only logs (no await): every failure is an error
            if errors != ledger.raised[index]:
                v.append(f"{name}: raised {ledger.raised[index]}, errors {errors}")
        elif errors != ledger.handled[index]:
            v.append(f"{name}: handled {ledger.handled[index]}, errors {errors}")
        if errors > ledger.raised[index]:
            v.append(f"{name}: more errors ({errors}) than raised")
        if ledger.peak[index] > max_workers(spec.stages[index]):
            v.append(
                f"{name}: {ledger.peak[index]} calls at once, max_workers="
                f"{max_workers(spec.stages[index])}"
            )
    total_errors = sum(s.errors for s in stats.values())
    dropped = sum(s.dropped for s in stats.values())
    if ledger.produced != len(ledger.consumed) + total_errors + dropped:
        v.append(
            f"produced {ledger.produced} != consumed {len(ledger.consumed)} + "
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
    return out


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
    seconds: float = 0.0
    runs: int = 0
    items: int = 0
    consumed: int = 0
    errors: int = 0
    dropped: int = 0
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
        kind = "item failed" if message.startswith("item ") else message[:60]
        self.counts[f"{record.levelname}: {kind}"] += 1


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
    name: str, seconds: float, seed: int, report: Report, early_stops: bool
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
        spec = make_spec(run_seed)
        out = await one_run(spec, baseline, early_stops=early_stops)
        report.runs += 1
        report.items += out.items
        report.consumed += out.consumed
        report.errors += out.errors
        report.dropped += out.dropped
        report.faults[spec.fault] += 1
        report.fired[spec.fault] += out.fault_fired
        report.modes[spec.mode] += 1
        if out.violations:
            report.violations.append(
                {"run": report.runs, "seed": run_seed, "problems": out.violations}
            )
            print(
                f"[{name}] run {report.runs} (--replay {run_seed}): "
                + "; ".join(out.violations),
                file=sys.stderr,
                flush=True,
            )
    report.seconds = time.perf_counter() - start
    if not measured:
        report.rss_start, report.objects_start = _memory()
    report.rss_end, report.objects_end = _memory()


def run_backend(
    name: str, seconds: float, seed: int, *, early_stops: bool = False
) -> Report:
    report = Report(name)
    where = h.backend(name)
    logger = logging.getLogger("flowrhythm")
    handler = _CountingHandler(report.log_records)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        anyio.run(
            soak,
            name,
            seconds,
            seed,
            report,
            early_stops,
            backend=where.anyio_backend,
            backend_options=dict(where.options),
        )
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    report.peak_rss = peak_rss_bytes()
    return report


def replay(name: str, run_seed: int, *, early_stops: bool = False) -> int:
    spec = make_spec(run_seed)
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
    for violation in report.violations:
        print(f"  run {violation['run']} (--replay {violation['seed']}):")
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
        "has returned (a known bug makes such runs fail today)",
    )
    args = parser.parse_args(argv)
    names = list(h.BACKENDS) if args.backend == "all" else h.parse_csv(args.backend)
    for name in names:
        h.backend(name)  # an unknown name fails here, with the choices
    if args.replay is not None:
        return max(
            replay(name, args.replay, early_stops=args.early_stops) for name in names
        )
    reports = []
    print(f"soak: {args.seconds:g} s per backend, seed {args.seed}")
    for name in names:
        if not h.backend_available(name):
            print(f"\n== {name}: not installed, skipped")
            continue
        report = run_backend(
            name, args.seconds, args.seed, early_stops=args.early_stops
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
