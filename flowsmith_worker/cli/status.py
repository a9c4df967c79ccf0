"""`flowsmith status`: one flow run and its steps, shown once or redrawn until it ends.

What is shown is a pure function of the records and the database clock's "now"
(render_run), so a test shows any moment without sleeping; --watch only reads
again, draws again and pauses.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import click

from flowsmith_worker import compensation, fanout
from flowsmith_worker.cli.format import (
    TABLE_WIDTH,
    Styled,
    clip,
    echo,
    echo_json,
    echo_painted,
    format_table,
    json_option,
    last_line,
    paint,
    printable,
    status_text,
)
from flowsmith_worker.cli.ops import (
    checked_tracking_id,
    echo_unreadable,
    elapsed,
    open_storage,
    status_cell,
    wide_option,
)
from flowsmith_worker.cli.params import (
    Duration,
    url_option,
)
from flowsmith_worker.concurrency import IN_FLIGHT
from flowsmith_worker.parking import FOREVER, parked_as
from flowsmith_worker.plan import MAP
from flowsmith_worker.readable import (
    UNREADABLE_CELL,
    format_both,
    format_duration,
    format_moment,
    format_relative,
    format_time,
    short_worker,
)
from flowsmith_worker.run import stored_run
from flowsmith_worker.storage.base import (
    FINISHED_FLOW_STATUSES,
    AttemptRecord,
    FlowRecord,
    FlowStatus,
    NodeRecord,
    NodeStatus,
    Storage,
)

DEFAULT_WATCH_INTERVAL = "2s"
EXIT_FLOW_FAILED = 1  # the run FAILED or was CANCELLED: a script can test it
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C
LABEL_WIDTH = 10  # "Finished  " in the run's lines
# The runs whose status exits 1: they will not complete.
_NOT_GOING_THROUGH = (FlowStatus.FAILED, FlowStatus.COMPENSATING, FlowStatus.CANCELLED)

# The wait between two reads of --watch. A test puts a function that moves the
# run on in its place, instead of sleeping.
pause: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class Snapshot:
    """A run, its steps, and the database clock when they were read."""

    flow: FlowRecord
    nodes: Sequence[NodeRecord]
    now: float

    @property
    def ended(self) -> bool:
        """Nothing more will happen to the run (or its status cannot be read)."""
        return "status" in self.flow.unreadable or self.flow.status in FINISHED_FLOW_STATUSES

    def progress(self) -> tuple[object, ...]:
        """What changes when the run moves on, unlike the clock: off a terminal, --watch
        prints the run again only when this changes."""
        return (self.flow.status, tuple((n.id, n.status, n.attempt) for n in self.nodes))


def read_snapshot(storage: Storage, tracking_id: str, with_payloads: bool = False) -> Snapshot:
    flow = stored_run(storage, tracking_id, with_payloads=with_payloads)
    nodes = storage.list_nodes(flow_id=flow.id, with_payloads=with_payloads)
    return Snapshot(flow, nodes, storage.current_time())


# -- rendering --------------------------------------------------------------------------


def render_run(snapshot: Snapshot, wide: bool) -> str:
    """The run's lines (status, times, error), its steps' table and the attempts of the
    steps that ran more than once, as echo_painted prints."""
    parts = [*_run_lines(snapshot, wide), "", _steps_table(snapshot, wide)]
    attempts = _attempts_table(snapshot, wide)
    if attempts:
        parts += ["", "Attempts of the steps that ran more than once:", attempts]
    return "\n".join(parts)


def _run_lines(snapshot: Snapshot, wide: bool) -> list[str]:
    flow, now = snapshot.flow, snapshot.now
    lines = [
        ("Run", flow.tracking_id),
        ("Flow", f"{flow.flow_name} (queue {flow.queue})"),
        ("Plan", _plan_cell(flow)),
        ("Status", _run_status(snapshot)),
        ("Created", format_both(flow.created_at, now)),
    ]
    key = _key_cell(flow, now)
    if key is not None:
        lines.append(("Key", key))
    starts = _delayed_start(snapshot)
    if starts is not None:
        lines.append(("Starts", format_both(starts, now)))
    if flow.finished_at is not None:
        took = format_duration(elapsed(flow.created_at, flow.finished_at))
        lines.append(("Finished", f"{format_both(flow.finished_at, now)}, after {took}"))
    if flow.error:
        lines.append(("Error", last_line(flow.error)))
    return [f"{label:<{LABEL_WIDTH}}{_value(value, wide)}" for label, value in lines]


def _run_status(snapshot: Snapshot) -> object:
    """The run's status, and how its compensations ended if it had any (compensation.py)."""
    cell = status_cell(snapshot.flow)
    outcome = compensation_of(snapshot)
    return cell if outcome is None else dataclasses.replace(cell, text=f"{cell.text} ({outcome})")


