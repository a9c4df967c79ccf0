"""The hot path through PgBouncer in transaction pooling mode (Debian 12's 1.18).

In that mode each transaction may run on another server connection, so
nothing a session holds survives it: with FLOWSMITH_PG_POOLER=transaction (plain
statements, no LISTEN) enqueue, claim, the group-commit batch write with
chaining, and real ``flowsmith worker`` processes work through it, a SIGKILLed
one included. A process that forgot the setting is told what to set: with
prepared statements on, two clients sharing the bouncer's server connections
fail with DatabaseUnavailable naming it, not with a confusing "prepared
statement does not exist"; a worker's LISTEN, which would hear nothing, is
noticed before it is sent, and the worker polls.
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowsmith_worker import Flow
from flowsmith_worker.config import PoolSettings
from flowsmith_worker.errors import DatabaseUnavailable, InvalidSetting
from flowsmith_worker.plan import Plan, PlannedStep
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import Chain, Finished, Lease, NewFlow, NodeStatus
from flowsmith_worker.storage.sql import SqlStorage
from flowsmith_worker.storage.sql.notify import UNHEARD_HINT
from flowsmith_worker.storage.sql.pooler import POOLER_ENV
from flowsmith_worker.storage.sql.prepared import SWITCH_ENV
from flowsmith_worker.worker import Worker
from tests.conftest import eventually
from tests.e2e import test_crash as crash
from tests.servers.pgbouncer import BouncedDatabase, PgBouncer
from tests.worker_process import WorkerProcess

Names = Callable[[str], str]
STEPS = 10
POOL = PoolSettings(pool_min=1, pool_max=4)

FLOWS_MODULE = textwrap.dedent(
    """
    import os

    from flowsmith_worker import Flow

    flow = Flow(os.environ["FS_FLOW_NAME"])
    for _i in range({steps}):
        flow.step(f"s{{_i}}", lambda ctx, i=_i: i * ctx.data["n"])
    """
).format(steps=STEPS)


@pytest.fixture
def pooled(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process says it is behind a pooler in transaction mode, as the README says."""
    monkeypatch.delenv(SWITCH_ENV, raising=False)
    monkeypatch.setenv(POOLER_ENV, "transaction")


@pytest.fixture
def bounced(bouncer_database: BouncedDatabase, pooled: None) -> Iterator[SqlStorage]:
    """A migrated storage whose every statement goes through the bouncer."""
    storage = create_storage(bouncer_database.url, POOL)
    assert isinstance(storage, SqlStorage)
    storage.migrate()
    yield storage
    storage.close()


def new_flows(unique: Names, runs: int, steps: int) -> list[NewFlow]:
    plan = Plan(stages=tuple((PlannedStep(f"s{i}", 1),) for i in range(steps)))
    return [NewFlow("raw", unique("t"), {"n": 1}, plan) for _ in range(runs)]


def test_enqueue_claim_and_batch_write_through_pgbouncer(
    bounced: SqlStorage, bouncer_database: BouncedDatabase, pgbouncer: PgBouncer, unique: Names
) -> None:
    """With FLOWSMITH_PG_POOLER=transaction, two workers' storages behind one PgBouncer
    in transaction mode (so they share its server connections): runs enqueued one by
    one and as a batch are claimed by both, each worker writes its first steps as one
    group-commit batch that chains the runs' next steps to it, then writes the chained
    steps' outcomes, fenced by the leases the chain gave; and no PREPARE reached the
    server."""
    for flow in new_flows(unique, runs=2, steps=3):
        bounced.enqueue_flow(flow=flow)
    bounced.enqueue_flows(flows=new_flows(unique, runs=4, steps=3))
    other = create_storage(bouncer_database.url, POOL)
    try:
        workers = {"w1": bounced, "w2": other}
        claimed = {
            w: s.claim_nodes(worker_id=w, limit=3, lease_seconds=60, queues=["default"])
            for w, s in workers.items()
        }
        for worker_id, storage in workers.items():
            nodes = claimed[worker_id]
            assert sorted(n.step_name for n in nodes) == ["s0"] * 3
            chain = Chain(worker_id=worker_id, lease_seconds=60)
            written = storage.complete_batch(
                finished=[done(n.lease, n.step_name) for n in nodes], chain=chain
            )
            assert [w.won for w in written] == [True] * 3
            chained = [w.chained for w in written if w.chained is not None]
            assert sorted(c.step_name for c in chained) == ["s1"] * 3
            again = storage.complete_batch(finished=[done(c.lease, c.step_name) for c in chained])
            assert [w.won for w in again] == [True] * 3
    finally:
        other.close()
    # Nothing left behind the chains: every run's third step waits for a claim.
    rest = bounced.claim_nodes(worker_id="w3", limit=10, lease_seconds=60, queues=["default"])
    assert sorted(n.step_name for n in rest) == ["s2"] * 6
    assert_nothing_prepared(pgbouncer, bouncer_database.name)


