"""Where a step's CPU goes: `flowsmith worker` processes draining 10-step no-op flows.

    .venv/bin/python -m tests.bench.profile [--flows 300] [--workers 2] [--py-spy PATH]
                                            [--engine CHECKOUT --engine OTHER] [--repeat 2]
                                            [--backend postgresql|mysql]

It starts a durable PostgreSQL or MariaDB (as `make bench` does), enqueues ``--flows``
10-step runs, holds them back until ``--workers`` processes are ready, releases
them and measures, over the drain:

* steps/s (the bench's steady window);
* CPU seconds per step of the worker processes (utime + stime from /proc, every
  thread) and of the database server (PostgreSQL: the postmaster's children, live
  ones read directly, exited ones through the postmaster's cutime/cstime;
  MariaDB: its one process, every thread);
* with ``--py-spy`` (a py-spy binary: ``python -m venv /tmp/spy &&
  /tmp/spy/bin/pip install py-spy``; never a dependency of the package), a
  sampling profile of each worker, summarised as CPU per step by category.
  Only the thread holding the GIL is sampled (``--gil``), without pausing the
  process (``--nonblocking``): py-spy cannot tell idle threads from busy ones
  in its non-pausing mode, and pausing a worker 1,000 times a second would
  change what is measured. So each sample is 1 ms of Python running; the
  worker CPU not covered by samples is time spent without the GIL (system
  calls, libpq, thread wake-ups). Profiling costs CPU of its own: take steps/s
  and CPU per step from runs without ``--py-spy``.

``--engine PATH`` runs the workers from a checkout of the package (with its
own ``.venv/bin/python``); given twice, the two engines drain alternately
(``--repeat`` rounds) on one server with the same measuring code: the A/B runs
of a change.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowsmith_worker.storage import create_storage
from tests.bench.targets import Target, open_targets
from tests.bench.workload import (
    NOOP_FLOWS,
    REPO,
    WorkerPool,
    enqueue_quickly,
    hold_backlog,
    release_backlog,
    steady_window,
    wait_completed,
)

STEPS_PER_FLOW = 10
SAMPLES_PER_SECOND = 1000
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# A stack's category: the first rule whose test holds, in this order, so that
# json.dumps inside the log renderer counts as logging, not as JSON. Each test
# gets the stack's frames as "function (file:line)", root first.
Rule = tuple[str, Callable[[list[str]], bool]]


def _anywhere(*parts: str) -> Callable[[list[str]], bool]:
    return lambda frames: any(part in frame for frame in frames for part in parts)


def _leaf(*parts: str) -> Callable[[list[str]], bool]:
    return lambda frames: any(part in frames[-1] for part in parts)


RULES: list[Rule] = [
    ("logging (structlog, log.py, redaction)", _anywhere("structlog/", "flowsmith_worker/log.py")),
    ("driver (psycopg2 execute/fetch, in C)", _leaf("do_execute", "fetchall (", "fetchone (")),
    ("driver (mysql-connector, in Python)", _anywhere("mysql/connector/")),
    ("SQLAlchemy (execute path, pool, results)", _anywhere("sqlalchemy/")),
    ("storage (FlowSmith's SQL code)", _anywhere("flowsmith_worker/storage/")),
    ("ctx copy (copy.deepcopy)", _anywhere("copy.py")),
    ("JSON (payload encode, output decode)", _anywhere("json/", "flowsmith_worker/payload.py")),
    # Every thread's stack starts in threading.py: only a leaf there is a hand-off.
    (
        "thread hand-offs (batcher, futures, locks, queues)",
        _leaf("threading.py", "queue.py", "concurrent/", "flowsmith_worker/batcher.py"),
    ),
    ("metrics", _anywhere("flowsmith_worker/metrics.py")),
    (
        "executor (executor.py, context, progress)",
        _anywhere("flowsmith_worker/executor.py", "flowsmith_worker/context.py"),
    ),
    ("worker loop, slots, heartbeat", _anywhere("flowsmith_worker/")),
]
OTHER = "other (interpreter, imports, unattributed)"


def categorise(frames: list[str]) -> str:
    for name, test in RULES:
        if test(frames):
            return name
    return OTHER


def read_raw(path: Path) -> Counter[str]:
    """py-spy's --format raw (collapsed stacks: ``frame;frame;... count``) by category."""
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if stack and number.isdigit():
            counts[categorise(stack.split(";"))] += int(number)
    return counts


