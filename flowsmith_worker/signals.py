"""SIGTERM/SIGINT for a worker: the first stops claiming, the second stops at once.

The previous handlers are restored on exit from the context manager.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any, Protocol

from flowsmith_worker.log import get_logger

log = get_logger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stoppable(Protocol):
    def stop(self, graceful: bool = True) -> None: ...


@contextlib.contextmanager
def stop_on_signals(target: Stoppable) -> Iterator[None]:
    received = 0

    def handle(signum: int, _frame: FrameType | None) -> None:
        nonlocal received
        received += 1
        graceful = received == 1
        log.warning(
            "worker.signal",
            signal=signal.Signals(signum).name,
            action="finishing in-flight steps" if graceful else "stopping now",
        )
        target.stop(graceful=graceful)

    previous: dict[int, Any] = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
