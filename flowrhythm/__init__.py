"""flowrhythm: asynchronous, auto-scaling job pipelines on AnyIO."""

from __future__ import annotations

from ._flow import Flow as Flow
from ._operators import RateLimit as RateLimit
from ._operators import Retry as Retry
from ._stats import StageStats as StageStats
from ._types import Consumer as Consumer
from ._types import ErrorHandler as ErrorHandler
from ._types import Producer as Producer
from ._types import Transformer as Transformer
from .scaling import FixedScaling as FixedScaling
from .scaling import ScalingPolicy as ScalingPolicy
from .scaling import ScalingStrategy as ScalingStrategy
from .scaling import UtilizationScaling as UtilizationScaling

__version__ = "0.1.0"

__all__ = (
    "Consumer",
    "ErrorHandler",
    "FixedScaling",
    "Flow",
    "Producer",
    "RateLimit",
    "Retry",
    "ScalingPolicy",
    "ScalingStrategy",
    "StageStats",
    "Transformer",
    "UtilizationScaling",
    "__version__",
)

# Public objects say they live here, not in the private module that defines them.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("flowrhythm."):
        _obj.__module__ = __name__
del _name, _obj
