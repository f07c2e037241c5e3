"""The worker loops of the operator stages: filter, fan-out and batch.

Plain transformers and the consumer run the two hot loops in ``_stage``; an
ordered stage runs the loop in ``_ordered``. Each stage's loop is picked once,
from its options, before the run starts, so an option nobody uses costs
nothing per item.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._stage import Stage

#: a worker that never has to wait still yields to the event loop this often, so
#: other tasks run and cancellation is seen within this many items
CHECKPOINT_EVERY = 64

#: what a blocking receive returns instead of an item
END = object()  # the input is exhausted
RETIRED = object()  # the scaler retired this idle worker
TIMED_OUT = object()  # a batch's max_wait passed first

ItemCall = Callable[[Any], Awaitable[Any]]


async def filter_loop(stage: Stage, predicate: ItemCall) -> None:
    """Pass on the items for which ``predicate`` is true; count the others."""
    predicate = stage.policy.wrap(predicate)
    counters = stage.counters
    on_error = stage.run.route_error
    offer = stage.offer
    budget = CHECKPOINT_EVERY
    item = await stage.receive_blocking()
    while item is not END and item is not RETIRED:
        stage.took()
        try:
            keep = await predicate(item)
        except Exception as exc:
            await on_error(stage, item, exc)
        else:
            counters.processed += 1
            if not keep:
                counters.filtered += 1
            elif not offer(item):
                await stage.send_blocking(item)
        del item
        budget -= 1
        if not budget:  # (inline: a helper coroutine per item costs more)
            budget = CHECKPOINT_EVERY
            await stage.pause()
        item = await stage.take()
    stage.exhausted = item is END


async def fan_out_loop(stage: Stage, gen_fn: Callable[[Any], Any]) -> None:
    """Send on every output an async generator yields for each input, as soon
    as it is yielded. An input that fails goes to the error handler; what it
    yielded before failing stays downstream."""
    policy = stage.policy
    counters = stage.counters
    on_error = stage.run.route_error
    emit = stage.emit
    budget = CHECKPOINT_EVERY
    item = await stage.receive_blocking()
    while item is not END and item is not RETIRED:
        stage.took()
        failure = await policy.fan_out(gen_fn, item, emit)
        if failure is None:
            counters.processed += 1
        else:
            await on_error(stage, item, failure)
        del item
        budget -= 1
        if not budget:
            budget = CHECKPOINT_EVERY
            await stage.pause()
        item = await stage.take()
    stage.exhausted = item is END


async def batch_loop(stage: Stage, _unused: object) -> None:
    """Group items into lists of up to ``max_size``; send a partial list once
    ``max_wait`` seconds have passed since its first item, and at the end of the
    input. One task: a batch stage never scales."""
    plan = stage.plan
    max_size, max_wait = plan.max_size, plan.max_wait
    counters = stage.counters
    timebase = stage.run.timebase
    now = timebase.now
    inbox = stage.inbox
    batch: list[Any] = []
    opened = 0.0  # when the pending batch took its first item

    async def flush() -> None:
        nonlocal batch
        full, batch = batch, []
        counters.processed += len(full)
        await stage.emit(full)

    async def receive_until_due() -> Any:
        assert max_wait is not None
        with timebase.deadline(max(opened + max_wait - now(), 0.0)) as scope:
            return await inbox.receive()
        assert scope.cancelled_caught
        return TIMED_OUT

    budget = CHECKPOINT_EVERY
    item = await stage.receive_blocking()
    while True:
        if item is TIMED_OUT:
            await flush()
            item = await stage.take()
            continue
        if item is END or item is RETIRED:
            break
        stage.took()
        if not batch and max_wait is not None:
            opened = now()
        batch.append(item)
        del item
        if len(batch) >= max_size or (
            max_wait is not None and now() - opened >= max_wait
        ):
            await flush()
        budget -= 1
        if not budget:
            budget = CHECKPOINT_EVERY
            await stage.pause()
        item = await stage.take(
            receive_until_due if batch and max_wait is not None else None
        )
    stage.exhausted = item is END
    if batch and item is END:
        await flush()  # the input ended (a drain): the partial batch goes on
