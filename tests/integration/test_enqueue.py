"""Enqueue: Flow.run_many and the one-round-trip flow.run, on every backend.

run_many writes a batch in one transaction with the idempotent-trigger rules of
flow.run per tracking_id, refuses a bad batch before its first write, and keeps
each statement bounded; flow.run on PostgreSQL is one statement in autocommit
and falls back to the rules when the tracking_id exists. Real databases and
real worker threads throughout; statements are counted with SQLAlchemy event
listeners or read from the PostgreSQL server's own statement log.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from flowsmith_worker import Context, Flow, FlowRun, FlowStatus, StepFailed, Worker
from flowsmith_worker import payload as payload_module
from flowsmith_worker.config import parse_database_url
from flowsmith_worker.errors import (
    FlowAlreadyCompleted,
    InvalidIdentifier,
    PayloadNotJSON,
    TrackingIdTaken,
)
from flowsmith_worker.payload import PayloadLimits
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import Storage
from flowsmith_worker.storage.sql import SqlStorage
from flowsmith_worker.storage.sql.enqueue import ENQUEUE_NEW_RUNS_PG, MAX_ROWS_PER_STATEMENT
from tests.conftest import database_url
from tests.servers import DatabaseServer, LocalServer
from tests.servers.pgbouncer import skip_through_pgbouncer

Names = Callable[[str], str]


def drain(storage: Storage, timeout: float = 60.0) -> None:
    Worker(storage=storage, poll_interval=0.05, concurrency=8).run_until_idle(timeout=timeout)


def sql_storage(storage: Storage) -> SqlStorage:
    assert isinstance(storage, SqlStorage)
    return storage


def flow_count(storage: Storage) -> int:
    return sum(storage.stats().flows_by_status.values())


def node_count(storage: Storage) -> int:
    return sum(storage.stats().nodes_by_status.values())


@contextmanager
def statements(storage: Storage) -> Iterator[list[str]]:
    """The SQL statements sent to the driver meanwhile (an executemany counts once; the
    prepared enqueue of PostgreSQL as its text, not as EXECUTE)."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if ENQUEUE_NEW_RUNS_PG.sent_as(statement):
            statement = ENQUEUE_NEW_RUNS_PG.text
        sent.append(" ".join(statement.split()))

    engine = sql_storage(storage).engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def three_steps(storage: Storage, name: str) -> Flow:
    flow = Flow(name, storage=storage)
    for step in ("a", "b", "c"):
        flow.step(step, lambda ctx, step=step: f"{step}{ctx.data['i']}")
    return flow


# -- run_many: the runs, their order, their completion --------------------------------


def test_run_many_enqueues_every_run_and_workers_complete_them_all(
    storage: Storage, unique: Names
) -> None:
    """Each input becomes a run with its own ctx.data; handles come back in input order."""
    flow = three_steps(storage, unique("batch"))
    ids = [unique("t") for _ in range(40)]
    runs = flow.run_many([{"i": i} for i in range(40)], tracking_ids=ids)
    assert [run.tracking_id for run in runs] == ids
    assert all(run.status() == FlowStatus.PENDING for run in runs)
    assert flow_count(storage) == 40 and node_count(storage) == 40  # stage 0 only
    drain(storage)
    for i, run in enumerate(runs):
        assert run.wait(timeout=5) == {"i": i, "a": f"a{i}", "b": f"b{i}", "c": f"c{i}"}


def test_run_many_makes_up_tracking_ids_and_takes_contexts(storage: Storage, unique: Names) -> None:
    """Without tracking_ids each run gets a new one; a Context's data is the input."""
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: ctx.data.get("n", 0) + 1)
    runs = flow.run_many([Context({"n": 1}), {"n": 2}, None])
    assert len({run.tracking_id for run in runs}) == 3
    drain(storage)
    assert [run.wait(5)["only"] for run in runs] == [2, 3, 1]


def test_run_many_of_nothing_writes_nothing(storage: Storage, unique: Names) -> None:
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: 1)
    with statements(storage) as sent:
        assert flow.run_many([]) == []
    assert sent == []


