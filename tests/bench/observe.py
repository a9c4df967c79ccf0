"""What bounds a PostgreSQL drain: the workers' wait events, and who used the CPU.

* Wait events: every SAMPLE_INTERVAL, from a connection of its own to the
  server's admin database (so the benchmark database's counters stay the
  workers' alone), one read of pg_stat_activity for the backends named with
  the drain's application_name (routes.drain_application): the workers' own,
  not the idle ones PgBouncer keeps from earlier drains. Each backend in each
  sample counts once: "CPU" when active with no wait event (running), the
  wait event when active and waiting (IO:WALSync = commits, Lock:* = locks,
  LWLock:* = contention inside the server), "in transaction: waiting for the
  worker" when its worker holds a transaction open between statements (the
  worker's Python and the round trip), "idle" between transactions. A worker
  keeps idle connections (its listener, its pool's spares), so what bounds
  the drain is read from the backends in a transaction: ``in_transaction_top``
  gives their shares alone.
* CPU: utime + stime from /proc of the server (postmaster and children), the
  worker processes and PgBouncer, and the whole machine's busy time from
  /proc/stat, each as cores used over the drain's wall-clock time. "other" is
  the machine's busy time nobody here used: the load of whoever shares it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

SAMPLE_INTERVAL = 0.1
TOP_EVENTS = 6
_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
_ACTIVITY = sa.text(
    "SELECT state, wait_event_type, wait_event FROM pg_stat_activity"
    " WHERE datname = :database AND application_name = :application"
)


IDLE = "idle"
_LABELS = {"idle": IDLE, "idle in transaction": "in transaction: waiting for the worker"}


def _label(state: str | None, kind: str | None, event: str | None) -> str:
    waiting = f"{kind}:{event}" if event else "CPU"
    if state == "active":
        return waiting
    return _LABELS.get(state or "", f"{state}: {waiting}")


def _shares(events: Counter[str]) -> list[dict[str, Any]]:
    """The most frequent events with their share of all of ``events``."""
    total = sum(events.values())
    return [{"event": e, "share": count / total} for e, count in events.most_common(TOP_EVENTS)]


class WaitSampler:
    """A thread reading the workers' backends' wait events until stop()."""

    def __init__(self, admin_url: str, database: str, application: str) -> None:
        self._engine = sa.create_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        self._parameters = {"database": database, "application": application}
        self._events: Counter[str] = Counter()
        self._samples = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wait-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        """Stop sampling; the events' shares (of all backend samples, and of those in a
        transaction), most frequent first, and the mean number of backends of each kind."""
        self._stopping.set()
        self._thread.join()
        self._engine.dispose()
        in_transaction = Counter({e: n for e, n in self._events.items() if e != IDLE})
        samples = max(1, self._samples)
        return {
            "interval_seconds": SAMPLE_INTERVAL,
            "samples": self._samples,
            "mean_backends": self._events.total() / samples,
            "mean_in_transaction": in_transaction.total() / samples,
            "top": _shares(self._events),
            "in_transaction_top": _shares(in_transaction),
        }

    def _run(self) -> None:
        with self._engine.connect() as conn:
            # One last sample after stop(): however short the drain, it has samples.
            while True:
                last = self._stopping.is_set()
                self._sample(conn)
                if last:
                    return
                self._stopping.wait(SAMPLE_INTERVAL)

    def _sample(self, conn: sa.Connection) -> None:
        rows = conn.execute(_ACTIVITY, self._parameters).all()  # autocommit: a fresh view
        self._samples += 1
        self._events.update(_label(*row) for row in rows)


# --------------------------------------------------------------------------- CPU


def _process_times() -> Iterator[tuple[int, int, int]]:
    """(pid, parent pid, utime + stime in ticks) of every process we may read."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # The command name may hold spaces and parentheses: fields follow the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        yield int(entry.name), int(fields[1]), int(fields[11]) + int(fields[12])


def _machine_busy_ticks() -> int:
    """Ticks all CPUs spent on anything but idle and iowait since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values[:8]) - idle


@dataclass(frozen=True)
class Processes:
    """A group of processes to meter: these pids, and their children if ``children``
    (the postmaster's backends, which come and go with connections)."""

    pids: frozenset[int]
    children: bool = False

    def select(self, processes: list[tuple[int, int, int]]) -> dict[int, int]:
        """Ticks of this group's processes, by pid."""
        return {
            pid: ticks
            for pid, parent, ticks in processes
            if pid in self.pids or (self.children and parent in self.pids)
        }


@dataclass
class _Snapshot:
    at: float
    machine: int
    groups: dict[str, dict[int, int]]  # group -> pid -> ticks


class CpuMeter:
    """CPU used by named groups of processes between start() and stop()."""

    def __init__(self, groups: dict[str, Processes]) -> None:
        self._groups = groups
        self._start: _Snapshot | None = None

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> dict[str, Any]:
        """Cores used by each group, the machine, "other" (busy, none of ours) and "free"."""
        if self._start is None:
            raise RuntimeError("CpuMeter.stop() before start()")
        end = self._snapshot()
        seconds = end.at - self._start.at
        cores: dict[str, Any] = {}
        for name, pids in end.groups.items():
            before = self._start.groups[name]
            # A process born meanwhile counts from zero; one gone meanwhile is lost.
            ticks = sum(t - before.get(pid, 0) for pid, t in pids.items())
            cores[f"{name}_cores"] = ticks / _TICKS_PER_SECOND / seconds
        machine = (end.machine - self._start.machine) / _TICKS_PER_SECOND / seconds
        cores["other_cores"] = max(0.0, machine - sum(cores.values()))
        cores["machine_busy_cores"] = machine
        cpus = os.cpu_count() or 1
        # Ticks are read a moment apart from the clock: never report a negative rest.
        cores["free_cores"] = max(0.0, cpus - machine)
        cores["cpus"] = cpus
        cores["seconds"] = seconds
        return cores

    def _snapshot(self) -> _Snapshot:
        at = time.monotonic()
        processes = list(_process_times())
        groups = {name: group.select(processes) for name, group in self._groups.items()}
        return _Snapshot(at, _machine_busy_ticks(), groups)


@contextmanager
def observed(
    admin_url: str, database: str, application: str, groups: dict[str, Processes]
) -> Iterator[dict[str, Any]]:
    """Sample the wait events of ``application``'s backends and meter CPU while the block
    runs; the figures land in the yielded dict (``waits``, ``cpu``) when it ends."""
    figures: dict[str, Any] = {}
    sampler = WaitSampler(admin_url, database, application)
    meter = CpuMeter(groups)
    meter.start()
    sampler.start()
    try:
        yield figures
    finally:
        figures["waits"] = sampler.stop()
        figures["cpu"] = meter.stop()
