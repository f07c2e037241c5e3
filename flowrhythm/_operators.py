"""Per-call options of a stage: retries, rate limits and timeouts.

``Retry`` and ``RateLimit`` are the public configuration objects. ``CallPolicy``
applies a stage's options around each call of its function; a stage configured
without them calls the function directly and pays nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from ._errors import add_note
from .scaling import _check_int

if TYPE_CHECKING:
    from ._cleanup import Cleanups
    from ._stats import StageCounters
    from ._time import Timebase

ItemCall = Callable[[Any], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Retry:
    """Call again, in the same worker, when a call raises one of ``on``.

    Attempt ``n`` (counting from 1) that fails is followed by a wait of
    ``backoff * 2 ** (n - 1)`` seconds, at most ``max_backoff``; with ``jitter``
    the wait is drawn uniformly from its upper half, so workers that failed
    together do not retry together. After ``attempts`` failed attempts the item
    goes to the error handler with the last exception, which carries a note
    saying how many attempts were made. Cancellation and other
    ``BaseException``\\ s are never retried.

    :param attempts: calls in all, the first included (1 disables retrying)
    :param on: the exception classes that are worth another attempt
    :param backoff: the wait after the first failed attempt, in seconds
    :param max_backoff: the longest wait between two attempts, in seconds
    :param jitter: spread the waits (see above)
    """

    attempts: int = 3
    on: type[Exception] | tuple[type[Exception], ...] = (Exception,)
    backoff: float = 0.1
    max_backoff: float = 10.0
    jitter: bool = True

    def __post_init__(self) -> None:
        _check_int("Retry: attempts", self.attempts, minimum=1)
        on = self.on if isinstance(self.on, tuple) else (self.on,)
        if not on or not all(
            isinstance(cls, type) and issubclass(cls, Exception) for cls in on
        ):
            raise TypeError(
                "Retry: on must be an Exception subclass or a non-empty tuple of "
                f"them (cancellation and BaseExceptions are never retried), got "
                f"{self.on!r}"
            )
        object.__setattr__(self, "on", on)
        _check_seconds("Retry: backoff", self.backoff, minimum=0.0)
        _check_seconds("Retry: max_backoff", self.max_backoff, minimum=0.0)
        if not isinstance(self.jitter, bool):
            raise TypeError(f"Retry: jitter must be a bool, got {self.jitter!r}")

    def __repr__(self) -> str:
        on = self.on if isinstance(self.on, tuple) else (self.on,)
        names = ", ".join(cls.__qualname__ for cls in on)
        names = f"({names})" if len(on) > 1 else f"({names},)"
        return (
            f"Retry(attempts={self.attempts}, on={names}, backoff={self.backoff}, "
            f"max_backoff={self.max_backoff}, jitter={self.jitter})"
        )

    def delay(self, failed_attempts: int) -> float:
        """Return the wait, in seconds, after the ``failed_attempts``-th failure."""
        delay = min(self.backoff * 2.0 ** (failed_attempts - 1), self.max_backoff)
        if self.jitter:
            delay *= 0.5 + random.random() / 2
        return delay


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``per_second`` call attempts per second, shared by every worker of
    the stage, with bursts of up to ``burst`` calls (a token bucket that starts
    full). Retried attempts take a token each. Workers waiting for a token count
    as throttled in the stage's stats, and the scaler does not grow a stage
    whose workers are throttled: more workers could not call any faster.

    :param per_second: the sustained rate, in calls per second
    :param burst: how many calls may start back to back after a quiet period
    """

    per_second: float
    burst: int = 1

    def __post_init__(self) -> None:
        value = self.per_second
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"RateLimit: per_second must be a number, got {value!r}")
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(
                f"RateLimit: per_second must be a finite number > 0, got {value!r}"
            )
        _check_int("RateLimit: burst", self.burst, minimum=1)


#: a token, give or take float rounding: refilling 0.1 s at 10/s yields
#: 0.9999999999999998, and a sleep for the rest could not move the clock
_WHOLE = 1.0 - 1e-9


