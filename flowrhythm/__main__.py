"""The ``flowrhythm`` command (also ``python -m flowrhythm``)."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from . import __version__

if TYPE_CHECKING:
    from rich.console import Console

BACKENDS = ("asyncio", "trio", "uvloop")


def build_parser() -> argparse.ArgumentParser:
    """Return the command's argument parser."""
    parser = argparse.ArgumentParser(
        prog="flowrhythm",
        description="Asynchronous, auto-scaling job pipelines on AnyIO.",
    )
    parser.add_argument(
        "--version", action="version", version=f"flowrhythm {__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="run a bursty demo pipeline and watch its stages scale",
        description=(
            "Run a demo pipeline: a bursty producer, an I/O-bound stage under "
            "UtilizationScaling, a stage that fails on some items, and a consumer. "
            "Shows the stats of every stage live (with rich, on a terminal) or "
            "prints them about once a second, then drains the flow and prints a "
            "summary."
        ),
    )
    demo.add_argument(
        "--duration",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="how long to feed the pipeline before draining it (default: 10)",
    )
    demo.add_argument(
        "--backend",
        choices=BACKENDS,
        default="asyncio",
        help="the event loop to run on (default: asyncio)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="seed the random latencies, for repeatable runs",
    )
    demo.add_argument(
        "--plain",
        action="store_true",
        help="print plain text reports instead of the live view",
    )
    demo.add_argument(
        "--no-color",
        action="store_true",
        help="draw the live view without colors (so does NO_COLOR=1)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(parser, args)
    parser.error(f"unknown command {args.command!r}")  # exits


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ._demo import format_summary, run_demo

    backend, options = _backend(parser, args.backend)
    console = None if args.plain else _live_console(no_color=args.no_color)
    print(
        f"flowrhythm {__version__} demo on {args.backend}, "
        f"{args.duration:g}s (Ctrl-C to stop)\n",
        flush=True,
    )
    try:
        summary = anyio.run(
            functools.partial(run_demo, args.duration, seed=args.seed, console=console),
            backend=backend,
            backend_options=options,
        )
    except BaseException as exc:
        if not _interrupted(exc):
            raise
        print("interrupted", file=sys.stderr)
        return 130
    if console is not None:
        print()
    print(format_summary(summary))
    return 0 if summary.conserved else 1


def _backend(parser: argparse.ArgumentParser, name: str) -> tuple[str, dict[str, Any]]:
    if name == "trio" and importlib.util.find_spec("trio") is None:
        parser.error("trio is not installed: pip install 'flowrhythm[trio]'")
    if name == "uvloop":
        if importlib.util.find_spec("uvloop") is None:
            parser.error("uvloop is not installed: pip install 'flowrhythm[uvloop]'")
        return "asyncio", {"use_uvloop": True}
    return name, {}


def _live_console(*, no_color: bool) -> Console | None:
    """A rich console for the live view, or None: no rich, or not a terminal."""
    if not sys.stdout.isatty() or importlib.util.find_spec("rich") is None:
        return None
    from rich.console import Console

    return Console(no_color=no_color or None, highlight=False)


def _interrupted(exc: BaseException) -> bool:
    """Tell whether ``exc`` is a Ctrl-C, possibly wrapped by task groups."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    inner: tuple[BaseException, ...] = getattr(exc, "exceptions", ())
    return bool(inner) and all(_interrupted(e) for e in inner)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
