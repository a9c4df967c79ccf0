"""The chaos run's short fixed-seed pass (issue 11, point 5), one per backend.

Real `flowsmith worker` processes, real servers, real SIGKILLs (some aimed by the
workers at their own claims and batch commits), SIGTERMs, database crashes, killed
connections and retries of FAILED runs; then every check of
tests/torture/chaos_check.py, and the checks' and the chaos's own tests. The long
run is ``make torture``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from flowsmith_worker import Flow
from flowsmith_worker.flow import registry
from flowsmith_worker.records import AttemptRecord, NodeRecord
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import AttemptOutcome, FlowStatus, NodeStatus, Storage
from tests.servers import DatabaseServer, LocalServer, require_restart
from tests.support import kill_points
from tests.support.outage import durable_commits
from tests.torture.chaos import (
    RESTART,
    STUCK,
    UNSETTLED,
    Crew,
    Database,
    Harm,
    Record,
    Retried,
    Retrier,
    Round,
    Settings,
    open_runs,
    play,
    summary,
    wait_all_over,
    worker_env,
)
from tests.torture.chaos_check import (
    Call,
    Key,
    Ran,
    check_model,
    check_node,
    check_round,
    read_journal,
    took,
)
from tests.torture.chaos_flows import (
    MAP,
    FlowPlan,
    StepPlan,
    StepScript,
    build_all,
    save_plans,
)
from tests.torture.engine import scheduled_failure
from tests.torture.model import item_output_of, output_of

SEED = 20261201
RUNS = 60
SECONDS = 20.0


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path, unique: Callable[[str], str]
) -> Database:
    """A fresh database; on a server, committing durably (a crash then loses nothing)."""
    if request.param == "sqlite":
        path = tmp_path / "chaos.db"
        return Database(f"sqlite:///{path}", "sqlite", path=path)
    server: DatabaseServer = request.getfixturevalue(
        "postgres_server" if request.param == "postgresql" else "mysql_server"
    )
    require_restart(server)
    assert isinstance(server, LocalServer)
    name = f"t_{unique('c')[-12:]}"
    url = server.create_database(name)
    durable_commits(server, name)
    return Database(url, request.param, server, name)


@pytest.mark.slow
def test_a_short_chaos_run_keeps_every_promise(database: Database, tmp_path: Path) -> None:
    """60 runs under 20 s of SIGKILLs (aimed ones too), SIGTERMs, database crashes,
    killed connections and retries (fixed seed): every run ends as the model says for
    its script, the journal and the trace agree, no completed step ran again, no two
    attempts of a node overlapped, nothing is left running, no worker died unkilled."""
    played = play(Settings(SEED, database.kind, SECONDS, RUNS), database, tmp_path)
    print(summary(played.record, len(played.runs), played.seconds))
    assert played.record.harms, "the chaos did nothing"
    problems = check_round(played, database.url)
    assert not problems, "\n".join(problems)


# -- the checks refuse what the engine must never do --------------------------------

RUN, STEP, PID, OTHER_PID = "r1", "s0_0", 100, 200
C, F, R = AttemptOutcome.COMPLETED, AttemptOutcome.FAILED, AttemptOutcome.RESCUED


def node(status: NodeStatus, *outcomes: AttemptOutcome) -> NodeRecord:
    """A node of step STEP whose attempts 1, 2, ... ended with ``outcomes``."""
    attempts = tuple(
        AttemptRecord(1, 1, STEP, number, "w", 0.0, 1.0, outcome, None)
        for number, outcome in enumerate(outcomes, 1)
    )
    return NodeRecord(
        1, 1, STEP, 0, 0, status, len(outcomes), 3, 0, 0.0, None, None, {}, None, None,
        0.0, 1.0, attempts=attempts,
    )  # fmt: skip


def journal(*calls: tuple[int, int, float, float | None, str | None]) -> dict[Key, list[Call]]:
    """(attempt, pid, start, end, result) calls of STEP in run RUN."""
    made: dict[Key, list[Call]] = {}
    for number, pid, start, end, result in calls:
        made.setdefault((RUN, STEP, number), []).append(Call(pid, start, end, result))
    return made


FAILED_THEN_COMPLETED = (node(NodeStatus.COMPLETED, F, C), journal(
    (1, PID, 0.0, 1.0, "ScheduledFailure"), (2, PID, 2.0, 3.0, "completed")
))  # fmt: skip
KILLED_THEN_RESCUED = (node(NodeStatus.COMPLETED, R, C), journal(
    (1, PID, 0.0, None, None), (2, OTHER_PID, 6.0, 7.0, "completed")
))  # fmt: skip


def test_the_node_checks_accept_what_the_engine_may_do() -> None:
    """A retried failure, and an attempt whose worker was SIGKILLed mid-call (no end
    line) rescued and run again after its death: no problem."""
    killed = Record(sigkilled={PID: 5.0})
    assert check_node(*FAILED_THEN_COMPLETED, Record()) == []
    assert check_node(*KILLED_THEN_RESCUED, killed) == []


def test_the_node_checks_accept_a_rescue_after_an_outage_that_followed_the_call() -> None:
    """Found by the chaos run (seed 64926166, PostgreSQL): a call that ended before
    the database went away, its outcome's write waiting out three restarts longer
    than the lease, is rescued with its worker alive (at least once, as documented)."""
    trace = node(NodeStatus.COMPLETED, R, C)
    trace = replace(trace, attempts=(replace(trace.attempts[0], ended_at=20.0), trace.attempts[1]))
    calls = journal((1, PID, 0.0, 1.0, "completed"), (2, PID, 21.0, 22.0, "completed"))
    outage = Record(harms=[Harm(RESTART, "postgresql", 1.5, 17.0)])
    assert check_node(trace, calls, outage) == []
    assert check_node(trace, calls, Record()) != []


@pytest.mark.parametrize(
    ("trace", "calls", "record", "problem"),
    [
        # A COMPLETED attempt the step function never saw.
        (node(NodeStatus.COMPLETED, C), {}, Record(), "not in the journal"),
        # A call the engine has no attempt for.
        (node(NodeStatus.COMPLETED, C), journal(
            (1, PID, 0.0, 1.0, "completed"), (2, PID, 2.0, 3.0, "completed")
        ), Record(), "not in the trace"),
        # One attempt called twice.
        (node(NodeStatus.COMPLETED, C), journal(
            (1, PID, 0.0, 1.0, "completed"), (1, OTHER_PID, 2.0, 3.0, "completed")
        ), Record(), "called the step 2 times"),
        # A step run again after it completed.
        (node(NodeStatus.COMPLETED, C), journal(
            (1, PID, 0.0, 1.0, "completed"), (2, PID, 2.0, 3.0, "completed")
        ), Record(), "after the step COMPLETED"),
        # The rescue ran while the lost worker still ran the first attempt.
        (KILLED_THEN_RESCUED[0], KILLED_THEN_RESCUED[1], Record(sigkilled={PID: 9.0}),
         "at the same time"),
        # Rescued though its worker lived and the database never went away.
        (KILLED_THEN_RESCUED[0], journal(
            (1, PID, 0.0, 1.0, "completed"), (2, OTHER_PID, 6.0, 7.0, "completed")
        ), Record(), "was not lost"),
        # The journal saw a failure the engine recorded as a completion.
        (node(NodeStatus.COMPLETED, C), journal((1, PID, 0.0, 1.0, "ScheduledFailure")),
         Record(), "ScheduledFailure in the journal"),
    ],
)  # fmt: skip
def test_the_node_checks_refuse_what_the_engine_must_never_do(
    trace: NodeRecord, calls: dict[Key, list[Call]], record: Record, problem: str
) -> None:
    """Each promise checked from the journal is checked: breaking it is reported."""
    problems = check_node(trace, calls, record)
    assert any(problem in found for found in problems), problems


ONE_STEP = FlowPlan("one", ((StepPlan(STEP, 1, None, False),),))


def run_of_one_step(script: StepScript, *outcomes: AttemptOutcome) -> list[str]:
    """check_model's problems for ONE_STEP, run with ``script``, whose node's attempts
    ended with ``outcomes`` and which COMPLETED with what its last attempt saw."""
    data = {"script": {STEP: script.to_json()}}
    output = output_of(len(outcomes), data)
    trace = replace(node(NodeStatus.COMPLETED, *outcomes), output=output)
    calls = journal(*((n, PID, n, n + 0.5, "x") for n, o in enumerate(outcomes, 1) if o in (F, C)))
    final = {**data, STEP: output}
    ran = Ran(data, FlowStatus.COMPLETED, {STEP: trace}, final, None)
    return check_model(ONE_STEP, ran, calls, RUN, {}).problems


def test_the_model_check_counts_rescued_attempts_out() -> None:
    """A step scripted to fail its attempt 2: rescued at 1, failed at 2, completed at
    3 is what the model allows (the rescue took a number, not a retry); completing at
    2 is not, nor failing at 1 then completing at 2 (its attempt 1 was to succeed)."""
    script = StepScript(fail=frozenset({2}))
    assert run_of_one_step(script, R, F, C) == []
    assert run_of_one_step(script, R, C)
    assert run_of_one_step(script, F, C)


HOLD_THE_WRITE_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("BEGIN IMMEDIATE")
print("holding", flush=True)
time.sleep(60)
"""


