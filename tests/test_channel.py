"""The channel between stages: order, bounds, wake-ups, closing and cancellation."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
import pytest
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream, WouldBlock
from anyio.lowlevel import checkpoint
from hypothesis import given
from hypothesis import strategies as st
from test_properties import BACKENDS, SETTINGS

from flowrhythm._channel import Channel
from flowrhythm._parking import OnAnyio, Parked

pytestmark = pytest.mark.anyio
GUARD = 10


@pytest.fixture(params=["native", "portable"])
def park(request: pytest.FixtureRequest) -> Callable[[], Parked] | None:
    """How the channel parks tasks: the loop's own way (the default), or the
    portable fallback on anyio's ``Event``."""
    return None if request.param == "native" else OnAnyio


async def send_or_wait(channel: Channel, item: Any) -> None:
    """What the runtime does: queue without waiting if it can, else wait."""
    try:
        channel.send_nowait(item)
    except WouldBlock:
        await channel.send_waiting(item)


async def park_sender(
    tg: anyio.abc.TaskGroup, channel: Channel, item: Any
) -> anyio.CancelScope:
    """Start a task sending ``item`` in a cancel scope of its own; return the
    scope once the task waits."""
    scope = anyio.CancelScope()

    async def send() -> None:
        with scope:
            await send_or_wait(channel, item)

    tg.start_soon(send)
    await anyio.wait_all_tasks_blocked()
    return scope


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
        await send_or_wait(channel, 1)
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
                await send_or_wait(channel, x)
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
            await send_or_wait(channel, x)
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
            await send_or_wait(channel, 1)
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


async def test_closing_the_receiving_side_releases_its_own_receivers(
    anyio_backend: Any,
) -> None:
    """Not a state the runtime creates (a stage closes its input after its workers
    are gone), but a channel in it must neither hang nor reopen."""
    channel = Channel(2)
    outcome: list[str] = []

    async def receive() -> None:
        try:
            await channel.receive()
        except ClosedResourceError:
            outcome.append("closed")

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            channel.close_receive()
            channel.close_send()
    assert outcome == ["closed"]
    assert not len(channel.buffer) < channel.limit


async def test_a_cancelled_sender_leaves_nothing_behind(
    anyio_backend: Any, park: Callable[[], Parked] | None
) -> None:
    channel = Channel(0, park)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            scope = await park_sender(tg, channel, "withdrawn")
            assert len(channel.senders) == 1
            scope.cancel()
    assert not channel.senders
    with pytest.raises(WouldBlock):
        channel.receive_nowait()


async def test_a_sender_cancelled_as_the_receiving_side_closes(
    anyio_backend: Any, park: Callable[[], Parked] | None
) -> None:
    """Both dequeue the waiting sender: it must see its cancellation (caught by its
    scope), not an error from the queue."""
    channel = Channel(0, park)
    scopes: list[anyio.CancelScope] = []
    outcome: list[str] = []

    async def send() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            try:
                await send_or_wait(channel, 1)
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
    anyio_backend: Any, park: Callable[[], Parked] | None
) -> None:
    """A receiver woken for an item while its cancellation is on its way leaves
    the item to the next receiver in line (natively, the send passes over it;
    with the fallback, it passes the wake-up on)."""
    channel = Channel(4, park)
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


@pytest.mark.parametrize(
    "cancel_first",
    [True, False],
    ids=["cancelled-then-room", "relieved-then-cancelled"],
)
async def test_a_waiting_sender_cancelled_as_room_is_made(
    anyio_backend: Any, cancel_first: bool
) -> None:
    """Cancelled first: a receiver making room passes over the sender, which keeps
    its item (the fallback cannot tell, and would take it). Relieved first: the
    item went through, whatever the sender sees next."""
    channel = Channel(1)
    channel.send_nowait(0)
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            scope = await park_sender(tg, channel, 1)
            if cancel_first:
                scope.cancel()
            assert channel.receive_nowait() == 0  # before the sender runs again
            if not cancel_first:
                scope.cancel()
    assert list(channel.buffer) == ([] if cancel_first else [1])
    assert not channel.senders
    if cancel_first:
        assert scope.cancelled_caught


def _send_inline(channel: Channel, item: Any) -> bool:
    """What the hot loops do before calling the channel's methods."""
    if not channel.receivers and len(channel.buffer) < channel.limit:
        channel.buffer.append(item)
        return True
    return False


