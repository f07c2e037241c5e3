"""A flaky, rate-limited service, called with a rate limit, a timeout and retries.

``FakeService`` stands in for an HTTP API: a call takes 10-30 ms, some calls
fail with ``TransientError`` (think 503), a few hang, and any call beyond the
service's quota fails with ``TooManyRequests`` (think 429). The ``fetch`` stage
calls it from four workers with:

- ``rate_limit=RateLimit(...)``: one token bucket shared by the four workers, so
  more workers can never mean more calls per second than the quota;
- ``timeout=...``: a call that hangs is cancelled and the worker goes on;
- ``retry=Retry(...)``: transient errors and timeouts get more attempts, after a
  short, growing wait. Each attempt takes a token of the rate limit.

At the end it prints the stage's counters and what the service saw: every call,
and not one over its quota.

Run it with ``python examples/rate_limited_api.py [asyncio|trio]``.
"""

from __future__ import annotations

import random
import sys
from collections.abc import AsyncIterator
from typing import NamedTuple

import anyio

from flowrhythm import FixedScaling, Flow, RateLimit, Retry, StageStats


class TransientError(Exception):
    """The service failed this call; the next one may succeed."""


class TooManyRequests(Exception):
    """The call went over the service's quota."""


class FakeService:
    """An in-process service with a quota: ``per_second`` calls a second, in
    bursts of at most ``burst`` (a token bucket, as real APIs often use).

    The random draws come from a seeded generator, so the N-th call fails or
    hangs the same way on every run.
    """

    def __init__(
        self,
        *,
        per_second: float,
        burst: int,
        seed: int = 7,
        failure_rate: float = 0.15,
        hang_rate: float = 0.05,
    ) -> None:
        self.per_second = per_second
        self.burst = burst
        self.failure_rate = failure_rate
        self.hang_rate = hang_rate
        self.random = random.Random(seed)
        self.calls = 0
        self.over_quota = 0
        self._tokens = float(burst)
        self._updated: float | None = None

    async def get(self, key: int) -> int:
        self.calls += 1
        self._spend_token()
        draw = self.random.random()
        latency = self.random.uniform(0.01, 0.03)
        if draw < self.hang_rate:
            await anyio.sleep(60)  # only the caller's timeout ends this call
        await anyio.sleep(latency)
        if draw < self.hang_rate + self.failure_rate:
            raise TransientError(f"503 Service Unavailable (key {key})")
        return key * key

    def _spend_token(self) -> None:
        now = anyio.current_time()
        if self._updated is not None:
            elapsed = now - self._updated
            self._tokens = min(self.burst, self._tokens + elapsed * self.per_second)
        self._updated = now
        if self._tokens < 1.0:
            self.over_quota += 1
            raise TooManyRequests("429 Too Many Requests")
        self._tokens -= 1.0


class Outcome(NamedTuple):
    fetched: dict[int, int]  # key -> value
    failed: list[int]  # the keys that ran out of attempts
    stats: StageStats  # the fetch stage's counters
    service: FakeService


async def main(requests: int = 30, per_second: float = 20.0) -> Outcome:
    # The service allows bursts of 5; the flow uses 4. The limiter decides when a
    # call may start, and a busy event loop may start one a little late, close to
    # the next: one call of headroom in the burst absorbs that.
    service = FakeService(per_second=per_second, burst=5)
    fetched: dict[int, int] = {}
    failed: list[int] = []

    async def keys() -> AsyncIterator[int]:
        for key in range(requests):
            yield key

    async def fetch(key: int) -> tuple[int, int]:
        return key, await service.get(key)

    async def store(pair: tuple[int, int]) -> None:
        key, value = pair
        fetched[key] = value

    async def give_up(key: int, exc: BaseException) -> None:
        # The exception carries a note with the number of attempts made.
        failed.append(key)
        notes = "; ".join(getattr(exc, "__notes__", ()))
        print(f"key {key}: {exc!r} ({notes})")

    flow = Flow()
    flow.set_producer(keys)
    flow.add_transformer(
        fetch,
        scaling_strategy=FixedScaling(4),  # more than the quota needs
        rate_limit=RateLimit(per_second=per_second, burst=4),
        timeout=0.2,  # a normal call takes at most 30 ms
        retry=Retry(
            attempts=4,
            on=(TransientError, TimeoutError),  # not TooManyRequests: a bug here
            backoff=0.05,  # 50 ms, then 100 ms, then 200 ms (with jitter)
        ),
    )
    flow.set_consumer(store)
    flow.set_error_handler(give_up)
    await flow.run()

    stats = flow.stats()["fetch"]
    print(f"fetched {len(fetched)} of {requests} keys, {len(failed)} gave up")
    print(
        f"fetch: {stats.retries} retries, {stats.timeouts} timeouts, "
        f"{stats.throttled_waits} throttled waits, {stats.errors} errors"
    )
    print(
        f"the service saw {service.calls} calls, {service.over_quota} over its "
        f"quota of {per_second:g}/s"
    )
    return Outcome(fetched, failed, stats, service)


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
