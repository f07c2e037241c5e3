"""Item errors go to the error handler; a failing producer ends the flow.

A transformer that raises fails only its item: the error handler receives the
item and the exception, and the flow goes on. A producer that raises is fatal:
the flow stops, cleans up, and the exception comes out of ``run()`` as itself, so
a plain ``except ConnectionError:`` catches it.

Run it with ``python examples/error_handling.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio

from flowrhythm import Flow


async def parse(line: str) -> int:
    return int(line)  # ValueError for a line that is not a number


async def report(line: str, exc: BaseException) -> None:
    print(f"skipped {line!r}: {exc!r}")


async def sum_lines(lines: list[str]) -> int:
    """Add up the numbers in ``lines``; the bad lines go to the error handler."""
    total = 0

    async def read_lines() -> AsyncIterator[str]:
        for line in lines:
            yield line

    async def add(number: int) -> None:
        nonlocal total
        total += number

    flow = Flow()
    flow.set_producer(read_lines)
    flow.add_transformer(parse)
    flow.set_consumer(add)
    flow.set_error_handler(report)
    await flow.run()
    return total


async def sum_from_network() -> int:
    """Add up numbers from a source that breaks: the flow fails with its error."""

    async def read_from_network() -> AsyncIterator[str]:
        yield "10"
        yield "20"
        await anyio.sleep(0.1)
        raise ConnectionError("the connection was reset")

    total = 0

    async def add(number: int) -> None:
        nonlocal total
        total += number

    flow = Flow()
    flow.set_producer(read_from_network)
    flow.add_transformer(parse)
    flow.set_consumer(add)
    flow.set_error_handler(report)
    await flow.run()
    return total


async def main(lines: tuple[str, ...] = ("1", "2", "three", "4", "", "6")) -> None:
    total = await sum_lines(list(lines))
    print(f"total: {total}")
    try:
        total = await sum_from_network()
    except ConnectionError as exc:
        # The flow adds a note saying where the error came from.
        notes = "; ".join(getattr(exc, "__notes__", ()))
        print(f"the source failed: {exc} ({notes})")
    else:
        print(f"total from the network: {total}")


if __name__ == "__main__":
    anyio.run(main)