def test_run_many_starts_a_parallel_first_stage_whole(storage: Storage, unique: Names) -> None:
    """A first stage of siblings gets all its nodes, group_index in plan order, as flow.run's."""
    flow = Flow(unique("fan"), storage=storage)
    with flow.parallel():
        flow.step("x", lambda ctx: "x").step("y", lambda ctx: "y")
    flow.step("z", lambda ctx: sorted(k for k in ctx.data if k in "xy"))
    runs = [*flow.run_many([{}, {}]), flow.run({})]
    for run in runs:
        assert [(n.step_name, n.position, n.group_index) for n in run.trace()] == [
            ("x", 0, 0),
            ("y", 0, 1),
        ]
    drain(storage)
    assert all(run.wait(5)["z"] == ["x", "y"] for run in runs)


@pytest.mark.parametrize(
    "start",
    [{"delay": 3600}, {"run_at": datetime.now(UTC) + timedelta(hours=1)}],
    ids=["delay", "run_at"],
)
def test_run_many_holds_every_first_step_back_until_its_start(
    storage: Storage, unique: Names, start: dict[str, Any]
) -> None:
    """``delay`` or ``run_at`` applies to each run of the batch, by the database clock."""
    flow = Flow(unique("later"), storage=storage).step("only", lambda ctx: 1)
    flow.run_many([{}, {}, {}], **start)
    assert storage.count_open_nodes(queues=["default"]) == 3
    assert storage.claim_nodes(worker_id="w", limit=10, lease_seconds=30, queues=["default"]) == []


def test_run_many_puts_runs_on_the_flows_queue_with_its_priority(
    storage: Storage, unique: Names
) -> None:
    queue = unique("bulk")
    flow = Flow(unique("f"), storage=storage, queue=queue, priority=5).step("only", lambda c: 1)
    runs = flow.run_many([{}, {}])
    assert {(run.record().queue, run.record().priority) for run in runs} == {(queue, 5)}
    assert storage.claim_nodes(worker_id="w", limit=10, lease_seconds=30, queues=["default"]) == []
    assert len(storage.claim_nodes(worker_id="w", limit=10, lease_seconds=30, queues=[queue])) == 2


