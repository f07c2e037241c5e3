"""The live view (flowrhythm.monitor, the ``rich`` extra) and the demo that uses it.

Tests that draw need rich and are skipped without it; the others run either way.
"""

from __future__ import annotations

import importlib
import io
import sys
from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from flowrhythm import FixedScaling, Flow, StageStats, UtilizationScaling
from flowrhythm.monitor import RICH_MISSING, FlowView, live, monitor

if TYPE_CHECKING:
    from rich.console import Console

pytestmark = pytest.mark.anyio


def console() -> Console:
    """An 80-column console writing to a string (skips the test without rich)."""
    rich_console = pytest.importorskip("rich.console")
    return rich_console.Console(file=io.StringIO(), width=80)  # type: ignore[no-any-return]


def output(console: Console) -> str:
    file = console.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()


def build_flow(items: int | None = None, *, pause: float = 0.001) -> Flow:
    """produce -> fetch (scales) -> check (fails on multiples of 7) -> save."""

    async def produce() -> AsyncIterator[int]:
        number = 0
        while items is None or number < items:
            yield number
            number += 1
            await anyio.sleep(pause)

    async def fetch(item: int) -> int:
        await anyio.sleep(0.01)
        return item

    async def check(item: int) -> int:
        if item % 7 == 0:
            raise ValueError(item)
        return item

    async def save(item: int) -> None:
        pass

    async def on_error(item: int, exc: BaseException) -> None:
        pass

    flow = Flow()
    flow.set_producer(produce)
    flow.add_transformer(
        fetch,
        scaling_strategy=UtilizationScaling(
            max_workers=6, sampling_period=0.05, sampling_events=4
        ),
    )
    flow.add_transformer(check)
    flow.set_consumer(save)
    flow.set_error_handler(on_error)
    return flow


def assert_frame(text: str, *, heading: str) -> None:
    lines = text.splitlines()
    assert lines[0].startswith(heading), text
    assert lines[1].split() == [
        "stage", "workers", "busy", "idle", "blkd", "queue", "items/s", "errors",
        "dropped", "scaled",
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[3:6]] == ["fetch", "check", "save"]
    assert all(len(line) <= 80 for line in lines), text


async def test_a_frame_of_a_running_flow(anyio_backend: Any) -> None:
    flow = build_flow()
    view = FlowView(flow)
    async with flow:
        await flow.start()
        for _ in range(5):
            await anyio.sleep(0.05)
            view.sample()
        out = console()
        out.print(view)
        await flow.stop()
    text = output(out)
    assert_frame(text, heading="flow running · ")
    fetch = text.splitlines()[3].split()
    assert int(fetch[1]) >= 1  # workers
    assert float(fetch[7].replace(",", "")) > 0  # items/s


async def test_a_frame_before_the_start() -> None:
    out = console()
    out.print(FlowView(build_flow()))
    text = output(out)
    assert_frame(text, heading="flow not started · 0 items in")
    assert text.splitlines()[3].split() == [
        "fetch", "0", "········", "0", "0", "0", "0", "–", "0", "0", "–",
    ]  # fmt: skip


async def test_rates_come_from_successive_snapshots(anyio_backend: Any) -> None:
    now = [0.0]
    step, end = anyio.Event(), anyio.Event()

    async def produce() -> AsyncIterator[int]:
        for number in range(10):
            if number == 5:
                await step.wait()
            yield number
        await end.wait()

    async def keep(item: int) -> None:
        pass

    flow = Flow(clock=lambda: now[0])
    flow.set_producer(produce)
    flow.set_consumer(keep, scaling_strategy=FixedScaling(1))
    view = FlowView(flow)

    async def processed(count: int) -> None:
        while flow.stats()["keep"].processed < count:
            await anyio.sleep(0.001)

    async with flow:
        await flow.start()
        await processed(5)
        now[0] = 10.0
        view.sample()
        step.set()
        await processed(10)
        now[0] = 12.0
        view.sample()
        out = console()
        out.print(view)
        end.set()
    assert output(out).splitlines()[0] == "flow running · 10 items in · 2/s"
    assert output(out).splitlines()[3].split()[7] == "2.5"
    now[0] = 20.0  # the run ended at 12.0
    view.sample()  # averages over the time the view watched: from 10.0 to 12.0
    out = console()
    out.print(view)
    assert output(out).splitlines()[0] == "flow finished · 10 items in · avg 2/s"
    assert output(out).splitlines()[3].split()[7] == "2.5"


