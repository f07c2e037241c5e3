"""The scripts in examples/ run and do what they say, with small parameters."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

if not EXAMPLES.is_dir():  # e.g. testing an sdist without the examples
    pytest.skip("examples/ is not here", allow_module_level=True)


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` afresh (its ``__main__`` block does not run)."""
    spec = importlib.util.spec_from_file_location(
        f"flowrhythm_example_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested() -> None:
    tested = {"basic", "context_managers", "trio_nursery", "autoscaling"}
    tested |= {"error_handling"}
    assert {path.stem for path in EXAMPLES.glob("*.py")} == tested


def test_basic(capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(load("basic").main())
    lines = capsys.readouterr().out.splitlines()
    # Two workers double the numbers, so the order may vary.
    assert sorted(lines) == sorted(f"Got: {2 * i}" for i in range(10))


@pytest.mark.anyio
async def test_context_managers(
    anyio_backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    module = load("context_managers")
    found = await module.main(users=20)
    assert sorted(user["id"] for user in found) == list(range(20))
    assert {user["via"] for user in found} <= {1, 2, 3}
    out = capsys.readouterr().out
    assert len(re.findall(r"connection \d opened", out)) == 3
    assert len(re.findall(r"connection \d closed", out)) == 3
    assert out.endswith("found 20 users; connections still open: 0\n")


def test_trio_nursery(capsys: pytest.CaptureFixture[str]) -> None:
    trio = pytest.importorskip("trio")
    done = trio.run(load("trio_nursery").main, 6)
    assert sorted(done) == sorted(f"thumbnail-{n}.png" for n in range(6))
    out = capsys.readouterr().out
    assert "the flow is running: <Flow resize -> upload (running)>" in out
    assert out.endswith(
        "6 thumbnails uploaded; the flow is finished: "
        "<Flow resize -> upload (finished)>\n"
    )


@pytest.mark.anyio
async def test_autoscaling(
    anyio_backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = await load("autoscaling").main(burst=120, calm_seconds=0.5)
    assert max(seen) >= 4  # the burst made the stage grow
    out = capsys.readouterr().out
    assert re.search(r"t= 0\.\ds  fetch:  1 workers", out)
    assert f"fetch peaked at {max(seen)} workers" in out


@pytest.mark.anyio
async def test_error_handling(
    anyio_backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    module = load("error_handling")
    await module.main(("5", "x", "7"))
    assert capsys.readouterr().out == (
        "skipped 'x': ValueError(\"invalid literal for int() with base 10: 'x'\")\n"
        "total: 12\n"
        "the source failed: the connection was reset "
        "(flowrhythm: raised by the producer)\n"
    )
    with pytest.raises(ConnectionError):
        await module.sum_from_network()


@pytest.mark.parametrize("name", ["basic", "error_handling"])
def test_runs_as_a_script(name: str) -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
