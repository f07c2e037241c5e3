"""Readings batched by size or time into SQLite, with a row-by-row fallback.

Sensor readings arrive in bursts. ``add_batch(50, max_wait=0.01)`` groups them
into lists of at most 50, and sends a shorter list once its first reading has
waited 10 ms, so a quiet period never holds rows back. Each list is inserted in
one short transaction (``executemany``, in a worker thread).

A bad reading (a negative value, which the table's CHECK constraint refuses)
rolls its whole batch back. The insert stage is a fan-out transformer: for such
a batch it yields the rows one by one, and the next stage inserts them
separately, so only the bad rows reach the error handler.

Run it with ``python examples/bulk_insert.py [asyncio|trio]``.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio

from flowrhythm import Flow

Row = dict[str, Any]


class Database:
    """One in-memory SQLite connection, used by one transaction at a time."""

    def __init__(self) -> None:
        # Worker threads take turns on the connection (see the lock below).
        self.connection = sqlite3.connect(":memory:", check_same_thread=False)
        self.connection.execute(
            "CREATE TABLE readings (id INTEGER PRIMARY KEY, sensor TEXT NOT NULL,"
            " value REAL NOT NULL CHECK (value >= 0))"
        )
        self.lock = anyio.Lock()  # SQLite has one writer at a time anyway

    async def insert(self, rows: list[Row]) -> None:
        """Insert ``rows`` in one transaction: all of them, or none."""
        async with self.lock:
            # sqlite3 blocks: run it in a thread, off the event loop.
            await anyio.to_thread.run_sync(self._insert, rows)

    def _insert(self, rows: list[Row]) -> None:
        with self.connection:  # commits, or rolls back if a row fails
            self.connection.executemany(
                "INSERT INTO readings VALUES (:id, :sensor, :value)", rows
            )

    def count(self) -> int:
        (count,) = self.connection.execute("SELECT COUNT(*) FROM readings").fetchone()
        return int(count)


async def main(bursts: int = 4, burst_size: int = 60, pause: float = 0.05) -> int:
    """Store ``bursts * burst_size`` readings; return how many rows the table has."""
    db = Database()
    batch_sizes: list[int] = []
    split: list[int] = []  # the sizes of the batches inserted row by row

    async def readings() -> AsyncIterator[Row]:
        number = 0
        for _ in range(bursts):
            for _ in range(burst_size):
                # Every 100th reading comes from a broken sensor.
                value = -1.0 if number % 100 == 99 else number / 10
                yield {"id": number, "sensor": f"s{number % 4}", "value": value}
                number += 1
            await anyio.sleep(pause)  # a quiet period: the batch goes by time

    async def insert_batch(rows: list[Row]) -> AsyncIterator[Row]:
        # A fan-out transformer: it yields nothing for a batch that went in, and
        # the rows of a batch that a bad row rolled back.
        batch_sizes.append(len(rows))
        try:
            await db.insert(rows)
            return
        except sqlite3.IntegrityError:
            split.append(len(rows))
        for row in rows:
            yield row

    async def insert_row(row: Row) -> None:
        await db.insert([row])  # a bad row raises: the error handler gets it

    async def reject(row: Row, exc: BaseException) -> None:
        print(f"rejected reading {row['id']} (value {row['value']}): {exc}")

    flow = Flow()
    flow.set_producer(readings)
    flow.add_batch(50, max_wait=0.01)
    flow.add_transformer(insert_batch)
    flow.set_consumer(insert_row)
    flow.set_error_handler(reject)
    try:
        await flow.run()
        stored = db.count()
    finally:
        db.connection.close()

    stats = flow.stats()
    print(f"batches: {', '.join(map(str, batch_sizes))}")
    print(f"{len(split)} batches rolled back and inserted row by row: {split}")
    print(
        f"batch stage: {stats['batch'].processed} rows in "
        f"{stats['batch'].emitted} batches; insert_row: "
        f"{stats['insert_row'].processed} rows stored one by one, "
        f"{stats['insert_row'].errors} rejected"
    )
    print(f"{stored} of {bursts * burst_size} readings stored")
    return stored


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
