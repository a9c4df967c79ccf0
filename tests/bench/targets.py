"""The databases measured: one per backend, on servers started with durable settings.

PostgreSQL and MariaDB are started by tests/servers/ with fsync on (its
``fast=False``), as production runs them; SQLite is a file in the benchmark's
temporary directory, with FlowSmith's own settings (WAL, synchronous=NORMAL).
One database serves every phase of a backend and is emptied between phases:
creating a PostgreSQL database writes megabytes of WAL and forces a
checkpoint, which would land in the middle of a measurement.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from flowsmith_worker.storage import create_storage
from tests.bench.routes import Route, start_bouncer, worker_url
from tests.bench.workload import monitor_engine
from tests.servers import LocalServer, ServerUnavailable, start_mariadb, start_postgres
from tests.servers.pgbouncer import PgBouncer

BACKENDS = ("sqlite", "postgresql", "mysql")
# Per-statement counts (counters.py) need the extension loaded at server start.
POSTGRES_SETTINGS = {"shared_preload_libraries": "pg_stat_statements"}
# Tables the engine keeps between runs; everything else named fs_* is run data.
_KEPT_TABLES = {"fs_schema_version", "fs_queues"}


@dataclass
class Target:
    """One backend's database, and the server it lives on (None for SQLite)."""

    backend: str
    url: str
    server: LocalServer | None
    # In front of the PostgreSQL server, when open_targets was asked for one.
    bouncer: PgBouncer | None = None
    engine: sa.Engine = field(init=False)

    def __post_init__(self) -> None:
        storage = create_storage(self.url)
        try:
            storage.migrate()
        finally:
            storage.close()
        self.engine = monitor_engine(self.url)

    @property
    def database(self) -> str:
        return str(sa.make_url(self.url).database)

    def worker_url(self, route: Route, application: str) -> str:
        """The URL the workers of ``route`` connect with, named ``application``."""
        return worker_url(self.url, self.database, route, self.bouncer, application)

    def wipe(self) -> None:
        """Delete every run, node and worker row, so the next phase starts empty."""
        with self.engine.connect() as conn:
            tables = _run_tables(conn)
            if self.backend == "postgresql":
                conn.execute(sa.text(f"TRUNCATE {', '.join(tables)}"))
                conn.execute(sa.text("VACUUM ANALYZE"))
            else:
                for table in tables:  # children first: fs_nodes refers to fs_flows
                    conn.execute(sa.text(f"DELETE FROM {table}"))

    def checkpoint(self) -> None:
        """Flush dirty pages now, so no checkpoint's writes fall inside what comes next."""
        with self.engine.connect() as conn:
            if self.backend == "postgresql":
                conn.execute(sa.text("CHECKPOINT"))
            elif self.backend == "sqlite":
                conn.execute(sa.text("PRAGMA wal_checkpoint(TRUNCATE)"))

    def close(self) -> None:
        self.engine.dispose()
        if self.bouncer is not None:
            self.bouncer.destroy()


def _run_tables(conn: sa.Connection) -> list[str]:
    """fs_* tables holding runs, dependent tables first."""
    metadata = sa.MetaData()
    metadata.reflect(conn)
    tables = [t.name for t in reversed(metadata.sorted_tables)]
    return [t for t in tables if t.startswith("fs_") and t not in _KEPT_TABLES]


@contextlib.contextmanager
def open_targets(
    backends: list[str], base: Path, *, bouncer: bool = False
) -> Iterator[list[Target]]:
    """A database per backend whose server could start; servers destroyed at the end.
    ``bouncer``: PostgreSQL's target gets a PgBouncer too, if pgbouncer is installed."""
    servers: list[LocalServer] = []
    targets: list[Target] = []
    try:
        for backend in backends:
            target = _open(backend, base, servers)
            if target is not None:
                targets.append(target)
                if bouncer and target.server is not None and backend == "postgresql":
                    target.bouncer = start_bouncer(target.server)
        yield targets
    finally:
        for target in targets:
            target.close()
        for server in servers:
            server.destroy()  # stop it and remove its data, wherever it lives


def _open(backend: str, base: Path, servers: list[LocalServer]) -> Target | None:
    if backend == "sqlite":
        return Target(backend, f"sqlite:///{base / 'bench.db'}", None)
    try:
        if backend == "postgresql":
            server = start_postgres(
                base / backend, fast=False, settings=POSTGRES_SETTINGS, spares=False
            )
        else:
            server = start_mariadb(base / backend, fast=False)
    except ServerUnavailable as exc:
        print(f"skipping {backend}: {exc}", file=sys.stderr)
        return None
    servers.append(server)
    return Target(backend, server.create_database("bench"), server)
