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


def test_a_step_named_as_a_maps_item_is_refused_in_either_order() -> None:
    """A step named "m[0]" and a map "m" would both have a node "m[0]" (a UNIQUE
    constraint error at run time): whichever is added second is refused when the flow
    is defined, naming it; a step "m[0]" beside a plain step "m" is no item and stays."""

    def each(ctx: object, item: object) -> object:
        return item

    step_first = Flow("fanout_item_names_unit_a").step("m[0]", lambda ctx: 1)
    with pytest.raises(
        InvalidFlowDefinition, match=r"map 'm' would name its items like .*'m\[0\]'"
    ):
        step_first.map("m", each, items=lambda ctx: [1])
    map_first = Flow("fanout_item_names_unit_b").map("m", each, items=lambda ctx: [1])
    with pytest.raises(InvalidFlowDefinition, match=r"step name 'm\[3\]' is the name of an item"):
        map_first.step("m[3]", lambda ctx: 1)
    in_a_group = pytest.raises(InvalidFlowDefinition, match=r"step name 'm\[3\]' is the name")
    with in_a_group, map_first.parallel():
        map_first.step("x", lambda ctx: 1)
        map_first.step("m[3]", lambda ctx: 1)
    Flow("fanout_item_names_unit_c").step("m", lambda ctx: 1).step("m[0]", lambda ctx: 2)


def test_a_map_name_leaves_room_for_its_items_suffix() -> None:
    """A map's items are named "<map>[N]" within the 200-character name limit: a map
    name without room for a 10-digit index is refused when the flow is defined, naming
    the map; one just short enough, and a plain step of 200 characters, are accepted."""

    def each(ctx: object, item: object) -> object:
        return item

    room = 200 - fanout.ITEM_SUFFIX_ROOM
    flow = Flow("fanout_map_name_room_unit")
    with pytest.raises(InvalidFlowDefinition, match=f"map name '{'m' * (room + 1)}' is too long"):
        flow.map("m" * (room + 1), each, items=lambda ctx: [])
    flow.map("m" * room, each, items=lambda ctx: [])
    flow.step("s" * 200, lambda ctx: 1)
    assert len(fanout.item_name("m" * room, 10**10 - 1)) == 200