class TokenBucket:
    """The shared state of one stage's :class:`RateLimit`.

    A token is taken at the moment the call starts, with the bucket refilled up
    to that moment, so the calls of a stage never exceed the limit on the flow's
    clock, even when a waiter wakes late. Waiters queue on a fair lock: the
    first sleeps until a token is due and takes it; the next one follows.
    """

    def __init__(
        self, limit: RateLimit, timebase: Timebase, counters: StageCounters
    ) -> None:
        self.rate = float(limit.per_second)
        self.burst = float(limit.burst)
        self.timebase = timebase
        self.counters = counters
        self.tokens = self.burst
        self.updated = timebase.now()
        self._queue = anyio.Lock()

    def _refill(self) -> float:
        now = self.timebase.now()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return self.tokens

    async def acquire(self) -> None:
        """Take a token, waiting for one (behind earlier waiters) if need be."""
        if not self._queue.locked() and self._refill() >= _WHOLE:
            self.tokens -= 1.0
            return
        counters = self.counters
        counters.throttled += 1
        counters.throttled_waits += 1
        try:
            async with self._queue:
                while (tokens := self._refill()) < _WHOLE:
                    await self.timebase.sleep((1.0 - tokens) / self.rate)
                self.tokens -= 1.0
        finally:
            counters.throttled -= 1


class CallPolicy:
    """A stage's timeout, retry and rate limit, applied around each call."""

    def __init__(
        self,
        role: str,
        counters: StageCounters,
        timebase: Timebase,
        cleanups: Cleanups,
        *,
        timeout: float | None,
        retry: Retry | None,
        rate_limit: RateLimit | None,
    ) -> None:
        self.role = role
        self.counters = counters
        self.timebase = timebase
        self.cleanups = cleanups
        self.timeout = timeout
        self.retry = retry
        self.bucket = (
            TokenBucket(rate_limit, timebase, counters)
            if rate_limit is not None
            else None
        )

    @property
    def plain(self) -> bool:
        return self.timeout is None and self.retry is None and self.bucket is None

    def wrap(self, fn: ItemCall) -> ItemCall:
        """Return ``fn`` with the options applied (``fn`` itself without any)."""
        if self.plain:
            return fn

        async def call(item: Any) -> Any:
            failed = 0
            while True:
                try:
                    return await self._attempt(fn, item)
                except Exception as exc:  # noqa: PERF203 (the retry loop)
                    failed += 1
                    if not await self.retry_after(exc, failed, retryable=True):
                        raise

        return call

    async def _attempt(self, fn: ItemCall, item: Any) -> Any:
        if self.bucket is not None:
            await self.bucket.acquire()
        if self.timeout is None:
            return await fn(item)
        with self.timebase.deadline(self.timeout) as scope:
            return await fn(item)
        raise self.timed_out(scope)

    def timed_out(self, scope: Any) -> TimeoutError:
        assert scope.cancelled_caught
        self.counters.timeouts += 1
        return TimeoutError(f"{self.role} took longer than {self.timeout} s")

    async def retry_after(
        self, exc: Exception, failed: int, *, retryable: bool
    ) -> bool:
        """Wait and return ``True`` if ``exc`` is worth another attempt; else note
        the attempts made on ``exc`` and return ``False``."""
        retry = self.retry
        if (
            retryable
            and retry is not None
            and failed < retry.attempts
            and isinstance(exc, retry.on)
        ):
            self.counters.retries += 1
            await self.timebase.sleep(retry.delay(failed))
            return True
        if failed > 1:
            add_note(exc, f"{self.role} gave up after {failed} attempts")
        return False

    async def fan_out(
        self,
        gen_fn: Callable[[Any], AsyncIterator[Any]],
        item: Any,
        emit: Callable[[Any], Awaitable[None]],
    ) -> Exception | None:
        """Run a fan-out function on ``item`` and ``emit`` each output; return the
        exception that failed the item, if it failed.

        The timeout bounds each step of the generator (the time to produce the
        next output), not the time ``emit`` waits for room downstream. An input
        is retried only while it has emitted nothing: a retry would duplicate
        outputs already sent on. What ``emit`` raises propagates: it is not the
        item's failure.
        """
        failed = 0
        while True:
            if self.bucket is not None:
                await self.bucket.acquire()
            outputs = gen_fn(item)
            emitted = False
            while True:
                try:
                    output = await self._next(outputs)
                except StopAsyncIteration:
                    return None
                except Exception as exc:
                    failed += 1
                    if not await self.retry_after(exc, failed, retryable=not emitted):
                        return exc
                    break  # retry with a fresh generator
                emitted = True
                # Outside the handler above: a failed send is not the item's.
                try:
                    await emit(output)
                except BaseException:
                    # The generator is suspended at its yield: close it, so its
                    # own cleanup (finally, async with) runs, even when cancelled.
                    aclose = getattr(outputs, "aclose", None)
                    if aclose is not None:
                        await self.cleanups.run(aclose)
                    raise

    async def _next(self, outputs: AsyncIterator[Any]) -> Any:
        if self.timeout is None:
            return await outputs.__anext__()
        with self.timebase.deadline(self.timeout) as scope:
            return await outputs.__anext__()
        raise self.timed_out(scope)


def _check_seconds(name: str, value: object, *, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")