def test_run_many_refuses_one_input_or_one_tracking_id_given_as_the_batch(
    storage: Storage, unique: Names
) -> None:
    """A dict where a list of dicts belongs (or a str for the ids) is a type error, not
    a batch of its keys (or of the id's characters)."""
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: 1)
    with pytest.raises(TypeError, match="list of inputs"):
        flow.run_many({"order": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tracking_ids is one string"):
        flow.run_many([{}], tracking_ids="x")
    assert flow_count(storage) == 0


# -- run_many: the trigger rules per tracking_id --------------------------------------


def failing_once(storage: Storage, name: str) -> tuple[Flow, dict[str, int]]:
    """A flow whose step "b" fails until ``broken["b"]`` is 0; calls counted per step."""
    calls = {"a": 0, "b": 0}
    broken = {"b": 1}

    def a(ctx: Context) -> str:
        calls["a"] += 1
        return "a"

    def b(ctx: Context) -> str:
        calls["b"] += 1
        if broken["b"]:
            raise RuntimeError("payment API down")
        return "b"

    flow = Flow(name, storage=storage).step("a", a).step("b", b)
    flow.broken = broken  # type: ignore[attr-defined]
    return flow, calls


def test_run_many_applies_the_trigger_rules_to_each_tracking_id(
    storage: Storage, unique: Names
) -> None:
    """Mixed in one batch: new ids are created, a pending run answers with its handle and
    keeps its input, a FAILED run resumes at its failed step only."""
    flow, calls = failing_once(storage, unique("mixed"))
    failed, pending, new = unique("failed"), unique("pending"), unique("new")
    flow.run({"v": "first"}, tracking_id=failed)
    drain(storage)
    with pytest.raises(StepFailed):
        FlowRun(storage, flow.name, failed).wait(5)
    flow.broken["b"] = 0  # type: ignore[attr-defined]
    flow.run({"v": "first"}, tracking_id=pending)
    requests = [flow.new_run({"v": "second"}, tid) for tid in (new, pending, failed)]
    results = storage.enqueue_flows(flows=requests)
    assert [(r.tracking_id, r.created, r.resumed) for r in results] == [
        (new, True, False),
        (pending, False, False),
        (failed, False, True),
    ]
    assert results[1].status == FlowStatus.PENDING and results[2].status == FlowStatus.RUNNING
    assert flow_count(storage) == 3
    drain(storage)
    assert FlowRun(storage, flow.name, pending).wait(5) == {"v": "first", "a": "a", "b": "b"}
    assert FlowRun(storage, flow.name, failed).wait(5) == {"v": "first", "a": "a", "b": "b"}
    assert FlowRun(storage, flow.name, new).wait(5) == {"v": "second", "a": "a", "b": "b"}
    assert calls == {"a": 3, "b": 4}  # the failed run: "b" again, never "a"


def test_a_completed_tracking_id_refuses_the_whole_batch(storage: Storage, unique: Names) -> None:
    """As flow.run: FlowAlreadyCompleted; and none of the batch's other runs is enqueued."""
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: 1)
    done = unique("done")
    flow.run({}, tracking_id=done)
    drain(storage)
    before = (flow_count(storage), node_count(storage))
    with pytest.raises(FlowAlreadyCompleted, match=done):
        flow.run_many([{}, {}, {}], tracking_ids=[unique("t"), done, unique("t")])
    assert (flow_count(storage), node_count(storage)) == before


def test_a_tracking_id_of_another_flow_refuses_the_whole_batch(
    storage: Storage, unique: Names
) -> None:
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: 1)
    other = Flow(unique("other"), storage=storage).step("only", lambda ctx: 1)
    taken = unique("taken")
    other.run({}, tracking_id=taken)
    with pytest.raises(TrackingIdTaken, match=other.name):
        flow.run_many([{}, {}], tracking_ids=[unique("t"), taken])
    assert flow_count(storage) == 1


def test_a_tracking_id_given_twice_is_refused_before_any_statement(
    storage: Storage, unique: Names
) -> None:
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: 1)
    tid = unique("t")
    with statements(storage) as sent, pytest.raises(ValueError, match="positions 1 and 3"):
        flow.run_many([{}] * 4, tracking_ids=[unique("t"), tid, unique("t"), tid])
    assert sent == [] and flow_count(storage) == 0


def test_inputs_and_tracking_ids_must_pair_up(storage: Storage, unique: Names) -> None:
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: 1)
    with pytest.raises(ValueError, match="3 inputs but 2 tracking_ids"):
        flow.run_many([{}, {}, {}], tracking_ids=["x", "y"])


@pytest.mark.parametrize(
    ("bad_input", "bad_id", "error", "message"),
    [
        ({"x": float("nan")}, None, PayloadNotJSON, "input 900 of run_many"),
        ({}, "", InvalidIdentifier, "tracking_id is empty"),
    ],
    ids=["input", "tracking_id"],
)
def test_a_bad_input_at_the_end_sends_no_statement(
    storage: Storage,
    unique: Names,
    bad_input: dict[str, Any],
    bad_id: str | None,
    error: type,
    message: str,
) -> None:
    """Every input and tracking_id is checked before the first write: run 901 of 901
    being unstorable sends nothing to the database, so a caller's transaction stays clean."""
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: 1)
    inputs = [{"i": i} for i in range(900)] + [bad_input]
    ids = [unique("t") for _ in range(900)] + [bad_id]
    with statements(storage) as sent, pytest.raises(error, match=message):
        flow.run_many(inputs, tracking_ids=ids)  # type: ignore[arg-type]
    assert sent == [] and flow_count(storage) == 0


# -- run_many: one transaction, bounded statements -----------------------------------


