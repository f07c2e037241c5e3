"""A stage that grows for a burst of work and shrinks when it is over.

The producer sends a trickle of items, then a burst, then a trickle again. The
``fetch`` stage, slow per item, runs under ``UtilizationScaling``: while its
workers are busy and items wait, it adds workers; once they sit idle, it retires
them. A watcher task prints the stage's stats five times a second.

Run it with ``python examples/autoscaling.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio

from flowrhythm import Flow, UtilizationScaling


async def main(burst: int = 300, calm_seconds: float = 1.5) -> list[int]:
    """Run the flow; return the worker counts of ``fetch`` the watcher saw."""

    async def requests() -> AsyncIterator[int]:
        trickle = (10, calm_seconds / 10)  # 10 items, evenly spread
        for count, pause in (trickle, (burst, 0.0), trickle):
            for number in range(count):
                yield number
                await anyio.sleep(pause)

    async def fetch(item: int) -> int:
        await anyio.sleep(0.05)  # a slow service
        return item

    async def store(item: int) -> None:
        pass

    flow = Flow()
    flow.set_producer(requests)
    flow.add_transformer(
        fetch,
        scaling_strategy=UtilizationScaling(
            min_workers=1,
            max_workers=20,
            upscaling_rate=4,  # workers added per decision
            downscaling_rate=4,  # workers retired per decision
            cooldown_seconds=0.2,  # no shrinking sooner than this after a change
            sampling_period=0.1,  # decide every 0.1 s ...
            sampling_events=10,  # ... and every 10 items in or out
        ),
    )
    flow.set_consumer(store)

    seen: list[int] = []

    async def watch() -> None:
        start = anyio.current_time()
        while True:
            fetch_stats = flow.stats()["fetch"]
            seen.append(fetch_stats.total_workers())
            print(
                f"t={anyio.current_time() - start:4.1f}s  fetch: "
                f"{fetch_stats.total_workers():2} workers "
                f"({fetch_stats.busy_workers:2} busy), "
                f"{fetch_stats.queue_length:3} queued, {fetch_stats.processed:3} done"
            )
            await anyio.sleep(0.2)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await flow.run()  # returns when the producer is exhausted and all is done
        tg.cancel_scope.cancel()  # stop the watcher
    print(f"fetch peaked at {max(seen)} workers, and had {seen[-1]} at the end")
    return seen


if __name__ == "__main__":
    anyio.run(main)
