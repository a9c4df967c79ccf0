"""The chaos run (issue 11, points 1 and 2): real workers, real servers, random harm.

N `flowsmith worker` processes drain hundreds of runs of flows mixing sequential,
parallel, conditional and subflow steps whose failures, timeouts and slow attempts are
scripted per run (tests/torture/chaos_flows.py), while a chaos loop at random
moments SIGKILLs workers (often mid-step) and starts new ones, SIGTERMs them (a
graceful drain), crashes and restarts the database server (PostgreSQL's
immediate shutdown, MariaDB SIGKILLed; SQLite: the worker holding the write
lock SIGKILLed) and kills database connections from the server's side
(pg_terminate_backend, MariaDB's KILL). The workers also kill themselves at aimed
moments (in a claim before and right after its commit, right before and right after
a batch commit) and have the server kill their connection as a claim or a batch
commits (tests/support/kill_points.py). And the chaos retries FAILED runs (those
without a subflow step) with `flowsmith retry` or flow.run of their tracking_id,
noting how each was first (``Retried``). Afterwards tests/torture/chaos_check.py
compares the engine's trace with the steps' own journal and the reference model.

    python -m tests.torture.chaos --backend postgresql --duration 600 [--seed N]

The seed is printed first; the same seed replays the same flows, scripts and
sequence of chaos actions (their exact moments against the workers' progress
depend on the machine's timing, so a replay is close, not identical).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import sqlalchemy as sa

from flowsmith_worker import Flow
from flowsmith_worker.flow import registry
from flowsmith_worker.records import FlowFilter, NodeRecord
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import FlowStatus, NodeStatus, Storage
from tests.servers import LocalServer, start_mariadb, start_postgres
from tests.servers.admin import kill_mysql_sessions
from tests.support import kill_points
from tests.support.outage import crash_and_restart, durable_commits
from tests.torture.chaos_events import EVENTS_FILE, EventSender, waits_of
from tests.torture.chaos_flows import (
    JOURNAL_ENV,
    MAP,
    PARKED_SHARE,
    PLAN_ENV,
    STEP,
    FlowPlan,
    StepPlan,
    StepScript,
    build_all,
    parked_step,
    save_plans,
)
from tests.worker_process import WorkerProcess

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ("sqlite", "postgresql", "mysql")
FLAGS = ("flag_a", "flag_b")
# Longer than a database restart (so a restart alone rescues nothing), short enough
# that the steps of a SIGKILLed worker are rescued within seconds.
LEASE_SECONDS = 4.0
CONCURRENCY = 3
CHILD_FLOWS = 2
# About one stage of a parent flow in eight is a map of 0 to MAX_ITEMS items.
MAP_SHARE = 0.12
MAX_ITEMS = 4
# The chaos's actions.
SIGKILL, SIGTERM = "sigkill", "sigterm"  # a worker
RESTART, KILL_CONNECTIONS = "restart database", "kill connections"  # the server
LOCK_HOLDER = "kill write-lock holder"  # SQLite's nearest to a crash of its database
RETRY = "retry a FAILED run"  # with `flowsmith retry` or flow.run of its tracking_id
NOBODY = "nobody caught holding it"
NOT_OVER = (FlowStatus.PENDING, FlowStatus.RUNNING)
# A FAILED run with a node in these is not settled: a retry would race that node.
UNSETTLED = frozenset({NodeStatus.PENDING, NodeStatus.RUNNING, NodeStatus.WAITING})
EVERY = 1_000_000  # a list_flows limit no round reaches
# The kill points a chaos worker aims at itself (tests/support/kill_points.py), and
# their odds each time a worker reaches one: a few kills of each kind a round.
KILL_ODDS = {
    kill_points.CLAIMED: 0.01,
    kill_points.LEASED: 0.01,
    kill_points.BEFORE_COMMIT: 0.01,
    kill_points.AFTER_COMMIT: 0.01,
    kill_points.DROPPED_AT_CLAIM: 0.02,
    kill_points.DROPPED_AT_BATCH: 0.02,
}
# A worker that nobody (not even itself) killed: at its start (the database was away,
# which a worker refuses to start without), or after it started, which it must not.
EXITED = "exited at its start"
DIED = "died on its own after it started"
STUCK = "did not stop within a minute of SIGTERM"


@dataclass(frozen=True)
class Settings:
    seed: int
    backend: str
    duration: float  # seconds of chaos at most (it stops earlier once every run is over)
    runs: int
    workers: int = 3
    flows: int = 6
    aimed: bool = True  # the workers kill themselves at the claim and the batch commit


@dataclass
class Harm:
    """One chaos action: what, to whom, from when to when (time.time())."""

    action: str
    target: str
    start: float
    end: float = 0.0


@dataclass(frozen=True)
class Retried:
    """A FAILED run as it was when the chaos retried it: where its next course starts.

    Whether the retry took (the database may have been away) is for the checks
    to see: a retry that took ran the run's FAILED and stopped nodes again."""

    nodes: dict[str, NodeRecord]
    error: str | None