def test_a_batch_larger_than_a_statement_is_chunked_in_one_transaction(
    storage: Storage, unique: Names
) -> None:
    """One row past MAX_ROWS_PER_STATEMENT: two statements inserting runs and two
    inserting nodes (on PostgreSQL the same two), and every run is there. (That the
    chunks share one transaction: the rollback test below, with two chunks.)"""
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: 1)
    count = MAX_ROWS_PER_STATEMENT + 1
    with statements(storage) as sent:
        runs = flow.run_many([{"i": i} for i in range(count)])
    assert sum("INSERT INTO fs_flows" in s for s in sent) == 2
    assert sum("INSERT INTO fs_nodes" in s for s in sent) == 2
    assert flow_count(storage) == count and node_count(storage) == count
    assert len({run.tracking_id for run in runs}) == count


def test_a_batch_is_chunked_by_bytes_too(storage: Storage, unique: Names) -> None:
    """No statement carries more inputs than the payload limit: with a 4 KiB limit and
    1.5 KiB inputs, ten runs take several INSERTs (MariaDB refuses statements over
    max_allowed_packet; a batch must not be larger than the largest single enqueue)."""
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: len(ctx.data["pad"]))
    payload_module.set_limits(PayloadLimits(max_bytes=4096))
    try:
        with statements(storage) as sent:
            runs = flow.run_many([{"pad": "x" * 1500} for _ in range(10)])
    finally:
        payload_module.set_limits(None)
    assert sum("INSERT INTO fs_flows" in s for s in sent) == 5  # two runs each
    drain(storage)
    assert all(run.wait(5)["only"] == 1500 for run in runs)


def test_racing_batches_of_the_same_ids_create_each_run_once(
    storage: Storage, unique: Names
) -> None:
    """Four threads enqueue the same 60 ids in different orders at once: one run and
    one first node per id, each id created by exactly one of them."""
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: 1)
    ids = [unique("t") for _ in range(60)]
    barrier = threading.Barrier(4)
    created: list[str] = []
    errors: list[BaseException] = []

    def enqueue(seed: int) -> None:
        mine = random.Random(seed).sample(ids, len(ids))
        try:
            barrier.wait()
            results = storage.enqueue_flows(flows=[flow.new_run({}, tid) for tid in mine])
            created.extend(r.tracking_id for r in results if r.created)
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=enqueue, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(created) == sorted(ids)
    assert flow_count(storage) == 60 and node_count(storage) == 60


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_an_id_inserted_by_another_transaction_mid_batch_is_answered_as_existing(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Names
) -> None:
    """Another request commits one of the batch's ids after the batch read them but
    before it inserts them: that run is answered with its handle (its input is the
    other request's), never duplicated, and the rest of the batch is created.
    (MySQL: the plain multi-row INSERT fails on the duplicate and goes row by row.)"""
    url = database_url(request, backend, tmp_path)
    storage, other = create_storage(url), create_storage(url)
    storage.migrate()
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: ctx.data["by"])
    ids = [unique("t") for _ in range(5)]
    raced = ids[2]

    def insert_first(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        if "INSERT INTO fs_flows" in statement and flow_count(other) == 0:
            other.enqueue_flow(flow=flow.new_run({"by": "other"}, raced))

    event.listen(sql_storage(storage).engine, "before_cursor_execute", insert_first)
    try:
        results = storage.enqueue_flows(flows=[flow.new_run({"by": "batch"}, t) for t in ids])
    finally:
        event.remove(sql_storage(storage).engine, "before_cursor_execute", insert_first)
    assert [r.created for r in results] == [True, True, False, True, True]
    assert flow_count(storage) == 5 and node_count(storage) == 5
    drain(storage)
    assert FlowRun(storage, flow.name, raced).wait(5)["only"] == "other"
    assert FlowRun(storage, flow.name, ids[0]).wait(5)["only"] == "batch"
    storage.close()
    other.close()


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_run_many_commits_or_rolls_back_with_the_callers_transaction(
    sql_url: str, outcome: str, unique: Names
) -> None:
    """The transactional outbox for a batch: the orders and their runs commit together,
    or neither is there."""
    storage = create_storage(sql_url)
    storage.migrate()
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: ctx.data["order"])
    app = sa.create_engine(parse_database_url(sql_url))
    with app.connect() as conn:
        conn.execute(sa.text("CREATE TABLE orders (id VARCHAR(20) PRIMARY KEY)"))
        conn.commit()
        orders = [f"o{i}" for i in range(1, MAX_ROWS_PER_STATEMENT + 2)]  # two chunks
        for order in orders[:3]:
            conn.execute(sa.text("INSERT INTO orders (id) VALUES (:id)"), {"id": order})
        runs = flow.run_many([{"order": o} for o in orders], connection=conn)
        conn.commit() if outcome == "commit" else conn.rollback()
    with app.connect() as conn:
        stored_orders = conn.execute(sa.text("SELECT count(*) FROM orders")).scalar()
    if outcome == "commit":
        assert stored_orders == 3 and flow_count(storage) == len(orders)
        drain(storage)
        assert runs[-1].wait(5) == {"order": orders[-1], "a": orders[-1]}
    else:
        assert stored_orders == 0 and flow_count(storage) == 0 and node_count(storage) == 0
    app.dispose()
    storage.close()


