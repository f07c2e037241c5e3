"""A flow inside a trio nursery, fed through a trio memory channel.

``await nursery.start(flow.run)`` returns once every stage has its workers; the
flow then runs next to the nursery's other tasks. The producer is the receiving
end of a channel: when the sender closes it, the flow drains and ``run()``
returns.

Run it with ``python examples/trio_nursery.py`` (needs ``pip install trio``).
"""

from __future__ import annotations

import trio

from flowrhythm import FixedScaling, Flow


async def main(jobs: int = 10) -> list[str]:
    send, receive = trio.open_memory_channel[str](0)
    done: list[str] = []

    async def resize(job: str) -> str:
        await trio.sleep(0.01)  # pretend to work
        return job.replace("image", "thumbnail")

    async def upload(thumbnail: str) -> None:
        done.append(thumbnail)
        print("uploaded", thumbnail)

    flow = Flow()
    flow.set_producer(receive)
    flow.add_transformer(resize, scaling_strategy=FixedScaling(workers=4))
    flow.set_consumer(upload)

    async with trio.open_nursery() as nursery:
        await nursery.start(flow.run)
        print("the flow is running:", flow)
        async with send:  # closing the channel ends the flow's input
            for number in range(jobs):
                await send.send(f"image-{number}.png")
    # Leaving the nursery waited for flow.run() to return.
    print(f"{len(done)} thumbnails uploaded; the flow is finished: {flow}")
    return done


if __name__ == "__main__":
    trio.run(main)
