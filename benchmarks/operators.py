"""Stage operators: ordered output, batching, and what each option costs per item.

Run from the repository root::

    python -m benchmarks.operators                    # every section, every backend
    python -m benchmarks.operators --only ordered --backends asyncio --workers 8,32
    python -m benchmarks.operators --json benchmarks/results/operators.json
    python -m benchmarks.operators --quick            # smoke test
    python -m benchmarks.operators --only plain --baseline ../old-checkout

Sections (``--only``):

- ``ordered``: one stage whose every call awaits a random latency (seeded,
  exponential with a mean of 1 ms), at 1, 8 and 32 workers: flowrhythm without
  and with ``ordered=True``, and aiostream's ``pipe.map(..., ordered=True,
  task_limit=n)`` (and unordered) on asyncio loops. Each row shows items/s, the
  time over unordered flowrhythm's, the peak reorder window against its bound
  (4 × workers), the most items taken from the source and not yet consumed, and
  tracemalloc's peak (in a separate, traced run). The ``head-of-line`` profile
  makes one item in every 100 take 50 × the mean latency.
- ``batch``: 100k trivial items through ``add_batch(100)`` (and with
  ``max_wait=0.01``) into a consumer, against the same flow with a plain
  transformer in the batch stage's place, and a hand-written anyio batching loop.
- ``options``: the per-item cost of ``timeout``, ``retry``, ``rate_limit`` (never
  triggered), all three, a fan-out stage yielding one item, a filter keeping
  everything and ``ordered=True`` at 1 and 4 workers, on one trivial stage.
- ``plain``: the 3-stage throughput workload of ``throughput.py``, flowrhythm
  with ``FixedScaling`` against ``anyio-fast``. With ``--baseline TREE`` it also
  times flowrhythm imported from another checkout (say, the commit before the
  operators) against this one, each in its own child processes, interleaved;
  ``--instructions`` counts instructions per item in both with valgrind's
  callgrind.

Rounds are interleaved (each round runs every case once) and tables show medians.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
from anyio import EndOfStream, WouldBlock
from anyio.lowlevel import checkpoint
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

# Only names that the commit before the operators has too: a --baseline child
# imports this module next to that older flowrhythm. Retry and RateLimit are
# looked up on the module when a case runs.
import flowrhythm
from flowrhythm import FixedScaling, Flow

from . import _harness as h
from . import contenders as c

SECTIONS = ("ordered", "batch", "options", "plain")

#: the mean per-item latency of the ordered section, seconds
MEAN_LATENCY = 0.001
#: head-of-line profile: one item in every HOL_EVERY takes HOL_FACTOR × the mean
HOL_EVERY = 100
HOL_FACTOR = 50
#: latencies are drawn from random.Random(SEED): every contender sees the same ones
SEED = 20240607
#: the bound an ordered stage keeps its reorder window within, per worker
WINDOW_PER_WORKER = 4
#: batch section
BATCH_SIZE = 100
BATCH_WAIT = 0.01
#: a sample that takes longer fails its case
SAMPLE_TIMEOUT = 300.0
QUICK_ITEMS = 2000

Run = Callable[[int, int, dict[str, float]], Awaitable[None]]


# -- cases --------------------------------------------------------------------------


@dataclass
class Case:
    """One contender in one configuration, and its samples."""

    section: str
    backend: str
    #: the latency profile (ordered section) or "" elsewhere
    group: str
    workers: int
    name: str
    items: int
    run: Run = field(repr=False)
    #: the case every ratio of this case is taken against (same section, backend,
    #: group; ``None``: this case is a reference)
    reference: str | None = None
    #: with the reference's workers rather than this case's
    reference_workers: int | None = None
    traced: bool = False
    seconds: list[float] = field(default_factory=list)
    probes: dict[str, list[float]] = field(default_factory=dict)
    traced_peak: int | None = None
    error: str | None = None
    ratio: float | None = None
    #: the same, from CPU time
    cpu_ratio: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_us_per_item(self) -> float | None:
        cpu = self.probes.get("cpu_s")
        return statistics.median(cpu) / self.items * 1e6 if cpu else None

    @property
    def items_per_s(self) -> float:
        return self.items / self.median_s

    @property
    def us_per_item(self) -> float:
        return self.median_s / self.items * 1e6

    @property
    def spread(self) -> float:
        if len(self.seconds) < 2:
            return 0.0
        return (max(self.seconds) - min(self.seconds)) / self.median_s

    def probe(self, key: str) -> float | None:
        """The largest value a probe took over the samples (peaks are maxima)."""
        values = self.probes.get(key)
        return max(values) if values else None

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "section": self.section,
            "backend": self.backend,
            "group": self.group,
            "workers": self.workers,
            "contender": self.name,
            "items": self.items,
            "seconds": self.seconds,
            "probes": self.probes,
            "traced_peak_bytes": self.traced_peak,
            "error": self.error,
            "reference": self.reference,
            "ratio": self.ratio,
            "cpu_ratio": self.cpu_ratio,
        }
        if self.seconds:
            data.update(
                median_s=self.median_s,
                items_per_s=self.items_per_s,
                us_per_item=self.us_per_item,
                spread=self.spread,
                cpu_us_per_item=self.cpu_us_per_item,
            )
        return data


def sample(case: Case, items: int | None = None, *, traced: bool = False) -> float:
    """Run ``case`` once in a fresh event loop; return seconds, record its probes."""
    probe: dict[str, float] = {}

    async def workload(n_items: int, workers: int) -> None:
        if traced:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
        start = time.process_time()
        await case.run(n_items, workers, probe)
        # CPU time: on a shared machine, waiting for a core inflates the wall
        # time but not this (nor does sleeping: only CPU-bound cases use it).
        probe["cpu_s"] = time.process_time() - start
        if traced:
            probe["traced_peak"] = tracemalloc.get_traced_memory()[1] - base

    where = h.backend(case.backend)
    n = case.items if items is None else items
    if traced:
        tracemalloc.start()
        try:
            seconds = h.measure(
                where, workload, n, case.workers, timeout=SAMPLE_TIMEOUT
            )
        finally:
            tracemalloc.stop()
        case.traced_peak = int(probe["traced_peak"])
        return seconds
    seconds = h.measure(where, workload, n, case.workers, timeout=SAMPLE_TIMEOUT)
    if items is None:  # a warm-up's probes are not recorded
        for key, value in probe.items():
            case.probes.setdefault(key, []).append(value)
    return seconds


# -- a tally that knows what should arrive ------------------------------------------


@dataclass(slots=True)
class Arrivals:
    """The source and the consumer of the ordered section, and what they saw."""

    pulled: int = 0
    count: int = 0
    total: int = 0
    out_of_order: int = 0
    #: the most items taken from the source and not yet consumed
    max_in_flight: int = 0

    async def source(self, n_items: int) -> AsyncIterator[int]:
        for i in range(n_items):
            self.pulled += 1
            yield i

    async def consume(self, i: int) -> None:
        in_flight = self.pulled - self.count
        self.max_in_flight = max(self.max_in_flight, in_flight)
        if i != self.count:
            self.out_of_order += 1
        self.count += 1
        self.total += i

    def verify(self, n_items: int, contender: str, *, ordered: bool) -> None:
        expected = n_items * (n_items - 1) // 2
        if self.count != n_items or self.total != expected:
            raise c.BenchmarkError(
                f"{contender}: consumer saw {self.count} items summing to "
                f"{self.total}, expected {n_items} items summing to {expected}"
            )
        if ordered and self.out_of_order:
            raise c.BenchmarkError(
                f"{contender}: {self.out_of_order} item(s) arrived out of order"
            )


@dataclass(slots=True)
class Sum:
    """A counting consumer of ints or of lists of ints."""

    count: int = 0
    total: int = 0
    calls: int = 0
    #: items that did not arrive as the (count + offset)-th value
    out_of_order: int = 0

    async def consume(self, x: int) -> None:
        self.count += 1
        self.total += x

    def consume_in_order(self, offset: int) -> Callable[[int], Awaitable[None]]:
        """A consumer that also counts items arriving out of input order."""

        async def consume(x: int) -> None:
            if x != self.count + offset:
                self.out_of_order += 1
            self.count += 1
            self.total += x

        return consume

    async def consume_batch(self, batch: list[int]) -> None:
        self.calls += 1
        self.count += len(batch)
        self.total += sum(batch)

    def verify(self, n_items: int, contender: str, offset: int = 0) -> None:
        expected = n_items * (n_items - 1) // 2 + offset * n_items
        if self.count != n_items or self.total != expected:
            raise c.BenchmarkError(
                f"{contender}: consumer saw {self.count} items summing to "
                f"{self.total}, expected {n_items} items summing to {expected}"
            )
        if self.out_of_order:
            raise c.BenchmarkError(
                f"{contender}: {self.out_of_order} item(s) arrived out of order"
            )


def check_stats(flow: Flow, contender: str) -> None:
    """Conservation, once the run ended: every stage lost nothing."""
    for name, stats in flow.stats().items():
        if stats.errors or stats.dropped or stats.received != stats.processed:
            raise c.BenchmarkError(
                f"{contender}: stage {name!r} stats are off: {stats}"
            )


# -- 1. ordered vs unordered, random latency ----------------------------------------


@functools.lru_cache(maxsize=16)
def latencies(profile: str, n_items: int) -> tuple[float, ...]:
    """Seeded per-item latencies: exponential with mean MEAN_LATENCY; in the
    head-of-line profile, every HOL_EVERY-th item takes HOL_FACTOR × the mean."""
    rng = random.Random(SEED)
    out = [rng.expovariate(1 / MEAN_LATENCY) for _ in range(n_items)]
    if profile == "head-of-line":
        for i in range(HOL_EVERY // 2, n_items, HOL_EVERY):
            out[i] = MEAN_LATENCY * HOL_FACTOR
    return tuple(out)


def _latency_stage(profile: str, n_items: int) -> Callable[[int], Awaitable[int]]:
    delays = latencies(profile, n_items)
    sleep = anyio.sleep

    async def work(i: int) -> int:
        await sleep(delays[i])
        return i

    return work


def flowrhythm_latency(profile: str, *, ordered: bool) -> Run:
    name = "flowrhythm ordered" if ordered else "flowrhythm"

    async def run(n_items: int, workers: int, probe: dict[str, float]) -> None:
        arrivals = Arrivals()
        flow = Flow(buffer_size=c.BUFFER_SIZE)
        flow.set_producer(lambda: arrivals.source(n_items))
        flow.add_transformer(
            _latency_stage(profile, n_items),
            name="work",
            scaling_strategy=FixedScaling(workers),
            ordered=ordered,
        )
        flow.set_consumer(
            arrivals.consume, name="consume", scaling_strategy=FixedScaling(1)
        )
        await flow.run()
        arrivals.verify(n_items, name, ordered=ordered)
        check_stats(flow, name)
        probe["max_in_flight"] = arrivals.max_in_flight
        probe["reorder_peak"] = flow.stats()["work"].reorder_window_peak

    return run


def aiostream_latency(profile: str, *, ordered: bool) -> Run:
    name = "aiostream ordered" if ordered else "aiostream"

    async def run(n_items: int, workers: int, probe: dict[str, float]) -> None:
        from aiostream import pipe, stream

        arrivals = Arrivals()
        work = _latency_stage(profile, n_items)
        xs: Any = stream.iterate(arrivals.source(n_items)) | pipe.map(
            work,  # type: ignore[arg-type]
            ordered=ordered,
            task_limit=workers,
        )
        consume = arrivals.consume
        async with xs.stream() as streamer:
            async for i in streamer:
                await consume(i)
        arrivals.verify(n_items, name, ordered=ordered)
        probe["max_in_flight"] = arrivals.max_in_flight

    return run


#: name -> (factory, asyncio loops only)
LATENCY_CONTENDERS: dict[str, tuple[Callable[[str], Run], bool]] = {
    "flowrhythm": (functools.partial(flowrhythm_latency, ordered=False), False),
    "flowrhythm ordered": (functools.partial(flowrhythm_latency, ordered=True), False),
    "aiostream": (functools.partial(aiostream_latency, ordered=False), True),
    "aiostream ordered": (functools.partial(aiostream_latency, ordered=True), True),
}
PROFILES = ("exponential", "head-of-line")
#: the loops aiostream runs on
ASYNCIO_LOOPS = ("asyncio", "uvloop")


# -- 2. batching ---------------------------------------------------------------------


async def same(x: int) -> int:
    return x


def flowrhythm_batch(max_wait: float | None, *, plain: bool = False) -> Run:
    name = "plain transformer" if plain else "add_batch"

    async def run(n_items: int, workers: int, probe: dict[str, float]) -> None:
        tally = Sum()
        flow = Flow(buffer_size=c.BUFFER_SIZE)
        flow.set_producer(lambda: c.produce(n_items))
        if plain:
            flow.add_transformer(same, name="same", scaling_strategy=FixedScaling(1))
            flow.set_consumer(tally.consume, name="consume")
        else:
            # Named: without a name, add_batch() itself takes ~0.15 s (it builds a
            # million candidate names), which is configuration, not throughput.
            flow.add_batch(BATCH_SIZE, max_wait=max_wait, name="batch")
            flow.set_consumer(tally.consume_batch, name="consume")
        await flow.run()
        tally.verify(n_items, name)
        if not plain:
            probe["batches"] = tally.calls
        for stage, stats in flow.stats().items():
            if stats.errors or stats.dropped or stats.received != stats.processed:
                raise c.BenchmarkError(
                    f"{name}: stage {stage!r} stats are off: {stats}"
                )

    return run


def anyio_batch(max_wait: float | None) -> Run:
    """The hand-written equivalent: producer -> batcher task -> consumer task over
    memory streams, non-blocking calls first, a checkpoint every 64 items."""

    async def run(n_items: int, workers: int, probe: dict[str, float]) -> None:
        tally = Sum()
        every = c.CHECKPOINT_EVERY
        now = loop_clock()

        async def producer(send: MemoryObjectSendStream[int]) -> None:
            with send:
                send_nowait = send.send_nowait
                budget = every
                async for item in c.produce(n_items):
                    try:
                        send_nowait(item)
                    except WouldBlock:
                        await send.send(item)
                        budget = every
                    budget -= 1
                    if not budget:
                        budget = every
                        await checkpoint()

        async def batcher(
            receive: MemoryObjectReceiveStream[int],
            send: MemoryObjectSendStream[list[int]],
        ) -> None:
            with receive, send:
                receive_nowait = receive.receive_nowait
                batch: list[int] = []
                opened = 0.0
                budget = every

                async def flush() -> None:
                    nonlocal batch
                    full, batch = batch, []
                    try:
                        send.send_nowait(full)
                    except WouldBlock:
                        await send.send(full)

                while True:
                    try:
                        item = receive_nowait()
                    except WouldBlock:
                        try:
                            item = await _receive_or_flush(
                                receive, batch, opened, max_wait, now
                            )
                        except EndOfStream:
                            break
                        budget = every
                        if item is _DUE:
                            await flush()
                            continue
                    except EndOfStream:
                        break
                    if not batch and max_wait is not None:
                        opened = now()
                    batch.append(item)
                    if len(batch) >= BATCH_SIZE or (
                        max_wait is not None and now() - opened >= max_wait
                    ):
                        await flush()
                    budget -= 1
                    if not budget:
                        budget = every
                        await checkpoint()
                if batch:
                    await flush()

        async def consumer(receive: MemoryObjectReceiveStream[list[int]]) -> None:
            with receive:
                consume = tally.consume_batch
                async for batch in receive:
                    await consume(batch)

        async with anyio.create_task_group() as tg:
            send, receive = anyio.create_memory_object_stream[int](c.BUFFER_SIZE)
            out_send, out_receive = anyio.create_memory_object_stream[list[int]](
                c.BUFFER_SIZE
            )
            tg.start_soon(producer, send)
            tg.start_soon(batcher, receive, out_send)
            tg.start_soon(consumer, out_receive)
        tally.verify(n_items, "anyio batch loop")
        probe["batches"] = tally.calls

    return run


_DUE: Any = object()


def loop_clock() -> Callable[[], float]:
    """The running loop's clock: cheaper per call than ``anyio.current_time``."""
    if anyio.get_cancelled_exc_class() is asyncio.CancelledError:
        return asyncio.get_running_loop().time
    import trio

    return trio.current_time