@dataclass
class Record:
    """What the chaos did, for the checks: every harm, and each worker's fate."""

    harms: list[Harm] = field(default_factory=list)
    sigkilled: dict[int, float] = field(default_factory=dict)  # pid -> when it was dead
    sigtermed: set[int] = field(default_factory=set)
    retried: dict[str, list[Retried]] = field(default_factory=dict)  # by tracking_id

    def count(self, action: str) -> int:
        return sum(1 for harm in self.harms if harm.action == action)

    def outages(self) -> list[tuple[float, float]]:
        """When the database (or a worker's connection) was away."""
        away = (RESTART, KILL_CONNECTIONS)
        return [(h.start, h.end) for h in self.harms if h.action in away]


# -- what runs: flows and their runs' scripts, from the seed ---------------------


def make_plans(rng: random.Random, count: int, tag: str) -> list[FlowPlan]:
    """CHILD_FLOWS child flows, then ``count`` flows of 1-4 stages of 1-3 steps: retries,
    conditions on an input flag or an earlier step's output, sync or async (async
    steps have a timeout), and now and then a subflow step running a child flow."""
    children = [
        FlowPlan(f"chaos_{tag}_child{k}", make_stages(rng, f"c{k}_", 2, subflows=()))
        for k in range(CHILD_FLOWS)
    ]
    names = tuple(child.name for child in children)
    parents = [
        FlowPlan(f"chaos_{tag}_{number}", make_stages(rng, "s", 4, subflows=names))
        for number in range(count)
    ]
    return children + parents


def make_stages(
    rng: random.Random, prefix: str, most: int, subflows: tuple[str, ...]
) -> tuple[tuple[StepPlan, ...], ...]:
    keys = list(FLAGS)
    stages = []
    for position in range(rng.randint(1, most)):
        width = rng.randint(1, 3)
        stage = [make_step(rng, f"{prefix}{position}_{i}", keys) for i in range(width)]
        if subflows and rng.random() < 0.3:
            child = rng.choice(subflows)
            condition = rng.choice([None, None, *keys])
            stage[0] = StepPlan(stage[0].name, 0, condition, False, child=child)
        if subflows and stage[-1].child is None and rng.random() < PARKED_SHARE:
            stage[-1] = parked_step(rng, stage[-1].name)
        if subflows and rng.random() < MAP_SHARE:  # a map is alone in its stage
            stage = [map_step(rng, f"{prefix}{position}_map")]
        stages.append(tuple(stage))
        keys += [step.name for step in stage]
    return tuple(stages)


def map_step(rng: random.Random, name: str) -> StepPlan:
    """A map of a few items (0 to MAX_ITEMS), 1 to 3 at once, maybe allowing failures."""
    items, at_once = rng.randint(0, MAX_ITEMS), rng.randint(1, 3)
    allow = rng.random() < 0.5
    return StepPlan(
        name,
        rng.randint(0, 2),
        None,
        False,
        kind=MAP,
        items=items,
        max_parallel=at_once,
        allow_failures=allow,
    )