def compensation_of(snapshot: Snapshot) -> str | None:
    """COMPENSATED or COMPENSATION_FAILED for a FAILED run that had steps to undo; else None."""
    if "status" in snapshot.flow.unreadable:
        return None
    found = compensation.outcome_of_run(snapshot.flow.status, snapshot.nodes)
    return None if found is None else str(found)


def waiting_for_key(flow: FlowRecord) -> str | None:
    """The concurrency key under which the run waits for a place; None if it waits for none."""
    turn = flow.key_turn
    return flow.concurrency_key if turn is not None and turn > IN_FLIGHT else None


def _key_cell(flow: FlowRecord, now: float) -> str | None:
    """The run's concurrency key and its place under it (see concurrency.py)."""
    if flow.concurrency_key is None:
        return None
    key = repr(flow.concurrency_key)
    if waiting_for_key(flow) is not None:
        since = format_both(flow.key_turn, now)
        return f"{key}: WAITING for a place (since {since}); its BLOCKED steps start in turn"
    return f"{key}: in flight" if flow.key_turn == IN_FLIGHT else key


def _plan_cell(flow: FlowRecord) -> object:
    """The version of the plan the run was enqueued with (it keeps it whatever is deployed)."""
    if "plan" in flow.unreadable:
        return status_text(UNREADABLE_CELL)
    steps = flow.plan.names()
    return f"version {flow.plan.version} ({len(steps)} step{'' if len(steps) == 1 else 's'})"


def plan_version(flow: FlowRecord) -> str | None:
    """The run's plan version for --json: null when its stored plan cannot be read."""
    return None if "plan" in flow.unreadable else flow.plan.version


def _value(value: object, wide: bool) -> str:
    """A value of the run's lines, printable, cut to fit TABLE_WIDTH unless ``wide``."""
    if isinstance(value, Styled):
        return paint(value)
    text = printable(str(value))
    return text if wide else clip(text, TABLE_WIDTH - LABEL_WIDTH)


def _delayed_start(snapshot: Snapshot) -> float | None:
    """When a run enqueued with a delay (or run_at) starts; None once it may run now."""
    if snapshot.flow.status != FlowStatus.PENDING:
        return None
    due = [_due(node, snapshot.now) for node in snapshot.nodes]
    later = [when for when in due if when is not None]
    # Every step of its first stage waits: it has not started.
    return min(later) if later and len(later) == len(due) else None


def _due(node: NodeRecord, now: float) -> float | None:
    """When a PENDING step runs, if that is later than ``now`` (a delay, a retry's backoff)."""
    if node.status != NodeStatus.PENDING or "status" in node.unreadable:
        return None
    try:
        due = float(node.run_after)
    except (TypeError, ValueError):
        return None
    # A wait for an event with no timeout is due at parking.FOREVER: it has no due time.
    return due if now < due < FOREVER else None


STEP_HEADERS = ("#", "STEP", "STATUS", "ATTEMPTS", "START", "DURATION", "WORKER", "LAST_ERROR")
WIDE_STEP_HEADERS = (
    "#",
    "STEP",
    "STATUS",
    "ATTEMPTS",
    "STARTED",
    "FINISHED",
    "DURATION",
    "WORKER",
    "LAST_ERROR",
)


def _steps_table(snapshot: Snapshot, wide: bool) -> str:
    # One row per step; a step's attempts, once they are stored, can follow it
    # as rows of their own.
    rows = [
        row
        for node in snapshot.nodes
        if not fanout.is_item(node)
        for row in _step_rows(snapshot, node, wide)
    ]
    for position, name in _not_reached(snapshot.flow, snapshot.nodes):
        blank = ["-"] * (len(WIDE_STEP_HEADERS if wide else STEP_HEADERS) - 3)
        rows.append([position + 1, name, Styled("(not reached)", dim=True), *blank])
    return format_table(
        WIDE_STEP_HEADERS if wide else STEP_HEADERS,
        rows,
        width=None if wide else TABLE_WIDTH,
        shrink=("STEP", "LAST_ERROR"),
    )