async def _receive_or_flush(
    receive: MemoryObjectReceiveStream[int],
    batch: list[int],
    opened: float,
    max_wait: float | None,
    now: Callable[[], float],
) -> Any:
    """Wait for the next item; ``_DUE`` once a pending batch's max_wait passed."""
    if not batch or max_wait is None:
        return await receive.receive()
    with anyio.move_on_after(opened + max_wait - now()):
        return await receive.receive()
    return _DUE


# -- 3. options on one trivial stage -------------------------------------------------


async def inc(x: int) -> int:
    return x + 1


async def inc_fan_out(x: int) -> AsyncIterator[int]:
    yield x + 1


async def keep(x: int) -> bool:
    return True


def _option_kwargs(name: str) -> dict[str, Any]:
    retry = flowrhythm.Retry()
    rate = flowrhythm.RateLimit(1e9, burst=10**9)
    options: dict[str, dict[str, Any]] = {
        "timeout=10": {"timeout": 10},
        "retry=Retry()": {"retry": retry},
        "rate_limit=RateLimit(1e9)": {"rate_limit": rate},
        "all three": {"timeout": 10, "retry": retry, "rate_limit": rate},
    }
    return options.get(name, {})


def options_case(name: str) -> Run:
    async def run(n_items: int, workers: int, probe: dict[str, float]) -> None:
        tally = Sum()
        flow = Flow(buffer_size=c.BUFFER_SIZE)
        flow.set_producer(lambda: c.produce(n_items))
        strategy = FixedScaling(workers)
        offset = 1
        if name.startswith("fan-out"):
            # (Flow's Transformer type does not list async generator functions)
            flow.add_transformer(
                inc_fan_out,  # type: ignore[arg-type]
                name="stage",
                scaling_strategy=strategy,
            )
        elif name.startswith("filter"):
            flow.add_filter(keep, name="stage", scaling_strategy=strategy)
            offset = 0
        elif name.startswith("ordered"):
            flow.add_transformer(
                inc, name="stage", scaling_strategy=strategy, ordered=True
            )
        else:
            flow.add_transformer(
                inc, name="stage", scaling_strategy=strategy, **_option_kwargs(name)
            )
        consume = (
            tally.consume_in_order(offset)
            if name.startswith("ordered")
            else tally.consume
        )
        flow.set_consumer(consume, name="consume")
        await flow.run()
        tally.verify(n_items, name, offset)
        check_stats(flow, name)

    return run


