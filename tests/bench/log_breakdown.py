"""Where the footprint run's log bytes go (footprint.py measures how many).

PostgreSQL: pg_waldump, from the local server's binaries, reads the run's LSN
range and sums each record's bytes by the relation it changes and its record
type ("fs_nodes Heap/UPDATE"); full-page images are summed apart, as the bytes
a checkpoint makes the next change of a page write again (the run starts right
after a CHECKPOINT, so they are only the first change of pages that existed).
MariaDB: InnoDB counts no redo by kind, but its monitor counts the index page
splits and reorganizations, each of which logs a large part of a 16 KB page.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from typing import Any

import sqlalchemy as sa

from tests.bench.targets import Target
from tests.servers import find_postgres

FULL_PAGE_IMAGES = "full-page images"
# A record line: "rmgr: Heap  len (rec/tot): 1204/ 1204, tx: 955, lsn: ..., prev ...,
# desc: UPDATE off 10 ..., blkref #0: rel 1663/16384/16461 blk 24" (rec: without images).
_RECORD = re.compile(r"rmgr: (\w+)\s+len \(rec/tot\):\s*(\d+)/\s*(\d+),.*?desc: (\S+)")
_RELATION = re.compile(r"blkref #0: rel \d+/\d+/(\d+)")
_INNODB_PAGE_COUNTERS = {
    "index_page_splits": "index page splits",
    "index_page_reorg_attempts": "index page reorganizations",
}
_SHOWN = 1.0  # bytes per step: smaller entries are left out of the breakdown


def begin(target: Target) -> dict[str, int]:
    """What has to be read before the run: on MariaDB, InnoDB's page counters (switched on)."""
    if target.backend != "mysql":
        return {}
    with target.engine.connect() as conn:
        for name in _INNODB_PAGE_COUNTERS:
            conn.execute(sa.text(f"SET GLOBAL innodb_monitor_enable = '{name}'"))
        return _innodb_counters(conn)


def breakdown(
    target: Target, begun: dict[str, int], log_range: tuple[int, int] | None, steps: int
) -> dict[str, float] | None:
    """Per step: log bytes by relation and record type (PostgreSQL), or page events
    (MariaDB); None where there is no way to tell (SQLite, no pg_waldump)."""
    if target.backend == "mysql":
        with target.engine.connect() as conn:
            after = _innodb_counters(conn)
        return {
            f"{label} per step": (after[name] - begun[name]) / steps
            for name, label in _INNODB_PAGE_COUNTERS.items()
        }
    if target.backend != "postgresql" or log_range is None or target.server is None:
        return None
    dump = _waldump(target, *log_range)
    if dump is None:
        return None
    totals = _sum_records(dump)
    names = _relation_names(target, {rel for rel, _kind in totals if rel is not None})
    labelled: Counter[str] = Counter()
    for (rel, kind), size in totals.items():
        labelled[kind if rel is None else f"{names.get(rel, rel)} {kind}"] += size
    per_step = {label: round(size / steps, 1) for label, size in labelled.most_common()}
    return {label: size for label, size in per_step.items() if size >= _SHOWN}


def _innodb_counters(conn: sa.Connection) -> dict[str, int]:
    names = ", ".join(f"'{name}'" for name in _INNODB_PAGE_COUNTERS)
    query = f"SELECT name, count FROM information_schema.innodb_metrics WHERE name IN ({names})"
    rows = conn.execute(sa.text(query))
    return {name: int(count) for name, count in rows}


def _waldump(target: Target, start: int, end: int) -> str | None:
    """pg_waldump's record lines for [start, end), or None if it cannot read them."""
    assert target.server is not None
    command = [
        str(find_postgres() / "pg_waldump"),
        "--path",
        str(target.server.data_dir / "pg_wal"),
        "--start",
        _lsn(start),
        "--end",
        _lsn(end),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout or None


def _lsn(position: int) -> str:
    """A WAL position in PostgreSQL's X/Y notation."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def _sum_records(dump: str) -> Counter[tuple[str | None, str]]:
    """Bytes by (relfilenode, "Rmgr/TYPE"); full-page images by themselves."""
    totals: Counter[tuple[str | None, str]] = Counter()
    for line in dump.splitlines():
        record = _RECORD.search(line)
        if record is None:
            continue
        rmgr, without_images, total, kind = record.groups()
        relation = _RELATION.search(line)
        key = (None if relation is None else relation.group(1), f"{rmgr}/{kind}")
        totals[key] += int(without_images)
        totals[(None, FULL_PAGE_IMAGES)] += int(total) - int(without_images)
    return totals


def _relation_names(target: Target, filenodes: set[str]) -> dict[str, str]:
    """Relation names for relfilenodes of the benchmark's database (catalogs included)."""
    query = sa.text("SELECT pg_filenode_relation(0, CAST(:node AS oid))::text")
    names: dict[str, str] = {}
    with target.engine.connect() as conn:
        for node in filenodes:
            name: Any = conn.execute(query, {"node": node}).scalar()
            if name is not None:
                names[node] = str(name)
    return names
