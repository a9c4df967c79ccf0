"""Payloads on every backend: each stored once, read only where needed, never trusted.

The run's input and each step's output are stored once; a step's ctx.data is
rebuilt when its node is claimed (storage/sql/context.py). A stored value that
does not parse (a row changed outside FlowSmith) fails its own run with an error
naming the column, and every other run on the queue goes on. Rows are corrupted
with SQL on the real tables; the runs are driven by in-process workers.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from flowsmith_worker import Context, Flow, FlowStatus, NodeStatus, Worker
from flowsmith_worker.cli import main
from flowsmith_worker.storage.base import ClaimedNode, Storage
from flowsmith_worker.storage.sql import schema

Names = Callable[[str], str]
F, N = schema.flows, schema.nodes
MIB = 1024 * 1024


def drain(storage: Storage, **kw: Any) -> None:
    """Run an in-process worker until nothing is pending; leases short, so a stuck node shows."""
    Worker(storage=storage, poll_interval=0.05, lease_seconds=1, **kw).run_until_idle(timeout=30)


def engine(storage: Storage) -> sa.Engine:
    made: sa.Engine = storage.engine  # type: ignore[attr-defined]
    return made


def set_column(storage: Storage, table: sa.Table, where: Any, **values: Any) -> None:
    """Change a row behind FlowSmith's back, as a careless operator or a bad migration would."""
    with engine(storage).begin() as conn:
        assert conn.execute(sa.update(table).where(where).values(**values)).rowcount == 1


def run_row(storage: Storage, tracking_id: str) -> Any:
    """Status and error of a run, read with SQL (get_flow parses the corrupt row itself)."""
    with engine(storage).connect() as conn:
        return conn.execute(
            sa.select(F.c.id, F.c.status, F.c.error).where(F.c.tracking_id == tracking_id)
        ).one()


def node_rows(storage: Storage, tracking_id: str) -> dict[str, Any]:
    with engine(storage).connect() as conn:
        rows = conn.execute(
            sa.select(N.c.step_name, N.c.status, N.c.error)
            .join(F, F.c.id == N.c.flow_id)
            .where(F.c.tracking_id == tracking_id)
        ).all()
    return {r.step_name: r for r in rows}


def assert_completed(runs: list[Any], step: str = "only") -> None:
    for run in runs:
        assert run.wait(timeout=1)[step] == "ok", run


# -- finding 1: a corrupt row fails its run; the queue goes on ------------------------


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("input", '{"order_id": 1', "fs_flows.input of run {tid!r} is not valid JSON"),
        ("input", "[1, 2]", "fs_flows.input of run {tid!r} is not a JSON object"),
        ("plan", "{'stages': []}", "fs_flows.plan of run {tid!r} is not valid JSON"),
        ("plan", '{"stages": 5}', "fs_flows.plan of run {tid!r} is not a plan"),
        # Deeper than json.loads goes: a RecursionError, not a ValueError.
        ("input", "[" * 100_000 + "]" * 100_000, "fs_flows.input of run {tid!r} is not valid"),
    ],
)
def test_a_corrupt_run_row_fails_that_run_and_the_queue_goes_on(
    storage: Storage,
    unique: Names,
    logs: list[dict[str, Any]],
    column: str,
    value: str,
    problem: str,
) -> None:
    """A run whose stored input or plan does not parse is claimed first, fails with
    an error naming the column and run (in the log too), and the runs queued
    behind it complete."""
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: "ok")
    tid = unique("poisoned")
    flow.run({"order_id": 1}, tracking_id=tid)
    set_column(storage, F, F.c.tracking_id == tid, **{column: value})
    others = [flow.run({"order_id": i}, tracking_id=unique("ok")) for i in range(3)]
    drain(storage)
    expected = problem.format(tid=tid)
    poisoned = run_row(storage, tid)
    assert poisoned.status == FlowStatus.FAILED
    assert expected in poisoned.error
    assert f"`flowsmith retry {tid}`" in poisoned.error
    node = node_rows(storage, tid)["only"]
    assert node.status == NodeStatus.FAILED and expected in node.error
    failed = [e for e in logs if e["event"] == "step.failed" and e["tracking_id"] == tid]
    assert len(failed) == 1 and expected in failed[0]["error"]
    assert_completed(others)


