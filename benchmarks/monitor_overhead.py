"""Monitor overhead: does the live view slow the flow it watches?

Run from the repository root::

    python -m benchmarks.monitor_overhead              # 200k items, 5 rounds, all backends
    python -m benchmarks.monitor_overhead --backends asyncio --rounds 9
    python -m benchmarks.monitor_overhead --quick      # smoke test

The throughput benchmark's ``flowrhythm`` contender (3 trivial stages and a
counting consumer, ``FixedScaling(workers)``, buffer 64) runs once plain and once
inside ``flow.monitor(...)``, drawing to a ``rich`` console that writes into a
``StringIO`` (80 columns, as if it were a terminal), so no terminal is needed but
every frame is rendered in full. The view snapshots ``flow.stats()`` and redraws
from its own task, on the flow's event loop: whatever a frame costs, the flow
waits for. It runs at the default ``refresh_per_second=4`` and at a stress
setting of 20.

Rounds are interleaved (each round runs every variant on every backend once, in
an order that rotates from round to round) and the table shows medians. A variant
passes ("not measurably slower") when its overhead over plain is below 3 % or
within the plain runs' own spread, (max - min) / median. The exit status is 1 if
the default setting fails on some backend; the stress setting is reported only.

Each frame's cost is also timed on its own (a snapshot plus a redraw, as the view
does it, on a finished flow): frames drawn per run × that cost over the plain
run's time is the overhead to expect, and frames/s × that cost the share of the
event loop the view takes in a long run ("steady"). Besides one frame per period
the view draws a few whatever the run's length (when it starts, when the flow
finishes, when it stops), so short runs (``--quick``) show a large overhead:
they get no verdict. Both estimates tend to be low: inside a running flow a frame
takes longer than back to back (≈ 3-4 ms against ≈ 2.5 ms on a 2-core EPYC,
probably colder caches); "ms/frame", the measured extra time per frame drawn,
includes that.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from flowrhythm import FixedScaling, Flow

from . import _harness as h
from . import contenders as c

if TYPE_CHECKING:
    from rich.console import Console

#: the default item count (--quick: QUICK_ITEMS, also each variant's warm-up)
ITEMS = 200_000
QUICK_ITEMS = 2_000
#: the monitor settings measured: the default, and a stress setting
REFRESH_RATES = (4.0, 20.0)
#: the setting whose verdict decides the exit status
DEFAULT_REFRESH = 4.0
#: below this overhead a variant passes even when the plain runs were steadier
TOLERANCE = 0.03
#: a sample taking longer than this (seconds) fails the run
SAMPLE_TIMEOUT = 300.0
#: frames drawn back to back to time one frame (the median counts)
FRAME_SAMPLES = 200
#: the console the view draws on: 80 columns, terminal escapes, into memory
CONSOLE_WIDTH = 80
#: the plain run's name
PLAIN = "plain"


def variant_name(refresh: float | None) -> str:
    return PLAIN if refresh is None else f"monitor {refresh:g}/s"


def _console(out: io.StringIO) -> Console:
    from rich.console import Console

    return Console(file=out, width=CONSOLE_WIDTH, force_terminal=True)


def _build(n_items: int, workers: int, tally: c.Tally) -> Flow:
    """The flow of the throughput contender ``flowrhythm``, from the same parts."""
    flow = Flow(buffer_size=c.BUFFER_SIZE)
    flow.set_producer(lambda: c.produce(n_items))
    for fn in c.STAGES:
        flow.add_transformer(
            fn, name=fn.__name__, scaling_strategy=FixedScaling(workers)
        )
    flow.set_consumer(
        tally.consume, name="consume", scaling_strategy=FixedScaling(workers)
    )
    return flow


def _verify(flow: Flow, tally: c.Tally, n_items: int, name: str) -> None:
    tally.verify(n_items, name)
    for stage, stats in flow.stats().items():
        if stats.processed != n_items or stats.errors or stats.dropped:
            raise c.BenchmarkError(f"{name}: stage {stage!r} stats are off: {stats}")


@dataclass
class Variant:
    """One way of running the flow: plain, or watched at ``refresh`` frames/s."""

    refresh: float | None
    #: frames the view drew in each timed run (empty for plain)
    frames: list[int]

    @property
    def name(self) -> str:
        return variant_name(self.refresh)

    async def run(self, n_items: int, workers: int) -> None:
        tally = c.Tally()
        flow = _build(n_items, workers, tally)
        if self.refresh is None:
            await flow.run()
        else:
            out = io.StringIO()
            async with flow.monitor(
                refresh_per_second=self.refresh, console=_console(out)
            ):
                await flow.run()
            # Every frame starts with the heading "flow <state> · N items in".
            drawn = out.getvalue().count("items in")
            if not drawn:
                raise c.BenchmarkError(f"{self.name}: the view drew nothing")
            self.frames.append(drawn)
        _verify(flow, tally, n_items, self.name)


async def _frame_cost(workers: int, frames: int) -> float:
    """Seconds per frame: one snapshot and one redraw, as the view's task does;
    the median of ``frames`` frames, so a neighbour's burst of load is left out."""
    from rich.live import Live

    from flowrhythm.monitor import FlowView

    tally = c.Tally()
    flow = _build(QUICK_ITEMS, workers, tally)
    await flow.run()
    view = FlowView(flow)
    view.sample()
    with Live(view, console=_console(io.StringIO()), auto_refresh=False) as display:
        display.refresh()  # the first frame pays for rich's lazy imports
        took = []
        for _ in range(frames):
            start = time.perf_counter()
            view.sample()
            display.refresh()
            took.append(time.perf_counter() - start)
    return statistics.median(took)


