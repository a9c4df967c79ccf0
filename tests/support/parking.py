"""Parked runs (sleeps, waits for events): drive a worker until they park, read their nodes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flowsmith_worker import NodeStatus, Worker
from flowsmith_worker.records import AttemptOutcome, NodeRecord
from flowsmith_worker.storage.base import Storage
from tests.conftest import eventually
from tests.support.runs import nodes_of

POLL = 0.02


def drive(worker: Worker, done: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Turn the worker's loop in this thread until ``done()`` is truthy."""

    def turn() -> Any:
        worker.run_once()
        return done()

    return eventually(turn, timeout=timeout, interval=POLL)


def parked(storage: Storage, tracking_id: str, step_name: str) -> bool:
    node = nodes_of(storage, tracking_id).get(step_name)
    return node is not None and node.status == NodeStatus.PENDING and node.wake_at is not None


def outcomes(node: NodeRecord) -> list[AttemptOutcome]:
    return [a.outcome for a in node.attempts]
