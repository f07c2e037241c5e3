"""Shared benchmark machinery: backends, timing, medians, tables, machine info, JSON."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
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


# -- contenders ---------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """One pipeline implementation the throughput benchmark races."""

    name: str
    run: Workload
    #: the backends it can run on (asyncio.Queue needs an asyncio event loop)
    backends: tuple[str, ...] = BACKENDS
    #: modules it imports: a missing one turns its rows into "not installed"
    requires: tuple[str, ...] = ()
    #: what to ``pip install`` for it, named in the "not installed" note
    pip: tuple[str, ...] = ()
    #: the oldest Python it runs on; an older interpreter runs it in a child
    #: process of a newer one (see :func:`find_python`)
    min_python: tuple[int, int] = (3, 10)
    #: a peer library: it runs ``--peer-items`` items, as some take 100+ µs each
    peer: bool = False

    def missing(self) -> list[str]:
        """The required modules this interpreter cannot import."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


# -- a second interpreter, for contenders that need a newer Python ------------------

#: the package directory's parent: a child process imports ``benchmarks`` and
#: ``flowrhythm`` from here, so it measures the same source as the parent
REPO_ROOT = Path(__file__).resolve().parent.parent
#: names an interpreter for contenders that need a newer Python than this one
PYTHON_ENV = "FLOWRHYTHM_BENCH_PYTHON"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p
    )
    return env


def python_candidates(min_python: tuple[int, int]) -> list[str]:
    """Where to look for an interpreter of ``min_python`` or newer, in order:
    ``$FLOWRHYTHM_BENCH_PYTHON``, a sibling of the running virtualenv named like
    it plus the version (``/x/venv`` -> ``/x/venv312``), ``python3.N`` on PATH."""
    found: list[str] = []
    if os.environ.get(PYTHON_ENV):
        found.append(os.environ[PYTHON_ENV])
    major, minor = min_python
    for newer in range(minor, minor + 4):
        tag = f"{major}{newer}"
        for name in (f"{sys.prefix}{tag}", f"{sys.prefix}-{tag}"):
            python = Path(name) / "bin" / "python"
            if python.exists():
                found.append(str(python))
        on_path = shutil.which(f"python{major}.{newer}")
        if on_path:
            found.append(on_path)
    return list(dict.fromkeys(found))


_python_cache: dict[
    tuple[tuple[int, int], tuple[str, ...]], tuple[str | None, str]
] = {}


def find_python(
    min_python: tuple[int, int], requires: Sequence[str] = ()
) -> tuple[str | None, str]:
    """An interpreter that is at least ``min_python`` and imports flowrhythm, anyio
    and ``requires``; returns ``(path, "python X.Y")`` or ``(None, why not)``."""
    key = (min_python, tuple(requires))
    if key in _python_cache:
        return _python_cache[key]
    modules = ["anyio", "flowrhythm", *requires]
    probe = (
        "import sys\n"
        f"for m in {modules!r}: __import__(m)\n"
        "print('%d.%d' % sys.version_info[:2])"
    )
    answer: tuple[str | None, str] = (
        None,
        (
            f"needs Python >= {min_python[0]}.{min_python[1]}: none found "
            f"(set {PYTHON_ENV} to one that has {', '.join(modules)})"
        ),
    )
    for python in python_candidates(min_python):
        try:
            out = subprocess.run(
                [python, "-c", probe],
                cwd=REPO_ROOT, env=_child_env(), capture_output=True, text=True,
                check=True, timeout=60,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            continue
        ver = out.stdout.strip()
        if tuple(int(x) for x in ver.split(".")) >= min_python:
            answer = (python, f"python {ver}")
            break
    _python_cache[key] = answer
    return answer


def measure_in_child(
    python: str,
    where: Backend,
    names: Sequence[str],
    n_items: Mapping[str, int],
    workers: int,
    warmup_items: int,
    timeout: float,
) -> dict[str, Any]:
    """Time the named contenders once each in a fresh ``python`` process.

    Each is warmed up first (a new process has paid for nothing yet). Returns
    the child's answer: ``{"python": ..., "source": ..., "results": {name:
    {"seconds": s} | {"error": message}}}``; see ``benchmarks/_child.py``.
    """
    spec = {
        "backend": where.name,
        "names": list(names),
        "items": dict(n_items),
        "workers": workers,
        "warmup_items": warmup_items,
        "timeout": timeout,
    }
    try:
        done = subprocess.run(
            [python, "-m", "benchmarks._child", json.dumps(spec)],
            cwd=REPO_ROOT, env=_child_env(), capture_output=True, text=True,
            check=False,  # a failed child becomes an error row, not an exception
            timeout=timeout * 2 * len(names) + 60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        error = f"child process timed out ({python})"
        return {"results": {name: {"error": error} for name in names}}
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        error = f"child process failed ({python}): {tail}"
        return {"results": {name: {"error": error} for name in names}}
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer


# -- timing -------------------------------------------------------------------------


async def _timed(
    fn: Workload, n_items: int, workers: int, timeout: float | None
) -> float:
    # Timed inside the event loop, so loop creation and teardown are not counted.
    start = time.perf_counter()
    # A hung contender (a peer library's deadlock) fails its row instead of
    # stalling the whole run; fail_after costs nothing per item.
    with anyio.fail_after(timeout):
        await fn(n_items, workers)
    return time.perf_counter() - start


def measure(
    where: Backend,
    fn: Workload,
    n_items: int,
    workers: int,
    *,
    timeout: float | None = None,
) -> float:
    """Run ``fn`` once in a fresh event loop; return its wall time in seconds.

    ``timeout`` (seconds) raises ``TimeoutError`` from a run that takes longer.
    """
    # Start every sample from the same heap state, so one contender's garbage is
    # not collected on the next one's clock.
    gc.collect()
    return anyio.run(
        _timed,
        fn,
        n_items,
        workers,
        timeout,
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
    """Set each result's ratio to the reference contender's median time per item,
    within the same backend and worker count (per item: slow peer libraries run
    fewer items than the rest)."""
    results = list(results)
    medians = {
        (r.backend, r.workers): r.us_per_item
        for r in results
        if r.contender == reference
    }
    for r in results:
        ref = medians.get((r.backend, r.workers))
        r.ratio = r.us_per_item / ref if ref else None


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


def machine_info(extra: Sequence[str] = ()) -> dict[str, Any]:
    """What the numbers depend on, recorded next to them; ``extra`` names more
    distributions whose versions matter (peer libraries)."""
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
            for dist in ("flowrhythm", "anyio", "trio", "uvloop", *extra)
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


def parse_standalone(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    check_arguments: Callable[[argparse.ArgumentParser, argparse.Namespace], None],
) -> argparse.Namespace:
    """The command line of a benchmark run on its own: its arguments and --json."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    return args


def save_results(
    path: str | Path,
    benchmark: str,
    config: Mapping[str, Any],
    results: Any,
    *,
    machine: Mapping[str, Any] | None = None,
    **extra: Any,
) -> None:
    """Write one benchmark's results as JSON (with when, where and how it ran)."""
    write_json(
        path,
        {
            "benchmark": benchmark,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": dict(config),
            "machine": dict(machine) if machine is not None else machine_info(),
            "results": results,
            **extra,
        },
    )
    print(f"\nresults written to {path}")


def progress(message: str) -> None:
    """A transient status line on stderr (only on a terminal: logs stay clean)."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K{message}")
        sys.stderr.flush()
