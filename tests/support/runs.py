"""A run's status and its nodes as stored, read the way the tests of several tiers need."""

from __future__ import annotations

from flowsmith_worker.records import FlowStatus, NodeRecord
from flowsmith_worker.storage.base import Storage


def nodes_of(storage: Storage, tracking_id: str) -> dict[str, NodeRecord]:
    """The run's nodes by step name (a map's items by their names, "each[3]")."""
    record = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
    assert record is not None
    return {n.step_name: n for n in storage.list_nodes(flow_id=record.id)}


def status_of(storage: Storage, tracking_id: str) -> FlowStatus:
    record = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
    assert record is not None
    return record.status
