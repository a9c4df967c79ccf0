"""Test-only kill points: a `flowsmith worker` that dies at the claim or at a batch's commit.

The chaos run's SIGKILLs come from outside, at moments the chaos loop cannot aim;
this module aims them from inside. A worker loads it as one more module of flows
(``flowsmith worker tests.torture.chaos_flows tests.support.kill_points``, or
FLOWSMITH_MODULES), and it reads ``$FS_KILL_POINTS``: ``point=odds`` pairs
separated by commas, e.g. ``claimed=0.01,before commit=0.02``. At each point
reached, with its odds, the process SIGKILLs itself (or, for the ``dropped``
points, the server kills its connection). Before doing so it appends one JSON
line (pid, point, time) to ``$FS_KILL_POINTS_LOG`` in a single ``write``, so the
chaos run knows who died, where and when. Loaded, it also makes SIGUSR1 write every
thread's stack to stderr (faulthandler), armed or not.

Nothing of it is in the package: it wraps two SqlStorage methods and one
function of the claim, only to know which transaction a thread is in, and
listens to SQLAlchemy's ``commit`` event, which fires before the DBAPI commit.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from flowsmith_worker.storage.sql import context as sql_context
from flowsmith_worker.storage.sql.storage import SqlStorage

POINTS_ENV = "FS_KILL_POINTS"
LOG_ENV = "FS_KILL_POINTS_LOG"
# SIGKILLs: the claim's statements ran but not its commit; the claim committed but no
# step of it started; the batch of outcomes written but not committed; committed.
CLAIMED = "killed in the claim before its commit"
LEASED = "killed right after the claim"
BEFORE_COMMIT = "killed before a batch commit"
AFTER_COMMIT = "killed right after a batch commit"
# The server kills the connection as the claim or the batch is about to commit.
DROPPED_AT_CLAIM = "connection killed at a claim's commit"
DROPPED_AT_BATCH = "connection killed at a batch commit"
SIGKILLS = (CLAIMED, LEASED, BEFORE_COMMIT, AFTER_COMMIT)
DROPS = (DROPPED_AT_CLAIM, DROPPED_AT_BATCH)
EVERY_POINT = SIGKILLS + DROPS
CLAIM, BATCH = "claim", "batch"  # which transaction a thread is in
# How a connection asks its server to kill it.
_KILL_MYSELF = {
    "postgresql": "SELECT pg_terminate_backend(pg_backend_pid())",
    "mysql": "KILL CONNECTION_ID()",
}

T = TypeVar("T")


def parse(text: str) -> dict[str, float]:
    """``point=odds,...`` as a dict; an unknown point is an error (a typo aims nothing)."""
    odds = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        point, _, value = pair.rpartition("=")
        if point not in EVERY_POINT:
            raise ValueError(f"{POINTS_ENV}: unknown kill point {point!r}; known: {EVERY_POINT}")
        odds[point] = float(value)
    return odds


def render(odds: dict[str, float]) -> str:
    """The value of $FS_KILL_POINTS for ``odds``."""
    return ",".join(f"{point}={value}" for point, value in odds.items())


class KillPoints:
    """The armed points of this process, and the thread's current transaction."""

    def __init__(self, odds: dict[str, float], log_path: str) -> None:
        self.odds = odds
        self.log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.local = threading.local()

    def phase(self) -> str | None:
        return getattr(self.local, "phase", None)

    def leased(self) -> bool:
        """Whether the thread's claim leased nodes (an empty poll is no moment to aim at)."""
        return bool(getattr(self.local, "leased", False))

    @contextlib.contextmanager
    def inside(self, phase: str) -> Iterator[None]:
        self.local.phase, self.local.leased = phase, False
        try:
            yield
        finally:
            self.local.phase = None

    def hit(self, point: str) -> bool:
        """Whether ``point``'s odds came up; if so, its line is written first."""
        if random.random() >= self.odds.get(point, 0.0):
            return False
        line = {"pid": os.getpid(), "point": point, "t": time.time()}
        os.write(self.log_fd, (json.dumps(line) + "\n").encode())  # one write: one line
        return True

    def die_at(self, point: str) -> None:
        if self.hit(point):
            os.kill(os.getpid(), signal.SIGKILL)

    def drop_at(self, point: str, conn: Connection) -> None:
        """Have the server kill ``conn``'s session; its commit then meets a dead connection."""
        statement = _KILL_MYSELF.get(conn.dialect.name)
        if statement is None or not self.hit(point):
            return
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        with contextlib.suppress(Exception):  # the server ends the session under us
            cursor.execute(statement)


def wrapped(
    method: Callable[..., T], points: KillPoints, phase: str, after: str
) -> Callable[..., T]:
    """``method`` run inside ``phase``; the process dies at ``after`` once it returned
    something (a claim that leased nodes, a batch that wrote outcomes)."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> T:
        with points.inside(phase):
            result = method(*args, **kwargs)
        if result:
            points.die_at(after)
        return result

    return run


def install(points: KillPoints) -> None:
    """Arm the points in this process."""
    SqlStorage.claim_nodes = wrapped(SqlStorage.claim_nodes, points, CLAIM, LEASED)  # type: ignore[method-assign]
    SqlStorage.complete_batch = wrapped(SqlStorage.complete_batch, points, BATCH, AFTER_COMMIT)  # type: ignore[method-assign]
    read_for_claimed = sql_context.read_for_claimed

    def after_the_lease(
        conn: Connection, claimed: Sequence[Any]
    ) -> dict[int, sql_context.RunPayloads]:
        # Called in the claim's transaction once its statements leased ``claimed``.
        if claimed:
            points.local.leased = True
            points.die_at(CLAIMED)
        return read_for_claimed(conn, claimed)

    sql_context.read_for_claimed = after_the_lease

    @event.listens_for(Engine, "commit")
    def before_commit(conn: Connection) -> None:
        phase = points.phase()
        if phase == BATCH:
            points.die_at(BEFORE_COMMIT)
            points.drop_at(DROPPED_AT_BATCH, conn)
        elif phase == CLAIM and points.leased():
            points.drop_at(DROPPED_AT_CLAIM, conn)


def _install_from_environment() -> None:
    # SIGUSR1 writes every thread's stack to stderr: what a worker that does not stop
    # is doing (the chaos asks before it SIGKILLs one).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    text = os.environ.get(POINTS_ENV)
    if text:
        install(KillPoints(parse(text), os.environ[LOG_ENV]))


_install_from_environment()
