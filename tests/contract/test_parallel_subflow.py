"""Parallel groups and subflows, on every backend (memory, sqlite, PostgreSQL, MySQL).

Flows are defined with the decorator API (flowsmith_worker.decorators) and with the
builder API (``with flow.parallel()``, ``flow.subflow(...)``). The fan-out and the
killed-worker tests run real ``flowsmith worker`` processes on the SQL backends,
and several in-process ``Worker`` threads on the memory backend (processes cannot
share an InMemoryStorage). Each step execution is recorded as a JSON line
appended with os.write to the file named by $FS_TEST_EVENTS, so the tests can
compare when and where every execution ran.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowsmith_worker import Context, Flow, FlowStatus, NodeStatus, StepFailed, Worker
from flowsmith_worker.decorators import step, subflow, workflow
from flowsmith_worker.storage.base import Storage
from tests.conftest import eventually

EVENTS_ENV = "FS_TEST_EVENTS"
POLL = 0.02


# ---------------------------------------------------------------------------- helpers

# The module the worker processes import (cwd on sys.path), written per test with
# unique flow names. The test process imports the same file to enqueue runs.
FLOWS_MODULE = '''
"""Flows for tests/contract/test_parallel_subflow.py, written by the test."""
import json
import os
import time

from flowsmith_worker.decorators import parallel, step, workflow

FAN_OUT = 20
WORK_SECONDS = 0.5


def record(kind, ctx, **extra):
    """Append one JSON line about this execution; os.write with O_APPEND is atomic."""
    line = json.dumps({
        "kind": kind, "step": ctx.step, "attempt": ctx.attempt, "tracking_id": ctx.tracking_id,
        "pid": os.getpid(), "t": time.time(), **extra,
    })
    fd = os.open(os.environ["FS_TEST_EVENTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\\n").encode())
    finally:
        os.close(fd)


@workflow("@FANOUT@")
def fanout():
    @parallel
    def fan():
        for i in range(FAN_OUT):
            def work(ctx):
                record("start", ctx)
                time.sleep(WORK_SECONDS)
                record("end", ctx)
                return {"pid": os.getpid()}

            step(name=f"work_{i:02d}")(work)

    @step
    def gather(ctx):
        record("start", ctx)
        return sorted(k for k in ctx.data if k.startswith("work_"))


@workflow("@KILLED@")
def killed():
    @parallel
    def group():
        @step(retries=1, backoff=0)
        def victim(ctx):
            record("start", ctx)
            if ctx.attempt == 1:
                time.sleep(120)  # killed with its worker long before this ends
            record("end", ctx)
            return {"pid": os.getpid(), "attempt": ctx.attempt}

        @step
        def sibling_a(ctx):
            record("start", ctx)
            record("end", ctx)
            return "a"

        @step
        def sibling_b(ctx):
            record("start", ctx)
            record("end", ctx)
            return "b"

    @step
    def after(ctx):
        record("start", ctx)
        return sorted(ctx.data)
'''


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def storage_url(storage: Storage) -> str:
    """The full URL (password included) of a SQL storage, for worker processes."""
    engine = storage.engine  # type: ignore[attr-defined]
    return str(engine.url.render_as_string(hide_password=False))


@pytest.fixture
def flows_module(
    tmp_path: Path, unique: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, Path]]:
    """The flows module written to a fresh directory and imported here; events file set."""
    app = tmp_path / "app"
    app.mkdir()
    module_name = unique("fs_test_flows")
    text = FLOWS_MODULE.replace("@FANOUT@", unique("fanout")).replace("@KILLED@", unique("killed"))
    (app / f"{module_name}.py").write_text(text)
    monkeypatch.setenv(EVENTS_ENV, str(tmp_path / "events.jsonl"))
    monkeypatch.syspath_prepend(str(app))
    module = importlib.import_module(module_name)
    yield module, app
    sys.modules.pop(module_name, None)


@contextlib.contextmanager
def worker_threads(
    storage: Storage, count: int, concurrency: int, lease: float = 2.0
) -> Iterator[list[Worker]]:
    """``count`` in-process workers, each in its own thread with its own slots."""
    workers = [
        Worker(
            storage,
            concurrency=concurrency,
            poll_interval=POLL,
            lease_seconds=lease,
            shutdown_timeout=5,
        )
        for _ in range(count)
    ]
    threads = [
        threading.Thread(target=w.run, name=f"test-worker-{i}", daemon=True)
        for i, w in enumerate(workers)
    ]
    for thread in threads:
        thread.start()
    try:
        yield workers
    finally:
        for w in workers:
            w.stop()
        for thread in threads:
            thread.join(timeout=15)


class WorkerProcesses:
    """Real `flowsmith worker` processes on one database, logs in files."""

    def __init__(self, url: str, app: Path, module: str, count: int, concurrency: int) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        for n in range(count):
            log_path = app / f"worker-{n}.log"
            self.logs.append(log_path)
            with open(log_path, "wb") as log:
                self.procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "flowsmith_worker",
                            "worker",
                            module,
                            "--url",
                            url,
                            "--concurrency",
                            str(concurrency),
                            "--lease",
                            "2",
                            "--poll-interval",
                            "0.05",
                            "--shutdown-timeout",
                            "1",
                            "--log-format",
                            "json",
                        ],
                        cwd=app,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    )
                )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every worker logged worker.started (its module imported, schema checked)."""

        def ready() -> bool:
            for proc, log in zip(self.procs, self.logs, strict=True):
                if proc.poll() is not None:
                    raise AssertionError(
                        f"worker exited with {proc.returncode}:\n{log.read_text()}"
                    )
            return all("worker.started" in log.read_text() for log in self.logs)

        eventually(ready, timeout=timeout, interval=0.05)

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.procs}

    def proc(self, pid: int) -> subprocess.Popen[bytes]:
        return next(p for p in self.procs if p.pid == pid)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def output(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in self.logs)


