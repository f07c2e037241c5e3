"""The shapes of what users pass as stages, for type checkers."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeAlias

#: ``async def f(item) -> result``
ItemFunction: TypeAlias = Callable[[Any], Awaitable[Any]]
#: ``async def handler(item, exc)``
ErrorFunction: TypeAlias = Callable[[Any, BaseException], Awaitable[Any]]

#: a consumer (or filter): an async function, or a zero-argument factory of async
#: context managers yielding one (entered once per worker)
Consumer: TypeAlias = (
    ItemFunction | Callable[[], AbstractAsyncContextManager[ItemFunction]]
)
#: a transformer: what a consumer may be, or an async generator function emitting
#: 0..n items per input (fan-out)
Transformer: TypeAlias = Consumer | Callable[[Any], AsyncIterator[Any]]
#: an async function ``(item, exc)``, or a factory of async context managers
#: yielding one (entered once per run)
ErrorHandler: TypeAlias = (
    ErrorFunction | Callable[[], AbstractAsyncContextManager[ErrorFunction]]
)
#: an async generator function, an async iterable, a zero-argument callable
#: returning one, or an async context manager factory yielding one
Producer: TypeAlias = (
    AsyncIterable[Any]
    | Callable[[], AsyncIterable[Any]]
    | Callable[[], AbstractAsyncContextManager[AsyncIterable[Any]]]
)
