"""Cancellation latency: how long a busy flow can keep other tasks waiting.

Run from the repository root::

    python -m benchmarks.latency                 # 20 trials per backend
    python -m benchmarks.latency --trials 100 --backends trio

A worker that never has to wait (its input is never empty, its output never
full) yields to the event loop only every ``CHECKPOINT_EVERY`` items
(``flowrhythm/_stage.py``). Until it does, no other task runs, so no other task
can cancel it, and a cancellation cannot reach it either. Each trial runs an
endless producer through one trivial stage into a trivial consumer inside a
cancel scope, while another task, the canceller, loops on ``checkpoint()`` for a
random 5-20 ms: between two of its turns, the stage processes at most one
checkpoint interval of items, and the largest such batch is reported ("items per
turn"). Then the canceller calls ``scope.cancel()`` and counts the items the
stage still processes before the flow has returned ("after cancel"): a
cancellation is delivered at a worker's next suspension, so this should be 0.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import anyio
from anyio.lowlevel import checkpoint

from flowrhythm import FixedScaling, Flow

from . import _harness as h
from . import contenders as c


def checkpoint_every() -> int | None:
    """flowrhythm's constant, for the report (private: may move)."""
    try:
        from flowrhythm import _stage
    except ImportError:
        return None
    value = getattr(_stage, "CHECKPOINT_EVERY", None)
    return value if isinstance(value, int) else None


@dataclass
class Trial:
    #: the most items the stage processed between two turns of the canceller
    items_per_turn: int
    #: the longest time between two turns of the canceller, seconds
    longest_turn_s: float
    #: items the stage processed after scope.cancel() was called
    after_cancel: int
    #: from scope.cancel() until flow.run() had returned, seconds
    cancel_s: float
    #: items the stage processed in the trial
    items: int


async def _trial(workers: int, watch_s: float) -> Trial:
    calls = 0

    async def produce() -> AsyncIterator[int]:
        for i in itertools.count():
            yield i

    async def stage(x: int) -> int:
        nonlocal calls
        calls += 1
        return x

    async def consume(x: int) -> None:
        pass

    flow = Flow(buffer_size=c.BUFFER_SIZE)
    flow.set_producer(produce)
    flow.add_transformer(stage, scaling_strategy=FixedScaling(workers))
    flow.set_consumer(consume, scaling_strategy=FixedScaling(workers))
    scope = anyio.CancelScope()
    returned = 0.0

    async def run_flow() -> None:
        nonlocal returned
        with scope:
            await flow.run()
        returned = time.perf_counter()

    most = 0
    longest = 0.0
    async with anyio.create_task_group() as tg:
        await tg.start(_started, tg, run_flow)
        last_calls, last_t = calls, time.perf_counter()
        deadline = last_t + watch_s
        while last_t < deadline:
            await checkpoint()
            now_calls, now_t = calls, time.perf_counter()
            most = max(most, now_calls - last_calls)
            longest = max(longest, now_t - last_t)
            last_calls, last_t = now_calls, now_t
        at_cancel = calls
        cancelled_at = time.perf_counter()
        scope.cancel()
    return Trial(most, longest, calls - at_cancel, returned - cancelled_at, calls)


async def _started(
    tg: anyio.abc.TaskGroup, fn: Any, *, task_status: anyio.abc.TaskStatus[None]
) -> None:
    # Start the flow, then return once it is moving items, so the canceller's
    # watch covers a busy flow and not its start-up.
    tg.start_soon(fn)
    await anyio.sleep(0.002)
    task_status.started()


