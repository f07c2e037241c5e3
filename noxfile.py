"""Development sessions: ``nox`` runs lint, typecheck and tests.

``nox -l`` lists every session; ``nox -s bench`` runs the throughput benchmarks
(opt-in, not a default session). Python versions come from the trove classifiers
in ``pyproject.toml``; a test session exists for each one found on this machine.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.needs_version = ">=2024.3.2"
nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "typecheck", "tests"]
# Only interpreters already on the machine; never download one.
nox.options.download_python = "never"

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
SUPPORTED = nox.project.python_versions(PYPROJECT)
LINT_PATHS = ["flowrhythm", "tests", "benchmarks", "examples", "noxfile.py"]


def _works(python: str, version: str) -> bool:
    """Tell whether ``python`` runs and is ``version`` (pyenv shims may not)."""
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == version


def _find_interpreter(version: str) -> str | None:
    """Return the directory of a working ``python<version>``, if there is one.

    Looks on ``PATH`` first, then in pyenv's installed versions (whose shims only
    answer for the versions pyenv currently selects).
    """
    on_path = shutil.which(f"python{version}")
    if on_path is not None and _works(on_path, version):
        return str(Path(on_path).parent)
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    pattern = os.path.join(pyenv_root, "versions", f"{version}.*", "bin")
    for bin_dir in sorted(glob.glob(pattern), reverse=True):
        python = os.path.join(bin_dir, f"python{version}")
        if _works(python, version):
            return bin_dir
    return None


def _available_pythons() -> list[str]:
    found = []
    for version in SUPPORTED:
        bin_dir = _find_interpreter(version)
        if bin_dir is None:
            continue
        found.append(version)
        # Put the real interpreter ahead of any shim, so nox finds it by name.
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    return found


PYTHONS = _available_pythons()


def _has_tests() -> bool:
    tests = ROOT / "tests"
    return any(tests.rglob("test_*.py")) or any(tests.rglob("*_test.py"))


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the test suite against the installed package."""
    session.install(".[test]")
    # pytest exits 5 when it collects nothing; that is fine only while no test
    # files exist at all.
    success_codes = [0] if _has_tests() else [0, 5]
    # The pytest script, not "python -m pytest": that would put the source tree
    # first on sys.path, and the tests must import the installed package.
    session.run("pytest", *session.posargs, success_codes=success_codes)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and formatting with ruff."""
    session.install("ruff>=0.6")
    paths = [path for path in LINT_PATHS if (ROOT / path).exists()]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the package with mypy --strict (configured in pyproject.toml)."""
    session.install(".[lint]")
    session.run("mypy", "--strict", "flowrhythm")


@nox.session
def bench(session: nox.Session) -> None:
    """Run the throughput benchmarks; arguments after ``--`` are passed on."""
    session.install(".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python=PYTHONS[:1])
def tests_oldest(session: nox.Session) -> None:
    """Run the tests against the oldest anyio the package declares it supports."""
    session.install(".[test]", "anyio==4.14.0")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHONS[-1:])
def stress(session: nox.Session) -> None:
    """The property-based tests with many more generated cases per backend."""
    session.install(".[test]")
    session.run(
        "pytest",
        "tests/test_properties.py",
        "tests/test_scaling_churn.py",
        *session.posargs,
        env={"FLOWRHYTHM_HYPOTHESIS": "stress"},
    )


@nox.session(python=PYTHONS[-1:])
def soak(session: nox.Session) -> None:
    """Random flows with random faults for 60 s per backend, invariants checked."""
    session.install(".[bench]")
    session.run(
        "python", "-m", "benchmarks.soak", "--seconds", "60", "--backend", "all",
        *session.posargs,
    )  # fmt: skip
