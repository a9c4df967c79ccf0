"""`flowsmith enqueue`: start a run of a flow from a shell, as ``flow.run()`` does in code.

The flow is the one its module defines (imported as `flowsmith worker` imports
it), so the run gets the same plan, queue and priority as one enqueued by the
application; the run goes to the database of --url (or the environment).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import click

from flowsmith_worker.cli.format import (
    echo,
    echo_json,
    json_option,
)
from flowsmith_worker.cli.ops import open_storage
from flowsmith_worker.cli.params import (
    Duration,
    url_option,
)
from flowsmith_worker.cli.worker import MODULES_ENV_VAR, import_modules
from flowsmith_worker.errors import (
    FlowNotDefined,
    InvalidIdentifier,
    PayloadRejected,
    RunAlreadyEnqueued,
)
from flowsmith_worker.flow import Flow, registry
from flowsmith_worker.readable import (
    format_duration,
)
from flowsmith_worker.storage.base import EnqueueResult

_JSON_KINDS: dict[type, str] = {
    list: "an array",
    str: "a string",
    bool: "a boolean",
    type(None): "null",
}


@click.command()
@click.argument("flow_name", metavar="FLOW")
@click.option(
    "--input",
    "input_text",
    default="{}",
    show_default=True,
    metavar="JSON",
    help="The run's input (its ctx.data): a JSON object; - reads it from stdin.",
)
@click.option(
    "--tracking-id",
    metavar="ID",
    help="The run's key (default: a random one); a run with it already is not started again.",
)
@click.option(
    "--module",
    "modules",
    multiple=True,
    envvar=MODULES_ENV_VAR,
    show_envvar=True,
    metavar="MODULE",
    help="The module defining FLOW, imported first as `flowsmith worker` does (repeatable).",
)
@click.option(
    "--delay",
    type=Duration(),
    help="Hold the run's first step back this long: 30s, 10m, 2h.",
)
@url_option
@json_option
def enqueue(
    flow_name: str,
    input_text: str,
    tracking_id: str | None,
    modules: Sequence[str],
    delay: float | None,
    url: str | None,
    as_json: bool,
) -> None:
    """Enqueue a run of FLOW, as flow.run() does; a worker importing its module runs it.

    A FAILED run given again by --tracking-id is resumed at its failed
    step(s), as flow.run() would; a run that is pending, running or completed
    is left alone, and the command exits 4.

    \b
    Exit codes:
      0  the run is enqueued (or a FAILED run with that tracking_id resumed)
      1  error (e.g. the module cannot be imported, the database is down)
      2  usage error (e.g. --input is not a JSON object)
      3  no flow named FLOW is defined in the modules given
      4  a run already has that tracking_id: nothing was enqueued

    \b
    Examples:
      flowsmith enqueue order --module myapp.flows --input '{"order_id": 42}'
      flowsmith enqueue order --module myapp.flows --tracking-id order-42 --delay 10m
      flowsmith enqueue order --module myapp.flows --input - --json < order.json
    """
    data = _parse_input(input_text)
    import_modules(modules)
    flow = _registered_flow(flow_name, modules)
    try:
        request = flow.new_run(data, tracking_id, delay)
    except PayloadRejected as exc:
        raise click.BadParameter(str(exc), param_hint="--input") from None
    except InvalidIdentifier as exc:
        raise click.BadParameter(str(exc), param_hint="--tracking-id") from None
    with open_storage(url) as storage:
        try:
            result = storage.enqueue_flow(flow=request)
        except RunAlreadyEnqueued as exc:
            raise type(exc)(f"{exc}: nothing was enqueued") from None
    follow = f"flowsmith status {shlex.quote(result.tracking_id)}"
    if not (result.created or result.resumed):
        raise RunAlreadyEnqueued(
            f"flow run {result.tracking_id!r} ({flow.name}) already exists and is "
            f"{result.status.value}: nothing was enqueued; `{follow}` shows it"
        )
    if as_json:
        echo_json({**_described(result), "flow_name": flow.name, "queue": flow.queue})
        return
    echo(_enqueued_message(result, flow, delay))
    echo(f"Follow it: {follow} --watch")


def _parse_input(text: str) -> dict[str, Any]:
    """The --input object (from stdin for -); any other JSON is a usage error."""
    raw = sys.stdin.read() if text == "-" else text
    example = """e.g. --input '{"order_id": 42}'"""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON ({exc}): {example}", param_hint="--input") from None
    if not isinstance(value, dict):
        kind = _JSON_KINDS.get(type(value), "a number")
        raise click.BadParameter(
            f"a run's input is a JSON object ({{...}}), not {kind}: {example}",
            param_hint="--input",
        )
    return value


def _registered_flow(name: str, modules: Sequence[str]) -> Flow:
    flow = registry.lookup(name)
    if flow is not None:
        return flow
    where = f"in {', '.join(modules)}" if modules else "(no --module was given)"
    defined = registry.names()
    listing = f"; the flows defined are {', '.join(defined)}" if defined else ""
    raise FlowNotDefined(
        f"no flow named {name!r} is defined {where}{listing}: give the module that "
        f"defines it with --module (or ${MODULES_ENV_VAR})"
    )


def _described(result: EnqueueResult) -> dict[str, Any]:
    return {
        "tracking_id": result.tracking_id,
        "status": result.status.value,
        "created": result.created,
        "resumed": result.resumed,
    }


def _enqueued_message(result: EnqueueResult, flow: Flow, delay: float | None) -> str:
    run = f"flow run {result.tracking_id!r} of flow {flow.name!r}"
    if result.resumed:
        return f"Resumed the FAILED {run}: its failed step(s) are queued again."
    starts = f"; its first step starts in {format_duration(delay)}" if delay else ""
    return f"Enqueued {run} on queue {flow.queue!r}{starts}."