def test_a_run_failed_by_a_corrupt_row_can_be_retried_once_the_row_is_corrected(
    storage: Storage, unique: Names
) -> None:
    """The error's advice holds: correct the value, retry the run, and it completes."""
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: ctx.data["order_id"])
    tid = unique("t")
    run = flow.run({"order_id": 1}, tracking_id=tid)
    set_column(storage, F, F.c.tracking_id == tid, input='{"order_id": ')
    drain(storage)
    assert run_row(storage, tid).status == FlowStatus.FAILED
    set_column(storage, F, F.c.tracking_id == tid, input='{"order_id": 2}')
    storage.resume_flow(tracking_id=tid)
    drain(storage)
    assert run.wait(timeout=1) == {"order_id": 2, "only": 2}


def test_a_corrupt_output_fails_the_step_that_needs_it_not_the_sibling_that_finished(
    storage: Storage, unique: Names
) -> None:
    """A parallel sibling finishing does not parse its siblings' outputs, so a corrupt
    output cannot roll its completion back; the next stage, whose ctx.data needs it,
    fails naming the column, and other runs complete."""
    flow = Flow(unique("f"), storage=storage)
    with flow.parallel():
        flow.step("a", lambda ctx: "A").step("b", lambda ctx: "B")
    flow.step("c", lambda ctx: "C")
    tid = unique("poisoned")
    flow.run({}, tracking_id=tid)
    a, b = claim(storage, 2)
    assert storage.complete_node(lease=a.lease, output="A")
    set_column(storage, N, N.c.id == a.node_id, output='{"unterminated')
    assert storage.complete_node(lease=b.lease, output="B")
    plain = Flow(unique("plain"), storage=storage).step("only", lambda ctx: "ok")
    others = [plain.run({}, tracking_id=unique("ok")) for _ in range(3)]
    drain(storage)
    expected = f"fs_nodes.output of step 'a' of run {tid!r} is not valid JSON"
    assert expected in run_row(storage, tid).error
    nodes = node_rows(storage, tid)
    assert nodes["b"].status == NodeStatus.COMPLETED
    assert nodes["c"].status == NodeStatus.FAILED and expected in nodes["c"].error
    assert_completed(others)


def test_a_subflow_whose_child_output_is_corrupt_fails_parent_and_child(
    storage: Storage, unique: Names
) -> None:
    """When a child run finishes, its final ctx.data (the parent step's output) is
    rebuilt from its outputs; one that does not parse fails the child and the
    waiting parent with an error naming it, instead of rolling back forever."""
    child_tid = unique("child")

    def corrupt_sibling(ctx: Context) -> str:
        # Runs after "x" completed (concurrency 1, group order): damage its output.
        with engine(storage).begin() as conn:
            conn.execute(
                sa.update(N)
                .where(
                    N.c.step_name == "x",
                    N.c.flow_id.in_(sa.select(F.c.id).where(F.c.tracking_id == child_tid)),
                )
                .values(output="nope")
            )
        return "Y"

    child = Flow(unique("child"), storage=storage)
    with child.parallel():
        child.step("x", lambda ctx: "X").step("y", corrupt_sibling)
    parent = Flow(unique("parent"), storage=storage).subflow(
        "sub", child, tracking_id=lambda ctx: child_tid
    )
    tid = unique("parent")
    parent.run({}, tracking_id=tid)
    plain = Flow(unique("plain"), storage=storage).step("only", lambda ctx: "ok")
    others = [plain.run({}, tracking_id=unique("ok")) for _ in range(2)]
    drain(storage, concurrency=1)
    expected = f"fs_nodes.output of step 'x' of run {child_tid!r} is not valid JSON"
    assert run_row(storage, child_tid).status == FlowStatus.FAILED
    assert node_rows(storage, child_tid)["y"].status == NodeStatus.FAILED
    parent_run = run_row(storage, tid)
    assert parent_run.status == FlowStatus.FAILED and expected in parent_run.error
    assert_completed(others)


def test_adopting_a_completed_child_with_a_corrupt_output_fails_the_parent_step(
    storage: Storage, unique: Names
) -> None:
    """A subflow step whose child already completed takes the child's rebuilt final
    ctx.data; a corrupt output there fails the parent step naming it."""
    child = Flow(unique("child"), storage=storage).step("x", lambda ctx: "X")
    child_tid = unique("child")
    done = child.run({}, tracking_id=child_tid)
    drain(storage)
    set_column(storage, N, N.c.id == done.trace()[0].id, output="[1,")
    parent = Flow(unique("parent"), storage=storage).subflow(
        "sub", child, tracking_id=lambda ctx: child_tid
    )
    tid = unique("parent")
    parent.run({}, tracking_id=tid)
    drain(storage)
    expected = f"fs_nodes.output of step 'x' of run {child_tid!r} is not valid JSON"
    assert run_row(storage, tid).status == FlowStatus.FAILED
    sub = node_rows(storage, tid)["sub"]
    assert sub.status == NodeStatus.FAILED and expected in sub.error


