"""The ``flowrhythm demo`` pipeline: bursty input, an I/O-bound stage that scales.

The pipeline::

    produce (calm/burst phases) -> fetch (I/O, UtilizationScaling 1..16)
        -> validate (fails on some items) -> store (consumer)
    failed items -> on_error (counts them)

While it runs, either a live view (:mod:`flowrhythm.monitor`, with rich) redraws
the stages a few times a second, or a *reporter* is called with ``flow.stats()``
and the elapsed time about once a second. The reporter is the only part that draws
anything in plain mode: swap :class:`TextReporter` for another callable of the
same shape to change the view.
"""

from __future__ import annotations

import random
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

import anyio

from ._flow import Flow
from ._stats import StageStats
from .scaling import FixedScaling, UtilizationScaling

if TYPE_CHECKING:
    from rich.console import Console

#: what draws the live view: called with the stats by stage name and the seconds
#: since the flow started
Reporter = Callable[[Mapping[str, StageStats], float], None]

#: the producer's schedule: (phase name, seconds, items per second), repeated
PHASES: tuple[tuple[str, float, float], ...] = (
    ("calm", 2.5, 15.0),
    ("burst", 1.5, 300.0),
)
#: how long the I/O-bound stage waits per item (seconds, uniformly distributed)
FETCH_LATENCY = (0.02, 0.05)
#: ``validate`` fails on every item whose number is a multiple of this
FAIL_EVERY = 11
#: how often the demo samples the stats (to catch the peak worker counts)
SAMPLE_INTERVAL = 0.1
#: seconds the final drain may take before it turns into an abort
DRAIN_TIMEOUT = 15.0

_CYCLE = sum(seconds for _, seconds, _ in PHASES)


def phase_at(elapsed: float) -> tuple[str, float]:
    """Return the producer's phase name and rate (items/s) ``elapsed`` s in."""
    offset = elapsed % _CYCLE
    for name, seconds, rate in PHASES:
        if offset < seconds:
            return name, rate
        offset -= seconds
    name, _, rate = PHASES[-1]
    return name, rate


class ValidationError(Exception):
    """What the ``validate`` stage raises for a bad item."""


@dataclass
class DemoSummary:
    """What one demo run did, counted by the demo's own callables and the stats."""

    #: items the producer yielded
    produced: int
    #: items the consumer received
    consumed: int
    #: items the error handler received
    errors: int
    #: items an abort cut (0 unless the drain timed out)
    dropped: int
    #: the largest worker count sampled per stage
    max_workers: dict[str, int]
    #: seconds the flow ran before the stop was requested
    ran_for: float
    #: seconds from the start of the flow until it had drained
    elapsed: float
    #: the final stats of every stage
    stats: Mapping[str, StageStats]

    @property
    def conserved(self) -> bool:
        """Tell whether every produced item ended exactly once, by both counts."""
        stats = list(self.stats.values())
        return (
            self.produced == self.consumed + self.errors + self.dropped
            and bool(stats)
            and stats[0].received == self.produced
            and stats[-1].processed == self.consumed
            and sum(s.errors for s in stats) == self.errors
        )


@dataclass
class _Pipeline:
    """The demo's callables and the counts they keep."""

    clock: Callable[[], float]
    rng: random.Random = field(default_factory=random.Random)
    started_at: float = 0.0
    produced: int = 0
    consumed: int = 0
    errors: int = 0

    async def produce(self) -> AsyncIterator[int]:
        """Yield numbered items at the rate of the current phase."""
        next_at = self.clock()
        number = 0
        while True:
            now = self.clock()
            if next_at < now - 0.1:
                next_at = now  # held back by back-pressure: do not catch up
            if next_at > now:
                await anyio.sleep(next_at - now)
            _, rate = phase_at(next_at - self.started_at)
            next_at += 1.0 / rate
            self.produced += 1
            yield number
            number += 1

    async def fetch(self, item: int) -> int:
        """Pretend to call a slow service."""
        await anyio.sleep(self.rng.uniform(*FETCH_LATENCY))
        return item

    async def validate(self, item: int) -> int:
        """Reject some items: they go to the error handler."""
        if item % FAIL_EVERY == 0:
            raise ValidationError(f"item {item} failed validation")
        return item

    async def store(self, item: int) -> None:
        """The consumer: count what arrives."""
        self.consumed += 1

    async def on_error(self, item: int, exc: BaseException) -> None:
        """The error handler: count what failed."""
        self.errors += 1


def build_flow(pipeline: _Pipeline) -> Flow:
    """Wire the demo's callables into a flow."""
    flow = Flow()
    flow.set_producer(pipeline.produce)
    flow.add_transformer(
        pipeline.fetch,
        name="fetch",
        scaling_strategy=UtilizationScaling(
            min_workers=1,
            max_workers=16,
            lower_utilization=0.3,
            upper_utilization=0.8,
            upscaling_rate=4,
            downscaling_rate=4,
            cooldown_seconds=0.5,
            dampening=0.6,
            sampling_period=0.25,
            sampling_events=20,
        ),
    )
    flow.add_transformer(
        pipeline.validate, name="validate", scaling_strategy=FixedScaling(1)
    )
    flow.set_consumer(pipeline.store, name="store")
    flow.set_error_handler(pipeline.on_error)
    return flow