def test_the_chaos_finds_the_process_holding_sqlites_write_lock(tmp_path: Path) -> None:
    """SQLite's "database crash" SIGKILLs the process holding its WAL write lock: the
    chaos finds that process (and nobody when no one holds it)."""
    path = tmp_path / "locked.db"
    database = Database(f"sqlite:///{path}", "sqlite", path=path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    assert database.write_lock_holder() is None
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_WRITE_LOCK, str(path)], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        assert database.write_lock_holder() == holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_the_round_check_reports_a_call_the_engine_never_made(tmp_path: Path) -> None:
    """A calm round (no chaos) on SQLite checks clean; a journal line of a call the
    engine never made, in a parent run or in a subflow's child run, is reported."""
    path = tmp_path / "calm.db"
    database = Database(f"sqlite:///{path}", "sqlite", path=path)
    played = play(Settings(SEED, "sqlite", 0.0, 20, aimed=False), database, tmp_path)
    assert check_round(played, database.url) == []
    lines = played.journal.read_text().splitlines()
    child = next(line for line in lines if ":s" in json.loads(line)["run"])
    for line in (lines[0], child):
        entry = json.loads(line)
        with played.journal.open("a") as journal_file:
            journal_file.write(json.dumps({**entry, "attempt": entry["attempt"] + 50}) + "\n")
        problems = check_round(played, database.url)
        assert any(f"attempt {entry['attempt'] + 50} ran" in p for p in problems), problems


