"""Parking on trio (imported only when trio runs the flow)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from trio.lowlevel import Abort, current_task, reschedule, wait_task_rescheduled


class OnTrio:
    __slots__ = ("aborted", "item", "task", "woken")

    def __init__(self) -> None:
        self.task = current_task()
        self.item: Any = None
        self.woken = False
        self.aborted = False

    def _abort(self, _raise_cancel: object) -> Abort:
        # Cancelled while parked: trio resumes the task with the cancellation, and
        # a later wake must not reschedule it a second time.
        self.aborted = True
        return Abort.SUCCEEDED

    def wait(self) -> Awaitable[Any]:
        # The caller awaits it at once; returning the coroutine saves a frame.
        return wait_task_rescheduled(self._abort)  # noqa: ASYNC105

    def wake(self) -> bool:
        if self.aborted:
            return False
        self.woken = True
        reschedule(self.task)
        return True