def make_step(rng: random.Random, name: str, keys: list[str]) -> StepPlan:
    return StepPlan(name, rng.randint(0, 2), rng.choice([None, None, *keys]), rng.random() < 0.4)


def make_input(rng: random.Random, plan: FlowPlan, plans: dict[str, FlowPlan]) -> dict[str, object]:
    """A run's input: its flags, and the script of each step's attempts, its
    children's steps included (a child's input is its parent's ctx.data)."""
    steps = plan.steps()
    steps += [s for step in plan.steps() if step.child for s in plans[step.child].steps()]
    script = {
        step.name: make_script(rng, step).to_json()
        for step in steps
        if not step.child and step.kind != MAP
    }
    for step in (step for step in steps if step.kind == MAP):  # each item its own script
        for name in step.node_names()[1:]:
            script[name] = make_script(rng, replace(step, name=name, kind=STEP)).to_json()
    return {**{flag: rng.random() < 0.6 for flag in FLAGS}, "script": script}


def make_script(rng: random.Random, step: StepPlan) -> StepScript:
    """Mostly quick successes; some attempts fail, hang past the timeout or are slow.
    Attempt numbers up to twice the allowance: a rescued attempt shifts the count."""
    numbers = range(1, 2 * (step.retries + 1) + 1)
    failing = {n for n in numbers if rng.random() < 0.25}
    hang = {n for n in failing if step.is_async and rng.random() < 0.3}
    pause = rng.choice([0.0, 0.02, 0.05, 0.1, 0.3])
    return StepScript(frozenset(failing - hang), frozenset(hang), pause)


# -- the database and what the chaos does to it ----------------------------------


@dataclass
class Database:
    url: str
    kind: str
    server: LocalServer | None = None  # None for SQLite
    name: str = ""
    path: Path | None = None  # SQLite's file

    def restart(self) -> str:
        """Crash the server and start it again."""
        assert self.server is not None
        crash_and_restart(self.server)
        if self.kind == "mysql" and self.server.fast:
            durable_commits(self.server, self.name)  # its start set the fast value again
        return self.kind

    def kill_connections(self) -> str:
        """Every session on our database, killed by the server (SQLite has none)."""
        assert self.server is not None
        with self.server.admin_engine().connect() as conn:
            if self.kind == "postgresql":
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :n AND pid <> pg_backend_pid()"
                    ),
                    {"n": self.name},
                )
            else:
                kill_mysql_sessions(conn, self.name)
        return self.name

    def write_lock_holder(self) -> int | None:
        """The pid holding SQLite's WAL write lock (byte 120 of the -shm file), if any."""
        assert self.path is not None
        try:
            inode = os.stat(f"{self.path}-shm").st_ino
        except FileNotFoundError:
            return None
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            # e.g. "1: POSIX  ADVISORY  WRITE 4242 08:01:123456 120 120"
            ours = len(fields) >= 8 and fields[5].rsplit(":", 1)[-1] == str(inode)
            if ours and fields[3] == "WRITE" and fields[6] == "120":
                return int(fields[4])
        return None


@contextlib.contextmanager
def local_database(backend: str, workdir: Path) -> Iterator[Database]:
    """For the command line: a durable private server (a crash loses no commit, as
    in production), or a SQLite file, under ``workdir``."""
    if backend == "sqlite":
        path = workdir / "chaos.db"
        yield Database(f"sqlite:///{path}", "sqlite", path=path)
        return
    start = start_postgres if backend == "postgresql" else start_mariadb
    server = start(workdir / backend, False)
    try:
        url = server.create_database("chaos")
        yield Database(url, backend, server, "chaos")
    finally:
        server.destroy()


# -- the workers -------------------------------------------------------------------


