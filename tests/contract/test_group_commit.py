"""Group commit and chaining, on every backend (memory, sqlite, postgresql, mysql).

complete_batch writes many outcomes in one transaction, each fenced by its own
lease; with a Chain it leases a run's next sequential step to the completing
worker in the same commit. CompletionBatcher gathers the outcomes of steps
that finish while a commit is on its way. The worker runs chained steps in the
same slot without a claim. Every test uses the real storage; none mocks it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from flowsmith_worker import Context, Flow, FlowStatus, NodeStatus, Worker
from flowsmith_worker.batcher import CompletionBatcher
from flowsmith_worker.plan import Plan, PlannedStep
from flowsmith_worker.storage.base import (
    Chain,
    ClaimedNode,
    Finished,
    NewFlow,
    Storage,
    Written,
)
from tests.conftest import eventually

Names = Callable[[str], str]
CHAIN = Chain("w1", lease_seconds=60)


def sequential(tracking_id: str, steps: Sequence[str] = ("a", "b", "c")) -> NewFlow:
    plan = Plan(stages=tuple((PlannedStep(name, 1),) for name in steps), module="tests.nowhere")
    return NewFlow(flow_name="raw", tracking_id=tracking_id, input={"n": 1}, plan=plan)


def claim_all(storage: Storage, worker_id: str = "w1", limit: int = 50) -> list[ClaimedNode]:
    return storage.claim_nodes(
        worker_id=worker_id, limit=limit, lease_seconds=60, queues=["default"]
    )


def completed(node: ClaimedNode, output: str = '"done"', replay: bool = False) -> Finished:
    return Finished(node.lease, NodeStatus.COMPLETED, output, replay=replay)


def statuses(storage: Storage, tracking_id: str) -> dict[str, tuple[NodeStatus, str | None]]:
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None
    return {
        n.step_name: (n.status, n.lease_owner)
        for n in storage.list_nodes(flow_id=record.id, with_payloads=False)
    }


# -- complete_batch -----------------------------------------------------------------


def test_a_batch_fences_each_outcome_by_its_own_lease(storage: Storage, unique: Names) -> None:
    """One stale lease in a batch is refused; the others in the same batch are written."""
    ids = [unique(f"t{i}") for i in range(3)]
    for tracking_id in ids:
        storage.enqueue_flow(flow=sequential(tracking_id, ["only"]))
    nodes = claim_all(storage)
    assert len(nodes) == 3
    # The middle one was rescued and claimed again: its first lease is stale.
    storage.release_nodes(leases=[nodes[1].lease])
    [again] = claim_all(storage, worker_id="w2")
    written = storage.complete_batch(finished=[completed(n) for n in nodes])
    assert [w.won for w in written] == [True, False, True]
    assert storage.complete_node(lease=again.lease, output="fresh")
    for tracking_id in ids:
        assert storage.get_flow(tracking_id=tracking_id).status == FlowStatus.COMPLETED  # type: ignore[union-attr]


def test_chaining_leases_the_next_step_to_the_completing_worker(
    storage: Storage, unique: Names
) -> None:
    """The completion of a sequential step creates the next one RUNNING, attempt 1,
    leased to the completing worker: no other worker can claim it."""
    tracking_id = unique("t")
    storage.enqueue_flow(flow=sequential(tracking_id))
    [a] = claim_all(storage)
    [written] = storage.complete_batch(finished=[completed(a, '"A"')], chain=CHAIN)
    assert written.won and written.chained is not None
    b = written.chained
    assert (b.step_name, b.lease.attempt, b.lease.worker_id) == ("b", 1, "w1")
    assert statuses(storage, tracking_id)["b"] == (NodeStatus.RUNNING, "w1")
    assert claim_all(storage, worker_id="w2") == []
    # The chained lease is a real lease: it fences, it is extended, and it chains on.
    assert storage.extend_leases(leases=[b.lease], lease_seconds=60)
    b_done = Finished(b.lease, NodeStatus.SKIPPED, None)
    [written] = storage.complete_batch(finished=[b_done], chain=CHAIN)
    assert written.chained is not None and written.chained.step_name == "c"
    c_done = Finished(written.chained.lease, NodeStatus.COMPLETED, '"C"')
    [last] = storage.complete_batch(finished=[c_done], chain=CHAIN)
    assert last.won and last.chained is None
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None and record.status == FlowStatus.COMPLETED
    assert record.output == {"n": 1, "a": "A", "c": "C"}  # the skipped step left nothing


def test_no_chain_into_or_out_of_a_parallel_group(storage: Storage, unique: Names) -> None:
    """A group after a step fans out to every worker, and the step after a group is
    claimed: the worker finishing the last sibling does not hold the others' outputs."""
    plan = Plan(
        stages=(
            (PlannedStep("a", 1),),
            (PlannedStep("x", 1), PlannedStep("y", 1)),
            (PlannedStep("z", 1),),
        ),
        module="tests.nowhere",
    )
    tracking_id = unique("t")
    storage.enqueue_flow(flow=NewFlow("raw", tracking_id, {"n": 1}, plan))
    [a] = claim_all(storage)
    [written] = storage.complete_batch(finished=[completed(a)], chain=CHAIN)
    assert written.won and written.chained is None
    siblings = claim_all(storage)
    assert sorted(n.step_name for n in siblings) == ["x", "y"]
    written_all = storage.complete_batch(finished=[completed(n) for n in siblings], chain=CHAIN)
    assert [w.chained for w in written_all] == [None, None]
    [z] = claim_all(storage, worker_id="w2")
    assert z.step_name == "z" and z.input == {"n": 1, "a": "done", "x": "done", "y": "done"}


