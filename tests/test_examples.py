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
    tested |= {"error_handling", "rate_limited_api", "bulk_insert", "ordered"}
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
    # The first sample may come before the stage's first worker started (trio
    # runs tasks in random order); the stage starts with one worker.
    assert re.search(r"t= 0\.0s  fetch:  [01] workers", out)
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


@pytest.mark.anyio
async def test_rate_limited_api(
    anyio_backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = await load("rate_limited_api").main(requests=20, per_second=50.0)
    stats, service = outcome.stats, outcome.service
    assert service.over_quota == 0
    assert sorted([*outcome.fetched, *outcome.failed]) == list(range(20))
    assert all(value == key * key for key, value in outcome.fetched.items())
    # One call per attempt: the first ones and the retries.
    assert service.calls == 20 + stats.retries
    assert (stats.received, stats.processed, stats.emitted) == (
        20,
        len(outcome.fetched),
        len(outcome.fetched),
    )
    assert (stats.errors, stats.dropped) == (len(outcome.failed), 0)
    # The seeded service fails calls 3, 5, ... and hangs call 4 of its first 20,
    # and 4 workers against a burst of 4 wait for tokens.
    assert stats.retries >= 5
    assert stats.timeouts >= 1
    assert stats.throttled_waits >= 1
    assert stats.throttled_workers == 0  # a snapshot of the finished run
    out = capsys.readouterr().out
    assert (
        f"fetch: {stats.retries} retries, {stats.timeouts} timeouts, "
        f"{stats.throttled_waits} throttled waits, {stats.errors} errors\n"
    ) in out
    assert out.endswith(
        f"the service saw {service.calls} calls, 0 over its quota of 50/s\n"
    )
    assert out.count("gave up after 4 attempts") == len(outcome.failed)


@pytest.mark.anyio
async def test_bulk_insert(
    anyio_backend: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    stored = await load("bulk_insert").main(bursts=3, burst_size=70, pause=0.05)
    assert stored == 208  # readings 99 and 199 are refused
    out = capsys.readouterr().out
    rejected = re.findall(
        r"rejected reading (\d+) \(value -1.0\): CHECK constraint", out
    )
    assert rejected == ["99", "199"]
    sizes = [int(size) for size in re.search(r"batches: (.*)", out)[1].split(", ")]
    assert sum(sizes) == 210
    assert max(sizes) == 50
    assert min(sizes[:-1]) < 50  # a quiet period sent a batch before it was full
    assert "2 batches rolled back and inserted row by row" in out
    assert f"batch stage: 210 rows in {len(sizes)} batches; insert_row: " in out
    assert "2 rejected\n208 of 210 readings stored\n" in out


@pytest.mark.anyio
async def test_ordered(anyio_backend: Any, capsys: pytest.CaptureFixture[str]) -> None:
    module = load("ordered")
    received = await module.main(items=200)
    assert received == [
        (number, tag)
        for number in range(200)
        if number % 100 != 99 and number % 3 != 0
        for tag in ("a", "b")
    ]
    out = capsys.readouterr().out
    assert "ordered=True: 264 items, 0 after a later one, in input order: True\n" in out
    peaks = re.findall(r"lookup (\d+) \(at most 4 x 16 = 64\), expand (\d+)", out)
    assert peaks[0] == ("0", "0")  # the unordered run keeps no window
    lookup_peak, expand_peak = map(int, peaks[1])
    assert 1 <= lookup_peak <= 64
    assert 1 <= expand_peak <= 16


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


def test_runs_as_a_script_on_trio() -> None:
    """The new examples take the event loop as an argument."""
    pytest.importorskip("trio")
    import subprocess

    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "ordered.py"), "trio"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "ordered=True: 528 items, 0 after a later one, in input order: True" in (
        result.stdout
    )