#: name -> workers of the stage
OPTION_CASES = {
    "plain": 1,
    "timeout=10": 1,
    "retry=Retry()": 1,
    "rate_limit=RateLimit(1e9)": 1,
    "all three": 1,
    "fan-out, 1 output": 1,
    "filter, always true": 1,
    "ordered, 1 worker": 1,
    "plain, 4 workers": 4,
    "ordered, 4 workers": 4,
}


# -- 4. a plain stage: the throughput workload, and an older flowrhythm -------------


def plain_case(name: str) -> Run:
    fn = {"flowrhythm": c.run_flowrhythm, "anyio-fast": c.run_anyio_fast}[name]

    async def run(n_items: int, workers: int, probe: dict[str, float]) -> None:
        await fn(n_items, workers)

    return run


#: run by a child: import flowrhythm from ``tree`` only, then this checkout's
#: benchmarks, so the workload is the same code whichever flowrhythm is timed
_BOOTSTRAP = (
    "import sys\n"
    "tree, repo, spec = sys.argv[1:4]\n"
    "sys.path.insert(0, tree)\n"
    "import flowrhythm\n"
    "sys.path.remove(tree)\n"
    "sys.path.insert(0, repo)\n"
    "from benchmarks.operators import child_main\n"
    "child_main(spec)\n"
)