def test_a_round_waits_for_the_child_runs_of_its_runs(tmp_path: Path) -> None:
    """Found by the chaos run (seed 406211912, SQLite): a parent run that fails while its
    subflow's child runs leaves that child to run to its end (its WAITING node waits
    for it), so the round is over only once the children are too: they are counted."""
    storage = create_storage(f"sqlite:///{tmp_path / 'open.db'}")
    storage.migrate()
    flow = Flow("open_runs_probe", storage=storage).step("only", lambda ctx: None)
    try:
        flow.run({}, tracking_id="t_r0")
        flow.run({}, tracking_id="t_r0:s1_0")  # a child's tracking_id
        flow.run({}, tracking_id="other_r0")
        assert open_runs(storage, "t_r") == 2
    finally:
        registry.unregister(flow.name)
        storage.close()


SIBLING = "s0_1"
FAILS_THE_RUN = StepScript(fail=frozenset({1}))


def named(trace: NodeRecord, step: str) -> NodeRecord:
    """``trace`` as the node of ``step`` (its attempts too)."""
    attempts = tuple(replace(a, step_name=step) for a in trace.attempts)
    return replace(trace, step_name=step, attempts=attempts)


def test_an_attempt_cancelled_after_its_worker_was_lost_is_no_problem() -> None:
    """Found by the chaos run (commit 9b4cf55, "CANCELLED after loss"): in a parallel
    stage a worker is SIGKILLed mid-call (a start line, no end) while its sibling fails
    the run; the rescue of its lease finds the run over and records the lost attempt
    CANCELLED, not RESCUED. The verdict must take that attempt as lost (no call of its
    own to agree with, no retry counted), not as a call whose end is missing. The old
    verdict (CANCELLED left out of LOST) reported both the node and the model."""
    plan = FlowPlan("pair", ((StepPlan(STEP, 0, None, False), StepPlan(SIBLING, 0, None, False)),))
    data = {"script": {STEP: FAILS_THE_RUN.to_json(), SIBLING: StepScript().to_json()}}
    failed = replace(node(NodeStatus.FAILED, F), attempt=1)
    lost = named(node(NodeStatus.CANCELLED, AttemptOutcome.CANCELLED), SIBLING)
    lost_call = {(RUN, SIBLING, 1): [Call(OTHER_PID, 0.1, None, None)]}
    calls = {**journal((1, PID, 0.0, 0.5, "ScheduledFailure")), **lost_call}
    assert check_node(lost, lost_call, Record(sigkilled={OTHER_PID: 1.0})) == []
    error = f"ScheduledFailure: {STEP}: attempt 1 is scheduled to fail"
    ran = Ran(data, FlowStatus.FAILED, {STEP: failed, SIBLING: lost}, None, error)
    assert check_model(plan, ran, calls, RUN, {}).problems == []
    # A CANCELLED attempt whose worker lived on is still one the engine lost wrongly.
    assert check_node(lost, lost_call, Record()) != []