@pytest.mark.parametrize(
    ("up", "down", "now", "expected"),
    [
        (None, None, 5.0, "–"),
        (2.0, None, 4.1, "↑ 2.1s ago"),
        (2.0, 3.0, 4.0, "↓ 1.0s ago"),
        (50.0, 3.0, 75.0, "↑ 25s ago"),
        (0.0, None, 600.0, "↑ 10m ago"),
        (0.0, None, 7200.0, "↑ 2h ago"),
        (1.0, None, None, "–"),
    ],
)
def test_last_scale_event(
    up: float | None, down: float | None, now: float | None, expected: str
) -> None:
    pytest.importorskip("rich")
    from flowrhythm.monitor import _scaled

    stats = StageStats(
        stage_name="s", busy_workers=1, idle_workers=0, blocked_workers=0,
        queue_length=0, oldest_item_enqueued_at=None, last_enqueue_at=None,
        last_dequeue_at=None, last_scale_up_at=up, last_scale_down_at=down,
        last_error_at=None, received=0, processed=0, errors=0, dropped=0,
    )  # fmt: skip
    assert _scaled(stats, now).plain == expected


async def test_live_returns_once_the_flow_has_finished(anyio_backend: Any) -> None:
    flow = build_flow(items=200)
    out = console()
    async with anyio.create_task_group() as tg:
        tg.start_soon(flow.run)
        with anyio.fail_after(10):
            await live(flow, console=out, refresh_per_second=20)
        assert repr(flow).endswith("(finished)>")
    text = output(out)  # a console that is not a terminal gets the last frame only
    assert_frame(text, heading="flow finished · 200 items in · avg ")
    save = text.splitlines()[5].split()
    assert save[0] == "save"
    assert int(save[8]) == 0  # nothing dropped


async def test_live_can_start_before_the_flow(anyio_backend: Any) -> None:
    flow = build_flow(items=20)
    out = console()
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(live, flow, console=out, refresh_per_second=10))
        await anyio.sleep(0.15)
        await flow.run()
    assert_frame(output(out), heading="flow finished · 20 items in")


async def test_live_stops_when_cancelled(anyio_backend: Any) -> None:
    flow = build_flow()
    out = console()
    with anyio.move_on_after(0.1):
        await live(flow, console=out)
    assert_frame(output(out), heading="flow not started")


async def test_monitor_ends_with_the_block(anyio_backend: Any) -> None:
    flow = build_flow()
    out = console()
    async with flow, monitor(flow, console=out, refresh_per_second=20) as view:
        await flow.start()
        await anyio.sleep(0.2)
        assert isinstance(view, FlowView)
        with anyio.fail_after(5):
            await flow.stop(drain=False)
    assert_frame(output(out), heading="flow finished · ")


async def test_monitor_as_a_flow_method(anyio_backend: Any) -> None:
    flow = build_flow(items=30)
    out = console()
    async with flow.monitor(console=out), flow:
        await flow.start()
    # Leaving "async with flow" waited for the flow: the view saw it finish.
    assert_frame(output(out), heading="flow finished · 30 items in")


async def test_monitor_lets_errors_through_as_themselves(anyio_backend: Any) -> None:
    flow = build_flow()

    async def watch_and_fail() -> None:
        async with flow, monitor(flow, console=console()):
            await flow.start()
            raise ConnectionError("lost")

    with pytest.raises(ConnectionError, match="lost"):
        await watch_and_fail()


async def test_monitor_leaves_when_cancelled(anyio_backend: Any) -> None:
    flow = build_flow()
    out = console()
    with anyio.move_on_after(0.2) as scope:
        async with flow, monitor(flow, console=out):
            await flow.start()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert_frame(output(out), heading="flow ")


async def test_refresh_rate_must_be_positive() -> None:
    pytest.importorskip("rich")
    with pytest.raises(ValueError, match="refresh_per_second must be > 0, got 0"):
        await live(build_flow(), refresh_per_second=0)


async def test_without_rich(
    anyio_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.delitem(sys.modules, "flowrhythm.monitor")
    module = importlib.import_module("flowrhythm.monitor")  # imports without rich
    assert RICH_MISSING == "the live view needs rich: pip install 'flowrhythm[rich]'"
    flow = build_flow()
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'flowrhythm\[rich\]'"):
        await module.live(flow)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'flowrhythm\[rich\]'"):
        async with module.monitor(flow):
            pass
    with pytest.raises(ImportError, match=r"the live view needs rich"):
        module.FlowView(flow).table()


# -- the demo's live view -------------------------------------------------------------


async def test_demo_live_view(anyio_backend: Any) -> None:
    from flowrhythm._demo import run_demo

    out = console()
    summary = await run_demo(0.6, seed=3, console=out)
    assert summary.conserved
    text = output(out)
    assert text.startswith("t=  0.6s  flow finished · "), text
    assert [line.split()[0] for line in text.splitlines()[3:6]] == [
        "fetch", "validate", "store",
    ]  # fmt: skip
    assert all(len(line) <= 80 for line in text.splitlines())


def test_demo_command_plain(capsys: pytest.CaptureFixture[str]) -> None:
    from flowrhythm.__main__ import main

    assert main(["demo", "--duration", "1", "--seed", "1", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "t=  1.0s  produced" in out
    assert "produced == consumed + errors + dropped: ok" in out
    assert "·" not in out  # the text report, not the live view


def test_demo_command_without_a_terminal_is_plain(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from flowrhythm.__main__ import main

    assert main(["demo", "--duration", "0.5", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "t=  0.5s  produced" in out
