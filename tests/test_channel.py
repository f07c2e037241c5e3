"""The channel between stages: order, bounds, wake-ups, closing and cancellation."""

from __future__ import annotations

import contextlib
import random
from functools import partial
from typing import Any

import anyio
import pytest
from anyio import BrokenResourceError, EndOfStream, WouldBlock
from anyio.lowlevel import checkpoint
from hypothesis import given
from hypothesis import strategies as st
from test_properties import BACKENDS, SETTINGS

from flowrhythm._channel import Channel

pytestmark = pytest.mark.anyio
GUARD = 10


async def test_fifo_and_bounded(anyio_backend: Any) -> None:
    channel = Channel(3)
    for x in range(3):
        channel.send_nowait(x)
    with pytest.raises(WouldBlock):
        channel.send_nowait(3)
    assert [channel.receive_nowait() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(WouldBlock):
        channel.receive_nowait()


async def test_a_full_channel_makes_the_sender_wait_for_a_receiver(
    anyio_backend: Any,
) -> None:
    channel = Channel(1)
    channel.send_nowait(0)
    sent = anyio.Event()

    async def send() -> None:
        await channel.send(1)
        sent.set()

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            await anyio.wait_all_tasks_blocked()
            assert not sent.is_set()
            assert channel.receive_nowait() == 0
            # the waiting sender's item moved into the room just made
            assert list(channel.buffer) == [1]
            await sent.wait()
    assert channel.receive_nowait() == 1


async def test_size_zero_hands_items_from_sender_to_receiver(
    anyio_backend: Any,
) -> None:
    channel = Channel(0)
    got: list[int] = []

    async def receive() -> None:
        with contextlib.suppress(EndOfStream):
            while True:
                got.append(await channel.receive())

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            with pytest.raises(WouldBlock):
                channel.send_nowait(0)  # nobody waits to receive
            tg.start_soon(receive)
            for x in range(5):
                await channel.send(x)
                # the receiver holds it; nothing sits in the buffer
                assert len(channel.buffer) <= 1
            channel.close_send()
    assert got == [0, 1, 2, 3, 4]


async def test_size_zero_lets_no_sender_past_a_receiver_holding_an_item(
    anyio_backend: Any,
) -> None:
    """The receiver was woken for item 0 while the sender went on to item 1: once
    the receiver has taken 0 (and holds it), item 1 has nowhere to go."""
    channel = Channel(0)
    got: list[int] = []
    sent: list[int] = []

    async def receive_one() -> None:
        got.append(await channel.receive())

    async def send() -> None:
        for x in range(2):
            await channel.send(x)
            sent.append(x)

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive_one)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(send)
            await anyio.wait_all_tasks_blocked()
            assert (got, sent, list(channel.buffer)) == ([0], [0], [])
            assert len(channel.senders) == 1
            assert channel.receive_nowait() == 1
    assert sent == [0, 1]


async def test_a_woken_receiver_does_not_take_the_room_of_the_buffer(
    anyio_backend: Any,
) -> None:
    """An item sent to a waiting receiver waits in the buffer until it runs, but
    the buffer still holds its full capacity of other items meanwhile."""
    channel = Channel(2)
    got: list[int] = []

    async def receive_one() -> None:
        got.append(await channel.receive())

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive_one)
            await anyio.wait_all_tasks_blocked()
            for x in range(3):
                channel.send_nowait(x)
            with pytest.raises(WouldBlock):
                channel.send_nowait(3)
    assert got == [0]
    assert [channel.receive_nowait() for _ in range(2)] == [1, 2]


async def test_closing_the_sending_side_ends_receivers_after_the_buffer(
    anyio_backend: Any,
) -> None:
    channel = Channel(2)
    ended = 0

    async def receive() -> None:
        nonlocal ended
        with pytest.raises(EndOfStream):
            await channel.receive()
        ended += 1

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            channel.close_send()
    assert ended == 3
    other = Channel(2)
    other.send_nowait(7)
    other.close_send()
    assert other.receive_nowait() == 7
    with pytest.raises(EndOfStream):
        other.receive_nowait()


async def test_closing_the_receiving_side_breaks_senders(anyio_backend: Any) -> None:
    channel = Channel(1)
    channel.send_nowait(0)
    broken = 0

    async def send() -> None:
        nonlocal broken
        with pytest.raises(BrokenResourceError):
            await channel.send(1)
        broken += 1

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(send)
            await anyio.wait_all_tasks_blocked()
            channel.close_receive()
    assert broken == 2
    assert not channel.buffer
    # the hot loops' inline check (room below the limit) fails from now on
    assert not len(channel.buffer) < channel.limit
    with pytest.raises(BrokenResourceError):
        channel.send_nowait(2)