def test_a_replayed_batch_is_harmless(storage: Storage, unique: Names) -> None:
    """A batch sent again after its answer was lost (it had committed) answers as the
    first send did and hands back the same chained step: nothing is stranded."""
    tracking_id = unique("t")
    storage.enqueue_flow(flow=sequential(tracking_id))
    [a] = claim_all(storage)
    [first] = storage.complete_batch(finished=[completed(a)], chain=CHAIN)
    [replayed] = storage.complete_batch(finished=[completed(a, replay=True)], chain=CHAIN)
    assert replayed == first
    # Sent again by a worker that has begun to stop (it asks for no chain now): the
    # chained step still comes back, for that worker to release at once.
    [stopping] = storage.complete_batch(finished=[completed(a, replay=True)], chain=None)
    assert stopping == first
    # Without the replay mark the same write is a lost lease, as it always was.
    assert storage.complete_batch(finished=[completed(a)], chain=CHAIN) == [Written(False)]
    # A replay of an attempt that never committed is not mistaken for a success.
    other = unique("u")
    storage.enqueue_flow(flow=sequential(other))
    [u] = claim_all(storage)
    storage.release_nodes(leases=[u.lease])
    assert storage.complete_batch(finished=[completed(u, replay=True)]) == [Written(False)]


def test_a_worker_that_stops_chains_nothing(storage: Storage, unique: Names) -> None:
    """Without a Chain (a stopping worker) the next step is PENDING for any worker."""
    tracking_id = unique("t")
    storage.enqueue_flow(flow=sequential(tracking_id))
    [a] = claim_all(storage)
    [written] = storage.complete_batch(finished=[completed(a)], chain=None)
    assert written.won and written.chained is None
    [b] = claim_all(storage, worker_id="w2")
    assert (b.step_name, b.input) == ("b", {"n": 1, "a": "done"})


# -- CompletionBatcher ----------------------------------------------------------------