def _step_rows(snapshot: Snapshot, node: NodeRecord, wide: bool) -> list[list[object]]:
    """A step's row; a map's is followed by one row for all its items, counted by
    status (a map of 10,000 items is not 10,000 rows: `--json` has each item)."""
    row = _step_row(snapshot.flow, node, snapshot.now, wide)
    planned = (
        snapshot.flow.plan.step(node.step_name) if "plan" not in snapshot.flow.unreadable else None
    )
    if planned is None or planned.kind != MAP or node.status == NodeStatus.PENDING:
        return [row]
    progress = fanout.progress_of(node.step_name, snapshot.nodes)
    blank = ["-"] * (len(row) - 4)
    failed = [  # this map's items only: another map's are at another position
        n
        for n in snapshot.nodes
        if fanout.is_item(n) and n.position == node.position and n.status == NodeStatus.FAILED
    ]
    error = f"{failed[0].step_name}: {last_line(failed[0].error)}" if failed else ""
    return [row, ["", f"{node.step_name}[…]", progress.summary(), *blank, error]]


def _step_row(flow: FlowRecord, node: NodeRecord, now: float, wide: bool) -> list[object]:
    due = _due(node, now)
    parked = parked_as(flow, node)
    if wide:
        started = f"due {format_time(due)}" if due else format_time(node.started_at)
        times = [started, format_time(node.finished_at)]
    else:
        times = [format_relative(due, now) if due else format_moment(node.started_at, now, False)]
    return [
        node.position + 1,
        node.step_name,
        status_text(parked) if parked else status_cell(node),
        _attempts(node),
        *times,
        format_duration(elapsed(node.started_at, node.finished_at)),
        (node.lease_owner or "-") if wide else short_worker(node.lease_owner),
        last_line(node.error),
    ]


ATTEMPT_HEADERS = ("STEP", "ATTEMPT", "OUTCOME", "START", "DURATION", "WORKER", "ERROR")


def _attempts_table(snapshot: Snapshot, wide: bool) -> str | None:
    """Every attempt of the steps that ran more than once (each step's latest is above)."""
    rows: list[list[object]] = [
        [
            node.step_name,
            attempt.attempt,
            _outcome_cell(attempt),
            format_moment(attempt.started_at, snapshot.now, wide),
            format_duration(elapsed(attempt.started_at, attempt.ended_at)),
            (attempt.worker_id or "-") if wide else short_worker(attempt.worker_id),
            last_line(attempt.error),
        ]
        for node in snapshot.nodes
        if len(node.attempts) > 1
        for attempt in node.attempts
    ]
    if not rows:
        return None
    return format_table(
        ATTEMPT_HEADERS, rows, width=None if wide else TABLE_WIDTH, shrink=("STEP", "ERROR")
    )


def _outcome_cell(attempt: AttemptRecord) -> Styled:
    return status_text(
        UNREADABLE_CELL if "outcome" in attempt.unreadable else attempt.outcome.value
    )


def _attempts(node: NodeRecord) -> str:
    text = f"{node.attempt}/{node.max_attempts}"
    return f"{text} ({node.rescues} rescued)" if node.rescues else text


def _not_reached(flow: FlowRecord, nodes: Sequence[NodeRecord]) -> list[tuple[int, str]]:
    """Steps of the run's plan that have no node yet: (position, name)."""
    known = {n.step_name for n in nodes}
    return [
        (position, planned.name)
        for position, stage in enumerate(flow.plan.stages)
        for planned in stage
        if planned.name not in known
    ]


def _echo_tracebacks(nodes: Sequence[NodeRecord]) -> None:
    with_errors = [n for n in nodes if n.error]
    if not with_errors:
        echo("\nNo step of this run has an error.")
        return
    for node in with_errors:
        erred = [a for a in node.attempts if a.error]
        if not erred:  # its attempts were made before attempts were kept (schema 5)
            echo(
                f"\n--- step {node.step_name!r}: {node.status.value}, attempt "
                f"{node.attempt}/{node.max_attempts}, worker {node.lease_owner or '-'} ---"
            )
            echo(node.error or "")
        for attempt in erred:
            echo(
                f"\n--- step {node.step_name!r}: attempt {attempt.attempt}/{node.max_attempts} "
                f"{_outcome_cell(attempt).text}, worker {attempt.worker_id or '-'} ---"
            )
            echo(attempt.error or "")


def _show(snapshot: Snapshot, wide: bool, show_traceback: bool) -> None:
    echo_painted(render_run(snapshot, wide))
    if show_traceback:
        _echo_tracebacks(snapshot.nodes)
    echo_unreadable(f"run {snapshot.flow.tracking_id!r}", snapshot.flow)
    for node in snapshot.nodes:
        echo_unreadable(f"step {node.step_name!r}", node)
        for attempt in node.attempts:
            echo_unreadable(f"step {node.step_name!r}, attempt {attempt.attempt}", attempt)


# -- the command ----------------------------------------------------------------------------


