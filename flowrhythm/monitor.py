"""A live terminal view of a flow's stages (the ``flowrhythm[rich]`` extra).

::

    from flowrhythm.monitor import monitor

    async with monitor(flow), flow:
        await flow.start()
        ...  # the view shows the stages until the flow has finished

The view redraws a few times a second from :meth:`Flow.stats` snapshots alone, so it
costs the flow's hot path nothing. This module imports without rich installed;
drawing anything then raises :exc:`ModuleNotFoundError`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

from ._stats import StageStats

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table
    from rich.text import Text

    from ._flow import Flow

__all__ = ("FlowView", "live", "monitor")

#: one snapshot's numbers: when, items finished per stage, items that entered
_Point = tuple[float, dict[str, int], int]

#: what using the view without rich raises
RICH_MISSING = "the live view needs rich: pip install 'flowrhythm[rich]'"
#: the items/s columns average over at least this many seconds of snapshots
RATE_WINDOW = 1.0
#: cells of the utilization bar
BAR_WIDTH = 8


def _require_rich() -> None:
    try:
        import rich  # noqa: F401
    except ImportError as exc:
        raise ModuleNotFoundError(RICH_MISSING, name="rich") from exc


class FlowView:
    """A rich renderable showing one row per stage of a flow.

    :meth:`sample` takes a :meth:`Flow.stats` snapshot; rendering (``console.print``,
    ``rich.live.Live``) draws the latest one. Rates (items/s) come from the
    differences between snapshots over about a second, so sample regularly; once
    the flow has finished they are averages over the whole time the view watched.
    Subclass it and override :meth:`heading` to put your own numbers on top.

    :param flow: the flow to show, started or not
    """

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.stats: Mapping[str, StageStats] = flow.stats()
        self._history: deque[_Point] = deque()
        self._first: _Point | None = None

    @property
    def finished(self) -> bool:
        """Tell whether the flow has run and finished."""
        run = self.flow._run
        return run is not None and run.state == "finished"

    def sample(self) -> Mapping[str, StageStats]:
        """Take a snapshot of the flow's stats; return it."""
        stats = self.stats = self.flow.stats()
        now = _sampled_at(stats)
        if now is None:
            return stats
        point = (now, {name: _done(s) for name, s in stats.items()}, _entered(stats))
        if self._first is None:
            self._first = point
        history = self._history
        if history and history[-1][0] >= now:
            history[-1] = point  # the clock stood still (e.g. the run has ended)
        else:
            history.append(point)
        while len(history) > 2 and now - history[1][0] >= RATE_WINDOW:
            history.popleft()
        return stats

    def state(self) -> str:
        """Return what the flow is doing, in a word or two."""
        run = self.flow._run
        if run is None:
            return "not started"
        if run.state == "finished":
            if run.fatal is not None:
                return f"failed: {type(run.fatal).__name__}"
            return "finished"
        if run.state != "running":
            return "starting"
        if run.abort_requested:
            return "aborting"
        if run.drain_requested:
            return "draining"
        return "running"

    def heading(self) -> str:
        """Return the line above the table: the flow's state and its input rate."""
        entered = _entered(self.stats)
        text = f"flow {self.state()} · {entered:,} items in"
        rate = self._rate(None)
        if rate is not None:
            text += f" · {'avg ' if self.finished else ''}{rate:,.0f}/s"
        return text

    def table(self) -> Table:
        """Return the stage table of the latest snapshot."""
        _require_rich()
        from rich import box
        from rich.table import Table

        table = Table(
            box=box.SIMPLE_HEAD,
            show_edge=False,
            padding=0,  # the box's blank column rule separates the columns
            header_style="bold",
        )
        table.add_column("stage", max_width=12, no_wrap=True, overflow="ellipsis")
        table.add_column("workers", no_wrap=True)
        for header in ("busy", "idle", "blkd", "queue", "items/s", "errors", "dropped"):
            table.add_column(header, justify="right", no_wrap=True)
        table.add_column("scaled", no_wrap=True)
        now = _sampled_at(self.stats)
        for name, stage in self.stats.items():
            rate = self._rate(name)
            table.add_row(
                name,
                _workers(stage),
                _count(stage.busy_workers, "green"),
                _count(stage.idle_workers, ""),
                # held back: waiting for room downstream or for a rate-limit token
                _count(stage.blocked_workers + stage.throttled_workers, "yellow"),
                _count(stage.queue_length, "yellow"),
                "–" if rate is None else f"{rate:,.1f}",
                _count(stage.errors, "red"),
                _count(stage.dropped, "red"),
                _scaled(stage, now),
            )
        return table

    def __rich__(self) -> RenderableType:
        _require_rich()
        from rich.console import Group
        from rich.text import Text

        return Group(Text(self.heading(), style="bold"), self.table())

    def _rate(self, stage_name: str | None) -> float | None:
        """Items/s finished by a stage (or entering the flow, for ``None``)."""
        history = self._history
        if not history or self._first is None:
            return None
        first = self._first if self.finished else history[0]
        (start, start_done, start_in), (end, end_done, end_in) = first, history[-1]
        if end <= start:
            return None
        if stage_name is None:
            return (end_in - start_in) / (end - start)
        return (end_done[stage_name] - start_done.get(stage_name, 0)) / (end - start)