@skip_through_pgbouncer("LISTEN on a connection of its own")
@pytest.mark.parametrize("backend", ["postgresql"])
def test_run_many_wakes_an_idle_listening_worker(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, unique: Names
) -> None:
    """With a 30 s poll interval only the batch's NOTIFY can get its runs done within seconds."""
    storage = create_storage(database_url(request, backend, tmp_path))
    storage.migrate()
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: ctx.data["i"])
    worker = Worker(storage=storage, poll_interval=30, lease_seconds=120, concurrency=4)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)  # past its first (empty) poll: asleep in its poll interval now
        runs = flow.run_many([{"i": i} for i in range(20)])
        assert [run.wait(timeout=10)["a"] for run in runs] == list(range(20))
    finally:
        worker.stop()
        thread.join(30)
    storage.close()


# -- flow.run: one round trip on PostgreSQL, the rules when the id exists -------------


def test_flow_run_of_an_existing_tracking_id_follows_the_trigger_rules(
    storage: Storage, unique: Names
) -> None:
    """On PostgreSQL the one-statement insert does nothing for an existing id; the
    transaction that follows applies the rules: the pending run's handle and nothing
    new, FAILED resumed at its failed step, COMPLETED and another flow's id refused."""
    flow, calls = failing_once(storage, unique("again"))
    tid = unique("t")
    flow.run({"v": 1}, tracking_id=tid)
    flow.run({"v": 2}, tracking_id=tid)  # pending: nothing new
    assert flow_count(storage) == 1 and node_count(storage) == 1
    drain(storage)
    with pytest.raises(StepFailed):
        FlowRun(storage, flow.name, tid).wait(5)
    flow.broken["b"] = 0  # type: ignore[attr-defined]
    run = flow.run({"v": 3}, tracking_id=tid)  # FAILED: resumed at "b"
    assert run.status() == FlowStatus.RUNNING
    drain(storage)
    assert run.wait(5) == {"v": 1, "a": "a", "b": "b"} and calls == {"a": 1, "b": 2}
    with pytest.raises(FlowAlreadyCompleted):
        flow.run({}, tracking_id=tid)
    other = Flow(unique("other"), storage=storage).step("only", lambda ctx: 1)
    with pytest.raises(TrackingIdTaken):
        other.run({}, tracking_id=tid)
    assert flow_count(storage) == 1


def test_a_new_run_is_one_statement_on_postgresql_and_two_elsewhere(
    storage: Storage, unique: Names
) -> None:
    """flow.run of a new tracking_id sends the fewest statements each database allows:
    PostgreSQL one (run, first stage and NOTIFY together); SQLite and MySQL the run
    and its first stage, without reading the run back."""
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: 1).step("b", lambda ctx: 2)
    flow.run({})
    with statements(storage) as sent:
        flow.run({"n": 1})
    sent = [s for s in sent if not s.startswith("BEGIN")]  # SQLite's BEGIN IMMEDIATE
    if storage.supports_notify:
        assert len(sent) == 1 and sent[0].startswith("WITH clock AS"), sent
    else:
        assert [s.split(" (")[0] for s in sent] == ["INSERT INTO fs_flows", "INSERT INTO fs_nodes"]


