"""`flowsmith migrate`, `flowsmith worker` and `flowsmith demo`: set up and run the workers."""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import click

from flowsmith_worker import connections, payload
from flowsmith_worker.cli.params import QueueNames, url_option
from flowsmith_worker.config import resolve_database_url
from flowsmith_worker.log import LOG_LEVELS, flush_output, setup_logging
from flowsmith_worker.metrics import DEFAULT_METRICS_HOST, serve
from flowsmith_worker.signals import stop_on_signals
from flowsmith_worker.storage import configure, create_storage
from flowsmith_worker.storage.base import DEFAULT_QUEUE
from flowsmith_worker.worker import (
    DEFAULT_CONCURRENCY,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_SHUTDOWN_TIMEOUT,
    Worker,
)

ENV_PREFIX = "FLOWSMITH_"
# Read from the environment by our own code, with its own fallbacks (see URL_HELP).
_OWN_ENVIRONMENT = frozenset({"url"})
MODULES_ENV_VAR = ENV_PREFIX + "MODULES"


class EnvironmentCommand(click.Command):
    """A command each of whose options may also come from $FLOWSMITH_<OPTION>, shown in --help.

    --queue reads $FLOWSMITH_QUEUE, --no-listen $FLOWSMITH_NO_LISTEN: a container
    configures the worker as Celery's or Procrastinate's, and an option added
    later gets its variable without anyone remembering to. The command line wins.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if not isinstance(param, click.Option) or param.name in _OWN_ENVIRONMENT:
                continue
            if param.envvar is None:
                param.envvar = environment_variable(param)
            param.show_envvar = True


def environment_variable(option: click.Option) -> str:
    """FLOWSMITH_ and the option's long name: --poll-interval reads $FLOWSMITH_POLL_INTERVAL."""
    name = max(option.opts, key=len).lstrip("-")
    return ENV_PREFIX + name.upper().replace("-", "_")


def unique_queues(
    _ctx: click.Context, _param: click.Parameter, values: Sequence[tuple[str, ...]]
) -> tuple[str, ...]:
    """--queue a,b --queue c: the queues named, each once, in their order."""
    return tuple(dict.fromkeys(name for names in values for name in names))


@click.command()
@url_option
def migrate(url: str | None) -> None:
    """Create or upgrade the FlowSmith tables (fs_*); safe to run twice, or concurrently.

    \b
    Examples:
      flowsmith migrate
      flowsmith migrate --url mysql://app:secret@db/app
    """
    storage = create_storage(resolve_database_url(url))
    try:
        version = storage.migrate()
    finally:
        storage.close()
    click.echo(f"FlowSmith schema at version {version} on {storage.url_for_display}")