def leaf_functions(path: Path, top: int = 25) -> list[tuple[str, int]]:
    """The functions most samples ended in (self time), for the detail under the table."""
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if stack and number.isdigit():
            counts[_short(stack.split(";")[-1])] += int(number)
    return counts.most_common(top)


def _short(frame: str) -> str:
    for marker in ("site-packages/", "lib/python3"):
        if marker in frame:
            function, _, where = frame.partition(" (")
            return f"{function} ({where.split(marker)[-1]}"
    return frame


# --------------------------------------------------------------------------- CPU


def cpu_seconds(pid: int, *, children: bool = False, system: bool = True) -> float:
    """utime + stime of ``pid`` (all its threads); with its waited-for children's.

    With ``system=False``, utime alone (and cutime): the process's own code.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the command name: state is fields[0]; utime, stime, cutime, cstime are 11..14.
    ticks = int(fields[11]) + (int(fields[12]) if system else 0)
    if children:
        ticks += int(fields[13]) + (int(fields[14]) if system else 0)
    return ticks / _CLOCK_TICKS


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of ``pid`` so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        total += sum(
            int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line
        )
    return total


@dataclass(frozen=True)
class WorkerUsage:
    """What the worker processes had used at one moment."""

    cpu: float
    user: float
    switches: int

    @staticmethod
    def of(pids: list[int]) -> WorkerUsage:
        return WorkerUsage(
            sum(cpu_seconds(pid) for pid in pids),
            sum(cpu_seconds(pid, system=False) for pid in pids),
            sum(context_switches(pid) for pid in pids),
        )

    def __sub__(self, other: WorkerUsage) -> WorkerUsage:
        return WorkerUsage(
            self.cpu - other.cpu, self.user - other.user, self.switches - other.switches
        )


def server_cpu_seconds(target: Target, pid: int) -> float:
    """The server's CPU: MariaDB's process (its threads); PostgreSQL's postmaster, its
    live children, and its exited ones."""
    if target.backend != "postgresql":
        return cpu_seconds(pid)
    postmaster = pid
    total = cpu_seconds(postmaster, children=True)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                if parent == postmaster:
                    total += cpu_seconds(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue  # it exited meanwhile: its time is in the postmaster's cutime
    return total


def server_pid(target: Target) -> int:
    assert target.server is not None
    pid = target.server._pid()  # the test harness's own server handle
    if pid is None:
        raise SystemExit(f"the {target.backend} server is not running")
    return pid


# --------------------------------------------------------------------------- workers


@dataclass
class EnginePool(WorkerPool):
    """The bench's worker processes, run from ``engine``'s checkout and virtualenv."""

    engine: Path = REPO

    def _command(self) -> list[str]:
        return [str(self.engine / ".venv" / "bin" / "python"), *super()._command()[1:]]

    def _popen_options(self, log: Any) -> dict[str, Any]:
        return {**super()._popen_options(log), "cwd": self.engine}


@contextmanager
def sampling(py_spy: Path | None, pids: list[int], out: Path) -> Iterator[list[Path]]:
    """py-spy recording each pid (on-CPU samples, raw collapsed stacks) while inside."""
    if py_spy is None:
        yield []
        return
    out.mkdir(parents=True, exist_ok=True)
    outputs = [out / f"worker-{pid}.txt" for pid in pids]
    procs = [
        subprocess.Popen(
            [
                *(str(py_spy), "record", "--pid", str(pid), "--output", str(path)),
                *("--format", "raw", "--rate", str(SAMPLES_PER_SECOND), "--gil", "--nonblocking"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for pid, path in zip(pids, outputs, strict=True)
    ]
    try:
        yield outputs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            if proc.returncode not in (0, -signal.SIGINT):
                print(err.decode(errors="replace"), file=sys.stderr)


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Drained:
    steps: int
    steps_per_second: float
    worker: WorkerUsage
    server_cpu: float
    wall: float
    samples: Counter[str]
    leaves: list[tuple[str, int]]

    def per_step_us(self, seconds: float) -> float:
        return seconds / self.steps * 1e6


def drain(target: Target, args: argparse.Namespace, engine: Path, logs: Path) -> Drained:
    target.wipe()
    storage = create_storage(target.url)
    try:
        enqueue_quickly(storage, NOOP_FLOWS[STEPS_PER_FLOW], args.flows)
    finally:
        storage.close()
    hold_backlog(target.engine)
    target.checkpoint()
    server = server_pid(target)
    pool = EnginePool(target.url, args.workers, logs, engine=engine)
    try:
        pool.start()
        pids = [proc.pid for proc in pool.procs]
        with sampling(args.py_spy, pids, args.raw or logs) as outputs:
            worker_before = WorkerUsage.of(pids)
            server_before = server_cpu_seconds(target, server)
            released_at = release_backlog(target.engine)
            wait_completed(target.engine, pool, args.flows)
            worker = WorkerUsage.of(pids) - worker_before
            server_cpu = server_cpu_seconds(target, server) - server_before
    finally:
        pool.stop()
    window = steady_window(target.engine, released_at)
    samples: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for path in outputs:
        samples += read_raw(path)
        leaves.update(dict(leaf_functions(path, top=10_000)))
    return Drained(
        window.steps,
        window.steps_per_second,
        worker,
        server_cpu,
        window.seconds,
        samples,
        leaves.most_common(25),
    )


def report(drained: Drained, engine: Path, backend: str) -> str:
    lines = [
        f"engine {engine}: {drained.steps} steps in {drained.wall:.2f} s, "
        f"{drained.steps_per_second:,.0f} steps/s",
        f"CPU per step: workers {drained.per_step_us(drained.worker.cpu):.0f} µs "
        f"(user {drained.per_step_us(drained.worker.user):.0f}), "
        f"{backend} server {drained.per_step_us(drained.server_cpu):.0f} µs, "
        f"together {drained.per_step_us(drained.worker.cpu + drained.server_cpu):.0f} µs "
        f"(2 cores give {2e6 / drained.steps_per_second:.0f} µs per step at this rate); "
        f"worker context switches per step {drained.worker.switches / drained.steps:.1f}",
    ]
    total = sum(drained.samples.values())
    if total:
        lines += ["", *_category_table(drained, total)]
        lines += ["", "| function the samples ended in (self time) | share |", "|---|---|"]
        lines += [f"| {name} | {count / total:.1%} |" for name, count in drained.leaves]
    return "\n".join(lines)


def _category_table(drained: Drained, total: int) -> list[str]:
    """Each category's µs per step: its samples (each 1/rate s of a thread holding the
    GIL); what the worker processes spent without the GIL (system calls, libpq's own
    work, waking threads) is the rest of their measured CPU."""
    worker_us = drained.per_step_us(drained.worker.cpu)
    lines = [
        f"| worker CPU per step ({total} samples at {SAMPLES_PER_SECOND}/s) | µs | share |",
        "|---|---|---|",
    ]
    held = 0.0
    for name, count in drained.samples.most_common():
        us = drained.per_step_us(count / SAMPLES_PER_SECOND)
        held += us
        lines.append(f"| {name} | {us:.0f} | {us / worker_us:.0%} |")
    rest = worker_us - held
    lines.append(
        f"| without the GIL (system calls, libpq, thread wake-ups) | {rest:.0f} "
        f"| {rest / worker_us:.0%} |"
    )
    lines.append(f"| all (measured, /proc) | {worker_us:.0f} | 100% |")
    return lines


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--flows", type=int, default=300, help="10-step runs (%(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="processes (%(default)s)")
    parser.add_argument("--py-spy", type=Path, help="a py-spy binary: sample the workers")
    parser.add_argument(
        "--engine",
        type=Path,
        action="append",
        help="a checkout to run the workers from (this one by default); give two to compare",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the engines")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks in this folder")
    parser.add_argument(
        "--backend", choices=["postgresql", "mysql"], default="postgresql", help="the server"
    )
    args = parser.parse_args()
    args.engine = [path.resolve() for path in args.engine or [REPO]]
    return args


def main() -> None:
    args = _arguments()
    with tempfile.TemporaryDirectory(prefix="flowsmith-profile-") as tmp:
        base = Path(tmp)
        with open_targets([args.backend], base) as targets:
            if not targets:
                raise SystemExit(f"{args.backend} could not start: see the message above")
            for _ in range(args.repeat):
                for engine in args.engine:  # alternating: A, B, A, B on one server
                    drained = drain(targets[0], args, engine, base)
                    print(report(drained, engine, args.backend), "\n", flush=True)


if __name__ == "__main__":
    main()
