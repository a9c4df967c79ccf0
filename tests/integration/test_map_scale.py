"""One map of 10,000 items, on SQLite and PostgreSQL: it completes, and its items are
enqueued in a bounded number of statements (fanout.ITEMS_PER_INSERT rows each), not
one per item. Statements are counted with SQLAlchemy's ``before_cursor_execute``
event on the storage's own engine: each event is one statement sent to the server
(an executemany would be one event for many rows, so those are refused too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from flowsmith_worker import Flow, FlowStatus, Worker
from flowsmith_worker.context import Context
from flowsmith_worker.fanout import ITEMS_PER_INSERT
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.sql.storage import SqlStorage
from tests.conftest import database_url

Names = Callable[[str], str]
ITEMS = 10_000


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlStorage]:
    made = create_storage(database_url(request, str(request.param), tmp_path))
    assert isinstance(made, SqlStorage)
    made.migrate()
    yield made
    made.close()


class Inserts:
    """The statements that insert into fs_nodes, each with its number of parameter sets."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def __call__(
        self, _conn: Any, _cursor: Any, statement: str, params: Any, _context: Any, many: bool
    ) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO FS_NODES"):
            self.sent.append(len(params) if many else 1)


@pytest.mark.slow
def test_ten_thousand_items_complete_and_enqueue_in_chunks(
    sql_storage: SqlStorage, unique: Names
) -> None:
    """A run whose map has 10,000 items completes with every output in item order; its
    item nodes were inserted by ceil(10,000 / ITEMS_PER_INSERT) statements (20), each a
    single multi-row INSERT (no executemany), besides the one node of each plain stage."""
    # The items are made from a count, not read from an earlier step's output: each
    # item's ctx.data would hold the whole list, parsed for each of the 10,000 items.
    flow = (
        Flow(unique("wide"), storage=sql_storage)
        .step("load", lambda ctx: ITEMS)
        .map("plus_one", _plus_one, items=lambda ctx: list(range(ctx.data["load"])))
        .step("total", lambda ctx: sum(ctx.data["plus_one"]))
    )
    inserts = Inserts()
    sa.event.listen(sql_storage.engine, "before_cursor_execute", inserts)
    try:
        run = flow.run({})
        worker = Worker(storage=sql_storage, concurrency=8, poll_interval=0.01, listen=False)
        try:
            worker.run_until_idle(timeout=600)
        finally:
            worker.shutdown()
    finally:
        sa.event.remove(sql_storage.engine, "before_cursor_execute", inserts)
    data = run.wait(timeout=0)
    assert run.status() == FlowStatus.COMPLETED
    assert data["plus_one"] == [i + 1 for i in range(ITEMS)]
    assert data["total"] == ITEMS * (ITEMS + 1) // 2
    plain_stages = 3  # load (enqueue), plus_one's own node, total
    assert len(inserts.sent) <= plain_stages + math.ceil(ITEMS / ITEMS_PER_INSERT)
    assert all(rows == 1 for rows in inserts.sent), "an executemany sent a row per item"


def _plus_one(ctx: Context, item: int) -> int:
    return item + 1