def child_command(tree: Path, spec: dict[str, Any]) -> list[str]:
    return [
        sys.executable,
        "-c",
        _BOOTSTRAP,
        str(tree),
        str(h.REPO_ROOT),
        json.dumps(spec),
    ]


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONHASHSEED"] = "0"  # the same dict layouts in every child
    return env


def child_main(spec_text: str) -> None:
    """A child's side: time the plain workload with the flowrhythm imported by the
    bootstrap; print one line of JSON."""
    spec = json.loads(spec_text)
    where = h.backend(spec["backend"])
    fns = {"flowrhythm": c.run_flowrhythm, "anyio-fast": c.run_anyio_fast}
    if spec["mode"] == "once":  # for callgrind: no warm-up, one run
        h.measure(where, fns[spec["contender"]], spec["items"], spec["workers"][0])
        return
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for workers in spec["workers"]:
        for name in spec["contenders"]:
            h.measure(where, fns[name], spec["warmup"], workers)
    for _ in range(spec["samples"]):
        for workers in spec["workers"]:
            for name in spec["contenders"]:
                cpu_s: list[float] = []

                async def timed(
                    n_items: int,
                    workers: int,
                    fn: h.Workload = fns[name],
                    cpu_s: list[float] = cpu_s,
                ) -> None:
                    start = time.process_time()
                    await fn(n_items, workers)
                    cpu_s.append(time.process_time() - start)

                seconds = h.measure(where, timed, spec["items"], workers)
                results.setdefault(f"{name}/{workers}", []).append(seconds)
                cpu.setdefault(f"{name}/{workers}", []).extend(cpu_s)
    print(
        json.dumps({"flowrhythm": flowrhythm.__file__, "results": results, "cpu": cpu})
    )


def tree_label(tree: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%h %s"],
            cwd=tree, capture_output=True, text=True, check=True, timeout=10,
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "flowrhythm"],
            cwd=tree, capture_output=True, text=True, check=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return str(tree)
    label = out.stdout.strip()
    if len(label) > 60:
        label = label[:57] + "..."
    return f"{label}{' (modified)' if dirty.stdout.strip() else ''}"


@dataclass
class TreeResult:
    """The plain workload timed in child processes of one checkout."""

    tree: str
    label: str
    backend: str
    workers: int
    contender: str
    items: int
    seconds: list[float] = field(default_factory=list)
    #: CPU time of the same runs
    cpu_seconds: list[float] = field(default_factory=list)
    #: instructions per item (callgrind), if counted
    instructions: float | None = None

    @property
    def us_per_item(self) -> float:
        return statistics.median(self.seconds) / self.items * 1e6

    @property
    def cpu_us_per_item(self) -> float:
        return statistics.median(self.cpu_seconds) / self.items * 1e6

    @property
    def spread(self) -> float:
        if len(self.seconds) < 2:
            return 0.0
        med = statistics.median(self.seconds)
        return (max(self.seconds) - min(self.seconds)) / med

    def as_dict(self) -> dict[str, Any]:
        return {
            "tree": self.tree,
            "label": self.label,
            "backend": self.backend,
            "workers": self.workers,
            "contender": self.contender,
            "items": self.items,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "us_per_item": self.us_per_item if self.seconds else None,
            "cpu_us_per_item": self.cpu_us_per_item if self.cpu_seconds else None,
            "spread": self.spread,
            "instructions_per_item": self.instructions,
        }


