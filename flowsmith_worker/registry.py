"""Flows by name, so a worker runs only steps of flows defined in its own process.

A worker never runs a name read from a row: it looks the name up here, and a
name that is not here fails the attempt with a message saying what to import.

Owns this process's map of names to Flows (thread-safe). Must never import a module
or build a flow itself: what a worker can run is exactly what its process imported.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from flowsmith_worker.errors import DuplicateFlowName

if TYPE_CHECKING:
    from flowsmith_worker.flow import Flow

_lock = threading.Lock()
_flows: dict[str, Flow] = {}


def register(flow: Flow) -> None:
    """Add a flow; a different flow of the same name is an error.

    The same definition executed again (a module reloaded, or imported both as
    ``__main__`` and by name) replaces the old object instead.
    """
    with _lock:
        old = _flows.get(flow.name)
        if old is not None and old.defined_at != flow.defined_at:
            raise DuplicateFlowName(
                f"a flow named {flow.name!r} is already defined at {old.defined_at}; "
                f"the one at {flow.defined_at} needs another name"
            )
        _flows[flow.name] = flow


def lookup(name: str) -> Flow | None:
    with _lock:
        return _flows.get(name)


def names() -> list[str]:
    with _lock:
        return sorted(_flows)


def unregister(name: str) -> None:
    """Forget a flow (tests)."""
    with _lock:
        _flows.pop(name, None)
