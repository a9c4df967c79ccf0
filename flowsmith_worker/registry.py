"""Flows by name, so a worker runs only steps of flows defined in its own process.

A worker never runs a name read from a row: it looks the name up here, and a
name that is not here fails the attempt with a message saying what to import.

Owns the name -> definition map (thread-safe). It knows nothing of Flow beyond a
name and where it was defined, so flow.py holds the process's one registry
(``flowsmith_worker.flow.registry``) and nothing here imports it back. Must never
import a module or build a flow itself: what a worker can run is exactly what its
process imported.
"""

from __future__ import annotations

import threading
from typing import Generic, Protocol, TypeVar

from flowsmith_worker.errors import DuplicateFlowName


class Defined(Protocol):
    """What the registry reads of a definition: its name and where it was written."""

    @property
    def name(self) -> str: ...

    @property
    def defined_at(self) -> str: ...


D = TypeVar("D", bound=Defined)


class Registry(Generic[D]):
    """Definitions by name; a different definition of a known name is an error."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, D] = {}

    def register(self, definition: D) -> None:
        """Add a definition; a different one of the same name is an error.

        The same definition executed again (a module reloaded, or imported both as
        ``__main__`` and by name) replaces the old object instead.
        """
        with self._lock:
            old = self._by_name.get(definition.name)
            if old is not None and old.defined_at != definition.defined_at:
                raise DuplicateFlowName(
                    f"a flow named {definition.name!r} is already defined at {old.defined_at}; "
                    f"the one at {definition.defined_at} needs another name"
                )
            self._by_name[definition.name] = definition

    def lookup(self, name: str) -> D | None:
        with self._lock:
            return self._by_name.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def unregister(self, name: str) -> None:
        """Forget a definition (tests)."""
        with self._lock:
            self._by_name.pop(name, None)
