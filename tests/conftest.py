from __future__ import annotations

import gc
import os
import sys
import warnings
from collections.abc import Iterator
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


@pytest.fixture(autouse=True)
def _no_leaked_resources() -> Iterator[None]:
    """Collect garbage after each test so an unclosed stream is blamed on the test
    that leaked it, with a readable message."""
    yield
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, f"the flow leaked resources: {leaks}"
