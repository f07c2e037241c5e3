"""I/O-bound throughput: one 10 ms stage, against the ideal of workers / 10 ms.

Run from the repository root::

    python -m benchmarks.iobound                   # 1, 4, 16, 64 workers, ~2 s each
    python -m benchmarks.iobound --backends asyncio --seconds 1
    python -m benchmarks.iobound --json benchmarks/results/iobound.json

A producer feeds ints through one transformer whose every call awaits
``anyio.sleep(0.010)`` (``FixedScaling(workers)``) into a counting consumer.
``workers`` such calls in flight at all times make ``workers / 0.010`` items/s:
the ideal. Each configuration runs ``--seconds`` × ideal items, so about that
many seconds. Two things keep a pipeline below the ideal: timers overshoot (a
10 ms sleep takes 10.1-10.6 ms, measured and shown as the "timer" ideal) and the
pipeline's own per-item work, which at 64 workers (6,400 items/s) starts to
count. ``anyio-pool`` (``workers`` hand-written tasks over one memory stream)
shows how much of the gap any pipeline on the same loop has, and ``sleepers``
(as many tasks doing nothing but the sleeps) what the loop's timers allow at
all: with 64 sleepers waking every 10 ms, a loop wakes each one late by more
than a lone sleep's overshoot, so no pipeline can beat that row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from flowrhythm import FixedScaling, Flow

from . import _harness as h
from . import contenders as c

#: the stage's latency, seconds
DELAY = 0.010
#: the default worker counts
WORKERS = (1, 4, 16, 64)


async def io_stage(x: int) -> int:
    await anyio.sleep(DELAY)
    return x + 1


@dataclass
class Count:
    count: int = 0
    total: int = 0

    async def consume(self, x: int) -> None:
        self.count += 1
        self.total += x

    def verify(self, n_items: int, contender: str) -> None:
        expected = n_items * (n_items - 1) // 2 + n_items  # one + 1 stage
        if self.count != n_items or self.total != expected:
            raise c.BenchmarkError(
                f"{contender}: consumer saw {self.count} items summing to "
                f"{self.total}, expected {n_items} items summing to {expected}"
            )


async def run_flowrhythm(n_items: int, workers: int) -> None:
    tally = Count()
    flow = Flow(buffer_size=c.BUFFER_SIZE)
    flow.set_producer(lambda: c.produce(n_items))
    flow.add_transformer(io_stage, scaling_strategy=FixedScaling(workers))
    flow.set_consumer(tally.consume, scaling_strategy=FixedScaling(1))
    await flow.run()
    tally.verify(n_items, "flowrhythm")


async def run_anyio_pool(n_items: int, workers: int) -> None:
    """The hand-written equivalent: ``workers`` tasks between two memory streams."""
    tally = Count()

    async def producer(send: ObjectSendStream[int]) -> None:
        async with send:
            async for item in c.produce(n_items):
                await send.send(item)

    async def worker(
        receive: ObjectReceiveStream[int], send: ObjectSendStream[int]
    ) -> None:
        async with receive, send:
            async for item in receive:
                await send.send(await io_stage(item))

    async def consumer(receive: ObjectReceiveStream[int]) -> None:
        async with receive:
            async for item in receive:
                await tally.consume(item)

    async with anyio.create_task_group() as tg:
        send, receive = anyio.create_memory_object_stream[int](c.BUFFER_SIZE)
        out_send, out_receive = anyio.create_memory_object_stream[int](c.BUFFER_SIZE)
        tg.start_soon(producer, send)
        with receive, out_send:
            for _ in range(workers):
                tg.start_soon(worker, receive.clone(), out_send.clone())
        tg.start_soon(consumer, out_receive)
    tally.verify(n_items, "anyio-pool")


async def run_sleepers(n_items: int, workers: int) -> None:
    """No pipeline at all: ``workers`` tasks that only sleep, ``n_items`` sleeps in
    all. What the event loop's timers allow under this load: the real ceiling of
    any pipeline on that loop (a busy loop wakes sleepers late)."""

    async def sleeper(count: int) -> None:
        for _ in range(count):
            await anyio.sleep(DELAY)

    share, extra = divmod(n_items, workers)
    async with anyio.create_task_group() as tg:
        for index in range(workers):
            tg.start_soon(sleeper, share + (index < extra))


CONTENDERS = {
    "flowrhythm": run_flowrhythm,
    "anyio-pool": run_anyio_pool,
    "sleepers": run_sleepers,
}


async def _sleep_time(samples: int) -> float:
    """The mean wall time of ``anyio.sleep(DELAY)`` on this loop, seconds."""
    start = time.perf_counter()
    for _ in range(samples):
        await anyio.sleep(DELAY)
    return (time.perf_counter() - start) / samples


def timer_overshoot(where: h.Backend, samples: int = 50) -> float:
    return anyio.run(
        _sleep_time,
        samples,
        backend=where.anyio_backend,
        backend_options=dict(where.options),
    )


@dataclass
class IoResult:
    backend: str
    workers: int
    contender: str
    items: int
    #: the measured time of one 10 ms sleep on this backend, seconds
    sleep_s: float
    seconds: list[float] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return self.items / statistics.median(self.seconds)

    @property
    def ideal(self) -> float:
        return self.workers / DELAY

    @property
    def of_ideal(self) -> float:
        return self.items_per_s / self.ideal

    @property
    def of_timer_ideal(self) -> float:
        """Against what the timer allows: ``workers / measured sleep``."""
        return self.items_per_s / (self.workers / self.sleep_s)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            items_per_s=self.items_per_s,
            ideal=self.ideal,
            of_ideal=self.of_ideal,
            of_timer_ideal=self.of_timer_ideal,
        )
        return data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backends",
        default=",".join(h.BACKENDS),
        help="comma-separated, from: %(default)s",
    )
    parser.add_argument(
        "--workers",
        default=",".join(map(str, WORKERS)),
        help="comma-separated worker counts (default %(default)s)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=2.0,
        help="target duration of each run (default %(default)s)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs per configuration (default 1)"
    )
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help="comma-separated subset of: %(default)s",
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
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
    args.contenders = h.parse_csv(args.contenders)
    for name in args.contenders:
        if name not in CONTENDERS:
            parser.error(f"unknown contender {name!r}; choose from {list(CONTENDERS)}")
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be positive and --rounds at least 1")


def run(args: argparse.Namespace) -> list[IoResult]:
    results: list[IoResult] = []
    for name in args.backends:
        if not h.backend_available(name):
            print(f"skipping {name}: not installed", file=sys.stderr)
            continue
        where = h.backend(name)
        sleep_s = timer_overshoot(where)
        for workers in args.workers:
            items = max(round(args.seconds * workers / DELAY), workers)
            results.extend(
                IoResult(name, workers, contender, items, sleep_s)
                for contender in args.contenders
            )
    for round_no in range(1, args.rounds + 1):
        # Interleaved like the throughput rounds.
        for r in results:
            h.progress(
                f"round {round_no}/{args.rounds}: {r.backend}, {r.workers} "
                f"worker(s), {r.contender}"
            )
            where = h.backend(r.backend)
            r.seconds.append(
                h.measure(where, CONTENDERS[r.contender], r.items, r.workers)
            )
    h.progress("")
    return results


def report(args: argparse.Namespace, results: list[IoResult]) -> str:
    out = [
        (
            f"I/O-bound: one stage awaiting anyio.sleep({DELAY}) per item, "
            f"FixedScaling(workers), ~{args.seconds:g} s per run, median of "
            f"{args.rounds} run(s)"
        ),
        (
            "ideal = workers / 10 ms; timer ideal = workers / the measured time of "
            "one 10 ms sleep on that backend; % = items/s of the ideal"
        ),
        (
            "sleepers = the same number of tasks doing nothing but the sleeps: the "
            "ceiling the loop's timers allow under this load, pipeline or not"
        ),
    ]
    groups: dict[str, dict[int, dict[str, IoResult]]] = {}
    for r in results:
        groups.setdefault(r.backend, {}).setdefault(r.workers, {})[r.contender] = r
    for backend, by_workers in groups.items():
        contenders = list(next(iter(by_workers.values())))
        headers = ["workers", "items", "ideal/s", "timer ideal/s"]
        for name in contenders:
            headers += [f"{name} items/s", "% ideal", "% timer"]
        rows = []
        for workers, by_name in by_workers.items():
            first = next(iter(by_name.values()))
            row = [
                str(workers),
                f"{first.items:,}",
                f"{first.ideal:,.0f}",
                f"{workers / first.sleep_s:,.0f}",
            ]
            for name in contenders:
                r = by_name[name]
                row += [
                    f"{r.items_per_s:,.0f}",
                    f"{r.of_ideal:.1%}",
                    f"{r.of_timer_ideal:.1%}",
                ]
            rows.append(row)
        sleep_ms = next(iter(next(iter(by_workers.values())).values())).sleep_s * 1e3
        title = f"\n[{backend}] a 10 ms sleep takes {sleep_ms:.2f} ms here"
        out.append(h.format_table(title, headers, rows))
    out.append("")
    out.append(h.format_machine(h.machine_info()))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = h.parse_standalone(
        argv,
        prog="python -m benchmarks.iobound",
        description="One 10 ms I/O-bound stage against workers / 10 ms.",
        add_arguments=add_arguments,
        check_arguments=check_arguments,
    )
    results = run(args)
    print(report(args, results))
    if args.json:
        config = {
            "delay": DELAY,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "backends": args.backends,
            "workers": args.workers,
        }
        h.save_results(args.json, "iobound", config, [r.as_dict() for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
