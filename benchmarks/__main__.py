"""Every benchmark in one run, with one summary: ``python -m benchmarks``.

Run from the repository root::

    python -m benchmarks                         # ~7 min on 2 cores
    python -m benchmarks --json benchmarks/results/all.json
    python -m benchmarks --only throughput,latency
    python -m benchmarks --quick                 # smoke test, ~1 min

Sections, each with quick-ish defaults (the standalone runners' options go
further):

- throughput: every contender of ``throughput.py`` (flowrhythm and its scaling
  variants, the hand-written pipelines) and the peer libraries of ``peers.py``,
  at 1 and 4 workers per stage on every backend, 5 interleaved rounds, medians;
- iobound: one 10 ms stage at 1, 4, 16, 64 workers against workers / 10 ms;
- memory: peak RSS at 1M and 5M items, traced memory at 200k and 1M: flat?
- latency: items processed between checkpoints and after a cancel;
- operators: ordered vs unordered with random latency (and aiostream's ordered
  map), batching, the per-item cost of each stage option, a plain stage against
  anyio-fast (``operators.py``; fewer rounds and shorter runs than standalone).

Each section prints its full report as it finishes; the summary comes last.
The exit status is 1 if a contender failed, memory was not flat or a
cancellation overran its bound, or an ordered stage's reorder window
outgrew its bound.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

from . import _harness as h
from . import iobound, latency, memory, operators, peers, throughput

SECTIONS = ("throughput", "iobound", "memory", "latency", "operators")


def _sub_args(
    add: Callable[[argparse.ArgumentParser], None],
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None],
    argv: list[str],
) -> argparse.Namespace:
    """A section's namespace, parsed and checked by the section's own code."""
    parser = argparse.ArgumentParser()
    add(parser)
    args = parser.parse_args(argv)
    check(parser, args)
    return args


def throughput_argv(quick: bool) -> list[str]:
    every = [ct.name for ct in throughput.REGISTRY]
    argv = ["--workers", "1,4", "--contenders", ",".join(every)]
    if quick:
        return [*argv, "--items", "2000", "--peer-items", "1000", "--rounds", "1"]
    # Five short rounds rather than three long ones: on a shared machine a median
    # of five shrugs off two disturbed samples. 40k items keep a flowrhythm
    # sample near 0.1 s; the peers' 8k keep aiostream's 4-worker sample
    # (~150-250 µs/item) under 2 s.
    return [*argv, "--items", "40000", "--peer-items", "8000", "--rounds", "5"]


def iobound_argv(quick: bool) -> list[str]:
    return ["--seconds", "0.2" if quick else "2"]


def memory_argv(quick: bool) -> list[str]:
    if quick:
        return ["--items", "20000,100000", "--traced-items", "10000,50000"]
    # tracemalloc runs ~7x slower: 5M traced items alone would take ~90 s.
    return ["--items", "1000000,5000000", "--traced-items", "200000,1000000"]


def latency_argv(quick: bool) -> list[str]:
    return ["--trials", "3" if quick else "20", "--workers", "1,4"]


def operators_argv(quick: bool) -> list[str]:
    if quick:
        return ["--quick"]
    # Three rounds of 0.1 s latency runs (the head-of-line ones take several
    # times that) and 40k-item runs elsewhere: about 2 minutes.
    return ["--rounds", "3", "--seconds", "0.1", "--items", "40000"]


def summary(
    tp: throughput.Outcome | None,
    io: list[iobound.IoResult] | None,
    mem: list[memory.MemResult] | None,
    lat: list[latency.LatencyResult] | None,
    ops: operators.Outcome | None = None,
) -> tuple[str, bool]:
    """The closing summary, and whether everything passed."""
    ok = True
    out = ["", "=" * 30 + " SUMMARY " + "=" * 30]
    if tp is not None:
        columns: list[tuple[str, int]] = []
        for r in tp.results:
            base = r.backend.split(",")[0]  # "asyncio, python 3.12" -> "asyncio"
            if (base, r.workers) not in columns:
                columns.append((base, r.workers))
        cells: dict[str, dict[tuple[str, int], str]] = {}
        for r in tp.results:
            base, _, other = r.backend.partition(", ")
            # Rows timed under another interpreter keep their own rows, so each
            # ratio is against anyio-fast on the same Python.
            name = r.contender + (
                f" [{other.replace('python ', 'py')}]" if other else ""
            )
            ratio = f"{r.ratio:.2f}×" if r.ratio is not None else "-"
            cells.setdefault(name, {})[base, r.workers] = (
                f"{r.us_per_item_stage:.2f} {ratio}"
            )
        for s in tp.skipped:
            if s.kind != "backend":
                cells.setdefault(s.contender, {})[
                    s.backend.split(",")[0], s.workers
                ] = "failed" if s.kind == "failed" else "n/a"
        headers = ["contender", *(f"{b} {w}w" for b, w in columns)]
        rows = [
            [name, *(by.get(col, "") for col in columns)] for name, by in cells.items()
        ]
        out.append(
            h.format_table(
                (
                    "throughput: µs/item/stage and × anyio-fast "
                    f"(median µs per item / {throughput.REFERENCE}'s on the same "
                    "backend and Python; Nw = N workers per stage)"
                ),
                headers,
                rows,
            )
        )
        out.extend(
            f"  {s.contender} ({s.backend}, {s.workers}w): {s.reason}"
            for s in tp.skipped
            if s.kind != "backend"
        )
        if tp.failed:
            ok = False
    if io is not None:
        flow_rows = [r for r in io if r.contender == "flowrhythm"]
        by_backend: dict[str, list[iobound.IoResult]] = {}
        for io_r in flow_rows:
            by_backend.setdefault(f"{io_r.backend}, {io_r.io}", []).append(io_r)
        workers = sorted({io_r.workers for io_r in flow_rows})
        rows = [
            [
                backend,
                *(
                    f"{next(x for x in group if x.workers == w).of_ideal:.0%}"
                    for w in workers
                ),
            ]
            for backend, group in by_backend.items()
        ]
        out.append(
            h.format_table(
                "\nI/O-bound: flowrhythm's items/s as % of workers / 10 ms",
                ["backend, waiting on", *(f"{w}w" for w in workers)],
                rows,
            )
        )
    if mem is not None:
        out.append("\nmemory (peak growth from the smallest to the largest run):")
        for v in memory.verdicts(mem):
            unit, scale = ("MB", 2**20) if v.mode == "rss" else ("KiB", 1024)
            what = "peak RSS" if v.mode == "rss" else "traced peak"
            out.append(
                f"  {v.contender}: {what} {v.smallest:,} -> {v.largest:,} items: "
                f"{v.growth / scale:+,.2f} {unit} (limit {v.limit / scale:,.0f} "
                f"{unit}): {'flat, PASS' if v.flat else 'NOT FLAT, FAIL'}"
            )
            ok = ok and v.flat
    if lat is not None:
        every = latency.checkpoint_every()
        out.append(f"\ncancellation (CHECKPOINT_EVERY = {every}):")
        for lat_r in lat:
            bound = every * lat_r.workers if every is not None else None
            over = bound is not None and lat_r.max_after_cancel > bound
            ok = ok and not over
            out.append(
                f"  {lat_r.backend}, {lat_r.workers}w: ≤ {lat_r.max_items_per_turn} "
                f"items between two turns of another task; {lat_r.max_after_cancel} "
                f"item(s) after cancel() (bound {bound}"
                f"{', EXCEEDED' if over else ''}); cancel→return median "
                f"{lat_r.median_cancel_us:,.0f} µs"
            )
    if ops is not None:
        lines, ops_ok = operators.summary(ops)
        out.append("")
        out.extend(lines)
        ok = ok and ops_ok
    out.append("")
    out.append(f"overall: {'PASS' if ok else 'FAIL'}")
    return "\n".join(out), ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Throughput (with peers), I/O-bound, memory, latency and "
        "operators, with one summary.",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help="comma-separated sections to run (default: %(default)s)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny runs of everything: a smoke test"
    )
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    only = h.parse_csv(args.only)
    for name in only:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {SECTIONS}")

    machine = h.machine_info(peers.PEER_DISTRIBUTIONS)
    print("flowrhythm benchmarks" + (" (--quick)" if args.quick else ""))
    print(h.format_machine(machine))
    print(f"started {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    payload: dict[str, Any] = {
        "benchmark": "all",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine,
    }
    took: dict[str, float] = {}
    tp = io = mem = lat = ops = None

    def section(name: str) -> None:
        print(f"\n{'-' * 24} {name} {'-' * 24}", flush=True)

    if "throughput" in only:
        section("throughput + peers")
        start = time.perf_counter()
        tp_args = throughput.parse_args(throughput_argv(args.quick))
        tp = throughput.run(tp_args)
        print(throughput.report(tp_args, tp), flush=True)
        payload["throughput"] = throughput.as_json(tp_args, tp)
        took["throughput"] = time.perf_counter() - start
    if "iobound" in only:
        section("I/O-bound")
        start = time.perf_counter()
        io_args = _sub_args(
            iobound.add_arguments, iobound.check_arguments, iobound_argv(args.quick)
        )
        io = iobound.run(io_args)
        print(iobound.report(io_args, io), flush=True)
        payload["iobound"] = {
            "config": vars(io_args),
            "results": [r.as_dict() for r in io],
        }
        took["iobound"] = time.perf_counter() - start
    if "memory" in only:
        section("memory")
        start = time.perf_counter()
        mem_args = _sub_args(
            memory.add_arguments, memory.check_arguments, memory_argv(args.quick)
        )
        mem = memory.run(mem_args)
        print(memory.report(mem_args, mem), flush=True)
        payload["memory"] = {
            "config": vars(mem_args),
            "results": [asdict(r) for r in mem],
            "verdicts": [asdict(v) | {"flat": v.flat} for v in memory.verdicts(mem)],
        }
        took["memory"] = time.perf_counter() - start
    if "latency" in only:
        section("cancellation latency")
        start = time.perf_counter()
        lat_args = _sub_args(
            latency.add_arguments, latency.check_arguments, latency_argv(args.quick)
        )
        lat = latency.run(lat_args)
        print(latency.report(lat_args, lat), flush=True)
        payload["latency"] = {
            "config": vars(lat_args) | {"checkpoint_every": latency.checkpoint_every()},
            "results": [r.as_dict() for r in lat],
        }
        took["latency"] = time.perf_counter() - start

    if "operators" in only:
        section("operators")
        start = time.perf_counter()
        ops_args = _sub_args(
            operators.add_arguments,
            operators.check_arguments,
            operators_argv(args.quick),
        )
        ops = operators.run(ops_args)
        print(operators.report(ops_args, ops), flush=True)
        payload["operators"] = operators.as_json(ops_args, ops)
        took["operators"] = time.perf_counter() - start

    text, ok = summary(tp, io, mem, lat, ops)
    print(text)
    print("took: " + ", ".join(f"{name} {s:.0f} s" for name, s in took.items()))
    payload["took_s"] = took
    payload["ok"] = ok
    if args.json:
        h.write_json(args.json, payload)
        print(f"results written to {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