class Crew:
    """The live worker processes; kills and replaces them.

    Workers started while ``aimed`` kill themselves at the claim and the batch
    commit now and then (tests/support/kill_points.py), and say so in the kill
    log first: ``reap`` reads it and notes the dead with the moment they died.
    """

    def __init__(self, workdir: Path, database: Database, env: dict[str, str], size: int):
        self.workdir, self.database, self.env, self.size = workdir, database, env, size
        self.live: list[WorkerProcess] = []
        self.gone: list[WorkerProcess] = []
        self.kill_log = workdir / "kills.jsonl"
        self.kill_log.touch()
        self._read_up_to = 0
        self.aim({})

    def aim(self, odds: dict[str, float]) -> None:
        """The workers started from now on kill themselves at these points with these odds."""
        self.aimed_env = {
            **self.env,
            kill_points.POINTS_ENV: kill_points.render(odds),
            kill_points.LOG_ENV: str(self.kill_log),
        }

    def fill(self) -> None:
        while len(self.live) < self.size:
            worker = WorkerProcess(
                self.workdir,
                self.database.url,
                self.aimed_env,
                "tests.support.kill_points",  # a second module: inert without its variable
                "--lease",
                str(LEASE_SECONDS),
                "--poll-interval",
                "0.1",
                "--concurrency",
                str(CONCURRENCY),
                module="tests.torture.chaos_flows",
            )
            self.live.append(worker)

    def sigkill(self, worker: WorkerProcess, record: Record) -> None:
        worker.signal(signal.SIGKILL)
        worker.proc.wait(30)
        self.read_kill_log(record)  # it may have killed itself first: that moment counts
        record.sigkilled.setdefault(worker.pid, time.time())  # dead by now: its steps end
        self._retire(worker)

    def sigterm(self, worker: WorkerProcess, record: Record) -> None:
        record.sigtermed.add(worker.pid)
        worker.signal(signal.SIGTERM)
        self.wait_drained(worker, record)
        self.read_kill_log(record)  # it may have reached a kill point while draining
        self._retire(worker)

    def wait_drained(self, worker: WorkerProcess, record: Record, patience: float = 60.0) -> None:
        """Wait for a SIGTERMed worker; one still running after ``patience`` s is a problem
        of the round: its threads' stacks (SIGUSR1, see kill_points) and log are kept in
        the harm, then it is SIGKILLed."""
        try:
            worker.proc.wait(patience)
            return
        except subprocess.TimeoutExpired:
            pass
        worker.signal(signal.SIGUSR1)
        time.sleep(1.0)
        tail = "\n".join(worker.output().splitlines()[-80:])
        record.harms.append(Harm(STUCK, f"pid {worker.pid}:\n{tail}", time.time(), time.time()))
        worker.signal(signal.SIGKILL)
        worker.proc.wait(30)
        record.sigkilled.setdefault(worker.pid, time.time())

    def reap(self, record: Record) -> None:
        """Retire the workers that died by themselves; note who died when, from the kill log."""
        dead = [worker for worker in self.live if worker.proc.poll() is not None]
        self.read_kill_log(record)
        for worker in dead:
            if worker.pid not in record.sigkilled:
                record.sigkilled[worker.pid] = time.time()
                how = DIED if '"worker.started"' in worker.output() else EXITED
                said = f"pid {worker.pid}, exit code {worker.proc.returncode}"
                record.harms.append(Harm(how, said, time.time(), time.time()))
            self._retire(worker)

    def read_kill_log(self, record: Record) -> None:
        """The kill log's new lines as harms; the self-SIGKILLed as dead at their line's time."""
        with self.kill_log.open() as log:
            log.seek(self._read_up_to)
            lines = log.readlines()
            self._read_up_to = log.tell()
        for line in lines:
            entry = json.loads(line)
            pid, point, when = entry["pid"], entry["point"], entry["t"]
            record.harms.append(Harm(point, f"pid {pid}", when, when))
            if point in kill_points.SIGKILLS:
                record.sigkilled.setdefault(pid, when)

    def kill_lock_holder(self, database: Database, record: Record, patience: float = 5.0) -> str:
        """SIGKILL the worker caught holding SQLite's write lock (within ``patience`` s)."""
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            holder = database.write_lock_holder()
            match = [w for w in self.live if w.pid == holder]
            if match:
                self.sigkill(match[0], record)
                return f"pid {holder}"
            time.sleep(0.002)
        return NOBODY

    def _retire(self, worker: WorkerProcess) -> None:
        self.live.remove(worker)
        self.gone.append(worker)

    def stop(self, record: Record) -> None:
        """SIGTERM every worker and wait for it (a graceful end, journaled as such)."""
        for worker in list(self.live):
            worker.signal(signal.SIGTERM)
        for worker in list(self.live):
            self.wait_drained(worker, record)
        self.read_kill_log(record)  # an aimed worker may have died at a point as it drained
        for worker in list(self.live):
            self._retire(worker)

    def cleanup(self) -> None:
        for worker in self.live + self.gone:
            worker.cleanup()