# -- finding 15: each payload stored once, read only where needed -------------------------


def claim(storage: Storage, limit: int) -> list[ClaimedNode]:
    return storage.claim_nodes(worker_id="w", limit=limit, lease_seconds=60, queues=["default"])


def stored_payload_bytes(storage: Storage, tracking_id: str) -> int:
    """Bytes of the payload columns of a run (input, output) and its nodes (output), in SQL."""

    def size(column: Any) -> Any:
        return sa.func.coalesce(sa.func.sum(sa.func.length(column)), 0)

    flow_id = run_row(storage, tracking_id).id
    with engine(storage).connect() as conn:
        nodes = conn.execute(sa.select(size(N.c.output)).where(N.c.flow_id == flow_id)).scalar_one()
        flows = conn.execute(
            sa.select(size(F.c.input) + size(F.c.output)).where(F.c.id == flow_id)
        ).scalar_one()
    return int(nodes) + int(flows)


def test_each_output_is_stored_once(storage: Storage, unique: Names) -> None:
    """Five steps of 100 KB outputs store about 500 KB, not the 2 MB that copying
    ctx.data into every node and into the run's output took."""
    flow = Flow(unique("f"), storage=storage)
    for name in "abcde":
        flow.step(name, lambda ctx, name=name: name * 100_000)
    run = flow.run({"order_id": 1}, tracking_id=unique("t"))
    drain(storage)
    data = run.wait(timeout=1)
    assert data == {"order_id": 1, **{name: name * 100_000 for name in "abcde"}}
    real = sum(len(json.dumps(v)) for v in data.values())
    assert real <= stored_payload_bytes(storage, run.tracking_id) < real + 1_000


@pytest.fixture
def wide_group(storage: Storage, unique: Names) -> Iterator[Flow]:
    """A flow of ten parallel steps and one after them, run with a 1 MiB input."""
    flow = Flow(unique("wide"), storage=storage)
    with flow.parallel():
        for index in range(10):
            flow.step(f"s{index}", lambda ctx: "done")
    flow.step("after", lambda ctx: sorted(ctx.data))
    flow.run({"blob": "x" * MIB}, tracking_id=unique("t"))
    yield flow


def peak_bytes(call: Callable[[], Any]) -> tuple[Any, int]:
    """What ``call`` returns, and the most memory it held at once (tracemalloc)."""
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_claiming_a_wide_group_reads_the_input_once_and_copies_it_per_sibling(
    storage: Storage, wide_group: Flow
) -> None:
    """Ten siblings claimed together read the run's 1 MiB input once (not ten
    stored snapshots, 20 MiB with their parses) and each gets its own parsed copy."""
    claimed, peak = peak_bytes(lambda: claim(storage, 10))
    assert len(claimed) == 10
    assert all(len(node.input["blob"]) == MIB for node in claimed)
    assert peak < 10 * MIB + 4 * MIB, f"{peak / MIB:.1f} MiB"


def test_siblings_claimed_together_share_no_mutable_value(storage: Storage, unique: Names) -> None:
    """Parallel steps run in different threads: a list in ctx.data changed in place
    by one of them is not the list its sibling sees."""
    flow = Flow(unique("f"), storage=storage)
    with flow.parallel():
        flow.step("a", lambda ctx: None).step("b", lambda ctx: None)
    flow.run({"items": [1]}, tracking_id=unique("t"))
    a, b = claim(storage, 2)
    a.input["items"].append(2)
    assert b.input["items"] == [1]


def test_finishing_siblings_of_a_wide_group_reads_no_payload(
    storage: Storage, wide_group: Flow
) -> None:
    """Each sibling's completion decides "is the stage done" from statuses: none of
    them reads the 1 MiB input or the other siblings' outputs (each used to read all)."""
    claimed = claim(storage, 10)
    for node in claimed:
        written, peak = peak_bytes(
            lambda node=node: storage.complete_node(lease=node.lease, output="done")
        )
        assert written
        assert peak < MIB / 2, f"{node.step_name}: {peak / MIB:.2f} MiB"
    (after,) = claim(storage, 1)
    assert after.step_name == "after"
    assert sorted(after.input) == ["blob", *(f"s{i}" for i in range(10))]