def run_trees(args: argparse.Namespace, backends: list[str]) -> list[TreeResult]:
    """Time the plain workload with each tree's flowrhythm, in child processes,
    alternating which tree goes first from round to round."""
    trees = [args.candidate, args.baseline]
    labels = {tree: tree_label(tree) for tree in trees}
    results: dict[tuple[Path, str, int, str], TreeResult] = {}
    for backend in backends:
        for tree in trees:
            for workers in args.plain_workers:
                for name in ("flowrhythm", "anyio-fast"):
                    results[tree, backend, workers, name] = TreeResult(
                        str(tree), labels[tree], backend, workers, name, args.items
                    )
    for round_no in range(1, args.tree_rounds + 1):
        order = trees if round_no % 2 else trees[::-1]
        for backend in backends:
            for tree in order:
                h.progress(
                    f"trees, round {round_no}/{args.tree_rounds}: {backend}, "
                    f"{labels[tree]}"
                )
                spec = {
                    "mode": "time",
                    "backend": backend,
                    "workers": args.plain_workers,
                    "contenders": ["flowrhythm", "anyio-fast"],
                    "items": args.items,
                    "warmup": min(args.items, QUICK_ITEMS),
                    "samples": args.tree_samples,
                }
                done = subprocess.run(
                    child_command(tree, spec),
                    cwd="/", env=_child_env(), capture_output=True, text=True,
                    check=False, timeout=SAMPLE_TIMEOUT * 4,
                )  # fmt: skip
                lines = done.stdout.strip().splitlines()
                if done.returncode or not lines:
                    raise RuntimeError(
                        f"child for {tree} failed: {done.stderr.strip()[-2000:]}"
                    )
                answer = json.loads(lines[-1])
                where = Path(answer["flowrhythm"]).resolve()
                if not where.is_relative_to(tree.resolve()):
                    raise RuntimeError(f"child for {tree} imported {where}")
                for key, seconds in answer["results"].items():
                    name, workers = key.split("/")
                    result = results[tree, backend, int(workers), name]
                    result.seconds.extend(seconds)
                    result.cpu_seconds.extend(answer["cpu"][key])
    h.progress("")
    if args.instructions:
        count_instructions(args, backends, results)
    return list(results.values())


#: items of the two callgrind runs: their difference divided by the difference of
#: their instruction counts leaves out start-up, imports and loop creation
CALLGRIND_ITEMS = (2000, 22000)


def count_instructions(
    args: argparse.Namespace,
    backends: list[str],
    results: dict[tuple[Path, str, int, str], TreeResult],
) -> None:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("--instructions: valgrind not found, skipped", file=sys.stderr)
        return
    for (tree, backend, workers, name), result in results.items():
        counts = []
        for items in CALLGRIND_ITEMS:
            h.progress(f"callgrind: {backend}, {workers}w, {name}, {items} items")
            spec = {
                "mode": "once",
                "backend": backend,
                "workers": [workers],
                "contender": name,
                "items": items,
            }
            done = subprocess.run(
                [
                    valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null",
                    *child_command(tree, spec),
                ],
                cwd="/", env=_child_env(), capture_output=True, text=True,
                check=False, timeout=3600,
            )  # fmt: skip
            found = re.search(r"Collected\s*:\s*(\d+)", done.stderr)
            if done.returncode or found is None:
                raise RuntimeError(f"callgrind failed: {done.stderr.strip()[-2000:]}")
            counts.append(int(found.group(1)))
        result.instructions = (counts[1] - counts[0]) / (
            CALLGRIND_ITEMS[1] - CALLGRIND_ITEMS[0]
        )
    h.progress("")


