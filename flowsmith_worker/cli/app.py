"""The `flowsmith` group: every command registered here, by name, and errors turned
into one line and an exit code (the only place that does either).

The commands live one group to a module, each with its help: worker.py (migrate,
worker, demo), enqueue.py, events.py (send-event), status.py, ops.py (flows, retry,
cancel, prune, stats, workers, queue-limit) and dashboard.py. They parse, validate and call the
library; the library decides, and refuses with a FlowSmithError whose type
carries the exit code.
"""

from __future__ import annotations

from typing import Any

import click
import sqlalchemy as sa

from flowsmith_worker.cli import dashboard, enqueue, events, ops, status, worker
from flowsmith_worker.cli.format import printable
from flowsmith_worker.config import redact
from flowsmith_worker.errors import FlowSmithError
from flowsmith_worker.version import __version__

EXIT_CODES_HELP = """\b
Exit codes of the operator commands:
  0  success (status: the run is COMPLETED, RUNNING or PENDING)
  1  status: the run FAILED or was CANCELLED; any command: error or refusal
  2  usage error
  3  no flow run has that tracking_id (enqueue: no flow has that name)
  4  enqueue: a run already has that tracking_id; nothing was enqueued"""


class _Group(click.Group):
    """Turns our errors into a one-line message and their exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FlowSmithError as exc:
            # Messages quote names and errors read from rows: shown, never obeyed.
            click.echo(f"Error: {printable(redact(str(exc)))}", err=True)
            raise click.exceptions.Exit(exc.exit_code) from None
        except sa.exc.SQLAlchemyError as exc:
            # Unforeseen database errors still get one line, not a traceback, and
            # without any password the driver quotes back.
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise click.ClickException(f"database error: {printable(redact(first))}") from None


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXIT_CODES_HELP,
)
@click.version_option(__version__, prog_name="flowsmith")
def main() -> None:
    """FlowSmith Worker: durable workflows on the database you already have.

    \b
    Examples:
      flowsmith migrate --url postgresql://app@db/app
      flowsmith worker myapp.flows --concurrency 8
      flowsmith demo
    """


for command in (
    worker.migrate,
    worker.worker,
    worker.demo,
    enqueue.enqueue,
    events.send_event,
    status.status,
    ops.flows,
    ops.retry,
    ops.cancel,
    ops.prune,
    ops.stats,
    ops.workers,
    ops.queue_limit,
    dashboard.dashboard,
):
    main.add_command(command)

__all__ = ["main"]