async def test_a_cancelled_sender_leaves_nothing_behind(anyio_backend: Any) -> None:
    channel = Channel(0)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:

            async def send() -> None:
                with anyio.CancelScope() as scope:
                    scopes.append(scope)
                    await channel.send("withdrawn")

            scopes: list[anyio.CancelScope] = []
            tg.start_soon(send)
            await anyio.wait_all_tasks_blocked()
            assert len(channel.senders) == 1
            scopes[0].cancel()
    assert not channel.senders
    with pytest.raises(WouldBlock):
        channel.receive_nowait()


async def test_a_sender_cancelled_as_the_receiving_side_closes(
    anyio_backend: Any,
) -> None:
    """Both dequeue the waiting sender: it must see its cancellation (caught by its
    scope), not an error from the queue."""
    channel = Channel(0)
    scopes: list[anyio.CancelScope] = []
    outcome: list[str] = []

    async def send() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            try:
                await channel.send(1)
            except BrokenResourceError:
                outcome.append("broken")
                return
        outcome.append("cancelled" if scope.cancelled_caught else "sent")

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            await anyio.wait_all_tasks_blocked()
            scopes[0].cancel()
            channel.close_receive()
    assert outcome in (["broken"], ["cancelled"])


async def test_a_receiver_cancelled_as_it_is_woken_passes_the_item_on(
    anyio_backend: Any,
) -> None:
    """A receiver woken for an item while its cancellation is on its way leaves
    the item to the next receiver in line."""
    channel = Channel(4)
    got: dict[str, list[int]] = {"first": [], "second": []}
    scopes: dict[str, anyio.CancelScope] = {}

    async def receive(name: str) -> None:
        with anyio.CancelScope() as scopes[name]:
            while True:
                got[name].append(await channel.receive())

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive, "first")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(receive, "second")
            await anyio.wait_all_tasks_blocked()
            scopes["first"].cancel()  # delivered when "first" runs next ...
            channel.send_nowait(0)  # ... which this wakes it for, in the same step
            await anyio.wait_all_tasks_blocked()
            scopes["second"].cancel()
    assert got == {"first": [], "second": [0]}
    assert not channel.buffer
    assert channel.limit == channel.capacity


async def test_a_receiver_woken_but_beaten_to_the_item_waits_again(
    anyio_backend: Any,
) -> None:
    channel = Channel(1)
    got: list[int] = []

    async def receive() -> None:
        got.append(await channel.receive())

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            channel.send_nowait(0)
            assert channel.receive_nowait() == 0  # taken before the receiver runs
            await anyio.wait_all_tasks_blocked()
            assert got == []
            assert len(channel.receivers) == 1
            channel.send_nowait(1)
    assert got == [1]
    assert channel.limit == channel.capacity


async def _shuffle(
    capacity: int, senders: int, receivers: int, per_sender: int, seed: int
) -> None:
    """Tasks on both sides that pause at random and are cancelled at random; every
    item a sender did not withdraw is received exactly once, in its sender's order."""
    rng = random.Random(seed)
    channel = Channel(capacity)
    received: list[tuple[int, int]] = []
    withdrawn: list[tuple[int, int]] = []

    async def pause() -> None:
        for _ in range(rng.randrange(3)):
            await checkpoint()

    async def send(sender: int) -> None:
        for n in range(per_sender):
            item = (sender, n)
            await pause()
            with anyio.CancelScope() as scope:
                if rng.random() < 0.1:
                    scope.cancel()
                await channel.send(item)
            if scope.cancelled_caught and item not in channel.buffer:
                # cancelled while queued (withdrawn), or just as a receiver took it
                withdrawn.append(item)

    async def receive() -> None:
        while True:
            with anyio.CancelScope() as scope:
                if rng.random() < 0.1:
                    scope.cancel()
                try:
                    item = await channel.receive()
                except EndOfStream:
                    return
            if not scope.cancelled_caught:
                received.append(item)
            await pause()

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            for _ in range(receivers):
                tg.start_soon(receive)
            async with anyio.create_task_group() as sending:
                for sender in range(senders):
                    sending.start_soon(send, sender)
            channel.close_send()
    delivered = set(received)
    assert len(delivered) == len(received)  # nothing twice
    everything = {(s, n) for s in range(senders) for n in range(per_sender)}
    assert everything - delivered <= set(withdrawn)  # nothing lost
    for sender in range(senders):
        mine = [n for s, n in received if s == sender]
        if receivers == 1:
            assert mine == sorted(mine)
    assert not channel.receivers
    assert not channel.senders


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    capacity=st.integers(0, 3),
    senders=st.integers(1, 3),
    receivers=st.integers(1, 3),
    per_sender=st.integers(0, 30),
    seed=st.integers(0, 2**32),
)
def test_items_are_conserved_under_random_cancellation(
    backend: tuple[str, dict[str, Any]],
    capacity: int,
    senders: int,
    receivers: int,
    per_sender: int,
    seed: int,
) -> None:
    name, options = backend
    anyio.run(
        partial(_shuffle, capacity, senders, receivers, per_sender, seed),
        backend=name,
        backend_options=options,
    )
