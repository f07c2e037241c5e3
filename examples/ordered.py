"""Sixteen workers with random latency, and the output still in input order.

``lookup`` runs 16 workers whose calls take 0-10 ms at random, so they finish
out of order. With ``ordered=True`` the stage still passes its results on in
input order: a result that is ready early waits, in a window of at most 4 items
per worker, until every earlier item has been passed on or has failed. An item
that fails (every 100th here) is skipped at once and holds nothing back.

After it, a filter with one worker (which keeps order by itself) drops the
multiples of 3, and ``expand``, an ordered fan-out stage with 4 workers, turns
each number into two items that stay together. The consumer checks the order.

The script runs the flow twice, with ``ordered=True`` and without, to compare.

Run it with ``python examples/ordered.py [asyncio|trio]``.
"""

from __future__ import annotations

import random
import sys
from collections.abc import AsyncIterator

import anyio

from flowrhythm import FixedScaling, Flow, StageStats

Item = tuple[int, str]


async def run(
    *, ordered: bool, items: int, seed: int = 1
) -> tuple[list[Item], int, dict[str, StageStats]]:
    """Run the flow once; return what the consumer received, how many of those
    items came late, and the stats."""
    rng = random.Random(seed)
    received: list[Item] = []
    late = 0  # items that arrived after an item that comes later in the input

    async def numbers() -> AsyncIterator[int]:
        for number in range(items):
            yield number

    async def lookup(number: int) -> int:
        await anyio.sleep(rng.uniform(0, 0.01))
        if number % 100 == 99:
            raise LookupError(number)
        return number

    async def not_multiple_of_3(number: int) -> bool:
        return number % 3 != 0

    async def expand(number: int) -> AsyncIterator[Item]:
        await anyio.sleep(rng.uniform(0, 0.002))
        yield number, "a"
        await anyio.sleep(rng.uniform(0, 0.002))
        yield number, "b"

    async def collect(item: Item) -> None:
        nonlocal late
        if received and item < received[-1]:
            late += 1
        received.append(item)

    async def skip(number: int, exc: BaseException) -> None:
        pass  # every 100th lookup fails; the order of the others is unaffected

    flow = Flow()
    flow.set_producer(numbers)
    flow.add_transformer(lookup, scaling_strategy=FixedScaling(16), ordered=ordered)
    flow.add_filter(not_multiple_of_3)  # one worker: keeps the order it gets
    flow.add_transformer(expand, scaling_strategy=FixedScaling(4), ordered=ordered)
    flow.set_consumer(collect)
    flow.set_error_handler(skip)
    await flow.run()
    return received, late, dict(flow.stats())


async def main(items: int = 400) -> list[Item]:
    expected = [
        (number, tag)
        for number in range(items)
        if number % 100 != 99 and number % 3 != 0
        for tag in ("a", "b")
    ]
    for ordered in (False, True):
        received, late, stats = await run(ordered=ordered, items=items)
        assert sorted(received) == expected  # nothing lost either way
        print(
            f"ordered={ordered}: {len(received)} items, {late} after a later one, "
            f"in input order: {received == expected}"
        )
        print(
            f"  reorder window peak: lookup {stats['lookup'].reorder_window_peak} "
            f"(at most 4 x 16 = 64), expand {stats['expand'].reorder_window_peak} "
            f"(at most 4 x 4 = 16)"
        )
    return received  # the ordered run's


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
