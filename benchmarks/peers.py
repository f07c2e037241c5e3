"""Peer libraries on the throughput workload, side by side with flowrhythm.

Run from the repository root::

    python -m benchmarks.peers                  # 1 and 4 workers, every backend
    python -m benchmarks.peers --quick          # smoke test
    python -m benchmarks.throughput --contenders flowrhythm,anyio-fast,aiostream

Each peer runs the workload of ``contenders.py``: ints from the same async
generator through the same three ``x + 1`` stages into the counting consumer,
``workers`` concurrent calls per stage, checked by count and sum. Every peer
is written the way its documentation shows, with unordered output where the
library offers it (flowrhythm does not keep order either) and 64-item buffers
where it has buffers at all.

- aiostream: ``stream.iterate(src) | pipe.map(f, task_limit=n) ... |
  pipe.action(consume, task_limit=n)``. Pull-based, no buffers; asyncio only.
- pypeln: ``pl.task.map(f, stage, workers=n, maxsize=64)`` chained into
  ``pl.task.each``. A task per item under a pool limit; asyncio only.
- pipestage: ``stream(src).map(f, concurrency=n, ordered=False)`` chained into
  ``for_each``. At ``concurrency=1`` a stage is a plain async generator (no
  task, no buffer: the chain runs like ``plain-loop``); above 1, a task per
  item in a window of 2n. Built on asyncio tasks and queues: asyncio only.
- anyiostream: ``Stream.from_callable(src).map(f, workers=n, buffer_size=64)``,
  consumed by iterating ``open()`` in the calling task (a ``foreach`` stage
  would add a fourth hop). anyio memory streams, so every backend, but it needs
  Python >= 3.12: under an older interpreter the runner times it in a child
  process of a 3.12 one (``$FLOWRHYTHM_BENCH_PYTHON``, or a sibling virtualenv
  named like the running one plus ``312``), together with flowrhythm and
  anyio-fast, whose rows are the yardstick for that interpreter.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import _harness as h
from . import contenders as c

#: backends of libraries built directly on asyncio (uvloop is an asyncio loop)
ASYNCIO_ONLY = ("asyncio", "uvloop")


async def run_aiostream(n_items: int, workers: int) -> None:
    from aiostream import pipe, stream

    tally = c.Tally()
    a, b, cc = c.STAGES
    # ordered=False: results leave a stage as they complete, like a worker pool.
    # (aiostream's MapCallable protocol rejects a plain one-argument function.)
    xs = (
        stream.iterate(c.produce(n_items))
        | pipe.map(a, ordered=False, task_limit=workers)  # type: ignore[arg-type]
        | pipe.map(b, ordered=False, task_limit=workers)  # type: ignore[arg-type]
        | pipe.map(cc, ordered=False, task_limit=workers)  # type: ignore[arg-type]
        | pipe.action(tally.consume, ordered=False, task_limit=workers)
    )
    async with xs.stream() as streamer:
        async for _ in streamer:
            pass
    tally.verify(n_items, "aiostream")


async def run_pypeln(n_items: int, workers: int) -> None:
    import pypeln as pl

    tally = c.Tally()
    a, b, cc = c.STAGES
    size = c.BUFFER_SIZE  # pypeln's default maxsize=0 is an unbounded queue
    stage = pl.task.map(a, c.produce(n_items), workers=workers, maxsize=size)
    stage = pl.task.map(b, stage, workers=workers, maxsize=size)
    stage = pl.task.map(cc, stage, workers=workers, maxsize=size)
    await pl.task.each(tally.consume, stage, workers=workers, maxsize=size)
    tally.verify(n_items, "pypeln")


async def run_pipestage(n_items: int, workers: int) -> None:
    from pipestage import stream

    tally = c.Tally()
    a, b, cc = c.STAGES
    await (
        stream(c.produce(n_items))
        .map(a, concurrency=workers, ordered=False)
        .map(b, concurrency=workers, ordered=False)
        .map(cc, concurrency=workers, ordered=False)
        .for_each(tally.consume, concurrency=workers, ordered=False)
    )
    tally.verify(n_items, "pipestage")


async def run_anyiostream(n_items: int, workers: int) -> None:
    from anyiostream import Stream

    tally = c.Tally()
    a, b, cc = c.STAGES
    size = c.BUFFER_SIZE
    # The source-to-first-stage channel is unbounded by design of the library.
    xs = (
        Stream.from_callable(lambda: c.produce(n_items))
        .map(a, workers=workers, buffer_size=size)
        .map(b, workers=workers, buffer_size=size)
        .map(cc, workers=workers, buffer_size=size)
    )
    consume = tally.consume
    async with xs.open() as items:
        async for item in items:
            await consume(item)
    tally.verify(n_items, "anyiostream")


PEERS = (
    h.Contender(
        "aiostream",
        run_aiostream,
        ASYNCIO_ONLY,
        requires=("aiostream",),
        pip=("aiostream",),
        peer=True,
    ),
    h.Contender(
        "pypeln",
        run_pypeln,
        ASYNCIO_ONLY,
        requires=("pypeln",),
        pip=("pypeln",),
        peer=True,
    ),
    h.Contender(
        "pipestage",
        run_pipestage,
        ASYNCIO_ONLY,
        requires=("pipestage",),
        pip=("pipestage",),
        peer=True,
    ),
    h.Contender(
        "anyiostream",
        run_anyiostream,
        requires=("anyiostream",),
        pip=("anyiostream",),
        min_python=(3, 12),
        peer=True,
    ),
)

#: the distributions whose versions go into the report's header
PEER_DISTRIBUTIONS = ("aiostream", "pypeln", "pipestage", "anyiostream")

#: the contenders ``python -m benchmarks.peers`` races by default
DEFAULT_CONTENDERS = (
    "flowrhythm",
    "anyio-fast",
    "asyncio-queue",
    "plain-loop",
    *(peer.name for peer in PEERS),
)


def main(argv: Sequence[str] | None = None) -> int:
    # The throughput runner does the work; it imports this module for PEERS.
    from . import throughput

    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = [
        "--contenders",
        ",".join(DEFAULT_CONTENDERS),
        "--workers",
        "1,4",
    ]
    # Later options win in argparse, so the caller's own override these.
    return throughput.main(defaults + argv, prog="python -m benchmarks.peers", rounds=5)


if __name__ == "__main__":
    sys.exit(main())