@click.command(cls=EnvironmentCommand)
@click.argument("modules", nargs=-1, required=True, envvar=MODULES_ENV_VAR)
@url_option
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=DEFAULT_CONCURRENCY,
    show_default=True,
    help="Steps run at the same time by this process.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.01),
    default=DEFAULT_POLL_INTERVAL,
    show_default=True,
    help="Seconds between polls when idle.",
)
@click.option(
    "--lease",
    "lease_seconds",
    type=click.FloatRange(min=1),
    default=DEFAULT_LEASE_SECONDS,
    show_default=True,
    help="Seconds a claim lasts without a heartbeat; a dead worker's steps are rescued after this.",
)
@click.option(
    "--queue",
    "queues",
    multiple=True,
    type=QueueNames(),
    default=(DEFAULT_QUEUE,),
    show_default=True,
    callback=unique_queues,
    help="Queues to take steps from: a,b is two (the option may also be repeated).",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_SHUTDOWN_TIMEOUT,
    show_default=True,
    help="On SIGTERM, seconds to let in-flight steps finish "
    "before releasing them to other workers.",
)
@click.option(
    "--no-listen",
    is_flag=True,
    help="Do not LISTEN for NOTIFY; poll only (FLOWSMITH_PG_POOLER=transaction implies it).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Refuse to start if these settings could open more than N database connections "
    "(--concurrency + 5, and 1 for LISTEN on PostgreSQL).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    metavar="PORT",
    help="Serve Prometheus metrics on /metrics, liveness on /livez, readiness on /readyz.",
)
@click.option(
    "--metrics-host",
    default=DEFAULT_METRICS_HOST,
    show_default=True,
    metavar="HOST",
    help="Address --metrics-port listens on; 0.0.0.0 for every interface (a container).",
)
@click.option(
    "--max-payload-bytes",
    type=click.IntRange(min=1024),
    default=None,
    metavar="BYTES",
    help="Largest step output (and run data) stored, as JSON; a larger one fails its "
    f"step at once. Default: {payload.DEFAULT_MAX_PAYLOAD_BYTES // payload.MiB} MiB "
    "(fits MariaDB's default "
    "16 MiB max_allowed_packet).",
)
@click.option(
    "--log-format",
    type=click.Choice(["auto", "console", "json"]),
    default="auto",
    show_default=True,
    help="console on a TTY, JSON lines otherwise.",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Least severe lines written (of FlowSmith, the modules and their libraries).",
)
def worker(
    modules: Sequence[str],
    url: str | None,
    concurrency: int,
    poll_interval: float,
    lease_seconds: float,
    queues: Sequence[str],
    shutdown_timeout: float,
    no_listen: bool,
    max_connections: int | None,
    metrics_port: int | None,
    metrics_host: str,
    max_payload_bytes: int | None,
    log_format: str,
    log_level: str,
) -> None:
    """Run the steps of the flows defined in MODULES.

    The modules are imported first (the current directory is on the path, as
    with uvicorn and celery), so their flows are registered. SIGTERM or SIGINT
    stops claiming and lets in-flight steps finish; a second one stops at once.

    Every option may also be set in the environment, as FLOWSMITH_ and its
    name (FLOWSMITH_CONCURRENCY=16, FLOWSMITH_QUEUE=emails,default), and the
    MODULES in $FLOWSMITH_MODULES, separated by spaces; the command line wins.

    \b
    Examples:
      flowsmith worker myapp.flows
      flowsmith worker myapp.flows myapp.billing --concurrency 16 --queue emails,default
      FLOWSMITH_MODULES=myapp.flows FLOWSMITH_CONCURRENCY=16 flowsmith worker
    """
    setup_logging(log_format, log_level)  # type: ignore[arg-type]
    _check_payload_limit_setting()
    if max_connections is not None:  # before anything connects
        listens = connections.listens(resolve_database_url(url), listen=not no_listen)
        connections.refuse_above(max_connections, concurrency, listens)
    import_modules(modules)
    # Every slot, the loop and the heartbeat thread may each hold a connection
    # at once (see connections.py); opening one per step costs more than the step.
    pool = connections.worker_pool(concurrency)
    storage = configure(
        url,
        pool_min=pool.pool_min,
        pool_max=pool.pool_max,
        max_payload_bytes=max_payload_bytes,
    )
    worker = Worker(
        storage,
        concurrency=concurrency,
        poll_interval=poll_interval,
        lease_seconds=lease_seconds,
        queues=queues,
        shutdown_timeout=shutdown_timeout,
        listen=not no_listen,
    )
    server = (
        serve(metrics_port, worker.metrics, worker.health, host=metrics_host)
        if metrics_port
        else None
    )
    if server:
        worker.log.info("metrics.serving", host=metrics_host, port=server.port)
    try:
        with stop_on_signals(worker):
            worker.run()
    finally:
        if server:
            server.shutdown()
    # Last, right before the process ends: from here no step of ours runs on.
    worker.release_unfinished()
    _exit_abandoning_steps()


@click.command()
@click.option("--flows", "flow_count", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--workers", "worker_count", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--db",
    "db_path",
    default="flowsmith-demo.db",
    show_default=True,
    help="SQLite file, created afresh.",
)
def demo(flow_count: int, worker_count: int, db_path: str) -> None:
    """Watch orders survive flaky APIs and a SIGKILLed worker, on SQLite.

    Enqueues FLOWS order flows, starts WORKERS `flowsmith worker` processes,
    kills one mid-run, and prints what happened.

    \b
    Examples:
      flowsmith demo
      flowsmith demo --flows 1000 --workers 3 --db /tmp/demo.db
    """
    from flowsmith_worker.demo import run_demo

    run_demo(db_path=db_path, flow_count=flow_count, worker_count=worker_count)


def import_modules(modules: Sequence[str]) -> None:
    """Import the modules that define the flows, from the current directory or the packages."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise click.ClickException(
                f"cannot import module {name!r}: {exc}. Give a dotted module name importable "
                "from the current directory or the installed packages (e.g. myapp.flows)."
            ) from None


def _check_payload_limit_setting() -> None:
    """A bad $FLOWSMITH_MAX_PAYLOAD_BYTES stops the start, not every step later."""
    try:
        payload.limits()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def _exit_abandoning_steps() -> None:
    """Leave even if a step thread is stuck: its node was released, its late result is fenced."""
    flush_output()
    if any(t.name.startswith("flowsmith-step") and t.is_alive() for t in threading.enumerate()):
        os._exit(0)