@contextlib.contextmanager
def worker_processes(
    storage: Storage, app: Path, module: str, count: int, concurrency: int
) -> Iterator[WorkerProcesses]:
    workers = WorkerProcesses(storage_url(storage), app, module, count, concurrency)
    try:
        workers.wait_ready()
        yield workers
    finally:
        workers.stop()


def intervals(
    events: list[dict[str, Any]], attempts: dict[str, int], prefix: str
) -> dict[str, tuple[float, float, int]]:
    """step -> (start, end, pid) of the recorded attempt (``attempts[step]``) of each step
    whose name starts with ``prefix``. (An attempt rescued under heavy load may also have
    left events; it is not the one that counted.)
    """
    mine = [
        e
        for e in events
        if e["step"].startswith(prefix) and e["attempt"] == attempts.get(e["step"])
    ]
    starts = {e["step"]: e for e in mine if e["kind"] == "start"}
    ends = {e["step"]: e for e in mine if e["kind"] == "end"}
    return {name: (starts[name]["t"], ends[name]["t"], starts[name]["pid"]) for name in ends}


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The largest number of spans running at one instant."""
    # At equal times an end sorts before a start: touching spans do not overlap.
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, change in points:
        running += change
        peak = max(peak, running)
    return peak


# ------------------------------------------------------------------- fan-out, 4 workers


@pytest.mark.slow
def test_fan_out_of_20_parallel_steps_over_4_workers_overlaps(
    storage: Storage, backend: str, flows_module: tuple[Any, Path], tmp_path: Path
) -> None:
    """20 parallel siblings run at the same time on 4 different workers; `gather` waits for all.

    Processes on the SQL backends, worker threads on memory; each worker has 3 slots,
    so a peak above 3 simultaneous executions, and two executions overlapping on
    two different workers, can only come from workers running siblings together.
    The step after the group starts after the last sibling ended, runs once, and
    sees every sibling's output in ctx.data.
    """
    module, app = flows_module
    module.fanout.flow.storage = storage
    concurrency = 3
    started = time.monotonic()
    if backend == "memory":
        runner: Any = worker_threads(storage, count=4, concurrency=concurrency)
    else:
        runner = worker_processes(storage, app, module.__name__, count=4, concurrency=concurrency)
    with runner as workers:
        run = module.fanout(Context({"order": 1}), tracking_id="fan-1")
        try:
            result = run.wait(timeout=60)
        except TimeoutError:
            raise AssertionError(getattr(workers, "output", lambda: "")()) from None
    elapsed = time.monotonic() - started

    events = read_events(tmp_path / "events.jsonl")
    nodes = {n.step_name: n for n in run.trace()}
    assert all(n.status == NodeStatus.COMPLETED for n in nodes.values())
    spans = intervals(events, {name: n.attempt for name, n in nodes.items()}, "work_")
    assert sorted(spans) == [f"work_{i:02d}" for i in range(20)]
    gathered = [e for e in events if e["step"] == "gather"]
    assert len(gathered) == nodes["gather"].attempt  # one gather node: the group advanced once
    owner = {name: nodes[name].lease_owner for name in spans}
    assert len(set(owner.values())) >= 2, f"one worker ran everything: {owner}"
    cross_worker = [
        (a, b)
        for a in spans
        for b in spans
        if a < b
        and owner[a] != owner[b]
        and spans[a][0] < spans[b][1]
        and spans[b][0] < spans[a][1]
    ]
    assert cross_worker, "no two siblings ran on different workers at the same time"
    peak = peak_overlap([(s, e) for s, e, _ in spans.values()])
    assert peak > concurrency, f"peak of {peak} siblings at once: one worker's slots at most"
    if backend != "memory":
        assert len({pid for _, _, pid in spans.values()}) >= 2, "siblings ran in one process only"
        assert {pid for _, _, pid in spans.values()} <= workers.pids

    assert gathered[0]["t"] >= max(end for _, end, _ in spans.values())
    assert result["gather"] == sorted(spans)
    print(
        f"\n[{backend}] fan-out: peak {peak} overlapping, "
        f"{len(set(owner.values()))} workers, {elapsed:.1f} s"
    )


# ----------------------------------------------------- a sibling killed with its worker


@pytest.mark.slow
def test_parallel_sibling_killed_with_its_worker_is_rerun_elsewhere(
    storage: Storage, backend: str, flows_module: tuple[Any, Path], tmp_path: Path
) -> None:
    """A sibling whose worker dies mid-step is rescued and re-run on another worker.

    SQL backends: two worker processes; the one running `victim` is SIGKILLed while
    the step hangs, after both other siblings completed. Memory: a worker claims
    `victim` and vanishes without heartbeat or result (what the storage sees of a
    kill). Either way, after the lease (2 s) expires `victim` runs again (attempt 2,
    one rescue) on another worker, the completed siblings are not re-run, and
    `after` runs once, after the victim's second attempt.
    """
    module, app = flows_module
    module.killed.flow.storage = storage
    events_path = tmp_path / "events.jsonl"
    killed_worker: str | int
    if backend == "memory":
        run = module.killed(Context({}), tracking_id="kill-1")
        claimed = storage.claim_nodes(
            worker_id="dead-worker", limit=1, lease_seconds=2, queues=["default"]
        )
        assert [c.step_name for c in claimed] == ["victim"]
        killed_worker = "dead-worker"
        with worker_threads(storage, count=2, concurrency=2):
            result = run.wait(timeout=30)
    else:
        with worker_processes(storage, app, module.__name__, count=2, concurrency=2) as workers:
            run = module.killed(Context({}), tracking_id="kill-1")

            def victim_hanging_siblings_done() -> int | None:
                events = read_events(events_path)
                victim = [e for e in events if e["step"] == "victim" and e["kind"] == "start"]
                ends = {e["step"] for e in events if e["kind"] == "end"}
                nodes = {n.step_name: n.status for n in run.trace()}
                siblings_done = all(
                    nodes.get(s) == NodeStatus.COMPLETED for s in ("sibling_a", "sibling_b")
                )
                if victim and siblings_done and {"sibling_a", "sibling_b"} <= ends:
                    return int(victim[0]["pid"])
                return None

            victim_pid = eventually(victim_hanging_siblings_done, timeout=30)
            os.kill(victim_pid, signal.SIGKILL)
            assert workers.proc(victim_pid).wait(timeout=10) == -signal.SIGKILL
            killed_worker = victim_pid
            try:
                result = run.wait(timeout=30)
            except TimeoutError:
                raise AssertionError(workers.output()) from None

    events = read_events(events_path)
    starts = Counter(e["step"] for e in events if e["kind"] == "start")
    assert starts["sibling_a"] == 1 and starts["sibling_b"] == 1, "a completed sibling re-ran"
    assert starts["after"] == 1
    nodes = {n.step_name: n for n in run.trace()}
    victim = nodes["victim"]
    assert victim.status == NodeStatus.COMPLETED
    assert victim.attempt == 2 and victim.rescues == 1
    assert result["victim"]["attempt"] == 2
    if backend == "memory":
        assert starts["victim"] == 1  # the dead worker never got to run it
        assert victim.lease_owner != "dead-worker"
    else:
        assert starts["victim"] == 2
        assert result["victim"]["pid"] != killed_worker
    second = next(e for e in events if e["step"] == "victim" and e["kind"] == "end")
    after = next(e for e in events if e["step"] == "after")
    assert after["t"] >= second["t"]
    assert result["after"] == ["sibling_a", "sibling_b", "victim"]


# ---------------------------------------------------- the group barrier, race-free


def test_siblings_finishing_together_advance_the_flow_exactly_once(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """Siblings completing at the same instant on different workers start the next
    step exactly once.

    In each of three runs, three sibling steps and the one step of a sibling subflow's
    child meet at a barrier, so their completions (the child's completing the parent
    node) race on three workers. If completion were not serialised per flow, each
    could see another still running and nobody would start `after` (the run would
    hang), or two could start it (it would run twice). 12 slots for 12 waiters.
    """
    barriers: dict[int, threading.Barrier] = {}
    lock = threading.Lock()
    after_calls: list[str] = []

    def meet(ctx: Context) -> str:
        with lock:
            barrier = barriers.setdefault(int(ctx.data["n"]), threading.Barrier(4))
        barrier.wait(timeout=20)
        return str(ctx.step)

    def after(ctx: Context) -> list[str]:
        with lock:
            after_calls.append(str(ctx.tracking_id))
        return sorted(k for k in ctx.data if k != "n")

    child = Flow(unique("race_child"), storage)
    child.step("c", meet)
    flow = Flow(unique("race"), storage)
    with flow.parallel():
        for i in range(3):
            flow.step(f"s{i}", meet)
        flow.subflow("sub", child)
    flow.step("after", after)

    runs = [flow.run({"n": i}, tracking_id=f"race-{i}") for i in range(3)]
    with worker_threads(storage, count=3, concurrency=4):
        results = [r.wait(timeout=30) for r in runs]
    assert all(r["after"] == ["s0", "s1", "s2", "sub"] for r in results)
    assert all(r["sub"]["c"] == "c" for r in results)
    assert sorted(after_calls) == ["race-0", "race-1", "race-2"]


# ------------------------------------------- a failed sibling, and resuming only it


def test_failed_sibling_fails_the_flow_and_resume_reruns_only_it(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """Builder API. A sibling that fails after its retries fails the flow; the others
    complete and `after` never starts. Resuming (same tracking_id) re-runs only that
    sibling, then `after`; nothing that completed runs again.
    """
    calls: Counter[str] = Counter()
    broken = {"flaky": True}

    def make(name: str) -> Callable[[Context], str]:
        def fn(ctx: Context) -> str:
            calls[name] += 1
            if name == "flaky" and broken["flaky"]:
                raise ConnectionError("flaky: 503 Service Unavailable")
            return name

        return fn

    flow = Flow(unique("sibling_fail"), storage)
    flow.step("start", make("start"))
    with flow.parallel():
        flow.step("ok_1", make("ok_1"))
        flow.step("flaky", make("flaky"), retries=1, backoff=0)
        flow.step("ok_2", make("ok_2"))
    flow.step("after", make("after"))

    run = flow.run({"order_id": 1}, tracking_id="sib-1")
    worker = Worker(storage, concurrency=3, poll_interval=POLL)
    worker.run_until_idle(timeout=30)
    with pytest.raises(StepFailed) as failed:
        run.wait(timeout=5)
    assert failed.value.step == "flaky" and "503 Service Unavailable" in str(failed.value)
    nodes = {n.step_name: n for n in run.trace()}
    assert run.status() == FlowStatus.FAILED
    assert nodes["flaky"].status == NodeStatus.FAILED and nodes["flaky"].attempt == 2
    assert "ConnectionError: flaky: 503" in (nodes["flaky"].error or "")
    assert nodes["ok_1"].status == nodes["ok_2"].status == NodeStatus.COMPLETED
    assert "after" not in nodes
    assert calls == Counter(start=1, ok_1=1, ok_2=1, flaky=2)

    broken["flaky"] = False
    again = flow.run({"order_id": 1}, tracking_id="sib-1")
    assert again.tracking_id == "sib-1"
    worker.run_until_idle(timeout=30)
    result = again.wait(timeout=5)
    assert calls == Counter(start=1, ok_1=1, ok_2=1, flaky=3, after=1)
    assert {k: result[k] for k in ("ok_1", "flaky", "ok_2", "after")} == {
        "ok_1": "ok_1",
        "flaky": "flaky",
        "ok_2": "ok_2",
        "after": "after",
    }
    nodes = {n.step_name: n for n in again.trace()}
    assert nodes["flaky"].attempt == 3 and nodes["ok_1"].attempt == 1


# --------------------------------------------------------------------- subflows


def _node(storage: Storage, tracking_id: str, step_name: str) -> Any:
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None
    return next(n for n in storage.list_nodes(flow_id=record.id) if n.step_name == step_name)


def test_subflow_chain_three_levels_deep_on_a_single_worker_slot(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """top -> mid -> leaf completes on ONE worker with ONE slot, so a waiting parent
    holds no slot. Each child starts with its parent's ctx.data at that point, under
    the tracking_id its parent chose; each parent step's output is the child's final
    data. Mixes both APIs: `@subflow` returning a builder Flow, and
    `Flow.subflow(name, child, tracking_id="fmt")` in a builder flow.
    """
    seen_waiting: list[tuple[str, str]] = []

    @workflow(unique("leaf"), storage=storage)
    def leaf() -> None:
        @step
        def pack(ctx: Context) -> dict[str, Any]:
            top_node = _node(storage, "order-7", "fulfil")
            mid_node = _node(storage, "mid-7", "leaf")
            seen_waiting.append((top_node.status, mid_node.status))
            return {"packed": ctx.data["order_id"], "saw": sorted(ctx.data)}

    mid = Flow(unique("mid"), storage)
    mid.step("pick", lambda ctx: f"picked {ctx.data['order_id']}")
    mid.subflow("leaf", leaf.flow, tracking_id="leaf-{order_id}")
    mid.step("label", lambda ctx: f"label for {ctx.data['leaf']['pack']['packed']}")

    @workflow(unique("top"), storage=storage)
    def top() -> None:
        @step
        def price(ctx: Context) -> int:
            return 100

        @subflow
        def fulfil(ctx: Context) -> dict[str, Any]:
            return {"flow": mid, "tracking_id": f"mid-{ctx.data['order_id']}"}

        @step
        def confirm(ctx: Context) -> str:
            return f"shipped with {ctx.data['fulfil']['label']}"

    run = top(Context({"order_id": 7}), tracking_id="order-7")
    Worker(storage, concurrency=1, poll_interval=POLL).run_until_idle(timeout=30)
    result = run.wait(timeout=5)

    assert seen_waiting == [(NodeStatus.WAITING, NodeStatus.WAITING)]
    leaf_rec = storage.get_flow(tracking_id="leaf-7")
    mid_rec = storage.get_flow(tracking_id="mid-7")
    assert leaf_rec is not None and mid_rec is not None
    assert mid_rec.input == {"order_id": 7, "price": 100}
    assert leaf_rec.input == {"order_id": 7, "price": 100, "pick": "picked 7"}
    assert mid_rec.parent_node_id == _node(storage, "order-7", "fulfil").id
    assert leaf_rec.parent_node_id == _node(storage, "mid-7", "leaf").id
    assert result["fulfil"] == mid_rec.output
    assert mid_rec.output is not None and mid_rec.output["leaf"] == leaf_rec.output
    assert result["fulfil"]["leaf"]["pack"] == {"packed": 7, "saw": ["order_id", "pick", "price"]}
    assert result["confirm"] == "shipped with label for 7"


def test_subflow_returning_a_workflow_object_and_data(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """A `@subflow` may return a @workflow object and a `data` dict: the child gets
    exactly that dict as its input (not the parent's ctx.data), and its final data is
    the parent step's output. With no tracking_id the child's is "<parent>:<step>".
    """

    @workflow(unique("child"), storage=storage)
    def child() -> None:
        @step
        def double(ctx: Context) -> int:
            return int(ctx.data["n"]) * 2

    @workflow(unique("parent"), storage=storage)
    def parent() -> None:
        @step
        def noise(ctx: Context) -> str:
            return "not for the child"

        @subflow(name="compute")
        def start_compute(ctx: Context) -> dict[str, Any]:
            return {
                "flow": child,
                "tracking_id": f"calc-{ctx.tracking_id}",
                "data": {"n": ctx.data["n"]},
            }

        @subflow
        def defaulted(ctx: Context) -> dict[str, Any]:
            return {"flow": child.name, "data": {"n": 5}}  # a registered name, no tracking_id

    run = parent({"n": 21}, tracking_id="p-1")
    Worker(storage, concurrency=2, poll_interval=POLL).run_until_idle(timeout=30)
    result = run.wait(timeout=5)
    record = storage.get_flow(tracking_id="calc-p-1")
    assert record is not None and record.input == {"n": 21}
    assert result["compute"] == {"n": 21, "double": 42}
    assert result["defaulted"] == {"n": 5, "double": 10}
    assert storage.get_flow(tracking_id="p-1:defaulted") is not None


def test_failed_child_fails_parent_and_resume_resumes_the_same_child(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """A leaf step failing fails leaf, mid and top (errors kept up the chain).
    Resuming top with its tracking_id resumes the same mid and leaf runs (same ids,
    no new run), re-running only the failed leaf step; completed steps do not re-run.
    """
    calls: Counter[str] = Counter()
    children: list[str] = []
    broken = [True]

    @workflow(unique("leaf"), storage=storage)
    def leaf() -> None:
        @step
        def charge(ctx: Context) -> str:
            calls["charge"] += 1
            if broken[0]:
                raise RuntimeError("card declined")
            return "charged"

    @workflow(unique("mid"), storage=storage)
    def mid() -> None:
        @step
        def reserve(ctx: Context) -> str:
            calls["reserve"] += 1
            return "reserved"

        @subflow
        def pay(ctx: Context) -> dict[str, Any]:
            calls["pay"] += 1
            children.append(f"leaf-{ctx.data['order_id']}")
            return {"flow": leaf, "tracking_id": children[-1]}

    @workflow(unique("top"), storage=storage)
    def top() -> None:
        @step
        def validate(ctx: Context) -> str:
            calls["validate"] += 1
            return "ok"

        @subflow
        def checkout(ctx: Context) -> dict[str, Any]:
            children.append(f"mid-{ctx.data['order_id']}")
            return {"flow": mid, "tracking_id": children[-1]}

    run = top({"order_id": 3}, tracking_id="top-3")
    worker = Worker(storage, concurrency=2, poll_interval=POLL)
    worker.run_until_idle(timeout=30)
    with pytest.raises(StepFailed):
        run.wait(timeout=5)
    records = {t: storage.get_flow(tracking_id=t) for t in ("top-3", "mid-3", "leaf-3")}
    assert all(r is not None and r.status == FlowStatus.FAILED for r in records.values())
    checkout_node = _node(storage, "top-3", "checkout")
    assert checkout_node.status == NodeStatus.FAILED
    assert "card declined" in (checkout_node.error or "")
    assert "leaf-3" in (checkout_node.error or "")

    broken[0] = False
    top({"order_id": 3}, tracking_id="top-3")
    worker.run_until_idle(timeout=30)
    result = run.wait(timeout=5)
    # The subflow steps asked for the same children again, and got the same runs.
    assert children == ["mid-3", "leaf-3", "mid-3", "leaf-3"]
    for tracking_id, before in records.items():
        after = storage.get_flow(tracking_id=tracking_id)
        assert after is not None and before is not None
        assert after.id == before.id and after.status == FlowStatus.COMPLETED
    assert calls == Counter(validate=1, reserve=1, pay=2, charge=2)
    assert result["checkout"]["pay"]["charge"] == "charged"
    assert _node(storage, "leaf-3", "charge").attempt == 2


def test_subflow_retries_resume_a_failed_child(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """`@subflow(retries=1)`: when the child fails, the parent step has an attempt left,
    so it runs again and resumes the same child (same run, failed step re-run), and
    the flow completes; the step fails only when its attempts are used up.
    """
    calls: Counter[str] = Counter()

    @workflow(unique("child"), storage=storage)
    def child() -> None:
        @step
        def flaky(ctx: Context) -> str:
            calls["flaky"] += 1
            if calls["flaky"] == 1:
                raise ConnectionError("503")
            return "ok"

    @workflow(unique("parent"), storage=storage)
    def parent() -> None:
        @subflow(retries=1)
        def sub(ctx: Context) -> dict[str, Any]:
            return {"flow": child, "tracking_id": "retried-child"}

    run = parent({}, tracking_id="retry-parent")
    Worker(storage, concurrency=1, poll_interval=POLL).run_until_idle(timeout=30)
    assert run.status() == FlowStatus.COMPLETED
    assert calls["flaky"] == 2
    assert _node(storage, "retry-parent", "sub").attempt == 2
    assert run.wait(timeout=1)["sub"]["flaky"] == "ok"


def test_builder_api_parallel_condition_and_subflow_tracking_callable(
    storage: Storage, unique: Callable[[str], str]
) -> None:
    """Point 2, the builder API: `with flow.parallel()` groups steps (same position),
    `flow.step(..., condition=callable)` skips when False (no output, the group and
    the flow go on), `flow.subflow(name, child, tracking_id=callable)` names the child.
    """
    child = Flow(unique("child"), storage)
    child.step("echo", lambda ctx: sorted(ctx.data))

    flow = Flow(unique("builder"), storage)
    flow.step("first", lambda ctx: 1)
    with flow.parallel():
        flow.step("always", lambda ctx: "yes")
        flow.step("never", lambda ctx: "no", condition=lambda ctx: ctx.data["first"] > 1)
        flow.subflow("side", child, tracking_id="side-{tracking_id}")
    flow.subflow("sub", child, tracking_id=lambda ctx: f"child-of-{ctx.tracking_id}")

    run = flow.run({}, tracking_id="b-1")
    Worker(storage, concurrency=2, poll_interval=POLL).run_until_idle(timeout=30)
    result = run.wait(timeout=5)
    nodes = {n.step_name: n for n in run.trace()}
    assert nodes["always"].position == nodes["never"].position == nodes["side"].position == 1
    assert nodes["sub"].position == 2
    assert nodes["never"].status == NodeStatus.SKIPPED and nodes["never"].output is None
    assert "never" not in result
    assert result["side"] == {"first": 1, "echo": ["first"]}
    assert result["sub"]["echo"] == ["always", "first", "side"]
    assert storage.get_flow(tracking_id="child-of-b-1") is not None
    assert storage.get_flow(tracking_id="side-b-1") is not None


def test_a_subflow_whose_child_cannot_start_fails_its_step(
    storage: Storage, backend: str, unique: Callable[[str], str], request: pytest.FixtureRequest
) -> None:
    """A subflow asking for a tracking_id that already belongs to another flow's run
    cannot start its child: the parent step FAILS with that reason kept, and the
    flow fails, instead of the step being left WAITING for a child that never runs.
    """
    other = Flow(unique("other"), storage)
    other.step("x", lambda ctx: 1)
    other.run({}, tracking_id="taken")

    @workflow(unique("child"), storage=storage)
    def child() -> None:
        @step
        def y(ctx: Context) -> int:
            return 2

    @workflow(unique("parent"), storage=storage)
    def parent() -> None:
        @subflow
        def clash(ctx: Context) -> dict[str, Any]:
            return {"flow": child, "tracking_id": "taken"}

    run = parent({}, tracking_id="clash-1")
    Worker(storage, concurrency=1, poll_interval=POLL).run_until_idle(timeout=30)
    node = _node(storage, "clash-1", "clash")
    assert node.status == NodeStatus.FAILED, f"parent step left {node.status}"
    assert "already belongs to a run of flow" in (node.error or "")
    assert run.status() == FlowStatus.FAILED