class _HeldFirstBatch:
    """The real storage, except that the first complete_batch waits for ``release``:
    the writes that come meanwhile queue up, as they do while a commit is on its way."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.release = threading.Event()
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def complete_batch(self, *, finished: Sequence[Finished], chain: Chain | None = None) -> Any:
        self.batches.append(len(finished))
        if len(self.batches) == 1:
            assert self.release.wait(10)
        return self._storage.complete_batch(finished=finished, chain=chain)


def test_outcomes_that_finish_during_a_commit_share_the_next_one(
    storage: Storage, unique: Names
) -> None:
    """While one batch commits, the outcomes that arrive queue and go in one transaction;
    no writer returns (frees its slot) before its own outcome has committed."""
    ids = [unique(f"t{i}") for i in range(6)]
    for tracking_id in ids:
        storage.enqueue_flow(flow=sequential(tracking_id, ["only"]))
    nodes = claim_all(storage)
    held = _HeldFirstBatch(storage)
    batcher = CompletionBatcher(held)  # type: ignore[arg-type]
    answers: dict[int, Written] = {}

    def write(node: ClaimedNode) -> None:
        answers[node.node_id] = batcher.write(completed(node))

    first = threading.Thread(target=write, args=(nodes[0],))
    first.start()
    eventually(lambda: held.batches == [1])
    rest = [threading.Thread(target=write, args=(n,)) for n in nodes[1:]]
    for thread in rest:
        thread.start()
    eventually(lambda: batcher.queued == 5)
    assert answers == {}  # nothing answered while its commit has not happened
    assert storage.get_flow(tracking_id=ids[0]).status == FlowStatus.RUNNING  # type: ignore[union-attr]
    held.release.set()
    for thread in [first, *rest]:
        thread.join(10)
    assert held.batches == [1, 5]
    assert all(w.won for w in answers.values()) and len(answers) == 6
    for tracking_id in ids:
        assert storage.get_flow(tracking_id=tracking_id).status == FlowStatus.COMPLETED  # type: ignore[union-attr]
    batcher.close()


class _WritingThreads:
    """The real storage, noting which thread sent each complete_batch."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.threads: list[threading.Thread] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def complete_batch(self, *, finished: Sequence[Finished], chain: Chain | None = None) -> Any:
        self.threads.append(threading.current_thread())
        return self._storage.complete_batch(finished=finished, chain=chain)


def test_a_lone_outcome_is_written_by_its_own_thread(storage: Storage, unique: Names) -> None:
    """With no batch on its way, a step writes its outcome itself: no thread hand-off,
    and so no wake-up of another thread, per step when the worker is not busy."""
    storage.enqueue_flow(flow=sequential(unique("t"), ["only"]))
    [node] = claim_all(storage)
    noted = _WritingThreads(storage)
    batcher = CompletionBatcher(noted)  # type: ignore[arg-type]
    assert batcher.write(completed(node)).won
    assert noted.threads == [threading.current_thread()]
    batcher.close()


def test_a_failing_batch_answers_every_writer_and_the_next_one_still_goes(
    storage: Storage, unique: Names
) -> None:
    """When the writer leading a batch meets the database away, every writer of that
    batch gets the error (none waits forever) and the writes queued meanwhile are
    still written, by one of their own writers."""
    from flowsmith_worker.errors import DatabaseUnavailable

    ids = [unique(f"t{i}") for i in range(4)]
    for tracking_id in ids:
        storage.enqueue_flow(flow=sequential(tracking_id, ["only"]))
    nodes = claim_all(storage)
    held = _HeldFirstBatch(storage)
    batcher = CompletionBatcher(held)  # type: ignore[arg-type]
    results: dict[int, Any] = {}
    failing = held.complete_batch

    def first_fails(*, finished: Sequence[Finished], chain: Chain | None = None) -> Any:
        answers = failing(finished=finished, chain=chain)  # the first waits for release
        if len(held.batches) == 1:
            raise DatabaseUnavailable("the answer was lost")
        return answers

    held.complete_batch = first_fails  # type: ignore[method-assign]

    def write(node: ClaimedNode) -> None:
        try:
            results[node.node_id] = batcher.write(completed(node))
        except DatabaseUnavailable as exc:
            results[node.node_id] = exc

    threads = [threading.Thread(target=write, args=(n,)) for n in nodes]
    threads[0].start()
    eventually(lambda: held.batches == [1])
    for thread in threads[1:]:
        thread.start()
    eventually(lambda: batcher.queued == 3)
    held.release.set()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert isinstance(results[nodes[0].node_id], DatabaseUnavailable)
    assert all(results[n.node_id].won for n in nodes[1:])
    assert held.batches[1] == 3
    batcher.close()


