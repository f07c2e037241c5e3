"""The bounded FIFO between two stages.

A deque plus two queues of parked tasks. The hot loops read ``buffer`` and
``limit`` directly and append or pop on the common path (no method call, no
exception); everything that may wait goes through the methods here.

Receivers are woken, not handed an item: a sender puts its item in the buffer
and wakes the longest-waiting receiver, which takes from the buffer when it runs.
So an item is never inside a task that is about to be cancelled: a woken receiver
whose cancellation wins leaves the item queued (and passes the wake-up on), and
the order of the items is the order of the buffer. A waiting sender, on the other
hand, is relieved of its item by the receiving side, so that a buffer of size 0
still moves items; if it is cancelled in that same step the item has gone through
anyway, and the stage counters (not the sender) say where it went.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

import anyio
from anyio import BrokenResourceError, ClosedResourceError, EndOfStream, WouldBlock


class _Sender:
    __slots__ = ("delivered", "event", "item")

    def __init__(self, item: Any) -> None:
        self.event = anyio.Event()
        self.item = item
        self.delivered = False


class Channel:
    """One producer side, one consumer side, any number of tasks on each."""

    __slots__ = (
        "buffer",
        "capacity",
        "limit",
        "receive_closed",
        "receivers",
        "send_closed",
        "senders",
    )

    def __init__(self, capacity: int) -> None:
        self.buffer: deque[Any] = deque()
        self.capacity = capacity
        #: how many items the buffer may hold right now: ``capacity``, plus one per
        #: woken receiver (its item waits in the buffer but is spoken for); 0 once
        #: the receiving side closed, so that a fast-path append cannot succeed
        self.limit = capacity
        #: parked receivers, longest waiting first
        self.receivers: deque[anyio.Event] = deque()
        self.senders: deque[_Sender] = deque()
        self.send_closed = False
        self.receive_closed = False

    # -- sending ----------------------------------------------------------------

    def send_nowait(self, item: Any) -> None:
        """Queue ``item``; ``WouldBlock`` if that needs a wait."""
        if self.receive_closed:
            raise BrokenResourceError
        if self.receivers:
            self.buffer.append(item)
            self._wake_receiver()
        elif len(self.buffer) < self.limit:
            self.buffer.append(item)
        else:
            raise WouldBlock

    async def send_waiting(self, item: Any) -> None:
        """Wait until a receiver takes ``item`` (after ``send_nowait`` would block)."""
        sender = _Sender(item)
        self.senders.append(sender)
        try:
            await sender.event.wait()
        except BaseException:
            # Still queued, unless a receiver took the item or the receiving side
            # closed (both dequeue the sender before waking it).
            with contextlib.suppress(ValueError):
                self.senders.remove(sender)
            raise
        if not sender.delivered:
            raise BrokenResourceError  # the receiving side closed

    # -- receiving --------------------------------------------------------------

    def receive_nowait(self) -> Any:
        """The next item; ``WouldBlock`` if there is none yet, ``EndOfStream`` if
        there will be none."""
        buffer = self.buffer
        if buffer:
            item = buffer.popleft()
            if self.senders and len(buffer) < self.limit:
                buffer.append(self._relieve_sender())
            return item
        if self.senders:
            return self._relieve_sender()
        if self.receive_closed:
            raise ClosedResourceError
        if self.send_closed:
            raise EndOfStream
        raise WouldBlock

    async def receive(self) -> Any:
        """The next item, waiting for one (``EndOfStream`` at the end)."""
        try:
            return self.receive_nowait()
        except WouldBlock:
            return await self.receive_waiting()

    async def receive_waiting(self) -> Any:
        """Wait for the next item (after ``receive_nowait`` would block)."""
        receivers = self.receivers
        event = anyio.Event()
        receivers.append(event)
        while True:
            try:
                await event.wait()
            except BaseException:
                try:
                    receivers.remove(event)
                except ValueError:
                    # Woken for an item, but the cancellation won: the item stays
                    # queued for the next receiver in line.
                    self.limit -= 1
                    if self.buffer and receivers:
                        self._wake_receiver()
                raise
            self.limit -= 1
            try:
                return self.receive_nowait()
            except WouldBlock:
                # A task that did not wait took the item first: wait again, first
                # in line.
                event = anyio.Event()
                receivers.appendleft(event)

    def _relieve_sender(self) -> Any:
        sender = self.senders.popleft()
        item, sender.item = sender.item, None
        sender.delivered = True
        sender.event.set()
        return item

    def _wake_receiver(self) -> None:
        if not self.receive_closed:
            self.limit += 1  # until it runs, see receive_waiting
        self.receivers.popleft().set()

    # -- closing ----------------------------------------------------------------

    def close_send(self) -> None:
        """No more items: receivers see ``EndOfStream`` once the buffer is empty."""
        self.send_closed = True
        while self.receivers:
            self._wake_receiver()

    def close_receive(self) -> None:
        """Nobody takes items any more: queued ones are discarded (the stage
        counters count them as dropped) and senders see ``BrokenResourceError``."""
        self.receive_closed = True
        self.limit = 0
        self.buffer.clear()
        while self.senders:
            self.senders.popleft().event.set()
        # (the runtime closes a stage's input once its workers are gone, so none
        # waits here; any that does sees the end)
        while self.receivers:
            self._wake_receiver()