def worker_env(plan_path: Path, journal: Path) -> dict[str, str]:
    """A chaos worker's environment: the flows' plan, the journal its steps write."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return {**env, PLAN_ENV: str(plan_path), JOURNAL_ENV: str(journal)}


@dataclass
class Retrier:
    """Retries FAILED runs of the round, as an operator or a caller would."""

    storage: Storage
    url: str
    flows: dict[str, Flow]
    runs: dict[str, tuple[str, dict[str, object]]]  # those it may retry
    prefix: str

    def retry_one(self, rng: random.Random, record: Record) -> str:
        """Retry a FAILED run whose nodes are all settled, one way or the other at random."""
        try:
            failed = self.storage.list_flows(
                where=FlowFilter(FlowStatus.FAILED, tracking_id_prefix=self.prefix, limit=EVERY)
            )
            settled = sorted(
                run.tracking_id
                for run in failed
                if run.tracking_id in self.runs
                and all(n.status not in UNSETTLED for n in self.storage.list_nodes(flow_id=run.id))
            )
        except Exception:  # the database restarting, a connection killed
            return "the database did not answer"
        if not settled:
            return "no FAILED run"
        tracking_id, by_cli = rng.choice(settled), rng.random() < 0.5
        try:
            return self.retry(tracking_id, record, by_cli)
        except Exception:  # went away before the retry was sent: nothing noted
            return "the database did not answer"

    def retry(self, tracking_id: str, record: Record, by_cli: bool) -> str:
        """Note how the FAILED run is, then retry it with `flowsmith retry` or flow.run."""
        run = self.storage.get_flow(tracking_id=tracking_id, with_payloads=False)
        if run is None or run.status != FlowStatus.FAILED:
            return f"{tracking_id} is not FAILED"
        nodes = {n.step_name: n for n in self.storage.list_nodes(flow_id=run.id)}
        record.retried.setdefault(tracking_id, []).append(Retried(nodes, run.error))
        if by_cli:
            done = subprocess.run(
                [sys.executable, "-m", "flowsmith_worker", "retry", tracking_id, "--url", self.url],
                check=False,
                capture_output=True,
                text=True,
            )
            said = (done.stdout + done.stderr).strip().splitlines()[-1:]
            return f"{tracking_id} by `flowsmith retry`: exit code {done.returncode} {said}"
        flow_name, data = self.runs[tracking_id]
        try:
            self.flows[flow_name].run(data, tracking_id=tracking_id)
        except Exception as error:  # the database away: the checks see whether it took
            return f"{tracking_id} by flow.run, which raised {type(error).__name__}"
        return f"{tracking_id} by flow.run"


def chaos_step(
    rng: random.Random, database: Database, crew: Crew, record: Record, retrier: Retrier
) -> None:
    """One random harm (the crew is refilled before and after it)."""
    crew.reap(record)
    crew.fill()  # every worker may have died by itself since the last harm
    actions = [SIGKILL, SIGKILL, SIGTERM, RETRY]
    actions += [RESTART, KILL_CONNECTIONS] if database.server else [LOCK_HOLDER]
    action = rng.choice(actions)
    harm = Harm(action, "", time.time())
    if action == RETRY:
        harm.target = retrier.retry_one(rng, record)
    elif action == SIGKILL:
        victim = rng.choice(crew.live)
        harm.target = f"pid {victim.pid}"
        crew.sigkill(victim, record)
    elif action == SIGTERM:
        victim = rng.choice(crew.live)
        harm.target = f"pid {victim.pid}"
        crew.sigterm(victim, record)
    elif action == LOCK_HOLDER:
        harm.target = crew.kill_lock_holder(database, record)
    elif action == RESTART:
        harm.target = database.restart()
    else:
        harm.target = database.kill_connections()
    harm.end = time.time()
    record.harms.append(harm)
    crew.fill()


# -- a whole round -----------------------------------------------------------------


@dataclass
class Round:
    """A round's flows, runs (tracking_id -> (flow, input)) and what the chaos did."""

    plans: dict[str, FlowPlan]
    runs: dict[str, tuple[str, dict[str, object]]]
    record: Record
    journal: Path
    seconds: float = 0.0


