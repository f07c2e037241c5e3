"""Memory: a flow's footprint must not grow with the number of items.

Run from the repository root::

    python -m benchmarks.memory                        # 1M and 5M items
    python -m benchmarks.memory --items 1000000,5000000 --traced-items 200000,1000000
    python -m benchmarks.memory --contenders flowrhythm,anyio-fast --json out.json

Pushes small ints through the throughput workload (3 trivial stages and a
counting consumer, ``FixedScaling(1)``, 64-item buffers). Every measurement runs
in a fresh process, so nothing another run allocated is counted:

- peak RSS: ``VmHWM`` from ``/proc/self/status`` after the run (the process's
  high-water mark; ``resource.getrusage`` where there is no ``/proc``), minus
  ``VmRSS`` after a small warm-up run, just before the measured one;
- traced memory, in separate runs since tracemalloc slows a run ~7×: the peak
  of Python allocations during the run, from ``tracemalloc.start()`` just before.

Bounded buffers mean O(buffers) memory, not O(items): the peaks must be flat.
Verdict: peak RSS grows by less than 10 MB, and the traced peak by less than
1 MB, from the smallest to the largest item count.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from . import _harness as h

#: the verdict's limits, bytes: growth from the smallest to the largest run
RSS_LIMIT = 10 * 2**20
TRACED_LIMIT = 2**20
#: items of the warm-up run before the baseline is read
WARMUP_ITEMS = 2_000


# -- the child: one run, one measurement ------------------------------------------


def _status_kb(field: str) -> int | None:
    """A ``VmXXX:`` line of ``/proc/self/status``, in KiB (None without /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_bytes() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _rss_bytes() -> int:
    rss = _status_kb("VmRSS")
    return rss * 1024 if rss is not None else _peak_rss_bytes()


def child(mode: str, n_items: int, contender: str, backend: str) -> dict[str, Any]:
    from .throughput import REGISTRY  # the contenders, by name

    run = {ct.name: ct.run for ct in REGISTRY}[contender]
    where = h.backend(backend)
    # Imports, first-use caches and the event loop's own structures are paid
    # before the baseline, so only what the run itself holds is counted.
    h.measure(where, run, WARMUP_ITEMS, 1)
    gc.collect()
    answer: dict[str, Any] = {"rss_before": _rss_bytes()}
    if mode == "traced":
        tracemalloc.start()
        start = time.perf_counter()
        h.measure(where, run, n_items, 1)
        seconds = time.perf_counter() - start
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        answer.update(traced_peak=peak, traced_end=current)
    else:
        start = time.perf_counter()
        h.measure(where, run, n_items, 1)
        seconds = time.perf_counter() - start
    answer.update(seconds=seconds, rss_peak=_peak_rss_bytes(), rss_after=_rss_bytes())
    return answer


# -- the parent ---------------------------------------------------------------------


@dataclass
class MemResult:
    contender: str
    backend: str
    mode: str  # "rss" or "traced"
    items: int
    seconds: float
    rss_before: int
    rss_peak: int
    rss_after: int
    traced_peak: int | None = None
    traced_end: int | None = None

    @property
    def growth(self) -> int:
        """The run's own peak: RSS high-water mark over the baseline, or the traced
        peak."""
        if self.mode == "traced":
            assert self.traced_peak is not None
            return self.traced_peak
        return max(self.rss_peak - self.rss_before, 0)


@dataclass
class Verdict:
    contender: str
    mode: str
    smallest: int
    largest: int
    growth: int  # bytes, largest run's peak minus smallest run's
    limit: int

    @property
    def flat(self) -> bool:
        return self.growth < self.limit


def measure_once(
    mode: str, n_items: int, contender: str, backend: str, timeout: float = 1800
) -> MemResult:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child",
         json.dumps([mode, n_items, contender, backend])],
        cwd=h.REPO_ROOT, capture_output=True, text=True, check=False,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(h.REPO_ROOT)},
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(
            f"memory child ({mode}, {n_items}, {contender}) failed:\n{done.stderr}"
        )
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return MemResult(contender, backend, mode, n_items, **data)


