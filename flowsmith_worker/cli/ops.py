"""The operators' commands: flows, retry, cancel, prune, stats, workers, queue-limit,
and what they share with status (cli/status.py) and enqueue (cli/enqueue.py).

cli/app.py adds them to the `flowsmith` group. Each command opens its own
storage, asks it one or two questions, closes it, and prints a table that fits
100 columns, times relative to the database clock ("3m05s ago"); --wide prints
whole cells and UTC times, --json every field with ISO-8601 times. Colour only
on a terminal, never under NO_COLOR.

Exit codes: the group's help lists them (cli/app.py); an error's type carries
its own (errors.py), so no command writes one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import click

from flowsmith_worker import fanout
from flowsmith_worker.cli.format import (
    TABLE_WIDTH,
    Styled,
    echo,
    echo_json,
    echo_painted,
    format_table,
    json_option,
    last_line,
    status_text,
)
from flowsmith_worker.cli.params import (
    Ago,
    Duration,
    Since,
    url_option,
)
from flowsmith_worker.config import resolve_database_url
from flowsmith_worker.errors import (
    InvalidIdentifier,
)
from flowsmith_worker.flow import MAX_TRACKING_ID_LENGTH
from flowsmith_worker.identifiers import check_identifier
from flowsmith_worker.progress import RESUMED_ON_RETRY
from flowsmith_worker.readable import (
    UNREADABLE_CELL,
    format_duration,
    format_moment,
    format_time,
    short_worker,
)
from flowsmith_worker.run import stored_run
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import (
    AttemptRecord,
    FlowFilter,
    FlowRecord,
    FlowStatus,
    FlowSummary,
    NodeRecord,
    NodeStatus,
    Storage,
)

DEFAULT_FLOWS_LIMIT = 50


def checked_tracking_id(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """A tracking_id argument no database could hold (say, bytes that are not UTF-8)
    is a usage error, before any SQL."""
    try:
        return check_identifier("tracking_id", value, MAX_TRACKING_ID_LENGTH)
    except InvalidIdentifier as exc:
        raise click.BadParameter(str(exc)) from None


# Enough for any terminal or script, and far below what a database LIMIT takes.
MAX_FLOWS_LIMIT = 100_000
UNREADABLE = UNREADABLE_CELL  # the STATUS cell of a row whose stored status is unknown
DEFAULT_PRUNE_BATCH = 500


def wide_option(fn: Any) -> Any:
    return click.option(
        "--wide",
        is_flag=True,
        help=f"Every column, times in UTC ISO-8601, nothing cut to fit {TABLE_WIDTH} columns.",
    )(fn)


# -- storage --------------------------------------------------------------------


@contextlib.contextmanager
def open_storage(url: str | None, *, read_only: bool = False) -> Iterator[Storage]:
    """The storage for --url (or the environment), closed after the command.

    A SQLite file is never created here (only `flowsmith migrate` creates one):
    a mistyped path, or no URL set at all, is said so rather than met with an
    empty new file. A command that only reads opens it read-only.
    """
    storage = create_storage(resolve_database_url(url), sqlite_mode="ro" if read_only else "rw")
    try:
        yield storage
    finally:
        storage.close()


def elapsed(start: float | None, end: float | None) -> float | None:
    """Seconds from start to end; NaN (shown UNREADABLE) for a time changed by hand."""
    if start is None or end is None:
        return None
    try:
        return float(end) - float(start)
    except (TypeError, ValueError):
        return math.nan


def status_cell(record: FlowRecord | FlowSummary | NodeRecord) -> Styled:
    return status_text(UNREADABLE if "status" in record.unreadable else record.status.value)


def echo_unreadable(
    what: str, record: FlowRecord | FlowSummary | NodeRecord | AttemptRecord
) -> None:
    """One line per stored value of ``record`` that could not be read, on stderr."""
    for column, why in record.unreadable.items():
        echo(f"{what}: the stored {column} cannot be read: {why}", err=True)


def flows_table(found: Sequence[FlowRecord | FlowSummary], now: float, wide: bool) -> str:
    """Runs as a table: within TABLE_WIDTH columns, times relative to ``now``; all with ``wide``."""
    headers: tuple[str, ...] = ("TRACKING_ID", "FLOW", "STATUS", "CREATED", "DURATION")
    if wide:
        headers = ("TRACKING_ID", "FLOW", "STATUS", "QUEUE", "CREATED", "FINISHED", "DURATION")
    rows = []
    for flow in found:
        created = format_moment(flow.created_at, now, wide)
        duration = format_duration(elapsed(flow.created_at, flow.finished_at))
        row: list[object] = [flow.tracking_id, flow.flow_name, status_cell(flow)]
        if wide:
            row += [flow.queue, created, format_time(flow.finished_at), duration]
        else:
            row += [created, duration]
        rows.append([*row, last_line(flow.error)])
    return format_table(
        (*headers, "ERROR"),
        rows,
        width=None if wide else TABLE_WIDTH,
        shrink=("TRACKING_ID", "FLOW", "ERROR"),
    )


# -- commands -------------------------------------------------------------------


@click.command()
@click.option(
    "--status",
    "status_",
    type=click.Choice([s.value for s in FlowStatus], case_sensitive=False),
    help="Only runs in this status.",
)
@click.option("--flow", "flow_name", metavar="NAME", help="Only runs of this flow.")
@click.option(
    "--since",
    type=Since(),
    help="Only runs created since then: a duration ago (45s, 30m, 2h, 7d) "
    "or an ISO date/datetime (UTC unless it says otherwise).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1, max=MAX_FLOWS_LIMIT),
    default=DEFAULT_FLOWS_LIMIT,
    show_default=True,
    help="At most this many runs, newest first.",
)
@url_option
@wide_option
@json_option
def flows(
    status_: str | None,
    flow_name: str | None,
    since: Ago | float | None,
    limit: int,
    url: str | None,
    wide: bool,
    as_json: bool,
) -> None:
    """List flow runs, newest first.

    The table fits 100 columns: times are relative ("3m05s ago") and long
    tracking ids, names and errors are cut; --wide shows them whole, with the
    queue and the UTC times. --json has every field, times in ISO-8601. A run
    whose stored status cannot be read is listed as UNREADABLE, with why on
    stderr. No run's input, output or plan is read.

    \b
    Exit codes:
      0  success (also when no run matches, or a run is UNREADABLE)
      1  error (e.g. the database is down)
      2  usage error

    \b
    Examples:
      flowsmith flows
      flowsmith flows --status FAILED --since 2h
      flowsmith flows --flow order --since 2024-05-01 --limit 200 --wide
      flowsmith flows --status FAILED --json | jq -r '.flows[].tracking_id'
    """
    where = FlowFilter(
        status=FlowStatus(status_.upper()) if status_ else None,
        flow_name=flow_name,
        since=None if isinstance(since, Ago) else since,
        created_within=since.seconds if isinstance(since, Ago) else None,
        limit=limit,
    )
    with open_storage(url, read_only=True) as storage:
        found = storage.list_flows(where=where)
        now = storage.current_time()
    if as_json:
        echo_json({"flows": found})
        return
    if not found:
        echo("No flow run matches.")
        return
    echo_painted(flows_table(found, now, wide))
    for flow in found:
        echo_unreadable(f"run {flow.tracking_id!r}", flow)
    if len(found) == limit:
        echo(f"(the newest {limit}; --limit shows more)")


@click.command()
@click.argument("tracking_id", callback=checked_tracking_id)
@url_option
@json_option
def retry(tracking_id: str, url: str | None, as_json: bool) -> None:
    """Resume a FAILED flow run: only its failed step(s), and those the failure stopped, run again.

    The steps that completed keep their outputs and do not run again; each
    failed step, and each parallel sibling its failure stopped, gets a fresh
    allowance of attempts. A worker picks them up.

    \b
    Exit codes:
      0  the step(s) are queued again
      1  the run is not FAILED (nothing done), or an error
      2  usage error
      3  no flow run has TRACKING_ID

    \b
    Examples:
      flowsmith retry order_123
      flowsmith flows --status FAILED --json | jq -r '.flows[].tracking_id' \\
        | xargs -n1 flowsmith retry
    """
    with open_storage(url) as storage:
        flow = stored_run(storage, tracking_id, with_payloads=False)
        nodes = storage.list_nodes(flow_id=flow.id, with_payloads=False)
        done = fanout.items_of_maps_done(nodes)
        requeued = [
            n.step_name
            for n in nodes
            if n.status in RESUMED_ON_RETRY and "status" not in n.unreadable and n.id not in done
        ]
        result = storage.resume_flow(tracking_id=tracking_id)
    if as_json:
        echo_json({**dataclasses.asdict(result), "requeued_steps": requeued})
        return
    steps = ", ".join(repr(s) for s in requeued) or "(none)"
    echo(
        f"Retrying flow run {tracking_id!r} ({flow.flow_name}): step(s) {steps} queued "
        "again; the completed steps keep their outputs."
    )


@click.command()
@click.argument("tracking_id", callback=checked_tracking_id)
@url_option
@json_option
def cancel(tracking_id: str, url: str | None, as_json: bool) -> None:
    """Cancel a flow run: its pending steps never start.

    A step already running is not interrupted: it finishes, but the run goes no
    further (no next step, no retry). Its subflows are cancelled too. Cancelling
    a cancelled run again does nothing and succeeds.

    \b
    Exit codes:
      0  the run is cancelled (now or before)
      1  the run had already COMPLETED or FAILED (nothing done), or an error
      2  usage error
      3  no flow run has TRACKING_ID

    \b
    Examples:
      flowsmith cancel order_123
      flowsmith cancel order_123 --json | jq .running_steps
    """
    with open_storage(url) as storage:
        flow = stored_run(storage, tracking_id, with_payloads=False)
        already = flow.status == FlowStatus.CANCELLED
        record = flow if already else storage.cancel_flow(tracking_id=tracking_id)
        nodes = storage.list_nodes(flow_id=record.id, with_payloads=False)
    running = [n for n in nodes if n.status == NodeStatus.RUNNING]
    cancelled = [n.step_name for n in nodes if n.status == NodeStatus.CANCELLED]
    if as_json:
        echo_json(
            {
                "flow": record,
                "already_cancelled": already,
                "cancelled_steps": cancelled,
                "running_steps": [n.step_name for n in running],
            }
        )
        return
    run = f"flow run {tracking_id!r} ({record.flow_name})"
    if already:
        echo(f"The {run} was already cancelled.")
    else:
        echo(f"Cancelled {run}.")
    if cancelled:
        echo(f"Never to start: {', '.join(cancelled)}.")
    if running:
        names = ", ".join(f"{n.step_name} (worker {short_worker(n.lease_owner)})" for n in running)
        echo(f"Still running, will finish, and the run goes no further: {names}.")


@click.command()
@click.option(
    "--older-than",
    "older_than",
    type=Duration(),
    required=True,
    help="Delete runs finished more than this long ago: 45s, 30m, 2h, 7d, 2w.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_PRUNE_BATCH,
    hidden=True,
    help="Runs deleted per transaction.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Say how many runs would go, and delete nothing.",
)
@url_option
@json_option
def prune(
    older_than: float, batch_size: int, dry_run: bool, url: str | None, as_json: bool
) -> None:
    """Delete finished runs (COMPLETED, FAILED, CANCELLED) and their steps.

    Only runs that finished more than --older-than ago go, with their finished
    subflows; pending and running runs are never touched. Deletion goes in
    small batches, each its own short transaction, so no lock is held for long
    while workers keep running. --dry-run counts the runs instead.

    \b
    Exit codes:
      0  success (also when nothing was old enough)
      1  error (e.g. the database is down)
      2  usage error (--older-than is required, and must be more than 0)

    \b
    Examples:
      flowsmith prune --older-than 7d --dry-run
      flowsmith prune --older-than 7d
      flowsmith prune --older-than 12h --url postgresql://app@db/app
    """
    age = format_duration(older_than)
    with open_storage(url) as storage:
        if dry_run:
            count = storage.count_prunable_flows(older_than_seconds=older_than)
        else:
            count = storage.prune_flows(older_than_seconds=older_than, batch_size=batch_size)
    if as_json:
        key = "would_prune" if dry_run else "pruned"
        echo_json({key: count, "older_than_seconds": older_than, "dry_run": dry_run})
    elif dry_run:
        echo(
            f"Would prune {count} finished flow run(s), with their steps, finished more than "
            f"{age} ago. Nothing was deleted (--dry-run)."
        )
    else:
        echo(
            f"Pruned {count} finished flow run(s), with their steps, finished more than {age} ago."
        )


_STATUS_ORDER = [s.value for s in NodeStatus]
_FLOW_STATUSES = {s.value for s in FlowStatus}


def _count_by_status(by_status: dict[str, int], column: str) -> int:
    if column == UNREADABLE:
        return sum(n for status, n in by_status.items() if status not in _STATUS_ORDER)
    return by_status.get(column, 0)


@click.command()
@url_option
@json_option
def stats(url: str | None, as_json: bool) -> None:
    """Counts of runs by status, steps by queue and status, the backlog, in-flight by worker.

    "Oldest runnable" is how long the longest-waiting step that could run now
    has waited (a sign that workers are missing or queues are capped too low).
    Queue limits set with `flowsmith queue-limit` are shown in the LIMIT column.

    \b
    Exit codes:
      0  success
      1  error (e.g. the database is down)
      2  usage error

    \b
    Examples:
      flowsmith stats
      flowsmith stats --json | jq .oldest_runnable_age
    """
    with open_storage(url, read_only=True) as storage:
        counts = storage.stats()
        limits = storage.queue_limits()
    if as_json:
        echo_json({**dataclasses.asdict(counts), "queue_limits": limits})
        return
    echo("Flow runs by status")
    flow_rows: list[list[object]] = [
        [s.value, counts.flows_by_status.get(s.value, 0)] for s in FlowStatus
    ]
    flow_rows += [
        [f"{UNREADABLE} {status!r}", n]
        for status, n in sorted(counts.flows_by_status.items())
        if status not in _FLOW_STATUSES
    ]
    echo(format_table(("STATUS", "RUNS"), flow_rows))

    echo("\nSteps by queue")
    seen = {str(s) for by_status in counts.nodes_by_queue.values() for s in by_status}
    columns = [s for s in _STATUS_ORDER if s in seen or s in ("PENDING", "RUNNING")]
    if seen - set(_STATUS_ORDER):
        columns.append(UNREADABLE)  # the steps whose stored status is none of ours
    queue_rows: list[list[object]] = [
        [
            queue,
            *(_count_by_status(counts.nodes_by_queue.get(queue, {}), s) for s in columns),
            limits.get(queue, "-"),
        ]
        for queue in sorted(set(counts.nodes_by_queue) | set(limits))
    ]
    if queue_rows:
        echo(format_table(("QUEUE", *columns, "LIMIT"), queue_rows))
    else:
        echo("(no steps)")

    oldest = counts.oldest_runnable_age
    echo(
        "\nOldest runnable step: "
        + ("none waiting" if oldest is None else f"waiting for {format_duration(oldest)}")
    )
    echo(f"Attempts: {counts.attempts}   Rescued after a lost worker: {counts.rescues}")

    echo("\nIn flight by worker")
    if counts.in_flight_by_worker:
        echo(
            format_table(
                ("WORKER", "RUNNING"),
                [[short_worker(w), n] for w, n in sorted(counts.in_flight_by_worker.items())],
            )
        )
    else:
        echo("(no step running)")


@click.command()
@url_option
@wide_option
@json_option
def workers(url: str | None, wide: bool, as_json: bool) -> None:
    """List the live workers: host, pid, queues, in-flight steps, start and last heartbeat.

    A worker whose heartbeat is older than three of its leases is dead; the
    next rescue by any worker removes its row. Worker ids are cut to 8
    characters and times are relative in the table; --wide shows them whole,
    --json too (times in ISO-8601).

    \b
    Exit codes:
      0  success (also when no worker is registered)
      1  error (e.g. the database is down)
      2  usage error

    \b
    Examples:
      flowsmith workers
      flowsmith workers --wide
      flowsmith workers --json | jq '.workers[] | {host, pid, in_flight}'
    """
    with open_storage(url, read_only=True) as storage:
        found = storage.list_workers()
        now = storage.current_time()
    if as_json:
        echo_json({"workers": found})
        return
    if not found:
        echo("No worker is registered.")
        return
    rows: list[list[object]] = [
        [
            w.id if wide else short_worker(w.id),
            w.host,
            w.pid,
            w.version,
            ",".join(w.queues),
            f"{w.in_flight}/{w.concurrency}",
            format_moment(w.started_at, now, wide),
            format_moment(w.heartbeat_at, now, wide),
        ]
        for w in found
    ]
    headers = ("WORKER", "HOST", "PID", "VERSION", "QUEUES", "IN_FLIGHT", "STARTED", "HEARTBEAT")
    table = format_table(
        headers, rows, width=None if wide else TABLE_WIDTH, shrink=("HOST", "QUEUES")
    )
    echo_painted(table)


@click.command("queue-limit")
@click.argument("queue")
@click.argument("limit", metavar="N")
@url_option
@json_option
def queue_limit(queue: str, limit: str, url: str | None, as_json: bool) -> None:
    """Cap the steps of QUEUE running at once across all workers; N=none removes the cap.

    N is a whole number (0 pauses the queue: nothing new starts) or `none`.
    Steps already running are not stopped. `flowsmith stats` shows the caps.

    \b
    Exit codes:
      0  success
      1  error (e.g. the database is down)
      2  usage error (N is not a number >= 0 or `none`)

    \b
    Examples:
      flowsmith queue-limit emails 5
      flowsmith queue-limit emails none
    """
    max_running = _parse_limit(limit)
    if not queue.strip() or len(queue) > 100:
        raise click.BadParameter("a queue name has 1 to 100 characters", param_hint="QUEUE")
    with open_storage(url) as storage:
        storage.set_queue_limit(queue=queue, max_running=max_running)
    if as_json:
        echo_json({"queue": queue, "max_running": max_running})
    elif max_running is None:
        echo(f"Queue {queue!r}: no limit.")
    else:
        echo(f"Queue {queue!r}: at most {max_running} step(s) running at once.")


def _parse_limit(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise click.BadParameter(
            f"{text!r}: give a whole number >= 0, or `none` to remove the limit",
            param_hint="N",
        )
    return value