def play(settings: Settings, database: Database, workdir: Path) -> Round:
    """Enqueue the runs, start the workers, harm them until every run is over or the
    duration passed, then let the workers finish undisturbed and stop them."""
    rng = random.Random(settings.seed)
    tag = f"{settings.seed}_{settings.backend}"[:30]
    prefix = f"{tag}_r"  # the round's runs, and their children ("<parent>:<step>")
    plans = make_plans(rng, settings.flows, tag)
    plan_path, journal = workdir / "plan.json", workdir / "journal.jsonl"
    save_plans(plans, plan_path)
    journal.touch()
    storage = create_storage(database.url)
    storage.migrate()
    flows = build_all(plans, None, storage)
    by_name = {plan.name: plan for plan in plans}
    parents = plans[CHILD_FLOWS:]
    runs: dict[str, tuple[str, dict[str, object]]] = {}
    try:
        for number in range(settings.runs):
            plan = rng.choice(parents)
            data = make_input(rng, plan, by_name)
            run = flows[plan.name].run(data, tracking_id=f"{prefix}{number}")
            runs[run.tracking_id] = (plan.name, data)
        record = Record()
        events = workdir / EVENTS_FILE
        sender = EventSender(database.url, waits_of(runs, by_name), events, settings.seed).start()
        # Only runs without a subflow, sleep or wait are retried (see chaos_check.check_model):
        # the model of a retry knows neither adopting a FAILED child nor events kept across it.
        simple = {
            name
            for name, plan in by_name.items()
            if not any(s.child or s.parks or s.kind == MAP for s in plan.steps())
        }
        retryable = {tid: run for tid, run in runs.items() if run[0] in simple}
        retrier = Retrier(storage, database.url, flows, retryable, prefix)
        crew = Crew(workdir, database, worker_env(plan_path, journal), settings.workers)
        crew.aim(KILL_ODDS if settings.aimed else {})
        started = time.monotonic()
        try:
            crew.fill()
            deadline = started + settings.duration
            while time.monotonic() < deadline and open_runs(storage, prefix) != 0:
                time.sleep(rng.uniform(0.2, 1.5))
                chaos_step(rng, database, crew, record, retrier)
            crew.aim({})  # the workers started from now on finish the round undisturbed

            def replace_the_dead() -> None:
                crew.reap(record)
                crew.fill()

            wait_all_over(storage, prefix, between=replace_the_dead)
            sender.finish()
            crew.stop(record)
        finally:
            crew.cleanup()
        return Round(by_name, runs, record, journal, time.monotonic() - started)
    finally:
        for name in flows:
            registry.unregister(name)
        storage.close()


def open_runs(storage: Storage, prefix: str) -> int | None:
    """How many runs of the round (tracking_id ``prefix``..., subflows' children
    included) are not over; None while the database does not answer."""
    try:
        return sum(
            len(
                storage.list_flows(where=FlowFilter(status, tracking_id_prefix=prefix, limit=EVERY))
            )
            for status in NOT_OVER
        )
    except Exception:  # the database restarting, a connection killed: ask again later
        return None


def unsettled(storage: Storage, prefix: str) -> int | None:
    """How many runs of the round are over with a node not yet (seed 43383837, SQLite: a
    worker died running a node as its sibling failed the run; its rescue came after the
    round ended); None while the database does not answer."""
    try:
        over = [
            run
            for status in (FlowStatus.COMPLETED, FlowStatus.FAILED)
            for run in storage.list_flows(
                where=FlowFilter(status, tracking_id_prefix=prefix, limit=EVERY)
            )
        ]
        return sum(
            1
            for run in over
            if UNSETTLED
            & {n.status for n in storage.list_nodes(flow_id=run.id, with_payloads=False)}
        )
    except Exception:  # the database restarting, a connection killed: ask again later
        return None


