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
still moves items. Either side passes over a parked task whose cancellation has
already arrived (see ``_parking``): a sender cancelled while it waits keeps its
item. On asyncio a sender can still be relieved and then cancelled before it
runs; its item has gone through, and the stage counters (not the sender) say
where it went.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any

from anyio import BrokenResourceError, ClosedResourceError, EndOfStream, WouldBlock

from ._parking import Parked, parking

#: what a relieved sender's ``item`` becomes; what relieving returns if every
#: waiting sender was already on its way out
_HANDED_OVER: Any = object()
_NOBODY: Any = object()


class Channel:
    """One producer side, one consumer side, any number of tasks on each."""

    __slots__ = (
        "_park",
        "buffer",
        "capacity",
        "limit",
        "receive_closed",
        "receivers",
        "send_closed",
        "senders",
    )

    def __init__(self, capacity: int, park: Callable[[], Parked] | None = None) -> None:
        self._park = parking() if park is None else park
        self.buffer: deque[Any] = deque()
        self.capacity = capacity
        #: how many items the buffer may hold right now: ``capacity``, plus one per
        #: woken receiver (its item waits in the buffer but is spoken for); 0 once
        #: the receiving side closed, so that a fast-path append cannot succeed
        self.limit = capacity
        #: parked receivers, longest waiting first (some may be on their way out)
        self.receivers: deque[Parked] = deque()
        #: parked senders with their items, longest waiting first
        self.senders: deque[Parked] = deque()
        self.send_closed = False
        self.receive_closed = False

    # -- sending ----------------------------------------------------------------

    def send_nowait(self, item: Any) -> None:
        """Queue ``item``; ``WouldBlock`` if that needs a wait."""
        if self.receive_closed:
            raise BrokenResourceError
        if (self.receivers and self._wake_receiver()) or len(self.buffer) < self.limit:
            self.buffer.append(item)
        else:
            raise WouldBlock

    async def send_waiting(self, item: Any) -> None:
        """Wait until a receiver takes ``item`` (after ``send_nowait`` would block)."""
        sender = self._park()
        sender.item = item
        self.senders.append(sender)
        try:
            await sender.wait()
        except BaseException:
            if not sender.woken:
                # Still queued, unless a receiver passed over it already.
                with contextlib.suppress(ValueError):
                    self.senders.remove(sender)
            raise
        if sender.item is not _HANDED_OVER:
            raise BrokenResourceError  # the receiving side closed

    # -- receiving --------------------------------------------------------------

    def receive_nowait(self) -> Any:
        """The next item; ``WouldBlock`` if there is none yet, ``EndOfStream`` if
        there will be none."""
        buffer = self.buffer
        if buffer:
            item = buffer.popleft()
            if self.senders and len(buffer) < self.limit:
                relieved = self._relieve_sender()
                if relieved is not _NOBODY:
                    buffer.append(relieved)
            return item
        if self.senders:
            item = self._relieve_sender()
            if item is not _NOBODY:
                return item
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
        receiver = self._park()
        receivers.append(receiver)
        while True:
            try:
                await receiver.wait()
            except BaseException:
                if receiver.woken:
                    # Woken for an item, but the cancellation won: the item stays
                    # queued for the next receiver in line.
                    self.limit -= 1
                    if self.buffer and receivers:
                        self._wake_receiver()
                else:
                    # Still queued, unless a sender passed over it already.
                    with contextlib.suppress(ValueError):
                        receivers.remove(receiver)
                raise
            self.limit -= 1
            try:
                return self.receive_nowait()
            except WouldBlock:
                # A task that did not wait took the item first: wait again, first
                # in line.
                receiver = self._park()
                receivers.appendleft(receiver)

    def _relieve_sender(self) -> Any:
        """Take the item of the longest-waiting sender still waiting, or ``_NOBODY``."""
        senders = self.senders
        while senders:
            sender = senders.popleft()
            if sender.wake():
                item, sender.item = sender.item, _HANDED_OVER
                return item
        return _NOBODY

    def _wake_receiver(self) -> bool:
        """Wake the longest-waiting receiver still waiting; whether there was one."""
        receivers = self.receivers
        while receivers:
            if receivers.popleft().wake():
                if not self.receive_closed:
                    self.limit += 1  # until it runs, see receive_waiting
                return True
        return False

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
            self.senders.popleft().wake()
        # (the runtime closes a stage's input once its workers are gone, so none
        # waits here; any that does sees the end)
        while self.receivers:
            self._wake_receiver()
