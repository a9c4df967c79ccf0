"""`flowsmith dashboard`: serve the web dashboard with uvicorn.

Registered on the `flowsmith` group by cli/app.py. Starlette, Jinja2 and uvicorn
are imported only when the command runs: they are the ``dashboard`` extra.
"""

from __future__ import annotations

import click

from flowsmith_worker.cli.params import Duration, url_option
from flowsmith_worker.config import resolve_database_url
from flowsmith_worker.storage import create_storage

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
EXTRA_HINT = "pip install 'flowsmith-worker[dashboard]'"


@click.command()
@url_option
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
@click.option(
    "--refresh",
    type=Duration(),
    default="5s",
    show_default=True,
    help="How often the overview and a live run's page refresh themselves.",
)
def dashboard(url: str | None, host: str, port: int, refresh: float) -> None:
    """Serve the web dashboard: runs, failures, workers; retry and cancel.

    Read-only unless $FLOWSMITH_DASHBOARD_PASSWORD is set: then retry and cancel
    ask for HTTP Basic credentials, user $FLOWSMITH_DASHBOARD_USER (default
    admin) and that password. Basic auth sends them in clear text: put a TLS
    proxy in front before listening on anything but 127.0.0.1.

    \b
    Examples:
      flowsmith dashboard
      FLOWSMITH_DASHBOARD_PASSWORD=s3cret flowsmith dashboard --url postgresql://app@db/app
      flowsmith dashboard --host 0.0.0.0 --port 9000
    """
    try:
        import uvicorn

        from flowsmith_worker.dashboard.app import create_app
        from flowsmith_worker.dashboard.security import Credentials
    except ImportError as exc:
        raise click.ClickException(
            f"the dashboard needs packages that are not installed ({exc.name}): {EXTRA_HINT}"
        ) from None
    try:
        credentials = Credentials.from_environment()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    storage = create_storage(resolve_database_url(url))
    try:
        storage.check_schema()
        app = create_app(storage, credentials=credentials, refresh_seconds=refresh)
        mode = "retry and cancel need the password" if credentials else "read-only"
        click.echo(
            f"FlowSmith dashboard on http://{host}:{port}/ for {storage.url_for_display} "
            f"({mode}); Ctrl+C stops it"
        )
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        storage.close()
