"""The dashboard's ASGI app: pages, the fragments they poll, and the two actions.

Every page is complete HTML rendered on the server (Jinja2, autoescaped: run
inputs, outputs, errors and tracking_ids are user data). A small script of
ours (static/live.js) refreshes the overview and a run's page by fetching
their fragment again; without it the pages are the same, only not live. The
storage is the only source: no SQL here.

Storage calls block, so the pages are plain functions, which Starlette runs
in its thread pool; the actions read their form asynchronously first.
"""

from __future__ import annotations

import contextlib
import shlex
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jinja2
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import URL
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from flowsmith_worker import compensation, progress
from flowsmith_worker.config import redact, resolve_database_url
from flowsmith_worker.dashboard import forms, views
from flowsmith_worker.dashboard.security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    REALM,
    Credentials,
    SecurityHeaders,
    new_csrf_cookie,
)
from flowsmith_worker.errors import FlowNotFound, FlowSmithError, Refused
from flowsmith_worker.readable import (
    format_duration,
    format_time,
    short_worker,
)
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import FlowRecord, FlowStatus, Storage
from flowsmith_worker.storage.sql.dashboard import OPEN_RUNS, error_message

HERE = Path(__file__).parent
DEFAULT_REFRESH_SECONDS = 5.0
# The overview's charts: the last hour in twelve slices of five minutes.
ACTIVITY_WINDOW_SECONDS = 3600.0
ACTIVITY_SLICES = 12
# Finished runs are counted over the last day (all of them would be a table scan).
FINISHED_WITHIN_SECONDS = 86400.0
# The failures page reads at most this many failed runs, the newest.
MAX_FAILED_RUNS = 2000

# What a redirect after an action may say: a key, never text from the request.
NOTICES = {
    "retried": "Retry queued: the failed step(s) run again; "
    "the completed steps keep their outputs.",
    "cancelled": "Cancelled: pending steps never start; a running step finishes, "
    "and the run goes no further.",
}


class _FromEnvironment:
    """The default of ``credentials``: read them from the environment."""


FROM_ENVIRONMENT = _FromEnvironment()


def create_app(
    storage: Storage | None = None,
    *,
    url: str | None = None,
    credentials: Credentials | _FromEnvironment | None = FROM_ENVIRONMENT,
    refresh_seconds: float = DEFAULT_REFRESH_SECONDS,
) -> Starlette:
    """The dashboard as an ASGI app, to serve (`flowsmith dashboard`) or mount in your own.

    ``storage``: the one to show (not closed by the app); else one is opened for
    ``url`` (default: $FLOWSMITH_DATABASE_URL, then $DATABASE_URL) and closed at
    shutdown (mounted in another app, Starlette runs no lifespan of the mounted
    one: there, pass a storage of your own). ``credentials``: who may retry and
    cancel; by default read from $FLOWSMITH_DASHBOARD_PASSWORD and
    $FLOWSMITH_DASHBOARD_USER; None: read-only.
    """
    if isinstance(credentials, _FromEnvironment):
        credentials = Credentials.from_environment()
    owned = storage is None
    shown = storage if storage is not None else create_storage(resolve_database_url(url))
    dashboard = Dashboard(shown, credentials, refresh_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        if owned:
            shown.close()

    return Starlette(
        routes=dashboard.router.routes,
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={
            FlowSmithError: dashboard.refused,
            # Database errors we do not know: one line too, never a traceback.
            sa.exc.SQLAlchemyError: dashboard.refused,
            HTTPException: dashboard.http_error,
        },
        lifespan=lifespan,
    )


def _templates() -> Jinja2Templates:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # everything, whatever the file's name
        undefined=jinja2.StrictUndefined,
    )
    environment.filters.update(
        time=format_time,
        duration=format_duration,
        worker=short_worker,
        message=error_message,
        json=views.shown_json,
        text=views.shown_text,
        shell=shlex.quote,  # a command shown to copy into a shell
    )
    environment.globals.update(cancellable=progress.cancellable, FlowStatus=FlowStatus)
    return Jinja2Templates(env=environment)


