"""Throughput: flowrhythm against hand-written pipelines, on every backend.

Run from the repository root::

    python -m benchmarks.throughput                 # 100k items, 3 rounds
    python -m benchmarks.throughput --workers 1,4 --json results.json
    python -m benchmarks.throughput --quick         # smoke test
    python -m benchmarks.throughput --contenders flowrhythm,anyio-fast,aiostream

Samples are interleaved: each round runs every (backend, workers, contender)
combination once, so drift in the machine's speed (thermal throttling, a
neighbour's load) is spread over all contenders instead of hitting one. Tables
report medians over rounds.

Peer libraries (``peers.py``) can be named in ``--contenders`` too; they run
``--peer-items`` items, since some take 100+ µs per item. A contender that needs
a newer Python than this one runs in child processes of such an interpreter,
in a group of its own with flowrhythm and the reference timed there as well.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import _harness as h
from . import contenders as c
from .peers import PEER_DISTRIBUTIONS, PEERS

#: the contender every other one is compared with
REFERENCE = "anyio-fast"
#: each flowrhythm contender's time over the reference's should stay at or below
#: its target (issue #4: fixed pools 1.2×, UtilizationScaling's defaults 1.4×)
TARGETS = {"flowrhythm": 1.2, "flowrhythm-utilization": 1.4}
#: the item count of --quick (and of each contender's warm-up run)
QUICK_ITEMS = 2_000
#: a sample taking longer than this (seconds) fails its contender's row
SAMPLE_TIMEOUT = 300.0

# Kept importable from here: older scripts build contenders with it.
Contender = h.Contender

CONTENDERS = (
    Contender("flowrhythm", c.run_flowrhythm),
    Contender("flowrhythm-utilization", c.run_flowrhythm_utilization),
    Contender("flowrhythm-sampling", c.run_flowrhythm_sampling),
    Contender("anyio-naive", c.run_anyio_naive),
    Contender("anyio-fast", c.run_anyio_fast),
    Contender("asyncio-queue", c.run_asyncio_queue, ("asyncio", "uvloop")),
    Contender("plain-loop", c.run_plain_loop),
)
#: every contender ``--contenders`` may name
REGISTRY = CONTENDERS + PEERS


@dataclass
class Series:
    """One (backend, workers, contender) line of a table and how it is run."""

    where: h.Backend
    workers: int
    contender: h.Contender
    items: int
    result: h.Result
    #: the interpreter of the child processes that run it; None: this process
    python: str | None = None


@dataclass
class Skipped:
    """A row that has no numbers, and why."""

    backend: str
    workers: int
    contender: str
    reason: str
    #: "failed" (it raised), "missing" (not installed, no interpreter) or
    #: "backend" (it cannot run on this backend: a note, not a row)
    kind: str = "missing"


@dataclass
class Outcome:
    results: list[h.Result]
    skipped: list[Skipped] = field(default_factory=list)
    #: notes for the report's header (which interpreter ran what)
    notes: list[str] = field(default_factory=list)
    #: what the child interpreters reported about themselves, by path
    children: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def failed(self) -> list[Skipped]:
        return [s for s in self.skipped if s.kind == "failed"]


def parse_args(
    argv: Sequence[str] | None,
    *,
    prog: str = "python -m benchmarks.throughput",
    rounds: int = 3,
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Push small items through 3 trivial stages and a counting consumer; "
            "compare flowrhythm with hand-written pipelines and peer libraries."
        ),
    )
    parser.add_argument(
        "--items", type=int, help="items per run (default 100000; --quick: 2000)"
    )
    parser.add_argument(
        "--peer-items",
        type=int,
        help="items per run of a peer library (default: --items / 5, at least 2000)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"timed runs of each contender (default {rounds}; --quick: 1)",
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
        help=(
            "comma-separated subset of: "
            f"{', '.join(ct.name for ct in REGISTRY)} (default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--stage-delay",
        type=float,
        default=0.0,
        metavar="MS",
        help=(
            "each stage awaits a sleep of this many milliseconds, a stand-in for "
            "I/O: measures pipelining (whether stages overlap) rather than "
            "per-item overhead (default 0; items default to 2000)"
        ),
    )
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--quick", action="store_true", help="few items, one round: a smoke test"
    )
    args = parser.parse_args(argv)

    if args.stage_delay < 0:
        parser.error("--stage-delay must not be negative")
    c.use_stage_delay(args.stage_delay / 1000)
    if args.items is None and args.stage_delay:
        args.items = 200 if args.quick else 2_000
    if args.items is None:
        args.items = QUICK_ITEMS if args.quick else 100_000
    if args.peer_items is None:
        args.peer_items = max(args.items // 5, min(args.items, QUICK_ITEMS))
    if args.rounds is None:
        args.rounds = 1 if args.quick else rounds
    if args.items < 1 or args.peer_items < 1 or args.rounds < 1:
        parser.error("--items, --peer-items and --rounds must be at least 1")

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
    known = {ct.name: ct for ct in REGISTRY}
    names = h.parse_csv(args.contenders)
    for name in names:
        if name not in known:
            parser.error(f"unknown contender {name!r}; choose from {list(known)}")
    args.contenders = [known[name] for name in names]
    return args


# -- planning -----------------------------------------------------------------------


def _plan(args: argparse.Namespace, outcome: Outcome) -> list[Series]:
    """Every series to time, in table order; what cannot run goes to ``skipped``."""
    known = {ct.name: ct for ct in REGISTRY}
    plan: list[Series] = []
    for name in args.backends:
        if not h.backend_available(name):
            print(f"skipping {name}: not installed", file=sys.stderr)
            continue
        where = h.backend(name)
        for workers in args.workers:
            # Contenders this interpreter is too old for, by child interpreter.
            elsewhere: dict[str, tuple[str, list[h.Contender]]] = {}
            for ct in args.contenders:
                if where.name not in ct.backends:
                    if ct.peer:
                        outcome.skipped.append(
                            Skipped(
                                where.name,
                                workers,
                                ct.name,
                                f"runs on {' and '.join(ct.backends)} only",
                                "backend",
                            )
                        )
                    continue
                if sys.version_info < ct.min_python:
                    python, label = h.find_python(ct.min_python, ct.requires)
                    if python is None:
                        outcome.skipped.append(
                            Skipped(where.name, workers, ct.name, label)
                        )
                    else:
                        elsewhere.setdefault(python, (label, []))[1].append(ct)
                    continue
                missing = ct.missing()
                if missing:
                    hint = " ".join(ct.pip or missing)
                    outcome.skipped.append(
                        Skipped(
                            where.name,
                            workers,
                            ct.name,
                            f"not installed (pip install {hint})",
                        )
                    )
                    continue
                plan.append(_series(args, where, workers, ct, where.name))
            for python, (label, group) in elsewhere.items():
                # The yardsticks run in the same child interpreter, so a ratio
                # never compares two Pythons.
                yardsticks = [
                    known[n]
                    for n in ("flowrhythm", REFERENCE)
                    if all(ct.name != n for ct in group)
                ]
                shown = f"{where.name}, {label}"
                plan.extend(
                    _series(args, where, workers, ct, shown, python)
                    for ct in yardsticks + group
                )
                note = (
                    f"{', '.join(ct.name for ct in group)}: needs Python >= "
                    f"{'.'.join(map(str, group[0].min_python))}, so it ran in child "
                    f"processes of {python} ({label}), next to flowrhythm and "
                    f"{REFERENCE} timed there too"
                )
                if note not in outcome.notes:
                    outcome.notes.append(note)
    return plan


def _series(
    args: argparse.Namespace,
    where: h.Backend,
    workers: int,
    ct: h.Contender,
    label: str,
    python: str | None = None,
) -> Series:
    items = args.peer_items if ct.peer else args.items
    result = h.Result(label, workers, ct.name, items, len(c.STAGES))
    return Series(where, workers, ct, items, result, python)


def _fail(outcome: Outcome, series: Series, error: str) -> None:
    outcome.skipped.append(
        Skipped(
            series.result.backend,
            series.workers,
            series.contender.name,
            f"FAILED: {error}",
            "failed",
        )
    )


# -- running ------------------------------------------------------------------------


def run(args: argparse.Namespace) -> Outcome:
    outcome = Outcome(results=[])
    plan = _plan(args, outcome)
    failed: set[int] = set()  # ids of series that raised: not run again

    # Warm-up, untimed: imports, first-use caches and code paths are paid here,
    # not by whichever contender happens to run first. It is also a quick
    # correctness check of every contender before the long runs. (Child processes
    # warm up on their own, every time.)
    for series in plan:
        if series.python is not None:
            continue
        h.progress(
            f"warm-up: {series.where.name}, {series.workers} worker(s), "
            f"{series.contender.name}"
        )
        try:
            h.measure(
                series.where,
                series.contender.run,
                min(series.items, QUICK_ITEMS),
                series.workers,
                timeout=SAMPLE_TIMEOUT,
            )
        except Exception as exc:
            _fail(outcome, series, f"{type(exc).__name__}: {exc}")
            failed.add(id(series))

    for round_no in range(1, args.rounds + 1):
        done_children: set[tuple[str, str, int]] = set()
        for series in plan:
            if id(series) in failed:
                continue
            h.progress(
                f"round {round_no}/{args.rounds}: {series.result.backend}, "
                f"{series.workers} worker(s), {series.contender.name}"
            )
            if series.python is None:
                try:
                    seconds = h.measure(
                        series.where,
                        series.contender.run,
                        series.items,
                        series.workers,
                        timeout=SAMPLE_TIMEOUT,
                    )
                except Exception as exc:
                    _fail(outcome, series, f"{type(exc).__name__}: {exc}")
                    failed.add(id(series))
                else:
                    series.result.seconds.append(seconds)
                continue
            # One child process times its whole group, in one go, at the group's
            # first series: still interleaved with everything else in the round.
            key = (series.python, series.where.name, series.workers)
            if key in done_children:
                continue
            done_children.add(key)
            group = [
                s
                for s in plan
                if (s.python, s.where.name, s.workers) == key and id(s) not in failed
            ]
            answer = h.measure_in_child(
                series.python,
                series.where,
                [s.contender.name for s in group],
                {s.contender.name: s.items for s in group},
                series.workers,
                QUICK_ITEMS,
                SAMPLE_TIMEOUT,
            )
            outcome.children.setdefault(
                series.python, {k: v for k, v in answer.items() if k != "results"}
            )
            for s in group:
                sample = answer["results"].get(s.contender.name, {"error": "no result"})
                if "seconds" in sample:
                    s.result.seconds.append(sample["seconds"])
                else:
                    _fail(outcome, s, sample["error"])
                    failed.add(id(s))
    h.progress("")

    outcome.results = [
        s.result for s in plan if s.result.seconds and id(s) not in failed
    ]
    h.set_ratios(outcome.results, REFERENCE)
    return outcome


# -- reporting ----------------------------------------------------------------------


def report(args: argparse.Namespace, outcome: Outcome) -> str:
    headers = [
        "contender",
        "items/s",
        "µs/item",
        "µs/item/stage",
        f"× {REFERENCE}",
        "spread",
    ]
    peer_items = (
        f" ({args.peer_items:,} for peer libraries)"
        if any(ct.peer for ct in args.contenders)
        else ""
    )
    out = [
        (
            f"throughput: {args.items:,} items{peer_items}, {len(c.STAGES)} stages + "
            f"consumer, buffer {c.BUFFER_SIZE}, median of {args.rounds} interleaved "
            "round(s)"
        ),
        (
            f"{REFERENCE} = 1.00, lower is faster; targets: "
            + ", ".join(f"{name} ≤ {limit}×" for name, limit in TARGETS.items())
            + "; spread = (max - min) / median"
        ),
        *(f"note: {note}" for note in outcome.notes),
    ]
    if args.stage_delay:
        out.insert(
            1,
            (
                f"each stage awaits a {args.stage_delay:g} ms sleep: a pipeline that "
                "overlaps its stages approaches workers / delay items/s "
                f"({1000 / args.stage_delay:,.0f}/s per worker); one that runs "
                f"them in turn gets a third of that"
            ),
        )
    groups: dict[tuple[str, int], tuple[list[h.Result], list[Skipped]]] = {}
    for r in outcome.results:
        groups.setdefault((r.backend, r.workers), ([], []))[0].append(r)
    for s in outcome.skipped:
        groups.setdefault((s.backend, s.workers), ([], []))[1].append(s)
    for (backend, workers), (group, skipped) in groups.items():
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
        missing = [s for s in skipped if s.kind != "backend"]
        rows += [[s.contender, "-", "-", "-", "-", "-"] for s in missing]
        title = f"\n[{backend}] {workers} worker(s) per stage"
        out.append(h.format_table(title, headers, rows))
        out.extend(f"  {s.contender}: {s.reason}" for s in missing)
        elsewhere: dict[str, list[str]] = {}
        for s in skipped:
            if s.kind == "backend":
                elsewhere.setdefault(s.reason, []).append(s.contender)
        out.extend(
            f"  not run: {', '.join(names)} ({reason})"
            for reason, names in elsewhere.items()
        )
        for r in group:
            limit = TARGETS.get(r.contender)
            if limit is not None and r.ratio is not None:
                verdict = "ok" if r.ratio <= limit else "ABOVE TARGET"
                out.append(
                    f"{r.contender} / {REFERENCE}: {r.ratio:.2f}× "
                    f"(target ≤ {limit}×): {verdict}"
                )
    out.append("")
    out.append(h.format_machine(h.machine_info(PEER_DISTRIBUTIONS)))
    for python, child in outcome.children.items():
        if "python" in child:
            versions = ", ".join(
                f"{dist} {ver or 'not installed'}"
                for dist, ver in child["versions"].items()
            )
            out.append(f"child:   {child['python']} ({python})\n         {versions}")
    return "\n".join(out)


def config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings, as recorded in the JSON output."""
    return {
        "items": args.items,
        "peer_items": args.peer_items,
        "rounds": args.rounds,
        "backends": args.backends,
        "workers": args.workers,
        "contenders": [ct.name for ct in args.contenders],
        "stages": len(c.STAGES),
        "buffer_size": c.BUFFER_SIZE,
        "checkpoint_every": c.CHECKPOINT_EVERY,
        "stage_delay_ms": args.stage_delay,
        "reference": REFERENCE,
        "targets": TARGETS,
    }


def as_json(args: argparse.Namespace, outcome: Outcome) -> dict[str, Any]:
    return {
        "config": config(args),
        "results": [r.as_dict() for r in outcome.results],
        "skipped": [asdict(s) for s in outcome.skipped],
        "notes": outcome.notes,
        "children": outcome.children,
    }


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "python -m benchmarks.throughput",
    rounds: int = 3,
) -> int:
    args = parse_args(argv, prog=prog, rounds=rounds)
    outcome = run(args)
    print(report(args, outcome))
    if args.json:
        h.write_json(
            args.json,
            {
                "benchmark": "throughput",
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **as_json(args, outcome),
                "machine": h.machine_info(PEER_DISTRIBUTIONS),
            },
        )
        print(f"\nresults written to {args.json}")
    # A contender that raised (lost items, a peer's API drift) fails the run.
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
