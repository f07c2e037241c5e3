"""The validated, immutable description of a flow that one run executes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from ._callables import StageCallable
from ._cleanup import Cleanups
from ._operators import RateLimit, Retry
from .scaling import ScalingStrategy

Source = Callable[[Cleanups], AbstractAsyncContextManager[AsyncIterator[Any]]]


@dataclass(frozen=True, slots=True)
class StagePlan:
    name: str
    kind: str  # "transformer", "filter", "batch" or "consumer"
    call: StageCallable
    #: the strategy as configured (None: the flow's default at start time)
    scaling: ScalingStrategy | None
    #: the input buffer size (None: the flow's default at start time)
    buffer_size: int | None
    #: the callable is an async generator function: 0..n outputs per input
    fan_out: bool = False
    ordered: bool = False
    timeout: float | None = None
    retry: Retry | None = None
    rate_limit: RateLimit | None = None
    #: for a batch stage: the largest batch, and how long a partial one may wait
    max_size: int = 0
    max_wait: float | None = None

    @property
    def loop(self) -> str:
        """Which worker loop runs this stage; chosen once, from the options used."""
        if self.kind != "transformer":
            return self.kind
        if self.ordered:
            return "ordered"
        return "fan_out" if self.fan_out else "map"

    @property
    def options(self) -> dict[str, object]:
        """The operator options that differ from their defaults, for describe()."""
        options: dict[str, object] = {}
        if self.fan_out:
            options["fan_out"] = True
        if self.ordered:
            options["ordered"] = True
        if self.kind == "batch":
            options["max_size"] = self.max_size
            if self.max_wait is not None:
                options["max_wait"] = self.max_wait
        for key in ("timeout", "retry", "rate_limit"):
            value = getattr(self, key)
            if value is not None:
                options[key] = value
        return options


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
