"""How a run's cleanup code (context manager exits, ``aclose()``) meets cancellation."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

logger = logging.getLogger("flowrhythm")

#: how long cleanup code may still run once the flow is being cancelled
CLEANUP_TIMEOUT = 5.0


def in_cancelled_scope() -> bool:
    # Called from a finally block: tells whether cleanup must be shielded.
    return anyio.current_effective_deadline() == float("-inf")


class Cleanups:
    """Runs cleanup shielded from the flow's cancellation, for a bounded time.

    A per-worker ``__aexit__`` (``await conn.close()``) must get to run even when the
    flow is aborted, whether the abort came before the exit started or while it was
    awaiting. So every cleanup runs in a shielded scope with no deadline, and the
    moment the run is cancelled every such scope, current or future, gets a
    deadline of :data:`CLEANUP_TIMEOUT` seconds: a hung exit cannot hang the flow.
    """

    def __init__(self) -> None:
        self._scopes: set[anyio.CancelScope] = set()
        self._deadline = math.inf

    def cancelling(self) -> None:
        """The run is being cancelled: bound every cleanup from now on."""
        if self._deadline != math.inf:
            return
        self._deadline = anyio.current_time() + CLEANUP_TIMEOUT
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, self._deadline)

    async def run(self, fn: Callable[[], Awaitable[Any]]) -> None:
        deadline = self._deadline
        if deadline != math.inf:
            deadline = max(deadline, anyio.current_time() + CLEANUP_TIMEOUT)
        with anyio.CancelScope(shield=True, deadline=deadline) as scope:
            self._scopes.add(scope)
            try:
                await fn()
            finally:
                self._scopes.discard(scope)
        if scope.cancelled_caught:
            logger.warning(
                "cleanup %r was still running %ss after the flow was cancelled; "
                "cut off",
                fn,
                CLEANUP_TIMEOUT,
            )

    async def exit(self, cm: Any, exc: BaseException | None) -> None:
        """Exit ``cm`` after ``exc`` (or normally); the result cannot suppress ``exc``.

        An exception leaving a worker is a cancellation or a fatal error, and a
        per-worker resource may hide neither.
        """
        if exc is None:
            await self.run(lambda: cm.__aexit__(None, None, None))
        else:
            await self.run(lambda: cm.__aexit__(type(exc), exc, exc.__traceback__))