@click.command()
@click.argument("tracking_id", callback=checked_tracking_id)
@url_option
@click.option(
    "--traceback",
    "show_traceback",
    is_flag=True,
    help="Also print the full error text (the traceback) of every failed or retried attempt.",
)
@click.option(
    "--watch",
    is_flag=True,
    help="Redraw until the run ends (off a terminal: print it again when it moves on); "
    "Ctrl-C stops watching.",
)
@click.option(
    "--interval",
    type=Duration(),
    default=DEFAULT_WATCH_INTERVAL,
    show_default=True,
    help="How often --watch reads the run again.",
)
@wide_option
@json_option
def status(
    tracking_id: str,
    url: str | None,
    show_traceback: bool,
    watch: bool,
    interval: float,
    wide: bool,
    as_json: bool,
) -> None:
    """Show a flow run and every step: status, attempts, times, worker, last error.

    The Plan line shows the version of the plan the run was enqueued with (a hash of
    its steps; plan_version in --json): the run keeps that plan whatever code is
    deployed since. Times are relative to the database clock ("3m05s ago"); a run
    enqueued with a delay says when it starts, a step waiting to be retried when
    ("in 25s"). A parked step shows as SLEEPING or AWAITING_EVENT (flow.sleep,
    flow.wait_for), with when it wakes if nothing comes first (PENDING with its
    wake_at in --json). Steps of the plan the run has not reached yet are listed as "(not
    reached)". A step that ran more than once (retried, rescued, released) has each
    attempt listed below the steps: outcome, start, duration, worker, error
    (--traceback: in full). The tables fit 100 columns, worker ids cut to 8
    characters: --wide shows every cell whole, with UTC times. A stored value that
    cannot be read is shown as UNREADABLE, with why on stderr (null with --json).
    Inputs and outputs are read only with --json, whose times are ISO-8601.

    A run of a flow with a concurrency key has a Key line: the key, and whether the
    run is in flight or WAITING for a place under it (its steps BLOCKED until a run
    of the key ends; waiting_for_key in --json).

    \b
    Exit codes:
      0  the run is COMPLETED, RUNNING or PENDING (--watch: it COMPLETED)
      1  the run FAILED (or is COMPENSATING: undoing its steps, then FAILED) or was
         CANCELLED, or its stored status cannot be read
         (or an error, e.g. the database is down)
      2  usage error
      3  no flow run has TRACKING_ID
      130  --watch stopped by Ctrl-C

    \b
    Examples:
      flowsmith status order_123
      flowsmith status order_123 --watch
      flowsmith status order_123 --traceback --wide
      flowsmith status order_123 --json | jq -r .flow.status
      flowsmith status order_123 >/dev/null || echo "order_123 did not go through"
    """
    if watch and as_json:
        raise click.UsageError("--watch redraws a table and --json prints once: choose one")
    with open_storage(url, read_only=True) as storage:
        if watch:
            snapshot = _watch(storage, tracking_id, interval, wide, show_traceback)
        else:
            # Inputs and outputs are read only to be printed (--json).
            snapshot = read_snapshot(storage, tracking_id, with_payloads=as_json)
    if as_json:
        echo_json(
            {
                "flow": snapshot.flow,
                "plan_version": plan_version(snapshot.flow),
                "compensation": compensation_of(snapshot),
                "waiting_for_key": waiting_for_key(snapshot.flow),
                "steps": snapshot.nodes,
                "not_reached": [name for _, name in _not_reached(snapshot.flow, snapshot.nodes)],
            }
        )
    elif not watch:
        _show(snapshot, wide, show_traceback)
    flow = snapshot.flow
    if "status" in flow.unreadable or flow.status in _NOT_GOING_THROUGH:
        raise click.exceptions.Exit(EXIT_FLOW_FAILED)


def _watch(
    storage: Storage, tracking_id: str, interval: float, wide: bool, show_traceback: bool
) -> Snapshot:
    """Show the run until it ends: redrawn on a terminal, printed again on each change elsewhere."""
    on_terminal = sys.stdout.isatty()
    shown: tuple[object, ...] | None = None
    try:
        while True:
            snapshot = read_snapshot(storage, tracking_id)
            if on_terminal:
                click.clear()
                _show(snapshot, wide, show_traceback)
                if not snapshot.ended:
                    echo(f"\nRead every {format_duration(interval)}; Ctrl-C stops watching.")
            elif snapshot.progress() != shown:
                if shown is not None:
                    echo()
                _show(snapshot, wide, show_traceback)
            shown = snapshot.progress()
            if snapshot.ended:
                return snapshot
            pause(interval)
    except KeyboardInterrupt:
        if on_terminal:
            echo()  # past the ^C the terminal printed
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