# What a node is when its worker died at each kill point: (status, attempt, calls).
DEAD_AT = {
    kill_points.CLAIMED: (NodeStatus.PENDING, 0, 0),  # the claim rolled back
    kill_points.LEASED: (NodeStatus.RUNNING, 1, 0),  # leased, never run
    kill_points.BEFORE_COMMIT: (NodeStatus.RUNNING, 1, 1),  # ran; its outcome rolled back
    kill_points.AFTER_COMMIT: (NodeStatus.COMPLETED, 1, 1),  # ran; its outcome written
}


@pytest.mark.slow
@pytest.mark.parametrize("point", kill_points.SIGKILLS)
def test_a_worker_aimed_at_a_kill_point_dies_there(
    point: str, database: Database, tmp_path: Path
) -> None:
    """A chaos worker aimed at ``point`` (odds 1) SIGKILLs itself exactly there: in
    the claim before its commit (nothing leased), right after it (leased, not run),
    right before the batch commit (run, outcome lost) or right after it (written);
    the chaos notes it dead at the moment its kill log gives."""
    plan = FlowPlan(f"aimed_{tmp_path.name[-20:]}", ((StepPlan(STEP, 0, None, False),),))
    storage = create_storage(database.url)
    storage.migrate()
    flow = build_all([plan], None, storage)[plan.name]
    plan_path, journal_path = tmp_path / "plan.json", tmp_path / "journal.jsonl"
    save_plans([plan], plan_path)
    crew = Crew(tmp_path, database, worker_env(plan_path, journal_path), 1)
    record = Record()
    try:
        flow.run({"script": {STEP: StepScript().to_json()}}, tracking_id=f"{plan.name}_r0")
        crew.aim({point: 1.0})
        crew.fill()
        crew.live[0].proc.wait(60)
        crew.reap(record)
        run = storage.get_flow(tracking_id=f"{plan.name}_r0", with_payloads=False)
        assert run is not None
        (node,) = storage.list_nodes(flow_id=run.id)
        calls = read_journal(journal_path)[0].get((run.tracking_id, STEP, 1), [])
        assert (node.status, node.attempt, len(calls)) == DEAD_AT[point]
        assert [harm.action for harm in record.harms] == [point]
        assert record.sigkilled.keys() == {crew.gone[0].pid}
    finally:
        crew.cleanup()
        registry.unregister(plan.name)
        storage.close()


def test_the_model_check_follows_a_run_through_its_retries() -> None:
    """A step (one retry allowed) scripted to fail attempts 1-3: FAILED at 2, retried by
    the chaos, completed at 4 is what the model allows from where the retry found it;
    the same end with no retry noted is not, nor completing at 4 when 4 was to fail."""
    snapshot = Retried({STEP: node(NodeStatus.FAILED, F, F)}, scheduled_failure(STEP, 2))
    assert retried_run(frozenset({1, 2, 3}), [snapshot]) == []
    assert retried_run(frozenset({1, 2, 3}), [])
    assert retried_run(frozenset({1, 2, 3, 4}), [snapshot])


MAPPED = FlowPlan("mapped", ((StepPlan("m", 1, None, False, kind=MAP, items=2, max_parallel=1),),))


def test_the_model_check_judges_a_maps_items_by_their_counted_attempts() -> None:
    """A map of two items (one retry each): item 0 rescued at 1 (its worker SIGKILLed),
    completed at 2; item 1 scripted to fail its attempt 1, completed at 2. The map's
    output renumbered item by item is what the model allows; item 1 completing at 1
    (it was to fail), or the map's list out of item order, is not."""
    fails = {"m[0]": frozenset[int](), "m[1]": frozenset({1})}
    assert mapped_run(fails, (R, C), (F, C)) == []
    assert mapped_run(fails, (R, C), (C,))
    assert mapped_run(fails, (R, C), (F, C), reverse=True)