def wait_all_over(
    storage: Storage, prefix: str, stall: float = 120.0, between: Callable[[], None] | None = None
) -> None:
    """Wait until every run of the round is over and settled: a child run of a parent
    that failed meanwhile goes on to its end (its WAITING node waits for it), and a run
    that failed while a lost worker held a node has it rescued once its lease lapses.
    Fail if none ends for ``stall`` seconds: a run stuck for good. ``between`` is
    called between looks."""
    last, since = None, time.monotonic()
    while (left := open_runs(storage, prefix)) != 0 or (left := unsettled(storage, prefix)) != 0:
        if between is not None:
            between()
        if left != last:
            last, since = left, time.monotonic()
        elif time.monotonic() - since > stall:
            raise AssertionError(f"{left} runs of {prefix}* stuck: none ended for {stall} s")
        time.sleep(0.2)


def summary(record: Record, runs: int, seconds: float) -> str:
    actions = (SIGKILL, SIGTERM, RESTART, KILL_CONNECTIONS, LOCK_HOLDER, RETRY)
    counts = ", ".join(
        f"{record.count(action)} {action}"
        for action in (*actions, *kill_points.EVERY_POINT, EXITED, DIED, STUCK)
        if record.count(action)
    )
    missed = sum(1 for harm in record.harms if harm.target == NOBODY)
    if missed:
        counts += f" ({missed} times nobody held the write lock within 5 s)"
    sent = sum(len(tries) for tries in record.retried.values())
    if sent:
        counts += f" ({sent} retries sent to FAILED runs, the others found none settled)"
    return f"{runs} runs in {seconds:.0f} s; chaos: {counts}"


def play_rounds(seed: int, args: argparse.Namespace, tmp: Path, database: Database) -> int:
    """Rounds of ``args.runs`` runs (seeds ``seed``, ``seed + 1``...) until the duration
    passed, each checked at once; print what each did and found. Return the problems."""
    # Here, not at the top: chaos_check imports this module's Round.
    from tests.torture.chaos_check import check_round, explain

    started = time.monotonic()
    deadline = started + args.duration
    total, runs, failures, number = Record(), 0, 0, 0
    while time.monotonic() < deadline:
        round_seed = seed + number
        workdir = tmp / f"round{number}"
        workdir.mkdir()
        left = max(10.0, deadline - time.monotonic())
        played = play(
            Settings(round_seed, args.backend, left, args.runs, args.workers), database, workdir
        )
        problems = check_round(played, database.url)
        said = summary(played.record, len(played.runs), played.seconds)
        print(f"round {number} (seed {round_seed}): {said}", flush=True)
        for problem in problems:
            print(f"  PROBLEM: {problem}", flush=True)
        for tracking_id in sorted({p.split(":")[0] for p in problems} & set(played.runs)):
            print(explain(played, database.url, tracking_id), flush=True)
        total.harms += played.record.harms
        total.retried.update(played.record.retried)  # tracking_ids differ by round
        runs, failures, number = runs + len(played.runs), failures + len(problems), number + 1
    print(f"in all, {number} rounds: {summary(total, runs, time.monotonic() - started)}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.torture.chaos", description=__doc__)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--backend", choices=BACKENDS, default="postgresql")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds, all rounds")
    parser.add_argument("--runs", type=int, default=200, help="runs a round")
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**9)
    print(f"chaos seed {seed} (replay: make torture SEED={seed} BACKEND={args.backend})")
    with (
        tempfile.TemporaryDirectory(prefix="flowsmith-chaos-") as tmp,
        local_database(args.backend, Path(tmp)) as database,
    ):
        failures = play_rounds(seed, args, Path(tmp), database)
    print("no problem found" if not failures else f"{failures} problems found")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
