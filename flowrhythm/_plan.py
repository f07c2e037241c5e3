"""The validated, immutable description of a flow that one run executes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from ._callables import StageCallable
from ._cleanup import Cleanups
from .scaling import ScalingStrategy

Source = Callable[[Cleanups], AbstractAsyncContextManager[AsyncIterator[Any]]]


@dataclass(frozen=True, slots=True)
class StagePlan:
    name: str
    kind: str  # "transformer" or "consumer"
    call: StageCallable
    #: the strategy as configured (None: the flow's default at start time)
    scaling: ScalingStrategy | None
    #: the input buffer size (None: the flow's default at start time)
    buffer_size: int | None


@dataclass(frozen=True, slots=True)
class Plan:
    source: Source
    stages: tuple[StagePlan, ...]
    error_handler: StageCallable | None
    default_scaling: ScalingStrategy
    default_buffer_size: int
    clock: Callable[[], float] | None

    def scaling_for(self, stage: StagePlan) -> ScalingStrategy:
        strategy = stage.scaling if stage.scaling is not None else self.default_scaling
        return strategy.for_stage(stage.name)

    def buffer_for(self, stage: StagePlan) -> int:
        if stage.buffer_size is not None:
            return stage.buffer_size
        return self.default_buffer_size
