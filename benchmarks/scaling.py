"""Scaling: how fast and how frugally a stage's pool follows a step change in load.

Run from the repository root::

    python -m benchmarks.scaling                     # 100/s 5 s, 1000/s 10 s, 50/s 10 s
    python -m benchmarks.scaling --backend asyncio,trio --json scaling.json
    python -m benchmarks.scaling --quick             # every duration halved
    python -m benchmarks.scaling --search            # try the tuning candidates

One I/O-bound stage (each item awaits ``anyio.sleep(latency)``) between a paced
producer and a counting consumer. The producer follows a rate profile with absolute
deadlines, so the offered rate is exact unless back-pressure or the event loop holds
it up (reported as lag). Every ``--sample-period`` the stage's stats are recorded;
each strategy is also wrapped in a recorder that sees every snapshot the controller
hands it, so every scale event is counted, not only those the sampler catches.

Little's law sets the yardstick: a stage receiving ``λ`` items/s that each take
``L`` seconds keeps ``λ·L`` workers busy on average, so ``λ·L`` workers is the
least that can keep up and ``Σ λ·L·duration`` the least worker-seconds a run can
cost.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import itertools
import math
import statistics
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio

from flowrhythm import (
    FixedScaling,
    Flow,
    ScalingStrategy,
    StageStats,
    UtilizationScaling,
)

from . import _harness as h

#: the offered load: ``rate:seconds`` phases, run back to back
DEFAULT_PROFILE = "100:5,1000:10,50:10"
#: seconds each item spends in the I/O-bound stage
DEFAULT_LATENCY = 0.010
DEFAULT_MAX_WORKERS = 64
DEFAULT_PLOT = "benchmarks/results/scaling.png"
#: large enough that a slow scale-up shows as a backlog, not as a throttled producer
DEFAULT_BUFFER = 1024
#: the stats sampler's period, and the moving-throughput window
SAMPLE_PERIOD = 0.1
WINDOW = 1.0

#: the goals every configuration is held to (reported, never enforced)
GOAL_RESPONSE_S = 2.0  # after a step, reach ≥ 90 % of the offered rate within this
GOAL_THROUGHPUT = 0.9
GOAL_OVERSIZE = 1.25  # steady-state workers at most this × λ·L
#: a phase's steady state is its second half
STEADY_FROM = 0.5
#: the producer "fell behind" when an item left this much after its deadline
LAG_LIMIT_S = 0.05

#: the stage under test, by name in ``flow.stats()``
STAGE = "io"
CONSUMER = "sink"


# -- configurations -----------------------------------------------------------------


def _utilization(max_workers: int, **params: Any) -> UtilizationScaling:
    return UtilizationScaling(min_workers=1, max_workers=max_workers, **params)


#: the tuned UtilizationScaling: the best of SEARCH on this workload (see README).
#: A dead band of [0.6, 0.9] instead of [0.2, 0.8] keeps the pool within ~1.5x of
#: the load instead of ~5x; growing one worker per consultation (still ~20 a second
#: at 1000 items/s) overshoots less than two or four; a short cooldown with a
#: shrink of two undoes the overshoot in seconds, not minutes.
TUNED: dict[str, Any] = {
    "lower_utilization": 0.6,
    "upper_utilization": 0.9,
    "upscaling_rate": 1,
    "downscaling_rate": 2,
    "cooldown_seconds": 0.5,
    "sampling_period": 0.25,
}

_NARROW: dict[str, Any] = {
    "lower_utilization": 0.6,
    "upper_utilization": 0.9,
    "cooldown_seconds": 1.0,
    "sampling_period": 0.25,
    "downscaling_rate": 2,
}

#: what ``--search`` tries: name -> UtilizationScaling parameters (max_workers and
#: min_workers=1 are added); the README lists the results
SEARCH: dict[str, dict[str, Any]] = {
    "defaults": {},
    "fast": {"cooldown_seconds": 1.0, "sampling_period": 0.25, "upscaling_rate": 4},
    "fast-shrink": {
        "cooldown_seconds": 1.0,
        "sampling_period": 0.25,
        "upscaling_rate": 4,
        "downscaling_rate": 4,
    },
    "narrow": _NARROW,
    "narrow-smooth": {**_NARROW, "dampening": 0.2},
    "tight": {
        **_NARROW,
        "lower_utilization": 0.75,
        "upper_utilization": 0.95,
        "dampening": 0.3,
    },
    "narrow-ev10": {
        **_NARROW,
        "cooldown_seconds": 0.5,
        "upscaling_rate": 1,
        "sampling_events": 10,
    },
    "narrow-ev10-raw": {
        **_NARROW,
        "cooldown_seconds": 0.5,
        "upscaling_rate": 1,
        "sampling_events": 10,
        "dampening": 1.0,
    },
    "narrow-slow": {**_NARROW, "upscaling_rate": 1, "downscaling_rate": 4},
    "tuned": TUNED,
}


@dataclass(frozen=True)
class Config:
    name: str
    description: str
    make: Callable[[], ScalingStrategy]


def configs(max_workers: int, peak_workers: int) -> list[Config]:
    return [
        Config(
            "utilization-default",
            f"UtilizationScaling(max_workers={max_workers}), other defaults",
            lambda: _utilization(max_workers),
        ),
        Config(
            "utilization-tuned",
            "UtilizationScaling("
            + ", ".join(f"{k}={v}" for k, v in TUNED.items())
            + f", max_workers={max_workers})",
            lambda: _utilization(max_workers, **TUNED),
        ),
        Config(
            "fixed-peak",
            f"FixedScaling({peak_workers}): Little's law at the peak rate",
            lambda: FixedScaling(peak_workers),
        ),
        Config(
            "fixed-max",
            f"FixedScaling({max_workers})",
            lambda: FixedScaling(max_workers),
        ),
    ]


def search_configs(max_workers: int) -> list[Config]:
    return [
        Config(
            name,
            "UtilizationScaling("
            + ", ".join(f"{k}={v}" for k, v in params.items())
            + ")",
            functools.partial(_utilization, max_workers, **params),
        )
        for name, params in SEARCH.items()
    ]


# -- the profile --------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    rate: float  # items/s offered
    duration: float  # seconds
    start: float  # seconds since the run's t0

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def items(self) -> int:
        return round(self.rate * self.duration)


def parse_profile(text: str, scale: float = 1.0) -> list[Phase]:
    """``"100:5,1000:10"`` -> phases; every duration multiplied by ``scale``."""
    phases: list[Phase] = []
    start = 0.0
    for part in h.parse_csv(text):
        rate_text, _, duration_text = part.partition(":")
        rate, duration = float(rate_text), float(duration_text) * scale
        if rate <= 0 or duration <= 0:
            raise ValueError(f"rate and duration must be positive, got {part!r}")
        phases.append(Phase(rate, duration, start))
        start += duration
    if not phases:
        raise ValueError("the profile has no phases")
    return phases


def littles_law(rate: float, latency: float) -> float:
    return rate * latency


def optimum_workers(rate: float, latency: float) -> int:
    """The fewest whole workers that keep up: ``ceil(λ·L)``, at least 1."""
    return max(1, math.ceil(littles_law(rate, latency) - 1e-9))


# -- one run ------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since t0
    workers: int
    busy: int
    queue: int
    processed: int  # by the stage under test
    produced: int  # by the producer


@dataclass
class Decision:
    """A consultation of the strategy that asked for a change."""

    t: float
    hook: str
    workers: int
    busy: int
    idle: int
    queue: int
    delta: int


class Recorder(ScalingStrategy):
    """Wraps a strategy, logging what the controller shows it and what it answers.

    Every snapshot carries the stage's last scale-up and scale-down times; the
    distinct values seen over a run are exactly its scale events.
    """

    def __init__(self, inner: ScalingStrategy, log: RunLog) -> None:
        self.inner = inner
        self.log = log
        self.min_workers = inner.min_workers
        self.max_workers = inner.max_workers
        self.sampling_events = inner.sampling_events
        self.sampling_period = inner.sampling_period

    def initial_workers(self) -> int:
        return self.inner.initial_workers()

    def on_enqueue(self, stats: StageStats) -> int:
        return self._record("enqueue", stats, self.inner.on_enqueue(stats))

    def on_dequeue(self, stats: StageStats) -> int:
        return self._record("dequeue", stats, self.inner.on_dequeue(stats))

    def on_tick(self, stats: StageStats) -> int:
        return self._record("tick", stats, self.inner.on_tick(stats))

    def for_stage(self, stage_name: str) -> ScalingStrategy:
        return Recorder(self.inner.for_stage(stage_name), self.log)

    def _record(self, hook: str, stats: StageStats, delta: int) -> int:
        self.log.see(stats)
        self.log.consults[hook] = self.log.consults.get(hook, 0) + 1
        if delta:
            self.log.decisions.append(
                Decision(
                    t=(stats.sampled_at or 0.0) - self.log.t0,
                    hook=hook,
                    workers=stats.total_workers(),
                    busy=stats.busy_workers,
                    idle=stats.idle_workers,
                    queue=stats.queue_length,
                    delta=delta,
                )
            )
        return delta

    def __repr__(self) -> str:
        return repr(self.inner)


@dataclass
class RunLog:
    t0: float
    ups: set[float] = field(default_factory=set)
    downs: set[float] = field(default_factory=set)
    consults: dict[str, int] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)

    def see(self, stats: StageStats) -> None:
        if stats.last_scale_up_at is not None:
            self.ups.add(stats.last_scale_up_at - self.t0)
        if stats.last_scale_down_at is not None:
            self.downs.add(stats.last_scale_down_at - self.t0)


@dataclass
class Tally:
    produced: int = 0
    consumed: int = 0
    total: int = 0
    service_s: float = 0.0  # summed time items spent in the stage's sleep
    served: int = 0
    #: per phase: the latest an item was handed over after its deadline, and when
    #: its first and last items were handed over
    lag: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    last: list[float] = field(default_factory=list)


@dataclass
class Run:
    config: str
    description: str
    strategy: str
    backend: str
    samples: list[Sample]
    ups: list[float]
    downs: list[float]
    consults: dict[str, int]
    decisions: list[Decision]
    final: dict[str, dict[str, Any]]
    produced: int
    consumed: int
    checksum_ok: bool
    mean_latency: float
    lag: list[float]
    offered: list[float]  # measured per phase, items/s
    duration: float  # t0 until the flow finished


async def run_config(
    config: Config,
    phases: Sequence[Phase],
    latency: float,
    buffer_size: int,
    sample_period: float,
    backend_name: str,
) -> Run:
    clock = anyio.current_time
    tally = Tally(
        lag=[0.0] * len(phases),
        first=[math.nan] * len(phases),
        last=[math.nan] * len(phases),
    )
    # The producer waits for t0, so the flow's start-up is not part of the run.
    t0 = clock() + 0.2
    log = RunLog(t0)

    async def produce() -> AsyncIterator[int]:
        n = 0
        for index, phase in enumerate(phases):
            start = t0 + phase.start
            for i in range(phase.items):
                deadline = start + i / phase.rate
                now = clock()
                if now < deadline:
                    await anyio.sleep_until(deadline)
                    now = clock()
                tally.lag[index] = max(tally.lag[index], now - deadline)
                if i == 0:
                    tally.first[index] = now - t0
                tally.last[index] = now - t0
                tally.produced += 1
                yield n
                n += 1

    async def io(item: int) -> int:
        started = clock()
        await anyio.sleep(latency)
        tally.service_s += clock() - started
        tally.served += 1
        return item

    async def sink(item: int) -> None:
        tally.consumed += 1
        tally.total += item

    strategy = config.make()
    flow = Flow(buffer_size=buffer_size)
    flow.set_producer(produce)
    flow.add_transformer(io, name=STAGE, scaling_strategy=Recorder(strategy, log))
    flow.set_consumer(sink, name=CONSUMER)

    samples: list[Sample] = []
    finished = anyio.Event()

    def sample() -> None:
        stats = flow.stats()[STAGE]
        log.see(stats)
        samples.append(
            Sample(
                t=clock() - t0,
                workers=stats.total_workers(),
                busy=stats.busy_workers,
                queue=stats.queue_length,
                processed=stats.processed,
                produced=tally.produced,
            )
        )

    async def run_flow() -> None:
        try:
            await flow.run()
        finally:
            finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_flow)
        await anyio.sleep_until(t0)
        k = 0
        while not finished.is_set():
            sample()
            k += 1
            with anyio.move_on_after(max(0.0, t0 + k * sample_period - clock())):
                await finished.wait()
        sample()
    duration = clock() - t0

    final = {name: asdict(stats) for name, stats in flow.stats().items()}
    for stats in flow.stats().values():
        log.see(stats)
    n = tally.produced
    offered = [
        phase.items / (tally.last[i] - tally.first[i] + 1 / phase.rate)
        if phase.items
        else 0.0
        for i, phase in enumerate(phases)
    ]
    return Run(
        config=config.name,
        description=config.description,
        strategy=repr(strategy),
        backend=backend_name,
        samples=samples,
        ups=sorted(log.ups),
        downs=sorted(log.downs),
        consults=log.consults,
        decisions=log.decisions,
        final=final,
        produced=n,
        consumed=tally.consumed,
        checksum_ok=tally.total == n * (n - 1) // 2,
        mean_latency=tally.service_s / tally.served if tally.served else math.nan,
        lag=tally.lag,
        offered=offered,
        duration=duration,
    )


def run_in_loop(
    where: h.Backend,
    config: Config,
    phases: Sequence[Phase],
    latency: float,
    buffer_size: int,
    sample_period: float,
) -> Run:
    return anyio.run(
        run_config,
        config,
        phases,
        latency,
        buffer_size,
        sample_period,
        where.name,
        backend=where.anyio_backend,
        backend_options=dict(where.options),
    )


# -- analysis -----------------------------------------------------------------------


@dataclass
class PhaseResult:
    rate: float
    start: float
    duration: float
    littles_law: float  # λ·L: workers busy on average at this rate
    optimum: int  # ceil(λ·L), at least 1
    offered: float  # measured items/s
    max_lag_s: float
    behind: bool  # the producer fell behind its schedule
    t90_s: float | None  # from the step to 1 s throughput ≥ 0.9 λ; None: never
    settle_s: float | None  # from the step until workers stay in [optimum, 1.25·λL]
    mean_workers: float
    max_workers: int
    steady_workers: float  # mean over the phase's second half
    worker_s: float
    min_worker_s: float  # λ·L·duration
    efficiency: float
    flaps: int  # scale events in the phase's second half
    steady_throughput: float  # items/s processed over the second half


@dataclass
class Goals:
    responsive: bool
    right_sized: bool
    steady: bool

    @property
    def all(self) -> bool:
        return self.responsive and self.right_sized and self.steady


@dataclass
class Analysis:
    run: Run
    phases: list[PhaseResult]
    worker_s: float
    min_worker_s: float
    efficiency: float
    lost: int
    consistent: bool  # every stage's received == processed + errors + dropped
    problems: list[str]
    goals: Goals


def _allowance(rate: float, latency: float) -> float:
    """The most workers that count as right-sized: 1.25 × λ·L, and never below one
    worker (min_workers is 1)."""
    return GOAL_OVERSIZE * max(littles_law(rate, latency), 1.0)


def _processed_at(samples: Sequence[Sample], times: Sequence[float], t: float) -> float:
    """Items processed by time ``t``, linearly interpolated between samples."""
    if t <= times[0]:
        return 0.0 if t < 0 else samples[0].processed
    i = bisect.bisect_right(times, t)
    if i >= len(samples):
        return samples[-1].processed
    a, b = samples[i - 1], samples[i]
    span = b.t - a.t
    share = (t - a.t) / span if span > 0 else 1.0
    return a.processed + share * (b.processed - a.processed)


def moving_throughput(samples: Sequence[Sample], window: float = WINDOW) -> list[float]:
    """Items/s processed over the ``window`` seconds up to each sample (nothing was
    processed before t0)."""
    times = [s.t for s in samples]
    return [
        (s.processed - _processed_at(samples, times, s.t - window)) / window
        for s in samples
    ]


def moving_offered(samples: Sequence[Sample], window: float = WINDOW) -> list[float]:
    times = [s.t for s in samples]
    out = []
    for s in samples:
        i = bisect.bisect_left(times, s.t - window)
        before = samples[i].produced if s.t - window >= 0 else 0
        span = s.t - samples[i].t if s.t - window >= 0 else window
        out.append((s.produced - before) / span if span > 0 else 0.0)
    return out


def _worker_seconds(samples: Sequence[Sample], start: float, end: float) -> float:
    """∫ workers dt over [start, end], the count held from one sample to the next."""
    total = 0.0
    for a, b in itertools.pairwise(samples):
        lo, hi = max(a.t, start), min(b.t, end)
        if hi > lo:
            total += a.workers * (hi - lo)
    return total


def analyse(run: Run, phases: Sequence[Phase], latency: float) -> Analysis:
    samples = run.samples
    throughput = moving_throughput(samples)
    results: list[PhaseResult] = []
    events = sorted(run.ups + run.downs)
    for index, phase in enumerate(phases):
        inside = [i for i, s in enumerate(samples) if phase.start <= s.t < phase.end]
        steady_from = phase.start + STEADY_FROM * phase.duration
        steady = [i for i in inside if samples[i].t >= steady_from]
        t90 = next(
            (
                samples[i].t - phase.start
                for i in inside
                if throughput[i] >= GOAL_THROUGHPUT * phase.rate
            ),
            None,
        )
        low = optimum_workers(phase.rate, latency)
        high = _allowance(phase.rate, latency)
        settle = None
        for i in reversed(inside):
            if not low <= samples[i].workers <= high:
                break
            settle = samples[i].t - phase.start
        worker_s = _worker_seconds(samples, phase.start, phase.end)
        min_worker_s = littles_law(phase.rate, latency) * phase.duration
        if steady:
            a, b = samples[steady[0]], samples[steady[-1]]
            steady_tp = (b.processed - a.processed) / (b.t - a.t) if b.t > a.t else 0.0
        else:
            steady_tp = math.nan
        results.append(
            PhaseResult(
                rate=phase.rate,
                start=phase.start,
                duration=phase.duration,
                littles_law=littles_law(phase.rate, latency),
                optimum=low,
                offered=run.offered[index],
                max_lag_s=run.lag[index],
                behind=run.lag[index] > LAG_LIMIT_S,
                t90_s=t90,
                settle_s=settle,
                mean_workers=_mean([samples[i].workers for i in inside]),
                max_workers=max((samples[i].workers for i in inside), default=0),
                steady_workers=_mean([samples[i].workers for i in steady]),
                worker_s=worker_s,
                min_worker_s=min_worker_s,
                efficiency=min_worker_s / worker_s if worker_s else math.nan,
                flaps=sum(1 for t in events if steady_from <= t < phase.end),
                steady_throughput=steady_tp,
            )
        )

    end = phases[-1].end
    worker_s = _worker_seconds(samples, 0.0, end)
    min_worker_s = sum(p.min_worker_s for p in results)

    problems: list[str] = []
    consistent = True
    errors = dropped = 0
    for name, st in run.final.items():
        errors += st["errors"]
        dropped += st["dropped"]
        if st["received"] != st["processed"] + st["errors"] + st["dropped"]:
            consistent = False
            problems.append(
                f"stage {name!r}: received {st['received']} != processed "
                f"{st['processed']} + errors {st['errors']} + dropped {st['dropped']}"
            )
    consumed = run.final[CONSUMER]["processed"]
    lost = run.produced - consumed - errors - dropped
    expected = sum(p.items for p in phases)
    if run.produced != expected:
        problems.append(f"produced {run.produced} items, the profile has {expected}")
    if consumed != run.produced or run.consumed != run.produced:
        problems.append(
            f"consumer processed {consumed} (saw {run.consumed}) of "
            f"{run.produced} produced"
        )
    if not run.checksum_ok:
        problems.append("the consumer's checksum is off: items lost or duplicated")
    if lost:
        problems.append(f"{lost} items lost")
    problems += [
        f"producer fell behind in phase {i + 1} (max lag {p.max_lag_s * 1e3:.0f} ms)"
        for i, p in enumerate(results)
        if p.behind
    ]

    goals = Goals(
        responsive=all(
            p.t90_s is not None and p.t90_s <= GOAL_RESPONSE_S for p in results
        ),
        right_sized=all(
            p.steady_workers <= _allowance(p.rate, latency) for p in results
        ),
        steady=all(p.flaps == 0 for p in results),
    )
    return Analysis(
        run=run,
        phases=results,
        worker_s=worker_s,
        min_worker_s=min_worker_s,
        efficiency=min_worker_s / worker_s if worker_s else math.nan,
        lost=lost,
        consistent=consistent,
        problems=problems,
        goals=goals,
    )


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


# -- reporting ----------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def report(
    where: str,
    analyses: Sequence[Analysis],
    phases: Sequence[Phase],
    latency: float,
) -> str:
    out: list[str] = []
    headers = [
        "config / phase",
        "λ/s",
        "λ·L",
        "offered/s",
        "done/s",
        "t→90%",
        "settle",
        "mean w",
        "max w",
        "steady w",
        "worker·s",
        "min w·s",
        "eff",
        "flaps",
    ]
    rows: list[list[str]] = []
    for a in analyses:
        for i, p in enumerate(a.phases):
            rows.append(
                [
                    f"{a.run.config if i == 0 else ''} {i + 1}",
                    f"{p.rate:g}",
                    f"{p.littles_law:g}",
                    f"{p.offered:.0f}" + ("!" if p.behind else ""),
                    f"{p.steady_throughput:.0f}",
                    _seconds(p.t90_s),
                    _seconds(p.settle_s),
                    f"{p.mean_workers:.1f}",
                    f"{p.max_workers}",
                    f"{p.steady_workers:.1f}",
                    f"{p.worker_s:.1f}",
                    f"{p.min_worker_s:.1f}",
                    f"{p.efficiency:.0%}",
                    f"{p.flaps}",
                ]
            )
        rows.append(
            [
                f"{'':{len(a.run.config)}} all",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                f"{a.worker_s:.1f}",
                f"{a.min_worker_s:.1f}",
                f"{a.efficiency:.0%}",
                f"{sum(p.flaps for p in a.phases)}",
            ]
        )
    out.append(
        h.format_table(f"\n[{where}] per configuration and phase", headers, rows)
    )
    out.append(
        "λ·L: workers Little's law says the phase keeps busy; done/s: processed over "
        "the phase's second half;\nt→90%: seconds from the step until the 1 s moving "
        "throughput reaches 90 % of λ; settle: seconds from the step\nuntil the pool "
        f"stays within [ceil(λ·L), {GOAL_OVERSIZE}·max(λ·L, 1)]; steady w: mean "
        "workers over the phase's second half;\neff: λ·L·duration / worker·s; flaps: "
        "scale events in the phase's second half; '!' after offered/s: producer lag "
        f"> {LAG_LIMIT_S * 1e3:.0f} ms"
    )

    g_headers = [
        "config",
        f"≥90% within {GOAL_RESPONSE_S:g} s",
        f"steady ≤ {GOAL_OVERSIZE}×λ·L",
        "no flapping",
        "eff",
        "lost",
        "stats ok",
        "L measured",
        "consults (enq/deq/tick)",
    ]
    g_rows = [
        [
            a.run.config,
            _verdict(a.goals.responsive),
            _verdict(a.goals.right_sized),
            _verdict(a.goals.steady),
            f"{a.efficiency:.0%}",
            f"{a.lost}",
            "yes" if a.consistent and not a.problems else "NO",
            f"{a.run.mean_latency * 1e3:.2f} ms",
            "/".join(
                str(a.run.consults.get(k, 0)) for k in ("enqueue", "dequeue", "tick")
            ),
        ]
        for a in analyses
    ]
    out.append(h.format_table(f"\n[{where}] goals", g_headers, g_rows))
    optimum = ", ".join(
        f"{p.rate:g}/s → λ·L = {littles_law(p.rate, latency):g} "
        f"(≥ {optimum_workers(p.rate, latency)} workers)"
        for p in phases
    )
    out.append(f"Little's-law optimum per phase: {optimum}")
    for a in analyses:
        out.extend(f"{a.run.config}: {problem}" for problem in a.problems)
    return "\n".join(out)


def search_report(where: str, analyses: Sequence[Analysis]) -> str:
    headers = [
        "candidate",
        "t→90% per step",
        "steady w per phase",
        "flaps",
        "goals",
        "eff",
        "parameters",
    ]
    rows = [
        [
            a.run.config,
            " / ".join(_seconds(p.t90_s) for p in a.phases),
            " / ".join(f"{p.steady_workers:.1f}" for p in a.phases),
            " / ".join(str(p.flaps) for p in a.phases),
            f"{sum((a.goals.responsive, a.goals.right_sized, a.goals.steady))}/3",
            f"{a.efficiency:.0%}",
            a.run.description.removeprefix("UtilizationScaling"),
        ]
        for a in analyses
    ]
    return h.format_table(f"\n[{where}] tuning candidates", headers, rows)


# -- plot ---------------------------------------------------------------------------


def plot(
    analyses: Sequence[Analysis],
    phases: Sequence[Phase],
    latency: float,
    path: Path,
    title: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(analyses)
    fig, axes = plt.subplots(
        n, 1, figsize=(11, 2.7 * n + 0.9), sharex=True, squeeze=False
    )
    # The last sample is taken after the flow ended (no workers left): the x axis
    # stops at the sample before it, or at the end of the profile.
    end = max(phases[-1].end, *(a.run.samples[-2].t for a in analyses))
    peak = max(p.rate for p in phases)
    step_t = [p.start for p in phases] + [phases[-1].end]
    step_rate = [p.rate for p in phases] + [phases[-1].rate]
    step_opt = [littles_law(p.rate, latency) for p in phases]
    step_opt.append(step_opt[-1])
    handles: list[Any] = []
    for ax, a in zip(axes[:, 0], analyses, strict=True):
        samples = a.run.samples
        t = [s.t for s in samples]
        ax2 = ax.twinx()
        offered = ax.step(
            step_t, step_rate, where="post", color="0.25", lw=1.2, ls="--",
            label="offered λ (items/s)",
        )  # fmt: skip
        measured = ax.plot(
            t, moving_offered(samples), color="0.6", lw=0.8,
            label="offered, measured (1 s window)",
        )  # fmt: skip
        achieved = ax.plot(
            t, moving_throughput(samples), color="tab:blue", lw=1.6,
            label="achieved throughput (1 s window)",
        )  # fmt: skip
        optimum = ax2.step(
            step_t, step_opt, where="post", color="tab:green", lw=1.0, ls=":",
            label="Little's law λ·L (workers)",
        )  # fmt: skip
        workers = ax2.step(
            t[:-1], [s.workers for s in samples[:-1]], where="post", color="tab:orange",
            lw=1.6,
            label="workers",
        )  # fmt: skip
        for p in phases[1:]:
            ax.axvline(p.start, color="0.4", lw=0.8, alpha=0.6)
        for p in phases:
            ax.axvspan(
                p.start + STEADY_FROM * p.duration, p.end, color="0.93", zorder=0
            )
        ax.set_xlim(0, end)
        ax.set_ylim(0, peak * 1.25)
        # Each panel scales its own worker axis, so a small pool stays readable
        # next to its Little's-law line (the tick labels tell the sizes apart);
        # the largest pool sits at two thirds of the height, below the peak load.
        top = max((w.workers for w in samples), default=0)
        ax2.set_ylim(0, max(top, littles_law(peak, latency)) * 1.5 + 1)
        ax.set_ylabel("items/s")
        ax2.set_ylabel("workers", color="tab:orange")
        ax2.tick_params(axis="y", colors="tab:orange")
        goals = a.goals
        marks = ", ".join(
            f"{name} {'✓' if ok else '✗'}"
            for name, ok in (
                ("≤2 s", goals.responsive),
                ("≤1.25×λ·L", goals.right_sized),
                ("no flapping", goals.steady),
            )
        )
        t90 = " / ".join(_seconds(p.t90_s) for p in a.phases)
        ax.set_title(
            textwrap.fill(f"{a.run.config}: {a.run.description}", 125)
            + f"\nt→90%: {t90} s   efficiency {a.efficiency:.0%}   "
            f"flaps {sum(p.flaps for p in a.phases)}   goals: {marks}",
            fontsize=9,
            loc="left",
        )
        ax.grid(axis="y", alpha=0.3)
        handles = [*offered, *measured, *achieved, *workers, *optimum]
    axes[-1, 0].set_xlabel("seconds (vertical lines: load steps; shaded: steady state)")
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling",
        description=(
            "Feed an I/O-bound stage a stepped load and measure how each scaling "
            "strategy follows it."
        ),
    )
    parser.add_argument(
        "--backend",
        default="asyncio",
        help=f"comma-separated, from: {', '.join(h.BACKENDS)} (default %(default)s)",
    )
    parser.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        help="rate:seconds phases, comma-separated (default %(default)s)",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=DEFAULT_LATENCY,
        help="seconds each item sleeps in the stage (default %(default)s)",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=DEFAULT_MAX_WORKERS,
        help="max_workers of the autoscaled configs and size of fixed-max "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--buffer-size",
        type=int,
        default=DEFAULT_BUFFER,
        help="the stage's input buffer (default %(default)s)",
    )
    parser.add_argument(
        "--sample-period",
        type=float,
        default=SAMPLE_PERIOD,
        help="seconds between stats samples (default %(default)s)",
    )
    parser.add_argument(
        "--configs",
        help="comma-separated subset of the configurations (default: all)",
    )
    parser.add_argument(
        "--search",
        action="store_true",
        help="run the tuning candidates (SEARCH in this file) instead",
    )
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--plot",
        metavar="PATH",
        default=DEFAULT_PLOT,
        help="PNG to draw (default %(default)s; one per backend gets the backend's "
        "name appended when several run; 'none' to skip)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="halve every phase's duration"
    )
    args = parser.parse_args(argv)
    try:
        args.phases = parse_profile(args.profile, 0.5 if args.quick else 1.0)
    except ValueError as exc:
        parser.error(f"--profile: {exc}")
    if args.latency <= 0 or args.sample_period <= 0:
        parser.error("--latency and --sample-period must be positive")
    if args.max_workers < 1 or args.buffer_size < 0:
        parser.error("--max-workers must be >= 1 and --buffer-size >= 0")
    args.backends = h.parse_csv(args.backend)
    for name in args.backends:
        if name not in h.BACKENDS:
            parser.error(f"unknown backend {name!r}; choose from {h.BACKENDS}")
    peak = optimum_workers(max(p.rate for p in args.phases), args.latency)
    if args.search:
        chosen = search_configs(args.max_workers)
    else:
        chosen = configs(args.max_workers, peak)
    if args.configs:
        known = {c.name: c for c in chosen}
        names = h.parse_csv(args.configs)
        for name in names:
            if name not in known:
                parser.error(f"unknown config {name!r}; choose from {list(known)}")
        chosen = [known[name] for name in names]
    args.chosen = chosen
    return args


def _plot_path(base: str, backend: str, several: bool) -> Path:
    path = Path(base)
    return path.with_name(f"{path.stem}-{backend}{path.suffix}") if several else path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    phases: list[Phase] = args.phases
    profile = " → ".join(f"{p.rate:g}/s for {p.duration:g} s" for p in phases)
    print(
        f"scaling: one stage sleeping {args.latency * 1e3:g} ms per item, offered "
        f"{profile}; buffer {args.buffer_size}, stats every "
        f"{args.sample_period * 1e3:g} ms"
    )
    payload: dict[str, Any] = {
        "benchmark": "scaling",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "profile": [asdict(p) for p in phases],
            "latency": args.latency,
            "buffer_size": args.buffer_size,
            "sample_period": args.sample_period,
            "max_workers": args.max_workers,
            "search": args.search,
            "tuned": TUNED,
            "goals": {
                "response_s": GOAL_RESPONSE_S,
                "throughput_share": GOAL_THROUGHPUT,
                "oversize": GOAL_OVERSIZE,
                "steady_from": STEADY_FROM,
            },
        },
        "machine": h.machine_info(),
        "results": [],
    }
    several = len(args.backends) > 1
    for name in args.backends:
        if not h.backend_available(name):
            print(f"skipping {name}: not installed", file=sys.stderr)
            continue
        where = h.backend(name)
        analyses = []
        for config in args.chosen:
            h.progress(f"{name}: {config.name} ({phases[-1].end:g} s)")
            run = run_in_loop(
                where,
                config,
                phases,
                args.latency,
                args.buffer_size,
                args.sample_period,
            )
            analyses.append(analyse(run, phases, args.latency))
        h.progress("")
        if args.search:
            print(search_report(name, analyses))
        print(report(name, analyses, phases, args.latency))
        if args.plot != "none":
            path = _plot_path(args.plot, name, several)
            plot(
                analyses,
                phases,
                args.latency,
                path,
                f"flowrhythm scaling: {args.latency * 1e3:g} ms I/O per item, "
                f"{profile} ({name})",
            )
            print(f"plot written to {path}")
        for a in analyses:
            data = asdict(a)
            data["goals"]["all"] = a.goals.all
            payload["results"].append(data)
    print()
    print(h.format_machine(payload["machine"]))
    if args.json:
        h.write_json(args.json, payload)
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
