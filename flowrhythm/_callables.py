"""Turn what users pass as stages into one internal shape, once, before the run.

Each user object is classified at configuration time. Whatever cannot be told
apart without calling it (a zero-argument factory whose result we cannot see yet)
is checked when the run starts, still before any item moves.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from ._cleanup import Cleanups

Factory = Callable[[], Any]


@dataclass(frozen=True, slots=True)
class StageCallable:
    """What a stage calls per item: a plain async function, or a factory of async
    context managers (entered once per worker) that yield one."""

    role: str  # "transformer 'name'", "consumer 'name'", "error handler"
    fn: Callable[..., Awaitable[Any]] | None
    factory: Factory | None
    arity: int = 1

    async def enter(self, cm: Any) -> Callable[..., Awaitable[Any]]:
        """Enter one context manager made by :attr:`factory`; return its callable."""
        if not (hasattr(cm, "__aenter__") and hasattr(cm, "__aexit__")):
            raise TypeError(
                f"{self.role}: the factory must return an async context manager, "
                f"got {cm!r}"
            )
        fn = await cm.__aenter__()
        if inspect.isasyncgenfunction(fn):
            await cm.__aexit__(None, None, None)
            raise TypeError(
                f"{self.role}: the context manager yielded the async generator "
                f"function {fn!r}; a fan-out stage is passed to add_transformer() "
                "directly (keep per-worker state in the generator)"
            )
        if (
            not callable(fn)
            or _is_sync_function(fn)
            or not _signature_accepts(fn, self.arity)
        ):
            await cm.__aexit__(None, None, None)
            args = "one argument" if self.arity == 1 else "two arguments"
            raise TypeError(
                f"{self.role}: the context manager must yield an async function "
                f"taking {args}, got {fn!r}"
            )
        return fn  # type: ignore[no-any-return]


def is_fan_out(obj: object) -> bool:
    """Whether ``obj`` is an async generator function (a fan-out stage)."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    return inspect.isasyncgenfunction(obj)


