"""The example of the original design: double ten numbers, on asyncio.

Run it with ``python examples/basic.py``.
"""

import asyncio

from flowrhythm import FixedScaling, Flow, UtilizationScaling


async def producer():
    for i in range(10):
        yield i


async def transformer(x):
    return x * 2


async def consumer(x):
    print("Got:", x)


async def error_handler(item, exc):
    print("Error:", item, exc)


async def main():
    flow = Flow(default_scaling_strategy=UtilizationScaling(max_workers=8))
    flow.set_producer(producer)
    flow.add_transformer(
        transformer, name="double", scaling_strategy=FixedScaling(workers=2)
    )
    flow.set_consumer(consumer)
    flow.set_error_handler(error_handler)

    await flow.start()  # returns once every stage has its workers
    await flow.wait()  # returns when the producer is exhausted and all items are done


if __name__ == "__main__":
    asyncio.run(main())