def test_a_new_run_in_the_callers_transaction_takes_as_few_statements(
    sql_url: str, unique: Names
) -> None:
    """With connection= the new run is written by the caller's connection: one statement
    on PostgreSQL (the same CTE, inside the caller's transaction, not prepared: the
    caller's session is not ours), two elsewhere."""
    storage = create_storage(sql_url)
    storage.migrate()
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: 1)
    app = sa.create_engine(parse_database_url(sql_url))
    sent: list[str] = []
    event.listen(app, "before_cursor_execute", lambda *args: sent.append(args[2].strip()))
    with app.connect() as conn:
        flow.run({}, tracking_id=unique("t"), connection=conn)
        conn.commit()
    app.dispose()
    if storage.supports_notify:
        assert len(sent) == 1 and sent[0].startswith("WITH clock AS"), sent
    else:
        assert [s.split(" (")[0] for s in sent] == ["INSERT INTO fs_flows", "INSERT INTO fs_nodes"]
    assert flow_count(storage) == 1 and node_count(storage) == 1
    storage.close()


def test_flow_run_and_run_many_log_no_info_line_per_run(
    storage: Storage, unique: Names, logs: list[dict[str, Any]]
) -> None:
    """A web app enqueuing thousands of runs must not print thousands of lines."""
    flow = Flow(unique("quiet"), storage=storage).step("only", lambda ctx: 1)
    flow.run({})
    flow.run_many([{}, {}])
    enqueue_lines = [line for line in logs if str(line["event"]).startswith("flow.")]
    assert enqueue_lines and all(line["log_level"] == "debug" for line in enqueue_lines)


def server_statements(server: LocalServer, database: str, action: Callable[[], Any]) -> list[str]:
    """The statements PostgreSQL logs for ``database`` (log_statement = 'all') while
    ``action`` runs, read from the server's log between two marker statements."""
    marker = uuid.uuid4().hex
    spy = sa.create_engine(server.url_for(database), poolclass=sa.pool.NullPool)
    with spy.connect() as conn:
        conn.execute(sa.text(f"SELECT 'begin-{marker}'"))
        action()
        conn.execute(sa.text(f"SELECT 'end-{marker}'"))
    spy.dispose()
    log = server.log_path.read_text(errors="replace")
    window = log[log.index(f"begin-{marker}") : log.index(f"end-{marker}")]
    found = []
    for line in window.splitlines()[1:]:
        if "LOG:  statement: " in line:
            found.append(line.split("LOG:  statement: ", 1)[1].strip())
        elif found and not line.startswith("20"):  # a statement's continuation line
            found[-1] += " " + line.strip()
    return [s.strip() for s in found[:-1]]  # the last is the end marker's own


@skip_through_pgbouncer("the enqueue sent as EXECUTE of a prepared statement")
def test_flow_run_on_postgresql_is_one_statement_without_begin_or_commit(
    postgres_server: DatabaseServer, unique: Names
) -> None:
    """The server's statement log: a new run is one statement (the prepared
    data-modifying CTE, in autocommit); no BEGIN, no COMMIT, no SET (a ping, were the
    connection idle long enough to get one, is left aside)."""
    if not isinstance(postgres_server, LocalServer):
        pytest.skip("needs the statement log of a server the tests started")
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = postgres_server.create_database(name)
    with postgres_server.admin_engine().connect() as conn:  # for the sessions opened after
        conn.execute(sa.text(f"ALTER DATABASE \"{name}\" SET log_statement = 'all'"))
    storage = create_storage(url)
    try:
        storage.migrate()
        flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: 1)
        flow.run({})  # the pool has its connection now
        sent = server_statements(postgres_server, name, lambda: flow.run({}, tracking_id="one"))
        beside_the_ping = [s for s in sent if s != "SELECT 1"]
        assert len(beside_the_ping) == 1, sent
        assert beside_the_ping[0].startswith("EXECUTE fs_enqueue_runs"), sent
        assert storage.get_flow(tracking_id="one") is not None
    finally:
        storage.close()
        postgres_server.drop_database(name)
