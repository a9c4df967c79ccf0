"""Run `flowsmith` commands in process and read their tables and --json."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from click.testing import CliRunner, Result

from flowsmith_worker import Context, Worker
from flowsmith_worker.cli import main
from flowsmith_worker.storage.base import (
    FlowRecord,
    Storage,
)


def cli(url: str, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--url", url], catch_exceptions=False)


def cli_json(url: str, *args: str, exit_code: int = 0) -> Any:
    result = cli(url, *args, "--json")
    assert result.exit_code == exit_code, result.output
    return json.loads(result.stdout)


def drain(storage: Storage, timeout: float = 20.0) -> Worker:
    """Run a worker until no step is pending or running on the default queue."""
    worker = Worker(storage=storage, poll_interval=0.05)
    try:
        worker.run_until_idle(timeout=timeout)
    finally:
        worker.shutdown()
    return worker


def flow_of(storage: Storage, tracking_id: str) -> FlowRecord:
    record = storage.get_flow(tracking_id=tracking_id)
    assert record is not None, tracking_id
    return record


def ok(ctx: Context) -> dict[str, Any]:
    return {"ok": True}


def doomed(ctx: Context) -> None:
    raise ValueError("card declined for order 42")


def run_line(output: str, label: str) -> str:
    """The value of the line ``label`` (Run, Status, Created...) of `flowsmith status`."""
    for line in output.splitlines():
        if line.split(maxsplit=1)[:1] == [label]:
            return line[len(label) :].strip()
    raise AssertionError(f"no {label!r} line in:\n{output}")


def iso_seconds(text: str) -> float:
    """An ISO-8601 time of --json, checked to be UTC, in seconds since the epoch."""
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text).timestamp()


def row_of(output: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first or second cell is ``first_cell``."""
    for line in output.splitlines():
        cells = line.split()
        if first_cell in cells[:2]:
            return cells
    raise AssertionError(f"no row for {first_cell!r} in:\n{output}")


# -- status -----------------------------------------------------------------------------