def mapped_run(
    fails: dict[str, frozenset[int]],
    first: tuple[AttemptOutcome, ...],
    second: tuple[AttemptOutcome, ...],
    reverse: bool = False,
) -> list[str]:
    """check_model's problems for MAPPED, its items ending with ``first``/``second``."""
    data = {"script": {name: StepScript(fail=f).to_json() for name, f in fails.items()}}
    items = [
        replace(
            node(NodeStatus.COMPLETED, *outcomes),
            step_name=f"m[{i}]",
            output=item_output_of(i, len(outcomes), data),
        )
        for i, outcomes in enumerate((first, second))
    ]
    outputs = [item.output for item in items]
    listed = list(reversed(outputs)) if reverse else outputs
    mapped = replace(node(NodeStatus.COMPLETED, C), step_name="m", output=listed)
    nodes = {"m": mapped, **{item.step_name: item for item in items}}
    calls: dict[Key, list[Call]] = {}
    for item in items:
        for attempt in item.attempts:
            end = None if attempt.outcome is R else attempt.attempt + 0.5
            result = {F: "ScheduledFailure", C: "completed"}.get(attempt.outcome)
            call = Call(PID, attempt.attempt, end, result)
            calls.setdefault((RUN, item.step_name, attempt.attempt), []).append(call)
    ran = Ran(data, FlowStatus.COMPLETED, nodes, {**data, "m": listed}, None)
    return check_model(MAPPED, ran, calls, RUN, {}).problems


def retried_run(fails: frozenset[int], retried: list[Retried]) -> list[str]:
    """check_model's problems for ONE_STEP run with ``fails``, which ended COMPLETED at
    attempt 4 after attempts 1-3 failed, the chaos having retried it as ``retried``."""
    data = {"script": {STEP: StepScript(fail=fails).to_json()}}
    trace = replace(node(NodeStatus.COMPLETED, F, F, F, C), output=output_of(4, data))
    calls = journal(*((n, PID, n, n + 0.5, "x") for n in range(1, 5)))
    ran = Ran(data, FlowStatus.COMPLETED, {STEP: trace}, {**data, STEP: trace.output}, None)
    return check_model(ONE_STEP, ran, calls, RUN, {}, retried).problems


def test_a_retry_that_did_not_take_is_no_course_of_the_run() -> None:
    """A retry sent while the database was away may not have taken: the checks count
    only those after which a node the retry was to run again has run again."""
    failed = node(NodeStatus.FAILED, F)
    snapshot = Retried({STEP: failed}, None)
    assert not took(snapshot, {STEP: failed})
    assert took(snapshot, {STEP: node(NodeStatus.COMPLETED, F, C)})


@pytest.mark.slow
def test_the_chaos_retries_failed_runs_and_judges_them(database: Database, tmp_path: Path) -> None:
    """A run scripted to fail its attempts 1 and 2 (no retry allowed) FAILS, is retried
    with `flowsmith retry`, FAILS again, is retried with flow.run of its tracking_id and
    COMPLETES: the round checks clean given the retries, not without them; a retry
    noted that did not take (the database away) is told apart from the one after it."""
    plan = FlowPlan(f"retried_{tmp_path.name[-20:]}", ((StepPlan(STEP, 0, None, False),),))
    storage = create_storage(database.url)
    storage.migrate()
    flows = build_all([plan], None, storage)
    plan_path, journal_path = tmp_path / "plan.json", tmp_path / "journal.jsonl"
    save_plans([plan], plan_path)
    journal_path.touch()
    tracking_id = f"{plan.name}_r0"
    runs = {tracking_id: (plan.name, {"script": {STEP: StepScript(frozenset({1, 2})).to_json()}})}
    retrier = Retrier(storage, database.url, flows, runs, tracking_id)
    crew, record = Crew(tmp_path, database, worker_env(plan_path, journal_path), 1), Record()
    try:
        flows[plan.name].run(runs[tracking_id][1], tracking_id=tracking_id)
        crew.fill()
        for by_cli in (True, False):
            wait_for(storage, tracking_id, FlowStatus.FAILED)
            assert "exit code 1" not in retrier.retry(tracking_id, record, by_cli)
        wait_for(storage, tracking_id, FlowStatus.COMPLETED)
        crew.stop(record)
    finally:
        crew.cleanup()
        registry.unregister(plan.name)
        storage.close()
    played = Round({plan.name: plan}, runs, record, journal_path)
    assert len(record.retried[tracking_id]) == 2
    assert check_round(played, database.url) == []
    assert check_round(replace(played, record=Record()), database.url) != []
    first = record.retried[tracking_id][0]
    record.retried[tracking_id].insert(0, first)  # as if a first retry had not taken
    assert check_round(played, database.url) == []


