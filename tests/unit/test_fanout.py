"""The pure rules of a map (flowsmith_worker/fanout.py) and Flow.map's refusals."""

from __future__ import annotations

import pytest

from flowsmith_worker import Flow, NodeStatus, fanout
from flowsmith_worker.errors import InvalidFlowDefinition
from flowsmith_worker.plan import MAP, Plan


def test_item_names_and_group_indexes_round_trip() -> None:
    """An item's name parses back to its map and index; its group_index is negative and
    maps back to the index; other names are no item."""
    assert fanout.parse_item_name(fanout.item_name("charge_items", 17)) == ("charge_items", 17)
    assert fanout.parse_item_name("charge_items") is None
    assert fanout.parse_item_name("a[b]") is None
    assert fanout.index_of(fanout.group_index_of(0)) == 0
    assert fanout.group_index_of(0) < 0


def test_collect_joins_outputs_in_order_and_records_errors_under_allow_failures() -> None:
    """Outputs are joined as stored, in the order given; with allow_failures a FAILED item
    becomes {"error": its last line}."""
    items = [
        (NodeStatus.COMPLETED, "1", None),
        (NodeStatus.FAILED, "7", "Traceback...\nValueError: no"),
        (NodeStatus.COMPLETED, None, None),
    ]
    assert fanout.collect(items[:1] + items[2:], allow_failures=False) == "[1,null]"
    assert (
        fanout.collect(items, allow_failures=True)
        == '[{"output":1},{"error":"ValueError: no"},{"output":null}]'
    )


def test_held_on_resume_keeps_places_for_items_still_running() -> None:
    """Resumed items beyond max_parallel minus the items still running stay held, the
    lowest indexes released first; no limit holds none."""
    assert fanout.held_on_resume([5, 1, 3], running=1, max_parallel=2) == {3, 5}
    assert fanout.held_on_resume([5, 1, 3], running=2, max_parallel=2) == {1, 3, 5}
    assert fanout.held_on_resume([5, 1, 3], running=0, max_parallel=None) == set()


def test_a_maps_plan_keeps_its_limits_and_other_plans_hash_as_before() -> None:
    """max_parallel and allow_failures are stored in the plan of a map step (and read
    back); a plan without a map is stored exactly as before (same version)."""
    flow = Flow("fanout_plan_unit").map(
        "each", lambda ctx, item: item, items=lambda ctx: [], max_parallel=3, allow_failures=True
    )
    planned = Plan.from_json(flow.plan().to_json()).step("each")
    assert planned is not None
    assert (planned.kind, planned.max_parallel, planned.allow_failures) == (MAP, 3, True)
    plain = Flow("fanout_plain_unit").step("a", lambda ctx: None)
    assert "max_parallel" not in plain.plan().to_json()


def test_flow_map_refuses_what_cannot_run() -> None:
    """A map inside a parallel group, an async items function and max_parallel < 1 are
    refused when the flow is defined, each naming the map."""
    flow = Flow("fanout_refusals_unit")
    inside = pytest.raises(InvalidFlowDefinition, match="map 'each' cannot be inside a parallel")
    with inside, flow.parallel():
        flow.map("each", lambda ctx, item: item, items=lambda ctx: [])

    async def items(ctx: object) -> list[int]:
        return []

    with pytest.raises(TypeError, match=r"map 'each': items=.* plain function"):
        flow.map("each", lambda ctx, item: item, items=items)
    with pytest.raises(ValueError, match="map 'each': max_parallel=0"):
        flow.map("each", lambda ctx, item: item, items=lambda ctx: [], max_parallel=0)


def test_a_maps_items_count_under_the_maps_name_in_metrics() -> None:
    """Metrics label an item node by its map's name (one series per map, not per item);
    a name that is no item of a defined map stays unregistered."""
    from flowsmith_worker.metrics import UNREGISTERED, metric_labels

    flow = Flow("fanout_metrics_unit").map("each", lambda ctx, item: item, items=lambda ctx: [])
    assert metric_labels(flow.name, "each[9999]") == (flow.name, "each", flow.queue)
    assert metric_labels(flow.name, "other[1]")[1] == UNREGISTERED