class Dashboard:
    """The endpoints, around one storage and the credentials that may act."""

    def __init__(
        self, storage: Storage, credentials: Credentials | None, refresh_seconds: float
    ) -> None:
        self.storage = storage
        self.credentials = credentials
        self.refresh_ms = round(refresh_seconds * 1000)
        self.templates = _templates()
        self.templates.env.globals["path_for"] = self._path_for_template()
        self.router = Router(routes=self._routes())

    def path_for(self, request: Request, name: str, /, **path_params: Any) -> URL:
        """The path of one of our routes, under wherever the app is mounted.

        Not request.url_for: mounted in another app, that asks the outer app's
        router, and it answers with an absolute URL of the host the request
        named, which a proxy in front may have changed.
        """
        route = self.router.url_path_for(name, **path_params)
        return URL(request.scope.get("root_path", "").rstrip("/") + str(route))

    def _path_for_template(self) -> Callable[..., URL]:
        """path_for for the templates, which know the request from their context."""

        @jinja2.pass_context
        def path_for(context: Any, name: str, /, **path_params: Any) -> URL:
            return self.path_for(context["request"], name, **path_params)

        return path_for

    def _routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.overview, name="overview"),
            Route("/fragments/overview", self.overview_fragment, name="overview_fragment"),
            Route("/runs", self.runs, name="runs"),
            Route("/run", self.run, name="run"),
            Route("/fragments/run", self.run_fragment, name="run_fragment"),
            Route("/run/retry", self.retry, methods=["POST"], name="retry"),
            Route("/run/cancel", self.cancel, methods=["POST"], name="cancel"),
            Route("/workers", self.workers, name="workers"),
            Route("/failures", self.failures, name="failures"),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]

    # -- rendering ------------------------------------------------------------------

    def render(
        self, request: Request, template: str, status_code: int = 200, **context: Any
    ) -> Response:
        """A page or fragment; sets this browser's CSRF cookie when actions are possible."""
        cookie = request.cookies.get(CSRF_COOKIE, "")
        fresh = None
        if self.credentials is not None and not cookie:
            cookie = fresh = new_csrf_cookie()
        response = self.templates.TemplateResponse(
            request,
            template,
            {
                "can_act": self.credentials is not None,
                "csrf_field": CSRF_FIELD,
                "csrf_token": self.credentials.csrf_token(cookie) if self.credentials else "",
                "refresh_ms": self.refresh_ms,
                **context,
            },
            status_code=status_code,
        )
        if fresh is not None:
            response.set_cookie(
                CSRF_COOKIE,
                fresh,
                path=request.scope.get("root_path") or "/",
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
        return response

    # -- pages ------------------------------------------------------------------------

    def overview(self, request: Request) -> Response:
        return self.render(request, "overview.html", **self._overview())

    def overview_fragment(self, request: Request) -> Response:
        return self.render(request, "_overview.html", **self._overview())

    def _overview(self) -> dict[str, Any]:
        overview = self.storage.overview(
            window_seconds=ACTIVITY_WINDOW_SECONDS,
            buckets=ACTIVITY_SLICES,
            finished_within=FINISHED_WITHIN_SECONDS,
        )
        return {
            "overview": overview,
            "columns": views.activity_columns(overview.slices),
            "workers": self.storage.list_workers(),
            "statuses": list(FlowStatus),
        }

    def runs(self, request: Request) -> Response:
        query = forms.RunsQuery.from_params(request.query_params)
        try:
            where = query.filter()
        except forms.InvalidQuery as exc:
            return self.render(
                request, "runs.html", 400, query=query, problem=str(exc), runs=[], older=None
            )
        found = self.storage.list_flows(where=where)
        shown = found[: forms.PAGE_SIZE]
        older = query.older_than(shown[-1]) if len(found) > forms.PAGE_SIZE else None
        return self.render(request, "runs.html", query=query, problem=None, runs=shown, older=older)

    def run(self, request: Request) -> Response:
        notice = NOTICES.get(request.query_params.get("notice", ""))
        return self.render(request, "run.html", notice=notice, **self._run(request))

    def run_fragment(self, request: Request) -> Response:
        return self.render(request, "_run.html", **self._run(request))

    def _run(self, request: Request) -> dict[str, Any]:
        flow = self._flow(forms.tracking_id(request.query_params.get("tracking_id")), True)
        nodes = self.storage.list_nodes(flow_id=flow.id)
        links = self.storage.subflow_links(flow=flow)
        return {
            "flow": flow,
            # A running step's bar ends now: by this host's clock, only drawn.
            "stages": views.timeline(flow, nodes, links.children, now=_host_time()),
            "parent": links.parent,
            "live": flow.status in OPEN_RUNS,
            # A run whose compensations ran is not retried (storage refuses it): no button.
            "retryable": flow.status == FlowStatus.FAILED
            and not any(compensation.is_compensation(n.step_name) for n in nodes),
        }

    def workers(self, request: Request) -> Response:
        return self.render(request, "workers.html", workers=self.storage.list_workers())

    def failures(self, request: Request) -> Response:
        window = forms.failure_window(request.query_params.get("within"))
        groups = self.storage.failure_groups(
            within_seconds=forms.FAILURE_WINDOWS[window], max_runs=MAX_FAILED_RUNS
        )
        return self.render(
            request,
            "failures.html",
            groups=groups,
            window=window,
            windows=list(forms.FAILURE_WINDOWS),
            max_runs=MAX_FAILED_RUNS,
        )

    def _flow(self, tracking_id: str, with_payloads: bool) -> FlowRecord:
        flow = self.storage.get_flow(tracking_id=tracking_id, with_payloads=with_payloads)
        if flow is None:
            raise HTTPException(
                404,
                f"no flow run has tracking_id {tracking_id!r} (it was never enqueued, "
                "or it was pruned)",
            )
        return flow

    # -- actions ------------------------------------------------------------------------

    async def retry(self, request: Request) -> Response:
        return await self._act(request, "retried", self._retry)

    async def cancel(self, request: Request) -> Response:
        return await self._act(request, "cancelled", self._cancel)

    def _retry(self, tracking_id: str) -> None:
        self.storage.resume_flow(tracking_id=tracking_id)

    def _cancel(self, tracking_id: str) -> None:
        self.storage.cancel_flow(tracking_id=tracking_id)

    async def _act(self, request: Request, notice: str, action: Callable[[str], None]) -> Response:
        """Check who asks and that the form is ours, then act and show the run again."""
        if self.credentials is None:
            raise HTTPException(
                403,
                "the dashboard is read-only: start it with $FLOWSMITH_DASHBOARD_PASSWORD set "
                "to allow retry and cancel",
            )
        if not self.credentials.admit(request.headers.get("authorization")):
            raise HTTPException(
                401,
                "retry and cancel need the dashboard's user and password",
                headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
            )
        form = await forms.action_form(request)
        if not self.credentials.csrf_valid(request.cookies.get(CSRF_COOKIE), form.get(CSRF_FIELD)):
            raise HTTPException(
                403,
                "this form's security token is missing or out of date (CSRF protection): "
                "reload the page and try again",
            )
        tracking_id = forms.tracking_id(form.get("tracking_id"))
        await run_in_threadpool(action, tracking_id)
        target = self.path_for(request, "run").include_query_params(
            tracking_id=tracking_id, notice=notice
        )
        return RedirectResponse(str(target), status_code=303)

    # -- errors ---------------------------------------------------------------------------

    def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        response = self.render(
            request,
            "error.html",
            exc.status_code,
            title=_TITLES.get(exc.status_code, "Error"),
            message=exc.detail,
        )
        response.headers.update(exc.headers or {})
        return response

    def refused(self, request: Request, exc: Exception) -> Response:
        """The storage's refusals and failures as a page: what happened, what to do."""
        status = 503
        if isinstance(exc, Refused):
            status = 409
        elif isinstance(exc, FlowNotFound):
            status = 404
        return self.render(
            request,
            "error.html",
            status,
            title=_TITLES[status],
            # A database error may quote a URL: never its password.
            message=redact((str(exc).strip().splitlines() or [type(exc).__name__])[0]),
        )


_TITLES = {
    400: "Bad request",
    401: "Credentials needed",
    403: "Refused",
    404: "Not found",
    409: "Not possible now",
    413: "Too large",
    503: "Database problem",
}


def _host_time() -> float:
    """This host's clock: only to draw, never to decide anything."""
    return time.time()