def wait_for(storage: Storage, tracking_id: str, status: FlowStatus, timeout: float = 60.0) -> None:
    """Until the run is ``status`` with every node settled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
        nodes = storage.list_nodes(flow_id=run.id) if run is not None else []
        if run is not None and run.status == status and not UNSETTLED & {n.status for n in nodes}:
            return
        time.sleep(0.05)
    raise AssertionError(f"{tracking_id} not {status} after {timeout} s")


@pytest.mark.slow
def test_a_worker_that_does_not_stop_is_a_problem_with_its_stacks(tmp_path: Path) -> None:
    """Found by the chaos run (seed 948188147, SQLite): a SIGTERMed worker still running a
    minute later stopped the whole run, its log lost with it. Now the chaos asks it for
    its threads' stacks (SIGUSR1), keeps them, SIGKILLs it and goes on; the round's
    check reports it. (Here the worker is simply never told to stop.)"""
    path = tmp_path / "stuck.db"
    database = Database(f"sqlite:///{path}", "sqlite", path=path)
    create_storage(database.url).migrate()
    plan_path, journal_path = tmp_path / "plan.json", tmp_path / "journal.jsonl"
    save_plans([], plan_path)
    crew, record = Crew(tmp_path, database, worker_env(plan_path, journal_path), 1), Record()
    try:
        crew.fill()
        crew.live[0].wait_started()
        crew.wait_drained(crew.live[0], record, patience=0.1)
    finally:
        crew.cleanup()
    (stuck,) = record.harms
    assert stuck.action == STUCK and "Thread 0x" in stuck.target, stuck.target
    played = Round({}, {}, record, journal_path)
    assert [p for p in check_round(played, database.url) if STUCK in p]


@pytest.mark.slow
def test_a_round_waits_for_the_rescue_of_a_lost_node_in_a_failed_run(tmp_path: Path) -> None:
    """Found by the chaos run (seed 43383837, SQLite): a worker died running one step
    of a parallel stage as its sibling failed the run; the run was over, so the round
    ended and stopped the workers before the lost node's lease lapsed, and the node was
    left RUNNING. The round now waits until a worker has rescued it (CANCELLED)."""
    path = tmp_path / "lost.db"
    database = Database(f"sqlite:///{path}", "sqlite", path=path)
    pair = (StepPlan(STEP, 0, None, False), StepPlan(SIBLING, 0, None, False))
    plan = FlowPlan(f"lost_{tmp_path.name[-20:]}", (pair,))
    storage = create_storage(database.url)
    storage.migrate()
    flow = build_all([plan], None, storage)[plan.name]
    plan_path, journal_path = tmp_path / "plan.json", tmp_path / "journal.jsonl"
    save_plans([plan], plan_path)
    crew, record = Crew(tmp_path, database, worker_env(plan_path, journal_path), 1), Record()
    try:
        run = flow.run({"script": {}}, tracking_id="lost_r0")
        claimed = storage.claim_nodes(
            worker_id="lost", limit=2, lease_seconds=1.0, queues=["default"]
        )
        failing = next(node for node in claimed if node.step_name == STEP)
        storage.fail_node(lease=failing.lease, error="failed", retry_delay=None)
        assert run.status() == FlowStatus.FAILED
        crew.fill()
        wait_all_over(storage, "lost_r")
        statuses = {
            node.step_name: node.status
            for node in storage.list_nodes(flow_id=claimed[0].lease.flow_id)
        }
        assert statuses == {STEP: NodeStatus.FAILED, SIBLING: NodeStatus.CANCELLED}
        crew.stop(record)
    finally:
        crew.cleanup()
        registry.unregister(plan.name)
        storage.close()