def test_waiting_on_a_run_and_its_status_read_none_of_its_payloads(
    storage: Storage, unique: Names
) -> None:
    """FlowRun.wait polls the run's status only: a pending run with a 1 MiB input is
    polled for 0.2 s without reading that input (each poll used to read and parse it),
    and status() reads none either; the final ctx.data is read once it completed."""
    flow = Flow(unique("f"), storage=storage).step("only", lambda ctx: "ok")
    run = flow.run({"blob": "x" * MIB}, tracking_id=unique("t"))

    def wait_briefly() -> None:
        with pytest.raises(TimeoutError):
            run.wait(timeout=0.2)

    _, peak = peak_bytes(wait_briefly)
    assert peak < MIB / 2, f"{peak / MIB:.2f} MiB"
    status, peak = peak_bytes(run.status)
    assert status == FlowStatus.PENDING and peak < MIB / 2, f"{peak / MIB:.2f} MiB"
    drain(storage)
    assert run.wait(timeout=1) == {"blob": "x" * MIB, "only": "ok"}


# -- the trace and the final data are rebuilt on read --------------------------------------


def test_trace_status_and_wait_show_the_rebuilt_context(
    storage: Storage, unique: Names, backend: str
) -> None:
    """Each node's input snapshot is what its step saw (a skipped step leaves no
    output), in trace(), `flowsmith status --json` and the run's final data."""
    seen: dict[str, dict[str, Any]] = {}

    def step(name: str) -> Callable[[Context], Any]:
        def fn(ctx: Context) -> Any:
            seen[name] = dict(ctx.data)
            return name.upper()

        return fn

    flow = Flow(unique("f"), storage=storage).step("a", step("a"))
    with flow.parallel():
        flow.step("b", step("b")).step("c", step("c"), condition=lambda ctx: False)
    flow.step("d", step("d"))
    run = flow.run({"order_id": 7}, tracking_id=unique("t"))
    drain(storage)
    final = {"order_id": 7, "a": "A", "b": "B", "d": "D"}
    assert run.wait(timeout=1) == final
    inputs = {node.step_name: node.input for node in run.trace()}
    assert inputs == {
        "a": {"order_id": 7},
        "b": {"order_id": 7, "a": "A"},
        "c": {"order_id": 7, "a": "A"},
        "d": {"order_id": 7, "a": "A", "b": "B"},
    }
    assert seen == {name: inputs[name] for name in "abd"}
    if backend != "memory":  # the command needs a database another process could open
        url = engine(storage).url.render_as_string(hide_password=False)
        result = CliRunner().invoke(main, ["status", run.tracking_id, "--url", url, "--json"])
        assert result.exit_code == 0, result.output
        shown = json.loads(result.output)
        assert shown["flow"]["output"] == final
        assert {s["step_name"]: s["input"] for s in shown["steps"]} == inputs


def test_snapshots_written_by_older_versions_are_ignored(storage: Storage, unique: Names) -> None:
    """Rows from before schema 3's code kept the final data in fs_flows.output; it is
    ignored: ctx.data, the trace and the run's output are always rebuilt from the run's
    input and completed outputs (which never change, so for real old rows the two agree).
    The per-node snapshots of fs_nodes.input went with schema 4
    (tests/integration/test_migrations.py)."""
    seen: list[dict[str, Any]] = []
    flow = Flow(unique("f"), storage=storage).step("a", lambda ctx: "A")
    flow.step("b", lambda ctx: seen.append(dict(ctx.data)) or "B")
    run = flow.run({"order_id": 7}, tracking_id=unique("t"))
    (a,) = claim(storage, 1)
    assert storage.complete_node(lease=a.lease, output="A")
    stale = json.dumps({"order_id": 7, "a": "stale snapshot"})
    drain(storage)
    set_column(storage, F, F.c.tracking_id == run.tracking_id, output=stale)
    assert seen == [{"order_id": 7, "a": "A"}]
    assert run.wait(timeout=1) == {"order_id": 7, "a": "A", "b": "B"}
    assert [n.input for n in run.trace()] == [{"order_id": 7}, {"order_id": 7, "a": "A"}]
