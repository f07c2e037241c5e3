"""I/O-bound throughput: one 10 ms stage, against the ideal of workers / 10 ms.

Run from the repository root::

    python -m benchmarks.iobound                   # 1, 4, 16, 64 workers, ~2 s each
    python -m benchmarks.iobound --backends asyncio --seconds 1 --io socket
    python -m benchmarks.iobound --json benchmarks/results/iobound.json

A producer feeds ints through one transformer (``FixedScaling(workers)``) into a
counting consumer; each call of the transformer waits 10 ms, ``workers`` calls in
flight at all times make ``workers / 0.010`` items/s: the ideal. Each
configuration runs ``--seconds`` × ideal items, so about that many seconds. What
the stage waits for (``--io``):

``sleep``
    ``anyio.sleep(0.010)``: the loop's own timers. They overshoot (a lone 10 ms
    sleep takes 10.1-10.6 ms, shown as the "timer" ideal), and with 64 sleepers
    the loop wakes each one later still: epoll's timeout is whole milliseconds,
    so how late a timer fires depends on how much work the loop does between
    them, not monotonically (64 bare sleepers with 0 / 3 / 6 / 12 / 24 µs of
    extra work per wake-up measured 91 / 90 / 88 / 85 / 92 % on asyncio).
``socket``
    a byte sent to ``_delay_server`` in another process, which echoes it 10 ms
    later (timed by spinning, to the microsecond; it costs that process a core):
    the loop sees socket readiness, as it would a real service's answer. A lone
    round trip still takes ~10.4 ms (the OS wakes an idle process late, shown as
    the "service" ideal).

``anyio-pool`` (``workers`` hand-written tasks over memory streams) shows how much
of the gap any pipeline on the same loop has, and ``sleepers`` / ``clients``
(as many tasks doing nothing but the waits) what the loop allows at all: no
pipeline can beat that row.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
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


Call = Callable[[int], Awaitable[int]]
StageFactory = Callable[[], Any]  # returns an async context manager yielding a Call


async def io_stage(x: int) -> int:
    await anyio.sleep(DELAY)
    return x + 1


@asynccontextmanager
async def sleep_call() -> AsyncIterator[Call]:
    yield io_stage


#: the delay server's address while ``run`` has it running
_service: tuple[str, int] | None = None


@asynccontextmanager
async def service_call() -> AsyncIterator[Call]:
    """One connection to the delay server, sending a byte per call and awaiting
    its echo 10 ms later (as a flowrhythm stage: one connection per worker)."""
    if _service is None:
        raise RuntimeError("the delay server is not running")
    async with await anyio.connect_tcp(*_service) as stream:

        async def call(x: int) -> int:
            await stream.send(b"x")
            await stream.receive(64)
            return x + 1

        yield call


@contextmanager
def delay_server() -> Iterator[tuple[str, int]]:
    """``benchmarks._delay_server`` in a child process, for as long as this lasts."""
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks._delay_server", str(DELAY)],
        cwd=h.REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        yield "127.0.0.1", int(child.stdout.readline())
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


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


async def run_flowrhythm(
    n_items: int, workers: int, stage: Call | StageFactory = io_stage
) -> None:
    tally = Count()
    flow = Flow(buffer_size=c.BUFFER_SIZE)
    flow.set_producer(lambda: c.produce(n_items))
    flow.add_transformer(stage, scaling_strategy=FixedScaling(workers))
    flow.set_consumer(tally.consume, scaling_strategy=FixedScaling(1))
    await flow.run()
    tally.verify(n_items, "flowrhythm")


async def run_anyio_pool(
    n_items: int, workers: int, stage: StageFactory = sleep_call
) -> None:
    """The hand-written equivalent: ``workers`` tasks between two memory streams."""
    tally = Count()

    async def producer(send: ObjectSendStream[int]) -> None:
        async with send:
            async for item in c.produce(n_items):
                await send.send(item)

    async def worker(
        receive: ObjectReceiveStream[int], send: ObjectSendStream[int]
    ) -> None:
        async with stage() as call, receive, send:
            async for item in receive:
                await send.send(await call(item))

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


async def run_bare(
    n_items: int, workers: int, stage: StageFactory = sleep_call
) -> None:
    """No pipeline at all: ``workers`` tasks that only wait, ``n_items`` waits in
    all. What the event loop allows under this load: the real ceiling of any
    pipeline on that loop (a busy loop wakes sleepers late)."""

    async def waiter(count: int) -> None:
        async with stage() as call:
            for x in range(count):
                await call(x)

    share, extra = divmod(n_items, workers)
    async with anyio.create_task_group() as tg:
        for index in range(workers):
            tg.start_soon(waiter, share + (index < extra))


#: what the stage waits for: its own loop's timer (``anyio.sleep``), or the echo
#: of a service in another process (socket readiness, timed by the OS)
CONTENDERS: dict[str, dict[str, h.Workload]] = {
    "sleep": {
        "flowrhythm": run_flowrhythm,
        "anyio-pool": run_anyio_pool,
        "sleepers": run_bare,
    },
    "socket": {
        "flowrhythm": partial(run_flowrhythm, stage=service_call),
        "anyio-pool": partial(run_anyio_pool, stage=service_call),
        "clients": partial(run_bare, stage=service_call),
    },
}
STAGES = {"sleep": sleep_call, "socket": service_call}
#: what a lone wait is called, per kind
LONE = {"sleep": "timer", "socket": "service"}


async def _lone_wait(samples: int, stage: StageFactory) -> float:
    """The mean wall time of one call of the stage, alone on this loop, seconds."""
    async with stage() as call:
        start = time.perf_counter()
        for x in range(samples):
            await call(x)
        return (time.perf_counter() - start) / samples


def lone_wait(where: h.Backend, io: str, samples: int = 50) -> float:
    return anyio.run(
        _lone_wait,
        samples,
        STAGES[io],
        backend=where.anyio_backend,
        backend_options=dict(where.options),
    )


@dataclass
class IoResult:
    backend: str
    #: what the stage waits for, a key of ``CONTENDERS``
    io: str
    workers: int
    contender: str
    items: int
    #: the measured time of one lone wait on this backend (a 10 ms sleep, or a
    #: round trip to the 10 ms service), seconds
    lone_s: float
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
    def of_lone_ideal(self) -> float:
        """Against what one lone wait allows: ``workers / measured wait``."""
        return self.items_per_s / (self.workers / self.lone_s)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            items_per_s=self.items_per_s,
            ideal=self.ideal,
            of_ideal=self.of_ideal,
            of_lone_ideal=self.of_lone_ideal,
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
        "--io",
        default=",".join(CONTENDERS),
        help="what the stage waits for, comma-separated from: %(default)s",
    )
    parser.add_argument(
        "--contenders",
        default=",".join(_all_contenders()),
        help="comma-separated subset of: %(default)s",
    )


def _all_contenders() -> list[str]:
    return list(dict.fromkeys(name for kind in CONTENDERS.values() for name in kind))


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
    args.io = h.parse_csv(args.io)
    for name in args.io:
        if name not in CONTENDERS:
            parser.error(f"unknown --io {name!r}; choose from {list(CONTENDERS)}")
    args.contenders = h.parse_csv(args.contenders)
    for name in args.contenders:
        if name not in _all_contenders():
            parser.error(f"unknown contender {name!r}; choose from {_all_contenders()}")
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be positive and --rounds at least 1")


def run(args: argparse.Namespace) -> list[IoResult]:
    global _service
    if "socket" not in args.io:
        return _run(args)
    with delay_server() as address:
        _service = address
        try:
            return _run(args)
        finally:
            _service = None


def _run(args: argparse.Namespace) -> list[IoResult]:
    results: list[IoResult] = []
    for name in args.backends:
        if not h.backend_available(name):
            print(f"skipping {name}: not installed", file=sys.stderr)
            continue
        where = h.backend(name)
        for io in args.io:
            lone_s = lone_wait(where, io)
            for workers in args.workers:
                items = max(round(args.seconds * workers / DELAY), workers)
                results.extend(
                    IoResult(name, io, workers, contender, items, lone_s)
                    for contender in args.contenders
                    if contender in CONTENDERS[io]
                )
    for round_no in range(1, args.rounds + 1):
        # Interleaved like the throughput rounds.
        for r in results:
            h.progress(
                f"round {round_no}/{args.rounds}: {r.backend}, {r.io}, "
                f"{r.workers} worker(s), {r.contender}"
            )
            where = h.backend(r.backend)
            workload = CONTENDERS[r.io][r.contender]
            r.seconds.append(h.measure(where, workload, r.items, r.workers))
    h.progress("")
    return results


def report(args: argparse.Namespace, results: list[IoResult]) -> str:
    out = [
        (
            f"I/O-bound: one stage waiting {DELAY * 1e3:g} ms per item, "
            f"FixedScaling(workers), ~{args.seconds:g} s per run, median of "
            f"{args.rounds} run(s)"
        ),
        (
            "sleep = the stage awaits anyio.sleep; socket = it sends a byte to a "
            "service in another process that echoes it 10 ms later"
        ),
        (
            "ideal = workers / 10 ms; timer (service) ideal = workers / the measured "
            "time of one lone sleep (round trip); % = items/s of the ideal"
        ),
        (
            "sleepers, clients = the same number of tasks doing nothing but the "
            "waits: the ceiling the loop allows under this load, pipeline or not"
        ),
    ]
    groups: dict[tuple[str, str], dict[int, dict[str, IoResult]]] = {}
    for r in results:
        by_workers = groups.setdefault((r.backend, r.io), {})
        by_workers.setdefault(r.workers, {})[r.contender] = r
    for (backend, io), by_workers in groups.items():
        lone = LONE[io]
        contenders = list(next(iter(by_workers.values())))
        headers = ["workers", "items", "ideal/s", f"{lone} ideal/s"]
        for name in contenders:
            headers += [f"{name} items/s", "% ideal", f"% {lone}"]
        rows = []
        for workers, by_name in by_workers.items():
            first = next(iter(by_name.values()))
            row = [
                str(workers),
                f"{first.items:,}",
                f"{first.ideal:,.0f}",
                f"{workers / first.lone_s:,.0f}",
            ]
            for name in contenders:
                r = by_name[name]
                row += [
                    f"{r.items_per_s:,.0f}",
                    f"{r.of_ideal:.1%}",
                    f"{r.of_lone_ideal:.1%}",
                ]
            rows.append(row)
        lone_ms = next(iter(next(iter(by_workers.values())).values())).lone_s * 1e3
        what = "a 10 ms sleep" if io == "sleep" else "a round trip to the service"
        title = f"\n[{backend}, {io}] {what} takes {lone_ms:.2f} ms here"
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
            "io": args.io,
        }
        h.save_results(args.json, "iobound", config, [r.as_dict() for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