async def live(
    flow: Flow, *, refresh_per_second: float = 4.0, console: Console | None = None
) -> None:
    """Show a live view of ``flow`` in the terminal until the flow has finished.

    Can start before the flow does. Returns after drawing the final frame once the
    flow has finished; cancel it to stop watching sooner.

    :param flow: the flow to watch
    :param refresh_per_second: how often to take a snapshot and redraw
    :param console: where to draw (default: rich's console on standard output)
    :raises ModuleNotFoundError: if rich is not installed
    """
    _require_rich()
    await _Display(FlowView(flow), refresh_per_second, console).run()


@asynccontextmanager
async def monitor(
    flow: Flow, *, refresh_per_second: float = 4.0, console: Console | None = None
) -> AsyncIterator[FlowView]:
    """Show a live view of ``flow`` while the ``async with`` block runs.

    The view draws its final frame and stops when the block ends or when the flow
    has finished, whichever comes first. To watch a flow to its end, enter the
    monitor first: ``async with monitor(flow), flow:``. The arguments are those of
    :func:`live`; the block gets the :class:`FlowView`.

    :raises ModuleNotFoundError: if rich is not installed
    """
    _require_rich()
    display = _Display(FlowView(flow), refresh_per_second, console)
    failure: BaseException | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(display.run)
        try:
            yield display.view
        except BaseException as exc:
            # Re-raised below, outside the task group, so it is not wrapped in an
            # exception group.
            failure = exc
            tg.cancel_scope.cancel()
        else:
            display.stop()
    if failure is not None:
        raise failure


class _Display:
    """Redraws a view on a rich ``Live`` until the flow finishes or stop() is called.

    Refreshing is driven from this task, never from rich's refresh thread.
    """

    def __init__(
        self, view: FlowView, refresh_per_second: float, console: Console | None
    ) -> None:
        if isinstance(refresh_per_second, bool) or not refresh_per_second > 0:
            raise ValueError(
                f"refresh_per_second must be > 0, got {refresh_per_second!r}"
            )
        self.view = view
        self.period = 1.0 / refresh_per_second
        self.console = console
        self._stopping = False
        self._pause: anyio.CancelScope | None = None

    def stop(self) -> None:
        """Draw the final frame now and return from :meth:`run`."""
        self._stopping = True
        if self._pause is not None:
            self._pause.cancel()

    def _done(self) -> bool:
        return self._stopping or self.view.finished

    async def run(self) -> None:
        from rich.live import Live

        view = self.view
        view.sample()
        with Live(view, console=self.console, auto_refresh=False) as display:
            while not self._done():
                with anyio.move_on_after(self.period) as self._pause:
                    run = view.flow._run
                    if run is None:
                        await anyio.sleep_forever()
                    else:
                        await run.finished.wait()
                self._pause = None
                view.sample()
                if self._done():
                    break  # leaving Live draws the last frame
                display.refresh()


def _sampled_at(stats: Mapping[str, StageStats]) -> float | None:
    first = next(iter(stats.values()), None)
    return first.sampled_at if first is not None else None


def _done(stage: StageStats) -> int:
    return stage.processed + stage.errors


def _entered(stats: Mapping[str, StageStats]) -> int:
    # What entered the first stage: taken by a worker, or still queued.
    first = next(iter(stats.values()), None)
    return first.received + first.queue_length if first is not None else 0


def _count(value: int, style: str) -> Text:
    from rich.text import Text

    return Text(str(value), style=style if value else "dim")


def _workers(stage: StageStats) -> Text:
    """The pool size, then a bar: busy workers solid, held-back ones (blocked or
    throttled) shaded, idle dots.

    The solid part is the stage's utilization.
    """
    from rich.text import Text

    total = stage.total_workers()
    busy = held = 0
    if total:
        busy = round(BAR_WIDTH * stage.busy_workers / total)
        held = round(BAR_WIDTH * (total - stage.idle_workers) / total) - busy
    text = Text(f"{total:>3} ")
    text.append("█" * busy, style="green")
    text.append("▒" * held, style="yellow")
    text.append("·" * (BAR_WIDTH - busy - held), style="dim")
    return text


def _scaled(stage: StageStats, now: float | None) -> Text:
    """The last scale event: its direction and how long ago it was."""
    from rich.text import Text

    up, down = stage.last_scale_up_at, stage.last_scale_down_at
    if now is None or (up is None and down is None):
        return Text("–", style="dim")
    if down is None or (up is not None and up >= down):
        arrow, at, style = "↑", up, "green"
    else:
        arrow, at, style = "↓", down, "cyan"
    assert at is not None
    text = Text(arrow, style=style)
    text.append(f" {_age(now - at)} ago")
    return text


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    if seconds < 59.5:
        return f"{seconds:.0f}s"
    if seconds < 3570:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"
