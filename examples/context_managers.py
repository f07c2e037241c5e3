"""One database connection per worker, opened and closed by a context manager.

A stage given as an async context manager factory enters it once per worker: each
of the three ``lookup`` workers opens its own connection, and every connection is
closed when the flow ends, however it ends.

Run it with ``python examples/context_managers.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio

from flowrhythm import FixedScaling, Flow


class FakeDatabase:
    """Stands in for a real client: connecting and querying take a little time."""

    numbers = itertools.count(1)
    open_connections = 0

    def __init__(self) -> None:
        self.number = next(self.numbers)

    @classmethod
    async def connect(cls) -> FakeDatabase:
        await anyio.sleep(0.01)
        cls.open_connections += 1
        return cls()

    async def fetch_user(self, user_id: int) -> dict[str, object]:
        await anyio.sleep(0.005)
        return {"id": user_id, "name": f"user-{user_id}", "via": self.number}

    async def close(self) -> None:
        FakeDatabase.open_connections -= 1


@asynccontextmanager
async def lookup() -> AsyncIterator[Callable[[int], Awaitable[dict[str, object]]]]:
    db = await FakeDatabase.connect()  # once per worker
    print(f"connection {db.number} opened")
    try:

        async def fetch(user_id: int) -> dict[str, object]:
            return await db.fetch_user(user_id)

        yield fetch
    finally:
        await db.close()
        print(f"connection {db.number} closed")


async def main(users: int = 12) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []

    async def user_ids() -> AsyncIterator[int]:
        for user_id in range(users):
            yield user_id

    async def collect(user: dict[str, object]) -> None:
        found.append(user)

    flow = Flow()
    flow.set_producer(user_ids)
    flow.add_transformer(lookup, scaling_strategy=FixedScaling(workers=3))
    flow.set_consumer(collect)
    await flow.run()

    print(f"found {len(found)} users; connections still open: ", end="")
    print(FakeDatabase.open_connections)
    return found


if __name__ == "__main__":
    anyio.run(main)
