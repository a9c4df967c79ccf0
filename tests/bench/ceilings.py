"""Each database's own single-row-commit ceiling, measured in the same run.

A durable step needs at least one commit, so the rate at which 2 clients can
commit one single-row INSERT each is what the engine's steps/s is compared
with: a ratio, which survives a noisy shared machine better than the absolute.

* Python: 2 processes, each on one connection of FlowSmith's own engine (same
  driver and settings: SQLite's WAL and synchronous=NORMAL), looping
  INSERT + COMMIT. Every backend has this one.
* pgbench (PostgreSQL): 2 clients running a one-INSERT script; no Python in
  the way, so the server's own ceiling.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import sqlalchemy as sa

from flowsmith_worker.storage import create_storage
from tests.bench.targets import Target
from tests.servers import PASSWORD, USER, find_postgres

CLIENTS = 2
TABLE = "bench_ceiling"
_INSERT = f"INSERT INTO {TABLE} (v) VALUES (1)"
_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)


def _create_table(target: Target) -> None:
    metadata = sa.MetaData()
    table = sa.Table(
        TABLE,
        metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("v", sa.Integer, nullable=False),
    )
    with target.engine.connect() as conn:
        table.drop(conn, checkfirst=True)
        table.create(conn)


def _drop_table(target: Target) -> None:
    with target.engine.connect() as conn:
        conn.execute(sa.text(f"DROP TABLE {TABLE}"))


def _commit_loop(url: str, seconds: float) -> int:
    """In a child process: commit single-row INSERTs for ``seconds``; return how many."""
    storage = create_storage(url)
    engine: sa.Engine = storage.engine  # type: ignore[attr-defined]  # SQL storages have one
    insert = sa.text(_INSERT)
    commits = 0
    with engine.connect() as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.execute(insert)
            conn.commit()
            commits += 1
    storage.close()
    return commits


def python_commits_per_second(target: Target, seconds: float) -> float:
    """2 processes committing one single-row INSERT per transaction, as fast as they can."""
    _create_table(target)
    target.checkpoint()
    try:
        spawn = multiprocessing.get_context("spawn")  # no forked copy of our pools
        with ProcessPoolExecutor(CLIENTS, mp_context=spawn) as pool:
            futures = [pool.submit(_commit_loop, target.url, seconds) for _ in range(CLIENTS)]
            return sum(f.result() for f in futures) / seconds
    finally:
        _drop_table(target)


def pgbench_commits_per_second(target: Target, seconds: float) -> float:
    """pgbench, 2 clients, each transaction one single-row INSERT (autocommit)."""
    url = sa.make_url(target.url)
    _create_table(target)
    target.checkpoint()
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".sql") as script:
            script.write(_INSERT + ";\n")
            script.flush()
            command = [
                str(find_postgres() / "pgbench"),
                "--no-vacuum",
                f"--client={CLIENTS}",
                f"--jobs={CLIENTS}",
                f"--time={max(1, round(seconds))}",
                f"--file={script.name}",
                f"--host={url.host}",
                f"--port={url.port}",
                f"--username={USER}",
                str(url.database),
            ]
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                env={**os.environ, "PGPASSWORD": PASSWORD},
                cwd=Path(script.name).parent,
                check=False,
            )
    finally:
        _drop_table(target)
    found = _TPS.search(result.stdout)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"pgbench failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return float(found.group(1))
