"""The flowrhythm logger: quiet by default, debug lines for lifecycle and scaling."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flowrhythm import Flow, ScalingStrategy, StageStats

pytestmark = pytest.mark.anyio


class GrowOnce(ScalingStrategy):
    min_workers = 1
    max_workers = 3
    sampling_events = 1
    sampling_period = 0.0

    def __init__(self) -> None:
        self.grown = False

    def on_enqueue(self, stats: StageStats) -> int:
        if self.grown:
            return 0
        self.grown = True
        return 2


async def _produce() -> AsyncIterator[int]:
    for item in range(20):
        yield item


async def _work(item: int) -> int:
    if item == 5:
        raise ValueError("five")
    return item


async def _sink(item: int) -> None:
    pass


def _flow() -> Flow:
    flow = Flow()
    flow.set_producer(_produce)
    flow.add_transformer(_work, scaling_strategy=GrowOnce())
    flow.set_consumer(_sink)
    return flow


async def test_quiet_by_default_except_failed_items(
    anyio_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="flowrhythm"):
        await _flow().run()
    # Without an error handler a failed item is logged, with its traceback.
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    record = caplog.records[0]
    assert "5" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)


async def test_debug_lines_for_lifecycle_and_scaling(
    anyio_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="flowrhythm"):
        await _flow().run()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert messages[0] == "flow started: _work x1, _sink x1"
    assert "stage '_work': 1 -> 3 workers" in messages
    assert messages[-1] == "flow finished (drained)"
