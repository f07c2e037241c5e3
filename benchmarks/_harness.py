"""Shared benchmark machinery: backends, timing, medians, tables, machine info, JSON."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import anyio

#: every backend a benchmark knows, in the order tables are printed
BACKENDS = ("asyncio", "uvloop", "trio")

#: ``async def run(n_items, workers) -> None``, raising if the result is wrong
Workload = Callable[[int, int], Awaitable[None]]


@dataclass(frozen=True)
class Backend:
    """How ``anyio.run`` is called for one of :data:`BACKENDS`."""

    name: str
    anyio_backend: str
    options: Mapping[str, Any] = field(default_factory=dict)


def backend(name: str) -> Backend:
    if name == "asyncio":
        return Backend("asyncio", "asyncio")
    if name == "uvloop":
        return Backend("uvloop", "asyncio", {"use_uvloop": True})
    if name == "trio":
        return Backend("trio", "trio")
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


def backend_available(name: str) -> bool:
    """False when the backend's event loop package is not installed."""
    if name == "asyncio":
        return True
    return importlib.util.find_spec(name) is not None


def parse_csv(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``"""
    return [part.strip() for part in text.split(",") if part.strip()]


# -- timing -------------------------------------------------------------------------


async def _timed(fn: Workload, n_items: int, workers: int) -> float:
    # Timed inside the event loop, so loop creation and teardown are not counted.
    start = time.perf_counter()
    await fn(n_items, workers)
    return time.perf_counter() - start


def measure(where: Backend, fn: Workload, n_items: int, workers: int) -> float:
    """Run ``fn`` once in a fresh event loop; return its wall time in seconds."""
    # Start every sample from the same heap state, so one contender's garbage is
    # not collected on the next one's clock.
    gc.collect()
    return anyio.run(
        _timed,
        fn,
        n_items,
        workers,
        backend=where.anyio_backend,
        backend_options=dict(where.options),
    )


@dataclass
class Result:
    """All samples of one contender on one backend with one worker count."""

    backend: str
    workers: int
    contender: str
    items: int
    stages: int
    seconds: list[float] = field(default_factory=list)
    #: median time relative to the reference contender's (filled in by the runner)
    ratio: float | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def items_per_s(self) -> float:
        return self.items / self.median_s

    @property
    def us_per_item(self) -> float:
        return self.median_s / self.items * 1e6

    @property
    def us_per_item_stage(self) -> float:
        return self.us_per_item / self.stages

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: how noisy the samples were."""
        if len(self.seconds) < 2:
            return 0.0
        return (max(self.seconds) - min(self.seconds)) / self.median_s

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            median_s=self.median_s,
            items_per_s=self.items_per_s,
            us_per_item=self.us_per_item,
            us_per_item_stage=self.us_per_item_stage,
            spread=self.spread,
        )
        return data


def set_ratios(results: Iterable[Result], reference: str) -> None:
    """Set each result's ratio to the reference contender's median time, within
    the same backend and worker count."""
    results = list(results)
    medians = {
        (r.backend, r.workers): r.median_s for r in results if r.contender == reference
    }
    for r in results:
        ref = medians.get((r.backend, r.workers))
        r.ratio = r.median_s / ref if ref else None


# -- reporting ----------------------------------------------------------------------


def _version_of(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers depend on, recorded next to them."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "flowrhythm_source": source_info(),
        "versions": {
            dist: _version_of(dist)
            for dist in ("flowrhythm", "anyio", "trio", "uvloop")
        },
    }


def source_info(package: str = "flowrhythm") -> dict[str, Any]:
    """Where the benchmarked package was imported from and, if that is a git
    checkout, which commit and whether it had local changes: results are only
    comparable between runs of the same code."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        return {"path": None, "commit": None, "dirty": None}
    where = Path(spec.origin).parent
    info: dict[str, Any] = {"path": str(where), "commit": None, "dirty": None}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=where, capture_output=True, text=True, check=True, timeout=10,
        )  # fmt: skip
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "."],
            cwd=where, capture_output=True, text=True, check=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return info  # not a git checkout (e.g. installed from a wheel)
    info["commit"] = commit.stdout.strip()
    info["dirty"] = bool(status.stdout.strip())
    return info


def format_machine(info: Mapping[str, Any]) -> str:
    versions = ", ".join(
        f"{dist} {ver or 'not installed'}" for dist, ver in info["versions"].items()
    )
    cpus = f"{info['cpu_count']} CPUs"
    if info["usable_cpus"] not in (None, info["cpu_count"]):
        cpus += f" ({info['usable_cpus']} usable)"
    source = info["flowrhythm_source"]
    code = f"flowrhythm from {source['path']}"
    if source["commit"]:
        code += f" (git {source['commit']}{', modified' if source['dirty'] else ''})"
    return (
        f"machine: {cpus}, {info['cpu']}\n"
        f"         {info['python']} on {info['platform']}\n"
        f"         {versions}\n"
        f"         {code}"
    )


def format_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]
) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [
        max(len(headers[i]), *(len(row[i]) for row in rows))
        for i in range(len(headers))
    ]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [first.ljust(widths[0])]
        parts += [
            cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([title, line(headers), rule, *(line(row) for row in rows)])


def write_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def progress(message: str) -> None:
    """A transient status line on stderr (only on a terminal: logs stay clean)."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{message}")
        sys.stderr.flush()