class TextReporter:
    """A plain report, one block of lines per call, at most 80 columns wide.

    Items/s is what a stage finished (processed or failed) since the last call;
    the producer's rate is what entered the first stage in that time.
    """

    HEADER = (
        f"{'stage':<11}{'workers':>8}{'busy':>6}{'idle':>5}{'blkd':>5}"
        f"{'util':>6}{'queue':>7}{'processed':>11}{'errors':>8}{'items/s':>9}"
    )

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self._last_elapsed = 0.0
        self._last_done: dict[str, int] = {}
        self._last_produced = 0

    def __call__(self, stats: Mapping[str, StageStats], elapsed: float) -> None:
        dt = elapsed - self._last_elapsed
        first = next(iter(stats.values()), None)
        # Everything that entered the first stage: taken, or still queued.
        produced = first.received + first.queue_length if first is not None else 0
        produced_rate = (produced - self._last_produced) / dt if dt > 0 else 0.0
        self._last_produced = produced
        phase, _ = phase_at(elapsed)
        title = f"t={elapsed:5.1f}s  produced {produced_rate:.0f} items/s"
        lines = [f"{title} (phase now: {phase})", self.HEADER]
        for name, stage in stats.items():
            done = stage.processed + stage.errors
            speed = (done - self._last_done.get(name, 0)) / dt if dt > 0 else 0.0
            self._last_done[name] = done
            lines.append(
                f"{name[:10]:<11}{stage.total_workers():>8}{stage.busy_workers:>6}"
                f"{stage.idle_workers:>5}{stage.blocked_workers:>5}"
                f"{stage.utilization():>6.0%}{stage.queue_length:>7}"
                f"{stage.processed:>11}{stage.errors:>8}{speed:>9.1f}"
            )
        self._last_elapsed = elapsed
        print("\n".join(lines), end="\n\n", file=self.out, flush=True)


def format_summary(summary: DemoSummary) -> str:
    """Render the end-of-run summary as plain text."""
    drain = summary.elapsed - summary.ran_for
    check = "ok" if summary.conserved else "MISMATCH"
    peaks = ", ".join(f"{name} {count}" for name, count in summary.max_workers.items())
    return "\n".join(
        [
            (
                f"summary: ran {summary.ran_for:.1f}s, drained in {drain:.1f}s, "
                f"{summary.elapsed:.1f}s in all"
            ),
            f"  produced  {summary.produced:>8}",
            f"  consumed  {summary.consumed:>8}",
            f"  errors    {summary.errors:>8}  (sent to the error handler)",
            f"  dropped   {summary.dropped:>8}  (cut by an abort)",
            f"  produced == consumed + errors + dropped: {check}",
            f"  max workers seen: {peaks}",
        ]
    )


async def run_demo(
    duration: float,
    *,
    reporter: Reporter | None = None,
    report_interval: float = 1.0,
    seed: int | None = None,
    console: Console | None = None,
) -> DemoSummary:
    """Run the demo pipeline for ``duration`` seconds, then drain it.

    :param duration: seconds to feed the pipeline before stopping it
    :param reporter: called about every ``report_interval`` seconds with
        ``flow.stats()`` and the elapsed time (default: :class:`TextReporter`)
    :param seed: seeds the random latencies, for repeatable runs
    :param console: show the live view (needs rich) on this console instead of
        calling the reporter; it draws its last frame once the flow has drained
    """
    report = reporter if reporter is not None else TextReporter()
    clock = anyio.current_time
    pipeline = _Pipeline(clock=clock, rng=random.Random(seed))
    flow = build_flow(pipeline)
    max_workers = dict.fromkeys(flow.stats(), 0)

    def sample() -> Mapping[str, StageStats]:
        stats = flow.stats()
        for name, stage in stats.items():
            max_workers[name] = max(max_workers[name], stage.total_workers())
        return stats

    async with flow, anyio.create_task_group() as tg:
        pipeline.started_at = start = clock()
        await flow.start()
        if console is not None:
            # Returns by itself once the flow has finished.
            tg.start_soon(_show_live, flow, pipeline, duration, console)
        # Sample on a fixed grid from the start, so reports do not drift.
        samples = max(1, round(duration / SAMPLE_INTERVAL))
        per_report = max(1, round(report_interval / SAMPLE_INTERVAL))
        for tick in range(1, samples + 1):
            await anyio.sleep_until(start + duration * tick / samples)
            stats = sample()
            if console is None and (tick % per_report == 0 or tick == samples):
                report(stats, clock() - start)
        ran_for = clock() - start
        async with anyio.create_task_group() as sampler:
            # Keep sampling while the flow drains.
            sampler.start_soon(_sample_until_stopped, sample)
            await flow.stop(drain=True, timeout=DRAIN_TIMEOUT)
            sampler.cancel_scope.cancel()
        elapsed = clock() - start
    final = sample()
    return DemoSummary(
        produced=pipeline.produced,
        consumed=pipeline.consumed,
        errors=pipeline.errors,
        dropped=sum(stage.dropped for stage in final.values()),
        max_workers=max_workers,
        ran_for=ran_for,
        elapsed=elapsed,
        stats=final,
    )


async def _sample_until_stopped(sample: Callable[[], object]) -> None:
    while True:
        await anyio.sleep(SAMPLE_INTERVAL)
        sample()


async def _show_live(
    flow: Flow, pipeline: _Pipeline, duration: float, console: Console
) -> None:
    from .monitor import FlowView, _Display

    class DemoView(FlowView):
        """The monitor's view, headed by the demo's clock and producer phase."""

        def heading(self) -> str:
            now = next(iter(self.stats.values())).sampled_at
            if now is None:
                return super().heading()
            elapsed = now - pipeline.started_at
            parts = [f"t={elapsed:5.1f}s"]
            # (uvloop's millisecond timers may end the run a hair before duration)
            if elapsed < duration and flow.state != "finished":
                parts.append(f"phase: {phase_at(elapsed)[0]:<5}")
            parts.append(super().heading())
            return "  ".join(parts)

    await _Display(DemoView(flow), 4.0, console).run()