# -- planning and running -----------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help="comma-separated sections, from: %(default)s",
    )
    parser.add_argument(
        "--backends",
        "--backend",
        default=",".join(h.BACKENDS),
        help="comma-separated, from: %(default)s",
    )
    parser.add_argument(
        "--rounds", type=int, help="timed runs of every case (default 5; --quick: 1)"
    )
    parser.add_argument(
        "--workers",
        default="1,8,32",
        help="ordered section: comma-separated worker counts (default %(default)s)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help=(
            "ordered section: target length of a run, as items = seconds × "
            "workers / 1 ms (default 0.5; --quick: 0.05)"
        ),
    )
    parser.add_argument(
        "--items",
        type=int,
        help="items per run of the other sections (default 100000; --quick: 2000)",
    )
    parser.add_argument(
        "--plain-workers",
        default="1,4",
        help="plain section: workers per stage (default %(default)s)",
    )
    parser.add_argument(
        "--no-traced",
        dest="traced",
        action="store_false",
        help="ordered section: skip the tracemalloc runs",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="TREE",
        help=(
            "plain section: also time flowrhythm imported from this checkout "
            "against --candidate's, in child processes"
        ),
    )
    parser.add_argument(
        "--candidate",
        type=Path,
        default=h.REPO_ROOT,
        metavar="TREE",
        help="the checkout compared with --baseline (default: this one)",
    )
    parser.add_argument(
        "--tree-rounds",
        type=int,
        default=10,
        help="--baseline: child processes per tree and backend (default %(default)s)",
    )
    parser.add_argument(
        "--tree-samples",
        type=int,
        default=3,
        help="--baseline: timed runs per child process (default %(default)s)",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="--baseline: also count instructions per item with valgrind (slow)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="few items, one round: a smoke test"
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.only = h.parse_csv(args.only)
    for name in args.only:
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {SECTIONS}")
    args.backends = h.parse_csv(args.backends)
    for name in args.backends:
        if name not in h.BACKENDS:
            parser.error(f"unknown backend {name!r}; choose from {h.BACKENDS}")
    try:
        args.workers = [int(w) for w in h.parse_csv(args.workers)]
        args.plain_workers = [int(w) for w in h.parse_csv(args.plain_workers)]
    except ValueError:
        parser.error("--workers and --plain-workers must be integers")
    if not args.workers or min(args.workers) < 1 or min(args.plain_workers) < 1:
        parser.error("worker counts must be at least 1")
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.seconds is None:
        args.seconds = 0.05 if args.quick else 0.5
    if args.items is None:
        args.items = QUICK_ITEMS if args.quick else 100_000
    if args.rounds < 1 or args.items < 1 or args.seconds <= 0:
        parser.error("--rounds and --items must be at least 1, --seconds > 0")
    if args.quick:
        args.tree_rounds, args.tree_samples = 1, 1
    if args.baseline is not None and not (args.baseline / "flowrhythm").is_dir():
        parser.error(f"--baseline {args.baseline}: no flowrhythm package there")
    if args.instructions and args.baseline is None:
        parser.error("--instructions needs --baseline")


def plan(args: argparse.Namespace) -> tuple[list[Case], list[str]]:
    cases: list[Case] = []
    notes: list[str] = []
    backends = []
    for name in args.backends:
        if h.backend_available(name):
            backends.append(name)
        else:
            notes.append(f"{name}: not installed, skipped")
    has_aiostream = importlib.util.find_spec("aiostream") is not None
    if "ordered" in args.only and not has_aiostream:
        notes.append("aiostream: not installed (pip install aiostream), skipped")
    for backend in backends:
        if "ordered" in args.only:
            for profile in PROFILES:
                for workers in args.workers:
                    items = max(round(args.seconds * workers / MEAN_LATENCY), 10)
                    for name, (factory, asyncio_only) in LATENCY_CONTENDERS.items():
                        if asyncio_only and (
                            not has_aiostream or backend not in ASYNCIO_LOOPS
                        ):
                            continue
                        cases.append(
                            Case(
                                "ordered", backend, profile, workers, name, items,
                                factory(profile),
                                reference=None if name == "flowrhythm" else "flowrhythm",
                                traced=args.traced,
                            )
                        )  # fmt: skip
        if "batch" in args.only:
            batch_cases: list[tuple[str, Run]] = [
                ("plain transformer", flowrhythm_batch(None, plain=True)),
                (f"add_batch({BATCH_SIZE})", flowrhythm_batch(None)),
                (
                    f"add_batch({BATCH_SIZE}, max_wait={BATCH_WAIT})",
                    flowrhythm_batch(BATCH_WAIT),
                ),
                ("anyio batch loop", anyio_batch(None)),
                (f"anyio batch loop, max_wait={BATCH_WAIT}", anyio_batch(BATCH_WAIT)),
            ]
            for name, fn in batch_cases:
                cases.append(
                    Case(
                        "batch", backend, "", 1, name, args.items, fn,
                        reference=None if name == "plain transformer" else "plain transformer",
                    )
                )  # fmt: skip
        if "options" in args.only:
            for name, workers in OPTION_CASES.items():
                cases.append(
                    Case(
                        "options", backend, "", workers, name, args.items,
                        options_case(name),
                        reference=None if name == "plain" else "plain",
                        reference_workers=1,
                    )
                )  # fmt: skip
        if "plain" in args.only:
            cases.extend(
                Case(
                    "plain", backend, "", workers, name, args.items, plain_case(name),
                    reference=None if name == "anyio-fast" else "anyio-fast",
                )
                for workers in args.plain_workers
                for name in ("flowrhythm", "anyio-fast")
            )  # fmt: skip
    return cases, notes


@dataclass
class Outcome:
    cases: list[Case]
    notes: list[str]
    trees: list[TreeResult] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(case.error for case in self.cases)


def run(args: argparse.Namespace) -> Outcome:
    cases, notes = plan(args)
    # Warm-up, untimed: first-use costs are paid here, and every case is checked
    # once on a few items before the long runs.
    for case in cases:
        h.progress(f"warm-up: {case.section}, {case.backend}, {case.name}")
        try:
            sample(
                case,
                min(
                    case.items,
                    QUICK_ITEMS // 10 if case.section == "ordered" else QUICK_ITEMS,
                ),
            )
        except Exception as exc:
            case.error = f"{type(exc).__name__}: {exc}"
    for round_no in range(1, args.rounds + 1):
        for case in cases:
            if case.error:
                continue
            h.progress(
                f"round {round_no}/{args.rounds}: {case.section}, {case.backend}, "
                f"{case.group} {case.workers}w, {case.name}"
            )
            try:
                case.seconds.append(sample(case))
            except Exception as exc:
                case.error = f"{type(exc).__name__}: {exc}"
    # tracemalloc slows a run several times: separate runs, after the timed ones.
    for case in cases:
        if case.traced and not case.error:
            h.progress(
                f"traced: {case.backend}, {case.group} {case.workers}w, {case.name}"
            )
            try:
                sample(case, traced=True)
            except Exception as exc:
                case.error = f"{type(exc).__name__}: {exc}"
    h.progress("")
    set_ratios(cases)
    outcome = Outcome(cases, notes)
    if "plain" in args.only and args.baseline is not None:
        backends = [b for b in args.backends if h.backend_available(b)]
        outcome.trees = run_trees(args, backends)
    return outcome


def set_ratios(cases: list[Case]) -> None:
    """Each case's median time per item over its reference's."""
    index = {
        (k.section, k.backend, k.group, k.workers, k.name): k
        for k in cases
        if k.seconds and not k.error
    }
    for k in cases:
        if k.reference is None or not k.seconds or k.error:
            continue
        workers = k.reference_workers or k.workers
        ref = index.get((k.section, k.backend, k.group, workers, k.reference))
        if ref is not None:
            k.ratio = k.us_per_item / ref.us_per_item
            cpu, ref_cpu = k.cpu_us_per_item, ref.cpu_us_per_item
            if cpu is not None and ref_cpu:
                k.cpu_ratio = cpu / ref_cpu


# -- reporting ----------------------------------------------------------------------


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def _by(cases: list[Case], section: str) -> dict[tuple[str, str], list[Case]]:
    groups: dict[tuple[str, str], list[Case]] = {}
    for k in cases:
        if k.section == section:
            groups.setdefault((k.backend, k.group), []).append(k)
    return groups


def window_ok(case: Case) -> bool | None:
    """Whether an ordered case kept its peak reorder window within the bound."""
    peak = case.probe("reorder_peak")
    if case.name != "flowrhythm ordered" or peak is None:
        return None
    return peak <= WINDOW_PER_WORKER * case.workers


def report(args: argparse.Namespace, outcome: Outcome) -> str:
    out = [
        (
            f"operators: median of {args.rounds} interleaved round(s); "
            "spread = (max - min) / median"
        ),
        *(f"note: {note}" for note in outcome.notes),
    ]
    cases = outcome.cases
    for (backend, profile), group in _by(cases, "ordered").items():
        rows = []
        for k in group:
            ok = window_ok(k)
            peak = k.probe("reorder_peak")
            window = (
                f"{peak:.0f} / {WINDOW_PER_WORKER * k.workers}"
                + ("" if ok in (None, True) else " EXCEEDED")
                if k.name == "flowrhythm ordered" and peak is not None
                else "-"
            )
            in_flight = k.probe("max_in_flight")
            rows.append(_row(k, [
                str(k.workers),
                k.name,
                *(_timed(k) if not k.error else ["FAILED", "-"]),
                window,
                f"{in_flight:.0f}" if in_flight is not None else "-",
                f"{k.traced_peak / 1024:,.0f}" if k.traced_peak is not None else "-",
            ]))  # fmt: skip
        title = (
            f"\n[{backend}] ordered vs unordered, {profile} latency (mean "
            f"{MEAN_LATENCY * 1e3:g} ms"
            + (
                f", every {HOL_EVERY}th item {HOL_FACTOR}× the mean"
                if profile == "head-of-line"
                else ""
            )
            + f"), items = {args.seconds:g} s × workers / 1 ms"
        )
        headers = [
            "workers", "contender", "items/s", "× unordered", "peak window / bound",
            "max in flight", "traced peak KiB", "spread",
        ]  # fmt: skip
        out.append(h.format_table(title, headers, rows))
    if _by(cases, "ordered"):
        out.append(
            "  × unordered: time per item over unordered flowrhythm's at the same "
            "workers (lower is faster); max in flight: items taken from the source "
            "and not yet consumed (flowrhythm: + the 64-item buffers)"
        )
    for (backend, _), group in _by(cases, "batch").items():
        rows = []
        for k in group:
            batches = k.probe("batches")
            rows.append(_row(k, [
                k.name,
                *(_timed(k) if not k.error else ["FAILED", "-"]),
                f"{k.us_per_item:.2f}" if k.seconds else "-",
                f"{batches:,.0f}" if batches is not None else "-",
                *_cpu(k),
            ]))  # fmt: skip
        title = (
            f"\n[{backend}] batching: {args.items:,} trivial items, producer -> "
            "stage -> consumer"
        )
        headers = [
            "pipeline", "items/s", "× plain transformer", "µs/item", "consumer calls",
            "CPU µs/item", "CPU ×", "spread",
        ]  # fmt: skip
        out.append(h.format_table(title, headers, rows))
    for (backend, _), group in _by(cases, "options").items():
        plain = next((k for k in group if k.name == "plain" and k.seconds), None)
        rows = []
        for k in group:
            extra = (
                f"{k.us_per_item - plain.us_per_item:+.2f}"
                if plain is not None and k.seconds and k is not plain
                else "-"
            )
            rows.append(_row(k, [
                k.name,
                str(k.workers),
                f"{k.us_per_item:.2f}" if k.seconds else "FAILED",
                extra,
                f"{k.ratio:.2f}" if k.ratio is not None else "-",
                *_cpu(k),
            ]))  # fmt: skip
        title = (
            f"\n[{backend}] options: one trivial stage (x + 1) between producer and "
            f"consumer, {args.items:,} items; µs/item of the whole flow"
        )
        headers = ["stage", "workers", "µs/item", "+µs vs plain", "× plain",
                   "CPU µs/item", "CPU ×", "spread"]  # fmt: skip
        out.append(h.format_table(title, headers, rows))
    for (backend, _), group in _by(cases, "plain").items():
        rows = [
            _row(k, [
                k.name,
                str(k.workers),
                f"{k.items_per_s:,.0f}" if k.seconds else "FAILED",
                f"{k.us_per_item:.2f}" if k.seconds else "-",
                f"{k.ratio:.2f}" if k.ratio is not None else "1.00" if k.seconds else "-",
                *_cpu(k),
            ])
            for k in group
        ]  # fmt: skip
        title = (
            f"\n[{backend}] plain stages: {args.items:,} items, {len(c.STAGES)} "
            "trivial stages + consumer, FixedScaling"
        )
        headers = [
            "contender",
            "workers",
            "items/s",
            "µs/item",
            "× anyio-fast",
            "CPU µs/item",
            "CPU ×",
            "spread",
        ]
        out.append(h.format_table(title, headers, rows))
    if any(k.section in ("batch", "options", "plain") for k in cases):
        out.append(
            "  CPU: the process's CPU time per item (these cases never sleep), "
            "which waiting for a core on a busy machine does not inflate"
        )
    if outcome.trees:
        out.append(report_trees(args, outcome.trees))
    failed = [k for k in cases if k.error]
    out.extend(
        f"FAILED: {k.section}, {k.backend}, {k.group} {k.workers}w, {k.name}: {k.error}"
        for k in failed
    )
    out.append("")
    out.append(h.format_machine(h.machine_info(("aiostream",))))
    return "\n".join(out)


def _timed(k: Case) -> list[str]:
    ratio = (
        f"{k.ratio:.2f}"
        if k.ratio is not None
        else ("1.00" if k.reference is None else "-")
    )
    return [_fmt_rate(k.items_per_s), ratio]


def _cpu(k: Case) -> list[str]:
    """CPU µs/item and its ratio: steadier than wall time on a busy machine."""
    cpu = k.cpu_us_per_item
    ratio = k.cpu_ratio if k.reference is not None else (1.0 if cpu else None)
    return [
        f"{cpu:.2f}" if cpu is not None else "-",
        f"{ratio:.2f}" if ratio is not None else "-",
    ]


def _row(k: Case, cells: list[str]) -> list[str]:
    return [*cells, f"{k.spread:.0%}" if k.seconds else "-"]


def report_trees(args: argparse.Namespace, trees: list[TreeResult]) -> str:
    index = {(t.tree, t.backend, t.workers, t.contender): t for t in trees}
    new, old = str(args.candidate), str(args.baseline)
    label_new = next(t.label for t in trees if t.tree == new)
    label_old = next(t.label for t in trees if t.tree == old)
    rows = []
    counted = any(t.instructions is not None for t in trees)
    for t in trees:
        if t.tree != new:
            continue
        o = index[old, t.backend, t.workers, t.contender]
        row = [
            t.backend,
            str(t.workers),
            t.contender,
            f"{t.us_per_item:.3f}",
            f"{o.us_per_item:.3f}",
            f"{t.us_per_item / o.us_per_item:.3f}",
            f"{t.spread:.0%} / {o.spread:.0%}",
            f"{t.cpu_us_per_item:.3f}",
            f"{o.cpu_us_per_item:.3f}",
            f"{t.cpu_us_per_item / o.cpu_us_per_item:.3f}",
        ]
        if counted:
            row += [
                f"{t.instructions:,.0f}" if t.instructions is not None else "-",
                f"{o.instructions:,.0f}" if o.instructions is not None else "-",
            ]
        rows.append(row)
    headers = ["backend", "workers", "contender", "new µs/item", "old µs/item",
               "new / old", "spread new / old", "new CPU µs", "old CPU µs",
               "CPU new / old"]  # fmt: skip
    if counted:
        headers += ["new instr/item", "old instr/item"]
    title = (
        f"\nplain stages, two checkouts in child processes ({args.tree_rounds} "
        f"round(s) × {args.tree_samples} run(s), alternating), {args.items:,} items:\n"
        f"  new: {new} ({label_new})\n  old: {old} ({label_old})\n"
        "  anyio-fast is the same code in both: its new / old is the noise"
    )
    return h.format_table(title, headers, rows)


def summary(outcome: Outcome) -> tuple[list[str], bool]:
    """A few lines for ``python -m benchmarks``'s summary, and whether all passed."""
    ok = not outcome.failed
    lines = ["operators:"]
    cases = outcome.cases
    for (backend, profile), group in _by(cases, "ordered").items():
        parts = []
        for k in group:
            if k.name == "flowrhythm ordered" and k.ratio is not None:
                aio = next(
                    (
                        x
                        for x in group
                        if x.name == "aiostream ordered"
                        and x.workers == k.workers
                        and x.seconds
                    ),
                    None,
                )
                text = f"{k.workers}w {k.ratio:.2f}×"
                if aio is not None:
                    text += f" (aiostream ordered {aio.items / aio.median_s / k.items_per_s:.2f}× the items/s)"
                parts.append(text)
        if parts:
            lines.append(
                f"  {backend}, {profile}: ordered/unordered time " + "; ".join(parts)
            )
        for k in group:
            verdict = window_ok(k)
            if verdict is False:
                ok = False
                lines.append(
                    f"  {backend}, {profile}, {k.workers}w: reorder window peak "
                    f"{k.probe('reorder_peak'):.0f} > bound {WINDOW_PER_WORKER * k.workers}: FAIL"
                )
    for (backend, _), group in _by(cases, "batch").items():
        parts = [f"{k.name} {k.ratio:.2f}×" for k in group if k.ratio is not None]
        if parts:
            lines.append(
                f"  {backend}, batching (× plain transformer): " + ", ".join(parts)
            )
    for (backend, _), group in _by(cases, "options").items():
        parts = [f"{k.name} {k.ratio:.2f}×" for k in group if k.ratio is not None]
        if parts:
            lines.append(f"  {backend}, options (× plain stage): " + ", ".join(parts))
    for (backend, _), group in _by(cases, "plain").items():
        parts = [
            f"{k.workers}w {k.ratio:.2f}×"
            for k in group
            if k.name == "flowrhythm" and k.ratio is not None
        ]
        if parts:
            lines.append(
                f"  {backend}, plain stages (× anyio-fast): " + ", ".join(parts)
            )
    if not ok:
        lines.extend(
            f"  FAILED: {k.section}, {k.backend}, {k.workers}w, {k.name}: {k.error}"
            for k in cases
            if k.error
        )
    return lines, ok


def as_json(args: argparse.Namespace, outcome: Outcome) -> dict[str, Any]:
    config = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in vars(args).items()
        if key != "json"
    }
    config.update(
        mean_latency=MEAN_LATENCY,
        hol_every=HOL_EVERY,
        hol_factor=HOL_FACTOR,
        seed=SEED,
        window_per_worker=WINDOW_PER_WORKER,
        batch_size=BATCH_SIZE,
        batch_wait=BATCH_WAIT,
        buffer_size=c.BUFFER_SIZE,
    )
    return {
        "config": config,
        "results": [k.as_dict() for k in outcome.cases],
        "trees": [t.as_dict() for t in outcome.trees],
        "notes": outcome.notes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.operators",
        description=(
            "Ordered output, batching and the per-item cost of stage options; "
            "a plain stage against anyio-fast and, with --baseline, another checkout."
        ),
    )
    add_arguments(parser)
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    outcome = run(args)
    print(report(args, outcome))
    _, ok = summary(outcome)
    if args.json:
        h.write_json(
            args.json,
            {
                "benchmark": "operators",
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **as_json(args, outcome),
                "machine": h.machine_info(("aiostream",)),
            },
        )
        print(f"\nresults written to {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