def assert_nothing_prepared(pgbouncer: PgBouncer, name: str) -> None:
    """No server connection behind the bouncer holds a statement of ours. (Prepared, a
    lost statement only costs a reconnect, so the work above could succeed anyway.)"""
    held = pgbouncer.prepared_statements(name)
    assert held, "the work above went through no server connection"
    assert held == {pid: [] for pid in held}


def done(lease: Lease, step_name: str) -> Finished:
    """The attempt holding ``lease`` ended well (output 1)."""
    return Finished(lease, NodeStatus.COMPLETED, "1", step_name=step_name)


@pytest.mark.slow
def test_a_worker_process_drains_ten_step_runs_through_pgbouncer(
    bounced: SqlStorage,
    bouncer_database: BouncedDatabase,
    pgbouncer: PgBouncer,
    tmp_path: Path,
    unique: Names,
) -> None:
    """Two real `flowsmith worker` processes with FLOWSMITH_PG_POOLER=transaction (and
    no --no-listen), connected only through one PgBouncer in transaction mode, run a
    few 10-step runs to the end (claims, chaining, batch writes, heartbeats all through
    the bouncer) and stop cleanly on SIGTERM; no PREPARE and no LISTEN reached the
    server."""
    url = bouncer_database.url
    name = unique("bounced")
    (tmp_path / "bouncedflows.py").write_text(FLOWS_MODULE)
    env = dict(os.environ, FS_FLOW_NAME=name)
    flow = Flow(name, storage=bounced)
    for i in range(STEPS):
        flow.step(f"s{i}", _not_here)
    handles = [flow.run({"n": n}) for n in range(1, 6)]
    args = ("--poll-interval", "0.1", "--concurrency", "4")
    workers = [WorkerProcess(tmp_path, url, env, *args, module="bouncedflows") for _ in "ab"]
    try:
        for worker in workers:
            worker.wait_started()
        for n, handle in enumerate(handles, start=1):
            expected = {"n": n, **{f"s{i}": i * n for i in range(STEPS)}}
            assert handle.wait(timeout=60) == expected, workers[0].output()[-3000:]
        for worker in workers:
            worker.signal(signal.SIGTERM)
        for worker in workers:
            assert worker.wait(30) == 0, worker.output()[-3000:]
        assert "listen.off" in workers[0].output()
    finally:
        for worker in workers:
            worker.cleanup()
    assert_nothing_prepared(pgbouncer, bouncer_database.name)
    assert_nobody_listens(pgbouncer, bouncer_database.name)


def assert_nobody_listens(pgbouncer: PgBouncer, name: str) -> None:
    """No server connection behind the bouncer LISTENs on FlowSmith's channel (there,
    its notifications would go to whichever client used it next)."""
    held = pgbouncer.listening_channels(name)
    assert held, "nothing went through any server connection"
    assert [c for channels in held.values() for c in channels if c == "flowsmith"] == []