@dataclass
class LatencyResult:
    backend: str
    workers: int
    trials: list[Trial]

    @property
    def max_items_per_turn(self) -> int:
        return max(t.items_per_turn for t in self.trials)

    @property
    def max_after_cancel(self) -> int:
        return max(t.after_cancel for t in self.trials)

    @property
    def max_turn_us(self) -> float:
        return max(t.longest_turn_s for t in self.trials) * 1e6

    @property
    def max_cancel_us(self) -> float:
        return max(t.cancel_s for t in self.trials) * 1e6

    @property
    def median_cancel_us(self) -> float:
        # The max is noisy (a neighbour's load, a GC pass): the median is typical.
        return statistics.median(t.cancel_s for t in self.trials) * 1e6

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "workers": self.workers,
            "max_items_per_turn": self.max_items_per_turn,
            "max_after_cancel": self.max_after_cancel,
            "max_turn_us": self.max_turn_us,
            "max_cancel_us": self.max_cancel_us,
            "median_cancel_us": self.median_cancel_us,
            "trials": [asdict(t) for t in self.trials],
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backends",
        default=",".join(h.BACKENDS),
        help="comma-separated, from: %(default)s",
    )
    parser.add_argument(
        "--trials", type=int, default=20, help="trials per backend (default 20)"
    )
    parser.add_argument(
        "--workers",
        default="1,4",
        help="workers of the stage and the consumer, comma-separated (default 1,4)",
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.backends = h.parse_csv(args.backends)
    for name in args.backends:
        if name not in h.BACKENDS:
            parser.error(f"unknown backend {name!r}; choose from {h.BACKENDS}")
    try:
        args.workers = [int(w) for w in h.parse_csv(args.workers)]
    except ValueError:
        parser.error(f"--workers must be integers, got {args.workers!r}")
    if not args.workers or min(args.workers) < 1 or args.trials < 1:
        parser.error("--workers and --trials must be at least 1")


def run(args: argparse.Namespace) -> list[LatencyResult]:
    rng = random.Random(args.seed)
    results = []
    for name in args.backends:
        if not h.backend_available(name):
            print(f"skipping {name}: not installed", file=sys.stderr)
            continue
        where = h.backend(name)
        for workers in args.workers:
            trials = []
            for n in range(args.trials):
                h.progress(f"latency: {name}, {workers} worker(s), trial {n + 1}")
                trials.append(
                    anyio.run(
                        _trial,
                        workers,
                        rng.uniform(0.005, 0.020),
                        backend=where.anyio_backend,
                        backend_options=dict(where.options),
                    )
                )
            results.append(LatencyResult(name, workers, trials))
    h.progress("")
    return results


def report(args: argparse.Namespace, results: Sequence[LatencyResult]) -> str:
    every = checkpoint_every()
    out = [
        (
            f"cancellation latency: an endless producer, 1 trivial stage, a trivial "
            f"consumer; max over {args.trials} trials"
        ),
        (
            "items/turn = most items the stage processed between two turns of "
            "another task; after cancel = items it processed after scope.cancel()"
        ),
        (
            f"flowrhythm's CHECKPOINT_EVERY = {every if every is not None else '?'}: "
            "a worker whose wake-up was already scheduled when cancel() ran goes "
            "on to its next checkpoint, so after cancel ≤ CHECKPOINT_EVERY × workers"
        ),
    ]
    headers = [
        "backend",
        "workers",
        "items/turn",
        "longest turn µs",
        "after cancel",
        "bound",
        "cancel→return µs median / max",
    ]
    rows = []
    exceeded = False
    for r in results:
        bound = every * r.workers if every is not None else None
        over = bound is not None and r.max_after_cancel > bound
        exceeded = exceeded or over
        rows.append(
            [
                r.backend,
                str(r.workers),
                str(r.max_items_per_turn),
                f"{r.max_turn_us:,.0f}",
                str(r.max_after_cancel) + (" EXCEEDED" if over else ""),
                str(bound) if bound is not None else "?",
                f"{r.median_cancel_us:,.0f} / {r.max_cancel_us:,.0f}",
            ]
        )
    out.append(h.format_table("", headers, rows))
    out.append(
        "\n(trio runs every ready task once per batch in random order, so between two "
        "turns of one task another may run twice: up to 2 intervals per turn)"
    )
    if exceeded:
        out.append("after cancel EXCEEDED the checkpoint bound")
    out.append("")
    out.append(h.format_machine(h.machine_info()))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = h.parse_standalone(
        argv,
        prog="python -m benchmarks.latency",
        description="Items a busy stage processes between checkpoints and after cancel.",
        add_arguments=add_arguments,
        check_arguments=check_arguments,
    )
    results = run(args)
    print(report(args, results))
    if args.json:
        config = {
            "trials": args.trials,
            "workers": args.workers,
            "backends": args.backends,
            "seed": args.seed,
            "checkpoint_every": checkpoint_every(),
        }
        h.save_results(args.json, "latency", config, [r.as_dict() for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
