"""The event loop that runs the ``async def`` steps and conditions of this process.

One loop, in one daemon thread, shared by every worker slot of the process and
started by the first coroutine it is given: a worker whose steps are all plain
functions never starts it. A slot thread hands its coroutine to the loop and
waits for the result, so an async step holds its slot, its lease and its
fencing exactly as a sync step does, while the loop runs the coroutines of the
other slots meanwhile.

Why one loop per process rather than one per slot thread: an async client (an
httpx.AsyncClient, an asyncpg pool, an aiohttp session) belongs to the loop
that created it, and applications keep such clients in module state. With a
loop per slot, a client made by a step on one slot would fail ("attached to a
different loop") in a step on another. The cost: an async step that blocks
(time.sleep, a sync database driver) stalls the other slots' async steps while
it does; such work belongs in a plain ``def`` step, which runs in its own thread.

A coroutine past its deadline is cancelled (unlike a sync call, which Python
cannot stop): ``run`` then raises DeadlinePassed once the coroutine has really
ended, so the retry never overlaps it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class DeadlinePassed(TimeoutError):
    """The coroutine was cancelled at its deadline (its result, if any, is dropped)."""


class _Escaped(Exception):
    """Carries a KeyboardInterrupt or SystemExit raised by a coroutine to its caller.

    asyncio re-raises those out of the loop itself, which would end the loop
    thread and every other slot's coroutine with it.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


class EventLoopThread:
    """An asyncio loop in a daemon thread of its own, started on first use."""

    def __init__(self, name: str = "flowsmith-event-loop") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def run(self, call: Callable[[], Awaitable[T]], deadline: float | None = None) -> T:
        """Await ``call()`` on the loop and return its result, from any other thread.

        ``deadline`` is a time.monotonic() instant: past it the coroutine is
        cancelled and, once it has ended, DeadlinePassed is raised. Whatever
        the coroutine raises is raised here.
        """
        if threading.current_thread() is self._thread:
            # The loop would wait for itself forever.
            raise RuntimeError("EventLoopThread.run() was called from its own loop: await instead")
        waiting = _awaited(call, deadline)
        try:
            future = asyncio.run_coroutine_threadsafe(waiting, self._running_loop())
        except BaseException:
            waiting.close()  # never scheduled: no "never awaited" warning for it
            raise
        try:
            return future.result()
        except _Escaped as escaped:
            raise escaped.error from None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._thread is None or not self._thread.is_alive():
                self._loop, self._thread = self._start()
            return self._loop

    def _start(self) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        loop.call_soon(started.set)
        thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
        thread.start()
        started.wait()
        return loop, thread

    def forget(self) -> None:
        """After a fork: the loop's thread did not come along; the child starts its own."""
        self._lock = threading.Lock()
        self._loop = self._thread = None


async def _awaited(call: Callable[[], Awaitable[T]], deadline: float | None) -> T:
    # What is left of the caller's deadline (already past: it expires at once).
    scope = asyncio.timeout(None if deadline is None else deadline - time.monotonic())
    try:
        async with scope:
            result = await call()
    except (KeyboardInterrupt, SystemExit) as exc:
        raise _Escaped(exc) from exc
    except TimeoutError as exc:
        if scope.expired():
            raise DeadlinePassed() from exc
        raise
    if scope.expired():  # the coroutine swallowed its cancellation and returned
        raise DeadlinePassed()
    return result


# The process's loop, for every worker and executor in it.
shared = EventLoopThread()


def run(call: Callable[[], Awaitable[T]], deadline: float | None = None) -> T:
    """``shared.run``: await ``call()`` on this process's loop (see EventLoopThread.run)."""
    return shared.run(call, deadline)


def is_async(fn: Any) -> bool:
    """Whether calling ``fn`` makes a coroutine: an ``async def`` function, a partial of
    one, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the method itself, not callable()
    )


os.register_at_fork(after_in_child=shared.forget)