@pytest.mark.slow
def test_a_worker_sigkilled_mid_step_behind_pgbouncer_loses_nothing(
    bounced: SqlStorage,
    bouncer_database: BouncedDatabase,
    pgbouncer: PgBouncer,
    tmp_path: Path,
    unique: Names,
) -> None:
    """Two `flowsmith worker --no-listen` processes through PgBouncer in transaction
    mode, one SIGKILLed inside a step (its client connections to the bouncer die,
    perhaps inside a transaction): as on a direct connection (tests/e2e/test_crash.py),
    all 20 runs of 3 steps complete, the dead worker's steps are rescued and run
    again by the survivor, no COMPLETED step runs again, no node's executions
    overlap, and the survivor stops cleanly."""
    name = unique("crash_bounced")
    workdir, events_path, env = crash.prepare(tmp_path, name, 0.05, 0.15)
    env.pop(SWITCH_ENV, None)
    env[POOLER_ENV] = "transaction"
    tracking_ids = crash.enqueue(bounced, name, 20)
    started: list[WorkerProcess] = []

    def spawn(workdir: Path, url: str, env: dict[str, str], *args: str) -> WorkerProcess:
        started.append(WorkerProcess(workdir, url, env, *args, "--no-listen", module="crashflows"))
        return started[-1]

    url = bouncer_database.url
    try:
        crash.kill_one_of_two(
            bounced, url, spawn, workdir, events_path, env, tracking_ids, 60, after_starts=10
        )
    finally:
        for worker in started:
            worker.cleanup()
    assert_nothing_prepared(pgbouncer, bouncer_database.name)


def _not_here(_ctx: object) -> None:
    raise AssertionError("steps run in the worker process, not in the test")


def test_prepared_statements_through_pgbouncer_fail_with_what_to_do(
    bouncer_database: BouncedDatabase, unique: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With prepared statements on (the default), two clients behind one PgBouncer in
    transaction mode share its server connections, so one meets the other's PREPAREd
    statements (or misses its own): after running the transaction again on a new
    connection it fails with DatabaseUnavailable naming FLOWSMITH_PG_POOLER=transaction."""
    monkeypatch.delenv(SWITCH_ENV, raising=False)
    monkeypatch.delenv(POOLER_ENV, raising=False)
    url, direct = bouncer_database.url, bouncer_database.direct_url
    migrator = create_storage(direct)
    migrator.migrate()
    migrator.close()
    first, second = create_storage(url, POOL), create_storage(url, POOL)
    try:
        with pytest.raises(DatabaseUnavailable, match=f"{POOLER_ENV}=transaction"):
            # One round is enough when the bouncer has one idle server connection;
            # a few more make the meeting certain with several.
            for _ in range(5):
                for storage in (first, second):
                    storage.enqueue_flow(flow=new_flows(unique, runs=1, steps=1)[0])
    finally:
        first.close()
        second.close()


def test_a_worker_that_forgot_the_setting_is_told_and_polls(
    bouncer_database: BouncedDatabase,
    pgbouncer: PgBouncer,
    unique: Names,
    logs: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker behind PgBouncer in transaction mode with only FLOWSMITH_PG_PREPARE=off
    (LISTEN left on): its listener's test NOTIFY, sent through the pool, never reaches
    it, so it warns naming FLOWSMITH_PG_POOLER=transaction and does not LISTEN on
    FlowSmith's channel (which would register some server connection of the bouncer's);
    runs still complete, by polling."""
    monkeypatch.delenv(POOLER_ENV, raising=False)
    monkeypatch.setenv(SWITCH_ENV, "off")
    storage = create_storage(bouncer_database.url, POOL)
    storage.migrate()
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: "done")
    worker = Worker(storage=storage, poll_interval=0.1, lease_seconds=30)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        eventually(lambda: any(line["event"] == "listen.unheard" for line in logs), timeout=15)
        assert flow.run({}, tracking_id=unique("t")).wait(timeout=10) == {"a": "done"}
    finally:
        worker.stop()
        thread.join(30)
        storage.close()
    [warning] = [line for line in logs if line["event"] == "listen.unheard"]
    assert warning["hint"] == UNHEARD_HINT and f"{POOLER_ENV}=transaction" in UNHEARD_HINT
    assert not any(line["event"] == "listen.started" for line in logs)
    assert_nobody_listens(pgbouncer, bouncer_database.name)


def test_a_pooler_mode_not_known_is_refused_with_what_to_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FLOWSMITH_PG_POOLER=transation (a typo) is refused when a PostgreSQL storage is
    made, naming the values known, rather than quietly leaving PREPARE and LISTEN on."""
    monkeypatch.setenv(POOLER_ENV, "transation")
    with pytest.raises(InvalidSetting, match=f"{POOLER_ENV}='transation'.*'transaction'"):
        create_storage("postgresql://nobody@127.0.0.1:1/none")
