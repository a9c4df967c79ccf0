"""Bytes written per step: a 50-step flow whose steps each return 1 KB of JSON.

Two figures, each also as a ratio to the real output (1,024 bytes a step):

* payload: the JSON the database holds for the finished runs (run input,
  output, error and plan; each node's input, output and error), summed in bytes;
* log: what the database wrote to its write-ahead log meanwhile, enqueue to
  the last commit (PostgreSQL: pg_current_wal_lsn() difference; MariaDB:
  Innodb_os_log_written). SQLite has no counter for it: its WAL file is
  rewritten from the start after each checkpoint, so its size says nothing.

log_breakdown says where the log bytes went (see log_breakdown.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from flowsmith_worker.storage import create_storage
from tests.bench import log_breakdown
from tests.bench.targets import Target
from tests.bench.workload import (
    FIFTY_KILOBYTE_STEPS,
    KILOBYTE_OUTPUT,
    enqueue_one_by_one,
    running_workers,
    wait_completed,
)

STEPS = 50
OUTPUT_BYTES = len(f'"{KILOBYTE_OUTPUT}"')
# The columns holding JSON a run writes, where the engine has them.
_JSON_COLUMNS = {
    "fs_flows": ("input", "output", "error", "plan"),
    "fs_nodes": ("input", "output", "error"),
}


def measure(target: Target, logs: Path, runs: int) -> dict[str, Any]:
    """Run ``runs`` such flows on one worker; bytes per step and their ratios."""
    target.wipe()
    target.checkpoint()
    begun = log_breakdown.begin(target)
    log_before = _log_position(target)
    storage = create_storage(target.url)
    try:
        enqueue_one_by_one(storage, FIFTY_KILOBYTE_STEPS, runs)
    finally:
        storage.close()
    with running_workers(target.url, 1, logs) as pool:
        wait_completed(target.engine, pool, runs)
    log_after = _log_position(target)
    steps = runs * STEPS
    payload = _stored_json_bytes(target) / steps
    log_range = None if log_before is None or log_after is None else (log_before, log_after)
    log = None if log_range is None else (log_range[1] - log_range[0]) / steps
    return {
        "runs": runs,
        "steps": steps,
        "output_bytes_per_step": OUTPUT_BYTES,
        "payload_bytes_per_step": payload,
        "payload_ratio": payload / OUTPUT_BYTES,
        "log_bytes_per_step": log,
        "log_ratio": None if log is None else log / OUTPUT_BYTES,
        "log_source": _LOG_SOURCE[target.backend],
        "log_breakdown": log_breakdown.breakdown(target, begun, log_range, steps),
    }


_LOG_SOURCE = {
    "postgresql": "pg_current_wal_lsn() difference",
    "mysql": "Innodb_os_log_written difference",
    "sqlite": "n/a: SQLite keeps no count of WAL bytes written",
}


def _log_position(target: Target) -> int | None:
    with target.engine.connect() as conn:
        if target.backend == "postgresql":
            lsn = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"
            return int(conn.execute(sa.text(lsn)).scalar_one())
        if target.backend == "mysql":
            row = conn.execute(sa.text("SHOW GLOBAL STATUS LIKE 'Innodb_os_log_written'")).one()
            return int(row[1])
    return None


def _stored_json_bytes(target: Target) -> int:
    inspector = sa.inspect(target.engine)
    total = 0
    with target.engine.connect() as conn:
        for table, wanted in _JSON_COLUMNS.items():
            present = {c["name"] for c in inspector.get_columns(table)}
            columns = [c for c in wanted if c in present]
            sizes = " + ".join(f"coalesce({_byte_length(target, c)}, 0)" for c in columns)
            total += int(conn.execute(sa.text(f"SELECT sum({sizes}) FROM {table}")).scalar_one())
    return total


def _byte_length(target: Target, column: str) -> str:
    if target.backend == "postgresql":
        return f"octet_length({column})"
    if target.backend == "sqlite":
        return f"length(CAST({column} AS BLOB))"
    return f"length({column})"  # MariaDB: LENGTH counts bytes