def verdicts(results: Sequence[MemResult]) -> list[Verdict]:
    out = []
    keys = dict.fromkeys((r.contender, r.mode) for r in results)
    for contender, mode in keys:
        runs = sorted(
            (r for r in results if (r.contender, r.mode) == (contender, mode)),
            key=lambda r: r.items,
        )
        if len(runs) < 2:
            continue
        small, large = runs[0], runs[-1]
        limit = TRACED_LIMIT if mode == "traced" else RSS_LIMIT
        out.append(
            Verdict(
                contender,
                mode,
                small.items,
                large.items,
                large.growth - small.growth,
                limit,
            )
        )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--items",
        default="1000000,5000000",
        help="item counts of the RSS runs (default %(default)s)",
    )
    parser.add_argument(
        "--traced-items",
        default="1000000,5000000",
        help=(
            "item counts of the tracemalloc runs, ~7x slower (default %(default)s; "
            "'' skips them)"
        ),
    )
    parser.add_argument(
        "--contenders",
        default="flowrhythm",
        help="comma-separated throughput contenders (default %(default)s)",
    )
    parser.add_argument(
        "--backend",
        default="asyncio",
        choices=h.BACKENDS,
        help="default %(default)s",
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from .throughput import REGISTRY

    try:
        args.items = [int(n) for n in h.parse_csv(args.items)]
        args.traced_items = [int(n) for n in h.parse_csv(args.traced_items)]
    except ValueError:
        parser.error("--items and --traced-items must be integers")
    if any(n < 1 for n in args.items + args.traced_items):
        parser.error("item counts must be at least 1")
    args.contenders = h.parse_csv(args.contenders)
    known = [ct.name for ct in REGISTRY if not ct.missing()]
    for name in args.contenders:
        if name not in known:
            parser.error(f"unknown contender {name!r}; choose from {known}")
    if not h.backend_available(args.backend):
        parser.error(f"backend {args.backend} is not installed")


def run(args: argparse.Namespace) -> list[MemResult]:
    results = []
    plan = [("rss", n) for n in args.items] + [("traced", n) for n in args.traced_items]
    for contender in args.contenders:
        for mode, n_items in plan:
            h.progress(f"memory: {contender}, {mode}, {n_items:,} items")
            results.append(measure_once(mode, n_items, contender, args.backend))
    h.progress("")
    return results


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def report(args: argparse.Namespace, results: Sequence[MemResult]) -> str:
    out = [
        (
            f"memory: 3 stages + consumer, FixedScaling(1), buffer 64, {args.backend}; "
            "every run in a fresh process"
        ),
        (
            "RSS growth = VmHWM after the run - VmRSS before it; traced = "
            "tracemalloc's peak during the run (MB = 2^20 bytes)"
        ),
    ]
    rss = [r for r in results if r.mode == "rss"]
    if rss:
        rows = [
            [
                r.contender,
                f"{r.items:,}",
                f"{r.seconds:.1f}",
                _mb(r.rss_before),
                _mb(r.rss_peak),
                _mb(r.growth),
            ]
            for r in rss
        ]
        headers = ["contender", "items", "s", "RSS before MB", "peak MB", "growth MB"]
        out.append(h.format_table("\npeak RSS", headers, rows))
    traced = [r for r in results if r.mode == "traced"]
    if traced:
        rows = [
            [
                r.contender,
                f"{r.items:,}",
                f"{r.seconds:.1f}",
                f"{(r.traced_peak or 0) / 1024:,.1f}",
                f"{(r.traced_end or 0) / 1024:,.1f}",
            ]
            for r in traced
        ]
        headers = ["contender", "items", "s", "traced peak KiB", "at end KiB"]
        out.append(h.format_table("\ntracemalloc", headers, rows))
    out.append("")
    for v in verdicts(results):
        what = "peak RSS" if v.mode == "rss" else "traced peak"
        unit, scale = ("MB", 2**20) if v.mode == "rss" else ("KiB", 1024)
        out.append(
            f"{v.contender}: {what} {v.smallest:,} -> {v.largest:,} items grew "
            f"{v.growth / scale:+,.2f} {unit} (limit {v.limit / scale:,.0f} {unit}): "
            f"{'flat, PASS' if v.flat else 'NOT FLAT, FAIL'}"
        )
    out.append("")
    out.append(h.format_machine(h.machine_info()))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        print(json.dumps(child(*json.loads(argv[1]))))
        return 0
    args = h.parse_standalone(
        argv,
        prog="python -m benchmarks.memory",
        description="Peak RSS and traced memory at two item counts: must be flat.",
        add_arguments=add_arguments,
        check_arguments=check_arguments,
    )
    results = run(args)
    print(report(args, results))
    found = verdicts(results)
    if args.json:
        config = {
            "items": args.items,
            "traced_items": args.traced_items,
            "contenders": args.contenders,
            "backend": args.backend,
            "rss_limit": RSS_LIMIT,
            "traced_limit": TRACED_LIMIT,
        }
        h.save_results(
            args.json,
            "memory",
            config,
            [asdict(r) for r in results],
            verdicts=[asdict(v) | {"flat": v.flat} for v in found],
        )
    return 0 if all(v.flat for v in found) else 1


if __name__ == "__main__":
    sys.exit(main())