def _receive_inline(channel: Channel) -> tuple[bool, Any]:
    if channel.buffer and not channel.senders:
        return True, channel.buffer.popleft()
    return False, None


async def _shuffle(
    capacity: int,
    senders: int,
    receivers: int,
    per_sender: int,
    seed: int,
    portable: bool,
) -> None:
    """Both sides pause at random, use the hot loops' inline paths or the methods
    at random, and are cancelled at random: a sender before it sends, a waiting
    receiver from a sender's task just before or after a send (the scale-down
    case, in the same step as the wake-up; the last one is replaced). Every
    item a sender did not withdraw is received exactly once; with one receiver at
    a time, in its sender's order."""
    rng = random.Random(seed)
    channel = Channel(capacity, OnAnyio if portable else None)
    received: list[tuple[int, int]] = []
    withdrawn: list[tuple[int, int]] = []
    waiting: dict[anyio.CancelScope, None] = {}
    alive = [receivers]

    def no_lost_wake_up() -> None:
        # While receivers wait, every queued item has a receiver woken for it
        # (each raises ``limit`` by one until it runs).
        if channel.receivers:
            assert len(channel.buffer) <= channel.limit - capacity

    async def pause() -> None:
        no_lost_wake_up()
        for _ in range(rng.randrange(3)):
            await checkpoint()
            no_lost_wake_up()

    def retire_one() -> None:
        if waiting and rng.random() < 0.3:
            scope = rng.choice(list(waiting))
            del waiting[scope]
            scope.cancel()

    async def send(sender: int) -> None:
        for n in range(per_sender):
            item = (sender, n)
            await pause()
            retire_one()  # its cancellation is on its way: the send may wake it
            if rng.random() < 0.5 and _send_inline(channel, item):
                retire_one()
                continue
            with anyio.CancelScope() as scope:
                if rng.random() < 0.1:
                    scope.cancel()
                await send_or_wait(channel, item)
            if scope.cancelled_caught and item not in channel.buffer:
                # cancelled while queued (withdrawn), or just as a receiver took it
                withdrawn.append(item)
            retire_one()

    async def receive(tg: anyio.abc.TaskGroup) -> None:
        while True:
            took, item = (
                _receive_inline(channel) if rng.random() < 0.5 else (False, None)
            )
            if not took:
                with anyio.CancelScope() as scope:
                    waiting[scope] = None
                    try:
                        item = await channel.receive()
                    except EndOfStream:
                        return
                    finally:
                        waiting.pop(scope, None)
                if scope.cancelled_caught:
                    # Retired. The pool shrinks, down to one: the last is replaced
                    # (a replacement would look at the buffer, hiding lost wake-ups).
                    alive[0] -= 1
                    if not alive[0]:
                        alive[0] += 1
                        tg.start_soon(receive, tg)
                    return
            received.append(item)
            await pause()

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            for _ in range(receivers):
                tg.start_soon(receive, tg)
            async with anyio.create_task_group() as sending:
                for sender in range(senders):
                    sending.start_soon(send, sender)
            # Quiet: no item may sit in the buffer while a receiver waits for one
            # (a lost wake-up, which closing the channel would hide).
            await anyio.wait_all_tasks_blocked()
            assert not (channel.buffer and channel.receivers)
            assert channel.limit == capacity
            channel.close_send()
    delivered = set(received)
    assert len(delivered) == len(received)  # nothing twice
    everything = {(s, n) for s in range(senders) for n in range(per_sender)}
    assert everything - delivered <= set(withdrawn)  # nothing lost
    if receivers == 1:
        for sender in range(senders):
            mine = [n for s, n in received if s == sender]
            assert mine == sorted(mine)
    assert not channel.receivers
    assert not channel.senders
    assert channel.limit == capacity


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    capacity=st.integers(0, 3),
    senders=st.integers(1, 3),
    receivers=st.integers(1, 3),
    per_sender=st.integers(0, 30),
    seed=st.integers(0, 2**32),
    portable=st.booleans(),
)
def test_items_are_conserved_under_random_cancellation(
    backend: tuple[str, dict[str, Any]],
    capacity: int,
    senders: int,
    receivers: int,
    per_sender: int,
    seed: int,
    portable: bool,
) -> None:
    name, options = backend
    anyio.run(
        partial(_shuffle, capacity, senders, receivers, per_sender, seed, portable),
        backend=name,
        backend_options=options,
    )