def test_one_unreadable_run_fails_alone_not_its_whole_batch(
    storage: Storage, unique: Names
) -> None:
    """A run whose stored plan is corrupt rolls its batch back; the batcher then writes
    each outcome alone, so that run fails and the others complete."""
    good, bad = unique("good"), unique("bad")
    for tracking_id in (good, bad):
        storage.enqueue_flow(flow=sequential(tracking_id, ["only", "next"]))
    nodes = {n.tracking_id: n for n in claim_all(storage)}
    _corrupt_plan(storage, bad)
    held = _HeldFirstBatch(storage)
    held.release.set()
    batcher = CompletionBatcher(held, chain=lambda: CHAIN)  # type: ignore[arg-type]
    results: dict[str, Any] = {}

    def write(tracking_id: str) -> None:
        try:
            results[tracking_id] = batcher.write(completed(nodes[tracking_id]))
        except Exception as exc:
            results[tracking_id] = exc

    threads = [threading.Thread(target=write, args=(t,)) for t in (good, bad)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert isinstance(results[good], Written) and results[good].won
    assert "fs_flows.plan" in str(results[bad])
    assert storage.get_flow(tracking_id=bad).status == FlowStatus.FAILED  # type: ignore[union-attr]
    batcher.close()


def _corrupt_plan(storage: Storage, tracking_id: str) -> None:
    import sqlalchemy as sa

    from flowsmith_worker.storage.sql import schema

    engine = storage.engine  # type: ignore[attr-defined]
    with engine.begin() as conn:
        conn.execute(
            sa.update(schema.flows)
            .where(schema.flows.c.tracking_id == tracking_id)
            .values(plan="{not json")
        )


# -- the worker -----------------------------------------------------------------------


def test_a_step_cannot_change_what_the_next_step_sees(storage: Storage, unique: Names) -> None:
    """ctx.data changed in place by a step does not reach a chained next step: it sees
    what a claim would have rebuilt from the stored outputs."""
    seen: list[Any] = []

    def mutate(ctx: Context) -> Any:
        ctx.data["a"]["items"].append("changed in place")
        ctx.data["n"] = "changed"
        return None

    def look(ctx: Context) -> Any:
        seen.append((ctx.data["a"], ctx.data["n"]))

    flow = Flow(unique("inplace"), storage=storage)
    flow.step("a", lambda ctx: {"items": [1]}).step("b", mutate).step("c", look)
    run = flow.run({"n": 1}, tracking_id=unique("t"))
    Worker(storage=storage, poll_interval=0.05, concurrency=1).run_until_idle(timeout=20)
    assert run.status() == FlowStatus.COMPLETED
    assert seen == [({"items": [1]}, 1)]


def test_a_worker_runs_a_whole_sequential_run_with_one_claim(
    storage: Storage, unique: Names
) -> None:
    """Steps 2..n are chained to the worker that ran step 1: one claim for the run."""
    claims: list[int] = []
    flow = Flow(unique("chained"), storage=storage)
    for name in "abcde":
        flow.step(name, lambda ctx, name=name: name.upper())
    run = flow.run({}, tracking_id=unique("t"))
    worker = Worker(storage=storage, poll_interval=0.05, concurrency=2)
    real_claim = storage.claim_nodes

    def counting_claim(**kw: Any) -> list[ClaimedNode]:
        claimed = real_claim(**kw)
        claims.append(len(claimed))
        return claimed

    worker.storage = _Spy(storage, claim_nodes=counting_claim)  # type: ignore[assignment]
    worker.run_until_idle(timeout=20)
    assert run.wait(timeout=5) == {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"}
    assert sum(claims) == 1
    trace = run.trace()
    assert {n.lease_owner for n in trace} == {worker.id}
    assert [n.attempt for n in trace] == [1] * 5


class _Spy:
    """The storage with some methods replaced (they still call the real ones)."""

    def __init__(self, storage: Storage, **replaced: Any) -> None:
        self._storage = storage
        self._replaced = replaced

    def __getattr__(self, name: str) -> Any:
        return self._replaced.get(name) or getattr(self._storage, name)


def test_a_stopping_worker_hands_its_chained_step_back(storage: Storage, unique: Names) -> None:
    """A chained step not started when its worker begins to stop is released at once
    for another worker (not run by the stopping one, not left to its lease)."""
    ran: list[str] = []
    worker = Worker(storage=storage, poll_interval=0.05, concurrency=1)
    release_a = threading.Event()

    def a(ctx: Context) -> str:
        ran.append("a")
        assert release_a.wait(10)
        return "A"

    flow = Flow(unique("stopping"), storage=storage)
    flow.step("a", a).step("b", lambda ctx: ran.append("b"))
    run = flow.run({}, tracking_id=unique("t"))
    worker.claim_once()
    eventually(lambda: ran == ["a"])
    # The batch for a's outcome was asked for a chain before the stop: force that
    # order by taking the chain decision now, then stopping.
    chain = worker._chain()
    worker.batcher.chain = lambda: chain
    worker.stop()
    release_a.set()
    eventually(lambda: not worker.in_flight())
    assert ran == ["a"]
    nodes = statuses(storage, run.tracking_id)
    assert nodes["b"] == (NodeStatus.PENDING, None)
    other = Worker(storage=storage, poll_interval=0.05)
    other.run_until_idle(timeout=20)
    assert ran == ["a", "b"] and run.status() == FlowStatus.COMPLETED


@pytest.mark.parametrize("steps", [1, 3])
def test_every_run_completes_under_concurrent_chains(
    storage: Storage, unique: Names, steps: int
) -> None:
    """Two workers with several slots each, many short runs: each step runs once, in order."""
    counts: dict[tuple[str, str], int] = {}
    lock = threading.Lock()

    def step(ctx: Context) -> int:
        with lock:
            key = (ctx.tracking_id or "", ctx.step or "")
            counts[key] = counts.get(key, 0) + 1
        return len(ctx.data)

    flow = Flow(unique("many"), storage=storage)
    for i in range(steps):
        flow.step(f"s{i}", step)
    runs = [flow.run({}, tracking_id=unique(f"t{i}")) for i in range(30)]
    workers = [Worker(storage=storage, poll_interval=0.05, concurrency=4) for _ in range(2)]
    threads = [threading.Thread(target=w.run_until_idle, kwargs={"timeout": 60}) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert all(r.status() == FlowStatus.COMPLETED for r in runs)
    assert sorted(counts.values()) == [1] * (30 * steps)
    assert runs[0].wait(timeout=5) == {f"s{i}": i for i in range(steps)}


@pytest.mark.parametrize(
    ("backend", "expected"),
    [("postgresql", 2), ("sqlite", 5), ("mysql", 6), ("memory", 5)],
    indirect=["backend"],
)
def test_a_batch_of_sequential_steps_takes_the_same_statements_however_large(
    storage: Storage, backend: str, expected: int, unique: Names
) -> None:
    """However many runs it moves (chained, completed, or over), a batch reads its runs and
    writes them set-based: on PostgreSQL one statement writes, chains and completes them;
    on SQLite (whose BEGIN IMMEDIATE counts here) one statement each; on MySQL/MariaDB
    one each too, after locking the nodes, and one more to read the chained ids back."""
    import sqlalchemy as sa

    ids = [unique(f"t{i}") for i in range(4)]
    for tracking_id in ids[:3]:
        storage.enqueue_flow(flow=sequential(tracking_id, ["a", "b"]))
    storage.enqueue_flow(flow=sequential(ids[3], ["only"]))
    nodes = {n.tracking_id: n for n in claim_all(storage)}
    storage.cancel_flow(tracking_id=ids[2])
    statements: list[str] = []
    engine = storage.engine  # type: ignore[attr-defined]
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        written = storage.complete_batch(
            finished=[
                Finished(n.lease, NodeStatus.COMPLETED, '"x"', step_name=n.step_name)
                for n in nodes.values()
            ],
            chain=CHAIN,
        )
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)
    assert len(statements) == expected, statements
    by_run = dict(zip(nodes, written, strict=True))
    assert [by_run[t].chained is not None for t in ids] == [True, True, False, False]
    assert all(w.won for w in written)
    assert statuses(storage, ids[0])["b"] == (NodeStatus.RUNNING, "w1")
    assert "b" not in statuses(storage, ids[2])  # cancelled: recorded, not moved on
    assert storage.get_flow(tracking_id=ids[3]).status == FlowStatus.COMPLETED  # type: ignore[union-attr]


# -- set-based writes, on every SQL backend -------------------------------------------


def _statements_of(storage: Storage, write: Callable[[], Any]) -> list[str]:
    """The statements ``write`` sent to the database (counted by the engine itself)."""
    import sqlalchemy as sa

    statements: list[str] = []
    engine = storage.engine  # type: ignore[attr-defined]
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        write()
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)
    return statements


def _mixed_batch(storage: Storage, unique: Names, each: int) -> tuple[list[str], int]:
    """``each`` runs of every kind, finished in one batch by w1: one that chains, one
    that completes, one cancelled meanwhile, one whose lease w2 holds now. Checks
    what became of each; returns the statements the batch took and its size."""
    kinds = ("chains", "completes", "cancelled", "lost")
    runs = {kind: [unique(f"{kind}{i}") for i in range(each)] for kind in kinds}
    for kind, tracking_ids in runs.items():
        steps = ["only"] if kind == "completes" else ["a", "b"]
        for tracking_id in tracking_ids:
            storage.enqueue_flow(flow=sequential(tracking_id, steps))
    nodes = {n.tracking_id: n for n in claim_all(storage, limit=4 * each)}
    for tracking_id in runs["cancelled"]:
        storage.cancel_flow(tracking_id=tracking_id)
    lost = [nodes[t].lease for t in runs["lost"]]
    storage.release_nodes(leases=lost)
    assert len(claim_all(storage, worker_id="w2")) == each
    finished = [
        Finished(n.lease, NodeStatus.COMPLETED, '"x"', step_name=n.step_name)
        for n in nodes.values()
    ]
    written: list[Written] = []
    statements = _statements_of(
        storage, lambda: written.extend(storage.complete_batch(finished=finished, chain=CHAIN))
    )
    by_run = dict(zip(nodes, written, strict=True))
    for tracking_id in runs["chains"]:
        chained = by_run[tracking_id].chained
        assert by_run[tracking_id].won and chained is not None and chained.step_name == "b"
        assert statuses(storage, tracking_id)["b"] == (NodeStatus.RUNNING, "w1")
    for tracking_id in runs["completes"]:
        assert by_run[tracking_id] == Written(True)
        assert storage.get_flow(tracking_id=tracking_id).status == FlowStatus.COMPLETED  # type: ignore[union-attr]
    for tracking_id in runs["cancelled"]:
        assert by_run[tracking_id] == Written(True)
        assert statuses(storage, tracking_id) == {"a": (NodeStatus.COMPLETED, "w1")}
    for tracking_id in runs["lost"]:
        assert by_run[tracking_id] == Written(False)
        # w2's attempt is untouched, and the run did not move on.
        assert statuses(storage, tracking_id) == {"a": (NodeStatus.RUNNING, "w2")}
    return statements, len(finished)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mysql"], indirect=True)
def test_a_batch_mixing_won_and_lost_fences_takes_the_same_statements_at_any_size(
    storage: Storage, backend: str, unique: Names
) -> None:
    """Each outcome is fenced by its own lease inside one set-based write: a lost lease
    writes and moves nothing while the rest of its batch chains, completes or is
    recorded; and a batch of 20 takes exactly the statements a batch of 4 does."""
    small, small_size = _mixed_batch(storage, unique, each=1)
    large, large_size = _mixed_batch(storage, unique, each=5)
    assert (small_size, large_size) == (4, 20)
    assert len(large) == len(small), (small, large)


# Stored outputs are the exact text the executor encoded; the set-based writes carry
# them inside a JSON document (json_each, JSON_TABLE), which must not alter them.
EXACT_OUTPUTS = [
    '"d\\u00e9j\\u00e0"',
    '"déjà vu, 😀, 漢字"',
    '"a quote \\" and a backslash \\\\"',
    '"\\u0000 \\t \\n"',
    "null",
    '{"a": [1, 2.5, true, null], "b": {}}',
    "  42  ",
    None,
    '"' + "y" * 70_000 + '"',  # larger than MySQL's batch statement takes together
]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mysql"], indirect=True)
def test_a_batch_stores_each_output_exactly_as_encoded(
    storage: Storage, backend: str, unique: Names
) -> None:
    """The text of each output in a batch is stored byte for byte; no output stays NULL
    (not the text 'null'), and a JSON null output stays the text 'null'."""
    import sqlalchemy as sa

    from flowsmith_worker.storage.sql import schema

    for i in range(len(EXACT_OUTPUTS)):
        storage.enqueue_flow(flow=sequential(unique(f"t{i}"), ["only", "next"]))
    nodes = sorted(claim_all(storage), key=lambda n: n.tracking_id)
    finished = [
        Finished(
            n.lease,
            NodeStatus.COMPLETED if output is not None else NodeStatus.SKIPPED,
            output,
            step_name=n.step_name,
        )
        for n, output in zip(nodes, EXACT_OUTPUTS, strict=True)
    ]
    assert all(w.won for w in storage.complete_batch(finished=finished, chain=CHAIN))
    engine = storage.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        stored = dict(
            conn.execute(
                sa.select(schema.nodes.c.id, schema.nodes.c.output).where(
                    schema.nodes.c.id.in_([n.node_id for n in nodes])
                )
            ).all()
        )
    assert [stored[n.node_id] for n in nodes] == EXACT_OUTPUTS


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mysql"], indirect=True)
def test_a_batch_larger_than_one_statement_takes_is_written(
    storage: Storage, backend: str, unique: Names
) -> None:
    """Outputs that together pass MariaDB's 16 MiB statement limit (each within the
    payload limit) are written in one batch all the same, each exactly."""
    big = ['"' + str(i) * (3 * 1024 * 1024 + 512 * 1024) + '"' for i in range(5)]
    for i in range(len(big)):
        storage.enqueue_flow(flow=sequential(unique(f"t{i}"), ["only"]))
    nodes = sorted(claim_all(storage), key=lambda n: n.tracking_id)
    finished = [
        Finished(n.lease, NodeStatus.COMPLETED, output, step_name=n.step_name)
        for n, output in zip(nodes, big, strict=True)
    ]
    assert all(w.won for w in storage.complete_batch(finished=finished, chain=CHAIN))
    for n, output in zip(nodes, big, strict=True):
        record = storage.get_flow(tracking_id=n.tracking_id)
        assert record is not None and record.status == FlowStatus.COMPLETED
        assert record.output == {"n": 1, "only": output[1:-1]}
