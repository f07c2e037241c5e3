from __future__ import annotations

import os
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# The default run stays quick; `nox -s stress` sets FLOWRHYTHM_HYPOTHESIS=stress.
_COMMON: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow],
}
settings.register_profile("default", max_examples=25, **_COMMON)
settings.register_profile("stress", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("FLOWRHYTHM_HYPOTHESIS", "default"))

_BACKENDS: list[Any] = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param("trio", id="trio"),
]
if sys.platform == "win32":  # uvloop does not exist there
    del _BACKENDS[1]


@pytest.fixture(params=_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param
