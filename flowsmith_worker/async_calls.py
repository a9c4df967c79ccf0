"""Blocking database calls made from async code, inside the caller's transaction or not.

``Flow.run_async`` and ``send_event_async`` share this: the call runs in a
thread (asyncio.to_thread), as does ``connection`` when it is a SQLAlchemy
Connection; an AsyncConnection or AsyncSession (SQLAlchemy's asyncio extension)
is used through its own ``run_sync``, on its own driver, so the write commits or
rolls back with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def call_with_connection(call: Callable[..., T], connection: Any) -> T:
    """``call(connection=...)`` without blocking the event loop."""
    if not _uses_asyncio_extension(connection):
        return await asyncio.to_thread(call, connection=connection)
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession  # imported by the caller

    if isinstance(connection, AsyncSession):  # the connection of its transaction
        connection = await connection.connection()
    if not isinstance(connection, AsyncConnection):
        raise TypeError(
            f"connection={connection!r}: give an AsyncConnection or AsyncSession "
            "(or a sync Connection)"
        )
    done: T = await connection.run_sync(lambda sync: call(connection=sync))
    return done


def _uses_asyncio_extension(connection: Any) -> bool:
    """Whether ``connection`` comes from SQLAlchemy's asyncio extension, told without
    importing it (and greenlet) for the applications that do not use it."""
    return type(connection).__module__.startswith("sqlalchemy.ext.asyncio")