@dataclass
class BackendResult:
    backend: str
    #: variant name -> its samples
    results: dict[str, h.Result]
    #: variant name -> frames drawn per timed run
    frames: dict[str, list[int]]
    #: seconds one frame takes, timed on its own
    frame_s: float

    @property
    def plain(self) -> h.Result:
        return self.results[PLAIN]

    def overhead(self, name: str) -> float:
        """The variant's median time over plain's, minus one."""
        return self.results[name].median_s / self.plain.median_s - 1

    def allowed(self) -> float:
        """The overhead that still counts as "not measurably slower"."""
        return max(TOLERANCE, self.plain.spread)

    def passed(self, name: str) -> bool:
        return self.overhead(name) <= self.allowed()

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "frame_us": self.frame_s * 1e6,
            "allowed_overhead": self.allowed(),
            "variants": [
                r.as_dict()
                | (
                    {}
                    if name == PLAIN
                    else {
                        "overhead": self.overhead(name),
                        "passed": self.passed(name),
                        "frames": self.frames[name],
                    }
                )
                for name, r in self.results.items()
            ],
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--items",
        type=int,
        help=f"items per run (default {ITEMS:,}; --quick: {QUICK_ITEMS:,})",
    )
    parser.add_argument(
        "--rounds", type=int, help="timed runs of each variant (default 5; --quick: 1)"
    )
    parser.add_argument(
        "--backends",
        default=",".join(h.BACKENDS),
        help="comma-separated, from: %(default)s",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="workers per stage (default 1)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="few items, one round: a smoke test"
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.items is None:
        args.items = QUICK_ITEMS if args.quick else ITEMS
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.items < 1 or args.rounds < 1 or args.workers < 1:
        parser.error("--items, --rounds and --workers must be at least 1")
    args.backends = h.parse_csv(args.backends)
    for name in args.backends:
        if name not in h.BACKENDS:
            parser.error(f"unknown backend {name!r}; choose from {h.BACKENDS}")
    try:
        import rich  # noqa: F401
    except ImportError:
        parser.error("needs rich: pip install 'flowrhythm[rich]'")


def run(args: argparse.Namespace) -> list[BackendResult]:
    refreshes: tuple[float | None, ...] = (None, *REFRESH_RATES)
    plan: list[tuple[h.Backend, Variant, h.Result]] = []
    for name in args.backends:
        if not h.backend_available(name):
            print(f"skipping {name}: not installed", file=sys.stderr)
            continue
        where = h.backend(name)
        for refresh in refreshes:
            variant = Variant(refresh, [])
            result = h.Result(
                name, args.workers, variant.name, args.items, len(c.STAGES)
            )
            plan.append((where, variant, result))

    # Warm-up, untimed: imports (rich's are lazy) and first-use code paths.
    for where, variant, _ in plan:
        h.progress(f"warm-up: {where.name}, {variant.name}")
        h.measure(
            where,
            variant.run,
            min(args.items, QUICK_ITEMS),
            args.workers,
            timeout=SAMPLE_TIMEOUT,
        )
        variant.frames.clear()

    per_backend = len(refreshes)
    for round_no in range(args.rounds):
        for start in range(0, len(plan), per_backend):
            group = plan[start : start + per_backend]
            # Rotate the order, so no variant always runs first (or right after
            # another one's garbage).
            shift = round_no % per_backend
            for where, variant, result in group[shift:] + group[:shift]:
                h.progress(
                    f"round {round_no + 1}/{args.rounds}: {where.name}, {variant.name}"
                )
                result.seconds.append(
                    h.measure(
                        where,
                        variant.run,
                        args.items,
                        args.workers,
                        timeout=SAMPLE_TIMEOUT,
                    )
                )

    results = []
    for start in range(0, len(plan), per_backend):
        group = plan[start : start + per_backend]
        where = group[0][0]
        h.progress(f"frame cost: {where.name}")
        frame_s = anyio.run(
            _frame_cost,
            args.workers,
            FRAME_SAMPLES,
            backend=where.anyio_backend,
            backend_options=dict(where.options),
        )
        results.append(
            BackendResult(
                where.name,
                {v.name: r for _, v, r in group},
                {v.name: v.frames for _, v, r in group if v.refresh is not None},
                frame_s,
            )
        )
    h.progress("")
    return results


def report(args: argparse.Namespace, results: Sequence[BackendResult]) -> str:
    out = [
        (
            f"monitor overhead: {args.items:,} items, {len(c.STAGES)} stages + "
            f"consumer, {args.workers} worker(s) per stage, buffer {c.BUFFER_SIZE}, "
            f"median of {args.rounds} interleaved round(s)"
        ),
        f"the live view draws to a {CONSOLE_WIDTH}-column in-memory terminal",
        "overhead = median time / plain's - 1; spread = (max - min) / median",
        (
            f"verdict: PASS = not measurably slower (overhead < {TOLERANCE:.0%} or "
            "within plain's spread)"
        ),
        "ms/frame = the extra time over the frames the view drew per run",
        (
            "expected = frames/run × one frame's cost / plain's time; steady = "
            "frames/s × one frame's cost,"
        ),
        (
            "  the view's share of a long run; both usually low: the frame is "
            "timed warm, back to back"
        ),
    ]
    headers = [
        "variant",
        "µs/item",
        "overhead",
        "expected",
        "steady",
        "frames/run",
        "ms/frame",
        "spread",
        "verdict",
    ]
    failed = []
    for b in results:
        rows = []
        for name, r in b.results.items():
            if name == PLAIN:
                rows.append(
                    [
                        name,
                        f"{r.us_per_item:.3f}",
                        *("-" * 5),
                        f"{r.spread:.1%}",
                        "",
                    ]
                )
                continue
            refresh = next(x for x in REFRESH_RATES if variant_name(x) == name)
            ok = b.passed(name)
            if not ok and refresh == DEFAULT_REFRESH:
                failed.append(b.backend)
            frames = statistics.median(b.frames[name]) if b.frames[name] else None
            extra_s = r.median_s - b.plain.median_s
            expected = (
                "-"
                if frames is None
                else f"{frames * b.frame_s / b.plain.median_s:.1%}"
            )
            rows.append(
                [
                    name,
                    f"{r.us_per_item:.3f}",
                    f"{b.overhead(name):+.1%}",
                    expected,
                    f"{refresh * b.frame_s:.1%}",
                    "-" if frames is None else f"{frames:.0f}",
                    "-" if not frames else f"{extra_s / frames * 1e3:.1f}",
                    f"{r.spread:.1%}",
                    "-" if args.quick else "PASS" if ok else "FAIL",
                ]
            )
        title = (
            f"\n[{b.backend}] one frame: {b.frame_s * 1e6:,.0f} µs; "
            f"allowed overhead: {b.allowed():.1%}"
        )
        out.append(h.format_table(title, headers, rows))
    out.append("")
    default = variant_name(DEFAULT_REFRESH)
    if args.quick:
        out.append(
            "--quick: a smoke test, runs too short for a verdict (the frames drawn "
            "at start and end outweigh the run)"
        )
    elif failed:
        out.append(
            f"{default} (the default): MEASURABLY SLOWER on {', '.join(failed)}: FAIL "
            "(a large plain spread means a busy machine: rerun with more --rounds; "
            "a small one, a real cost)"
        )
    else:
        out.append(f"{default} (the default): not measurably slower: PASS")
    out.append("")
    out.append(h.format_machine(h.machine_info(("rich",))))
    return "\n".join(out)


def passed(results: Sequence[BackendResult]) -> bool:
    """Whether the default setting passed on every backend."""
    return all(b.passed(variant_name(DEFAULT_REFRESH)) for b in results)


def main(argv: Sequence[str] | None = None) -> int:
    args = h.parse_standalone(
        argv,
        prog="python -m benchmarks.monitor_overhead",
        description="Throughput of the trivial 3-stage flow, plain and with the "
        "live view running.",
        add_arguments=add_arguments,
        check_arguments=check_arguments,
    )
    results = run(args)
    print(report(args, results))
    if args.json:
        config = {
            "items": args.items,
            "rounds": args.rounds,
            "backends": args.backends,
            "workers": args.workers,
            "refresh_per_second": list(REFRESH_RATES),
            "default_refresh": DEFAULT_REFRESH,
            "tolerance": TOLERANCE,
            "console_width": CONSOLE_WIDTH,
            "stages": len(c.STAGES),
            "buffer_size": c.BUFFER_SIZE,
        }
        h.save_results(
            args.json,
            "monitor_overhead",
            config,
            [b.as_dict() for b in results],
            machine=h.machine_info(("rich",)),
            passed=None if args.quick else passed(results),
        )
    return 0 if args.quick or passed(results) else 1


if __name__ == "__main__":
    sys.exit(main())
