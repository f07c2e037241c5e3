"""Throughput: flowrhythm against hand-written pipelines, on every backend.

Run from the repository root::

    python -m benchmarks.throughput                 # 100k items, 3 rounds
    python -m benchmarks.throughput --workers 1,4 --json results.json
    python -m benchmarks.throughput --quick         # smoke test

Samples are interleaved: each round runs every (backend, workers, contender)
combination once, so drift in the machine's speed (thermal throttling, a
neighbour's load) is spread over all contenders instead of hitting one. Tables
report medians over rounds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from . import _harness as h
from . import contenders as c

#: the contender every other one is compared with
REFERENCE = "anyio-fast"
#: flowrhythm's time over the reference's should stay at or below this
TARGET_RATIO = 1.5
#: the item count of --quick (and of each contender's warm-up run)
QUICK_ITEMS = 2_000


@dataclass(frozen=True)
class Contender:
    name: str
    run: h.Workload
    #: the backends it can run on (asyncio.Queue needs an asyncio event loop)
    backends: tuple[str, ...] = h.BACKENDS


CONTENDERS = (
    Contender("flowrhythm", c.run_flowrhythm),
    Contender("anyio-naive", c.run_anyio_naive),
    Contender("anyio-fast", c.run_anyio_fast),
    Contender("asyncio-queue", c.run_asyncio_queue, ("asyncio", "uvloop")),
    Contender("plain-loop", c.run_plain_loop),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput",
        description=(
            "Push small items through 3 trivial stages and a counting consumer; "
            "compare flowrhythm with hand-written pipelines."
        ),
    )
    parser.add_argument(
        "--items", type=int, help="items per run (default 100000; --quick: 2000)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="timed runs of each contender (default 3; --quick: 1)",
    )
    parser.add_argument(
        "--backends",
        default=",".join(h.BACKENDS),
        help="comma-separated, from: %(default)s",
    )
    parser.add_argument(
        "--workers",
        default="1",
        help="workers per stage, or a comma-separated list like 1,4 (default 1)",
    )
    parser.add_argument(
        "--contenders",
        default=",".join(ct.name for ct in CONTENDERS),
        help="comma-separated subset of: %(default)s",
    )
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--quick", action="store_true", help="few items, one round: a smoke test"
    )
    args = parser.parse_args(argv)

    if args.items is None:
        args.items = QUICK_ITEMS if args.quick else 100_000
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.items < 1 or args.rounds < 1:
        parser.error("--items and --rounds must be at least 1")

    args.backends = h.parse_csv(args.backends)
    for name in args.backends:
        if name not in h.BACKENDS:
            parser.error(f"unknown backend {name!r}; choose from {h.BACKENDS}")
    try:
        args.workers = [int(w) for w in h.parse_csv(args.workers)]
    except ValueError:
        parser.error(f"--workers must be integers, got {args.workers!r}")
    if not args.workers or min(args.workers) < 1:
        parser.error("--workers must be at least 1")
    known = {ct.name: ct for ct in CONTENDERS}
    names = h.parse_csv(args.contenders)
    for name in names:
        if name not in known:
            parser.error(f"unknown contender {name!r}; choose from {list(known)}")
    args.contenders = [known[name] for name in names]
    return args


def run(args: argparse.Namespace) -> list[h.Result]:
    backends = []
    for name in args.backends:
        if h.backend_available(name):
            backends.append(h.backend(name))
        else:
            print(f"skipping {name}: not installed", file=sys.stderr)

    results: dict[tuple[str, int, str], h.Result] = {}
    plan = []
    for where in backends:
        for workers in args.workers:
            for ct in args.contenders:
                if where.name in ct.backends:
                    plan.append((where, workers, ct))
                    results[where.name, workers, ct.name] = h.Result(
                        where.name, workers, ct.name, args.items, len(c.STAGES)
                    )

    # Warm-up, untimed: imports, first-use caches and code paths are paid here,
    # not by whichever contender happens to run first. It is also a quick
    # correctness check of every contender before the long runs.
    for where, workers, ct in plan:
        h.progress(f"warm-up: {where.name}, {workers} worker(s), {ct.name}")
        h.measure(where, ct.run, min(args.items, QUICK_ITEMS), workers)

    for round_no in range(1, args.rounds + 1):
        for where, workers, ct in plan:
            h.progress(
                f"round {round_no}/{args.rounds}: {where.name}, "
                f"{workers} worker(s), {ct.name}"
            )
            seconds = h.measure(where, ct.run, args.items, workers)
            results[where.name, workers, ct.name].seconds.append(seconds)
    h.progress("")

    ordered = list(results.values())
    h.set_ratios(ordered, REFERENCE)
    return ordered


def report(args: argparse.Namespace, results: list[h.Result]) -> str:
    headers = [
        "contender",
        "items/s",
        "µs/item",
        "µs/item/stage",
        f"× {REFERENCE}",
        "spread",
    ]
    out = [
        (
            f"throughput: {args.items:,} items, {len(c.STAGES)} stages + consumer, "
            f"buffer {c.BUFFER_SIZE}, median of {args.rounds} interleaved round(s)"
        ),
        (
            f"{REFERENCE} = 1.00, lower is faster; flowrhythm target ≤ "
            f"{TARGET_RATIO}×; spread = (max - min) / median"
        ),
    ]
    groups: dict[tuple[str, int], list[h.Result]] = {}
    for r in results:
        groups.setdefault((r.backend, r.workers), []).append(r)
    for (backend, workers), group in groups.items():
        rows = [
            [
                r.contender,
                f"{r.items_per_s:,.0f}",
                f"{r.us_per_item:.2f}",
                f"{r.us_per_item_stage:.2f}",
                f"{r.ratio:.2f}" if r.ratio is not None else "-",
                f"{r.spread:.0%}",
            ]
            for r in group
        ]
        title = f"\n[{backend}] {workers} worker(s) per stage"
        out.append(h.format_table(title, headers, rows))
        headline = next((r for r in group if r.contender == "flowrhythm"), None)
        if headline is not None and headline.ratio is not None:
            verdict = "ok" if headline.ratio <= TARGET_RATIO else "ABOVE TARGET"
            out.append(
                f"flowrhythm / {REFERENCE}: {headline.ratio:.2f}× "
                f"(target ≤ {TARGET_RATIO}×): {verdict}"
            )
    out.append("")
    out.append(h.format_machine(h.machine_info()))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print(report(args, results))
    if args.json:
        h.write_json(
            args.json,
            {
                "benchmark": "throughput",
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "config": {
                    "items": args.items,
                    "rounds": args.rounds,
                    "backends": args.backends,
                    "workers": args.workers,
                    "contenders": [ct.name for ct in args.contenders],
                    "stages": len(c.STAGES),
                    "buffer_size": c.BUFFER_SIZE,
                    "checkpoint_every": c.CHECKPOINT_EVERY,
                    "reference": REFERENCE,
                    "target_ratio": TARGET_RATIO,
                },
                "machine": h.machine_info(),
                "results": [r.as_dict() for r in results],
            },
        )
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