def callable_name(obj: object) -> str | None:
    """Return a readable default stage name for ``obj``, if it has one."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    name = getattr(obj, "__name__", None)
    if isinstance(name, str):
        return name
    return type(obj).__name__ if callable(obj) else None


def stage_callable(
    obj: object, role: str, *, arity: int, fan_out: bool = False
) -> StageCallable:
    """Classify a transformer, consumer or error handler.

    ``arity`` is the number of positional arguments the async function takes
    (1 for items, 2 for ``(item, exc)``). With ``fan_out``, an async generator
    function is accepted too (call :func:`is_fan_out` first to tell).
    """
    what = "an async function" if arity == 1 else "an async function (item, exc)"
    expected = f"{what} or an async context manager factory"
    if inspect.iscoroutine(obj):
        obj.close()
        raise TypeError(
            f"{role} must be {expected}, got a coroutine object; pass the function "
            "itself, without calling it"
        )
    if not callable(obj):
        raise TypeError(f"{role} must be {expected}, got {obj!r}")
    if inspect.isasyncgenfunction(obj):
        if fan_out:
            _check_arity(obj, arity, role, "an async generator function")
            return StageCallable(role, obj, None, arity)
        raise TypeError(
            f"{role} must be {expected}, got the async generator function {obj!r}; "
            "only add_transformer() takes those (fan-out), and a context manager "
            "factory needs @contextlib.asynccontextmanager"
        )
    if _is_async_function(obj):
        _check_arity(obj, arity, role, expected)
        return StageCallable(role, obj, None, arity)
    if _is_async_cm_factory(obj) or (_accepts(obj, 0) and not _accepts(obj, arity)):
        # A zero-argument callable: an async CM factory, checked when entered. One
        # that would also take the item (like print) is more likely a sync stage.
        return StageCallable(role, None, obj, arity)
    if inspect.isgeneratorfunction(obj) or _is_sync_function(obj):
        raise TypeError(
            f"{role} must be {expected}, got the synchronous function {obj!r}; "
            "declare it with 'async def' (run blocking code through "
            "anyio.to_thread.run_sync)"
        )
    _check_arity(obj, arity, role, expected)
    # Some other callable (e.g. an object with an async __call__ that inspect cannot
    # see through); its results are awaited, so a wrong one fails on first use.
    return StageCallable(role, obj, None, arity)


def producer_source(
    obj: object,
) -> Callable[[Cleanups], AbstractAsyncContextManager[AsyncIterator[Any]]]:
    """Classify a producer; return a factory of "open the source" context managers."""
    expected = (
        "an async generator function, an async iterable, a zero-argument callable "
        "returning one, or an async context manager factory yielding one"
    )
    if inspect.iscoroutine(obj):
        obj.close()
        raise TypeError(
            f"producer must be {expected}, got a coroutine object; "
            "pass the function itself, without calling it"
        )
    if hasattr(obj, "__aiter__") and not callable(obj):
        return lambda cleanups: _iterate(obj, cleanups)
    if not callable(obj):
        hint = (
            "; wrap it in an async generator"
            if hasattr(obj, "__iter__") or hasattr(obj, "__next__")
            else ""
        )
        raise TypeError(f"producer must be {expected}, got {obj!r}{hint}")
    if inspect.isgeneratorfunction(obj):
        raise TypeError(
            f"producer must be {expected}, got the synchronous generator function "
            f"{obj!r}; declare it with 'async def'"
        )
    if _is_async_function(obj):
        raise TypeError(
            f"producer must be {expected}, got the coroutine function {obj!r}; "
            "make it an async generator ('yield' items instead of returning them)"
        )
    if not _accepts(obj, 0):
        raise TypeError(
            f"producer must be {expected}, got {obj!r}, which cannot be called "
            "without arguments"
        )
    factory: Factory = obj
    return lambda cleanups: _iterate(factory(), cleanups)


@asynccontextmanager
async def _iterate(
    source: Any, cleanups: Cleanups, *, enter: bool = True
) -> AsyncIterator[AsyncIterator[Any]]:
    """Open a producer's source: enter it if it is a context manager, then iterate.

    The iterator is ``aclose()``d and the context manager exited on every path.
    What a context manager yields is iterated, never entered again (a stream's
    ``__aenter__`` returns the stream itself).
    """
    if enter and hasattr(source, "__aenter__") and hasattr(source, "__aexit__"):
        cm = source
        source = await cm.__aenter__()
        try:
            async with _iterate(source, cleanups, enter=False) as iterator:
                yield iterator
        except BaseException as exc:
            await cleanups.exit(cm, exc)
            raise
        else:
            await cleanups.exit(cm, None)
        return
    if not hasattr(source, "__aiter__"):
        raise TypeError(
            "producer must produce an async iterable (or an async context manager "
            f"yielding one), got {source!r}"
        )
    iterator = source.__aiter__()
    try:
        # The producer loop iterates with 'async for', which asks for __aiter__
        # again: an iterator that defines only __anext__ gets a wrapper.
        yield iterator if hasattr(iterator, "__aiter__") else _Iterating(iterator)
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await cleanups.run(aclose)


class _Iterating:
    """An async iterator over one that defines ``__anext__`` but no ``__aiter__``."""

    __slots__ = ("_next",)

    def __init__(self, iterator: Any) -> None:
        self._next: Callable[[], Awaitable[Any]] = iterator.__anext__

    def __aiter__(self) -> _Iterating:
        return self

    async def __anext__(self) -> Any:
        return await self._next()


def _is_async_function(obj: object) -> bool:
    if inspect.iscoroutinefunction(obj):
        return True
    call = getattr(type(obj), "__call__", None)  # noqa: B004
    return (
        not inspect.isfunction(obj)
        and not inspect.ismethod(obj)
        and not isinstance(obj, type)
        and inspect.iscoroutinefunction(call)
    )


def _is_sync_function(obj: object) -> bool:
    target = obj
    while isinstance(target, functools.partial):
        target = target.func
    return (
        inspect.isfunction(target)
        or inspect.ismethod(target)
        or inspect.isbuiltin(target)
    ) and not (inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(obj))


def _is_async_cm_factory(obj: object) -> bool:
    if isinstance(obj, type):
        return hasattr(obj, "__aenter__") and hasattr(obj, "__aexit__")
    wrapped = getattr(obj, "__wrapped__", None)
    return wrapped is not None and inspect.isasyncgenfunction(wrapped)


def _accepts(obj: Callable[..., Any], count: int) -> bool:
    """Tell whether ``obj`` can be called with ``count`` positional arguments."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind(*range(count))
    except TypeError:
        return False
    return True


def _check_arity(obj: Callable[..., Any], arity: int, role: str, expected: str) -> None:
    if not _signature_accepts(obj, arity):
        args = "one argument (the item)" if arity == 1 else "two arguments (item, exc)"
        raise TypeError(f"{role} must be {expected} taking {args}, got {obj!r}")


def _signature_accepts(obj: Callable[..., Any], count: int) -> bool:
    """Like ``_accepts``, but a callable without a signature (builtins, C code)
    passes: there is nothing to check."""
    try:
        inspect.signature(obj)
    except (TypeError, ValueError):
        return True
    return _accepts(obj, count)
