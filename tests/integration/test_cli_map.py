"""`flowsmith status` of a run with a map: one row counts the items by status, the
first failed item's error beside it; the items are not a row each."""

from __future__ import annotations

from collections.abc import Callable

from flowsmith_worker import Flow, FlowStatus
from flowsmith_worker.context import Context
from tests.integration.conftest import Db
from tests.support.cli import cli, cli_json, drain

Names = Callable[[str], str]


def test_status_counts_a_maps_items_in_one_row(sqlite_db: Db, unique: Names) -> None:
    """A map of 5 items (max_parallel=1) whose first item fails: status shows the map's
    row, then one row "5 items: 1 FAILED, 4 CANCELLED" with the item's error; no item
    has a row of its own; --json lists every item."""

    def charge(ctx: Context, item: int) -> int:
        raise ValueError(f"card declined for item {item}")

    flow = Flow(unique("charges"), storage=sqlite_db.storage).map(
        "charge", charge, items=lambda ctx: list(range(5)), max_parallel=1
    )
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    drain(sqlite_db.storage)
    assert flow.get_run(tid).status() == FlowStatus.FAILED
    shown = cli(sqlite_db.url, "status", tid, "--wide")  # the error unclipped
    lines = shown.stdout.splitlines()
    [items_row] = [line for line in lines if "charge[…]" in line]
    assert "5 items: 1 FAILED, 4 CANCELLED" in items_row
    assert "charge[0]: ValueError: card declined for item 0" in items_row
    assert not [line for line in lines if "charge[3]" in line]
    steps = cli_json(sqlite_db.url, "status", tid, exit_code=1)["steps"]  # 1: FAILED
    assert [s["step_name"] for s in steps] == ["charge"] + [f"charge[{i}]" for i in range(5)]


def test_a_maps_items_row_shows_only_its_own_items_error(sqlite_db: Db, unique: Names) -> None:
    """Two maps with allow_failures: the first has a failed item, the second none. The
    second map's items row shows no error (not the first map's item's), the first
    map's row shows its own."""

    def charge(ctx: Context, item: int) -> int:
        if item == 1:
            raise ValueError("card declined for item 1")
        return item

    flow = (
        Flow(unique("two_maps"), storage=sqlite_db.storage)
        .map("first", charge, items=lambda ctx: [0, 1], allow_failures=True)
        .map("second", lambda ctx, item: item, items=lambda ctx: [0, 2], allow_failures=True)
    )
    tid = unique("t")
    flow.run({}, tracking_id=tid)
    drain(sqlite_db.storage)
    assert flow.get_run(tid).status() == FlowStatus.COMPLETED
    lines = cli(sqlite_db.url, "status", tid, "--wide").stdout.splitlines()
    [first_row] = [line for line in lines if "first[…]" in line]
    [second_row] = [line for line in lines if "second[…]" in line]
    assert "first[1]: ValueError: card declined for item 1" in first_row
    assert "ValueError" not in second_row and "first[1]" not in second_row
