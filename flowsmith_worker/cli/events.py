"""`flowsmith send-event`: deliver an event to a run's wait_for step from a shell,
as ``send_event()`` does in code."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

import click

from flowsmith_worker.cli.format import echo, echo_json, json_option
from flowsmith_worker.cli.ops import open_storage
from flowsmith_worker.cli.params import url_option
from flowsmith_worker.errors import InvalidIdentifier, PayloadRejected
from flowsmith_worker.events import send_event as send


@click.command("send-event")
@click.argument("tracking_id")
@click.argument("name")
@click.option(
    "--data",
    "data_text",
    default="null",
    show_default=True,
    metavar="JSON",
    help="The event's payload (the wait_for step's output): any JSON; - reads it from stdin.",
)
@click.option(
    "--idempotency-key",
    metavar="KEY",
    help="Sending again with the same key delivers the event once.",
)
@url_option
@json_option
def send_event(
    tracking_id: str,
    name: str,
    data_text: str,
    idempotency_key: str | None,
    url: str | None,
    as_json: bool,
) -> None:
    """Send the event NAME to the run TRACKING_ID: its wait_for(NAME) step outputs the data.

    A run that has not reached that step yet keeps the event until it does.

    \b
    Exit codes:
      0  the event is stored (or was already, under the same --idempotency-key)
      1  refused: the run is finished, does not wait for NAME, or already has it
      2  usage error (e.g. --data is not JSON)
      3  no flow run has that tracking_id

    \b
    Examples:
      flowsmith send-event order-42 approval --data '{"approved": true}'
      flowsmith send-event order-42 approval --data - --idempotency-key hook-981 < body.json
    """
    data = _parse_data(data_text)
    with open_storage(url) as storage:
        try:
            sent = send(tracking_id, name, data, idempotency_key=idempotency_key, storage=storage)
        except PayloadRejected as exc:
            raise click.BadParameter(str(exc), param_hint="--data") from None
        except InvalidIdentifier as exc:
            raise click.UsageError(str(exc)) from None
    if as_json:
        echo_json({"tracking_id": sent.tracking_id, "name": sent.name, "delivered": sent.delivered})
        return
    if not sent.delivered:
        echo(
            f"Event {name!r} was already sent to run {tracking_id!r} with this key: not sent again."
        )
        return
    echo(f"Sent event {name!r} to run {tracking_id!r}.")
    echo(f"Follow it: flowsmith status {shlex.quote(tracking_id)}")


def _parse_data(text: str) -> Any:
    """The --data JSON value (from stdin for -); text that is not JSON is a usage error."""
    raw = sys.stdin.read() if text == "-" else text
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise click.BadParameter(
            f"not JSON ({exc}): e.g. --data '{{\"approved\": true}}'", param_hint="--data"
        ) from None
