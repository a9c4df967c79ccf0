"""The dashboard over HTTP: a real uvicorn server on a SQLite database with runs in
every state (tests/dashboard_support.py), a real Worker thread, and httpx as the client.

The browser test (test_dashboard_browser.py) drives the same pages in Chromium;
the storage queries under them are tested on every backend in
test_dashboard_queries.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from flowsmith_worker import Flow, Worker
from flowsmith_worker.dashboard import Credentials, create_app
from flowsmith_worker.readable import format_time
from flowsmith_worker.storage.base import FlowStatus, Storage
from tests.conftest import eventually
from tests.dashboard_support import (  # noqa: F401 - the *_fixture: fixtures
    DECLINED,
    XSS,
    Zoo,
    db_fixture,
    db_url_fixture,
    declined,
    ok,
    serving,
    status_of,
    zoo_fixture,
)
from tests.support.http import free_port
from tests.support.parking import POLL, drive, parked
from tests.support.runs import nodes_of

CREDENTIALS = Credentials("ops", "correct horse")
AUTH = ("ops", "correct horse")
TOKEN = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


@pytest.fixture
def client(db: Storage, zoo: Zoo) -> Iterator[httpx.Client]:
    """A client of the dashboard with actions enabled; it keeps the CSRF cookie."""
    with (
        serving(create_app(db, credentials=CREDENTIALS, refresh_seconds=1)) as base,
        httpx.Client(base_url=base) as session,
    ):
        yield session


def token_of(page: httpx.Response) -> str:
    found = TOKEN.search(page.text)
    assert found, "no action form on the page"
    return found.group(1)


def post_action(
    client: httpx.Client, action: str, tracking_id: str, auth: tuple[str, str] | None = AUTH
) -> httpx.Response:
    """Open the run's page (as a browser would, for its form) and post the action."""
    page = client.get("/run", params={"tracking_id": tracking_id})
    return client.post(
        f"/run/{action}",
        data={"tracking_id": tracking_id, "csrf_token": token_of(page)},
        auth=auth,
    )


# -- pages ------------------------------------------------------------------------------


def test_every_page_shows_the_runs_in_every_state(client: httpx.Client, zoo: Zoo) -> None:
    """The overview, runs list (whole and per status), every run, the workers and the
    failures pages answer 200 with what they are about."""
    overview = client.get("/")
    assert overview.status_code == 200
    assert "live workers" in overview.text and "Runs failed, last hour" in overview.text
    runs = client.get("/runs").text
    for tracking_id in zoo.tracking_ids():
        assert tracking_id in runs
    for status, tracking_id in [
        (FlowStatus.COMPLETED, zoo.completed),
        (FlowStatus.FAILED, zoo.failed),
        (FlowStatus.RUNNING, zoo.running),
        (FlowStatus.PENDING, zoo.pending),
        (FlowStatus.CANCELLED, zoo.cancelled),
    ]:
        page = client.get("/runs", params={"status": status.value}).text
        assert tracking_id in page
        assert (f">{zoo.completed}</a>" in page) == (status == FlowStatus.COMPLETED)
    for tracking_id in zoo.tracking_ids():
        page = client.get("/run", params={"tracking_id": tracking_id})
        assert page.status_code == 200 and tracking_id in page.text
    failed = client.get("/run", params={"tracking_id": zoo.failed}).text
    assert "retried \N{MULTIPLICATION SIGN}1" in failed and f"ValueError: {DECLINED}" in failed
    assert "Traceback" in failed  # the error with its traceback
    workers = client.get("/workers").text
    assert "No worker is registered" not in workers
    failures = client.get("/failures").text
    assert f"ValueError: {DECLINED}" in failures and zoo.failed in failures


def test_a_run_page_links_subflows_both_ways_and_shows_parallel_steps_side_by_side(
    client: httpx.Client, zoo: Zoo
) -> None:
    """The parent's step links to its child run, the child back to the parent's step;
    the parallel siblings share one stage."""
    parent = client.get("/run", params={"tracking_id": zoo.completed}).text
    assert 'href="/run?tracking_id=order-1%3Apay"' in parent
    stage = re.search(r'<li class="stage parallel">(.*?)</li>', parent, re.S)
    assert stage and "email" in stage.group(1) and "sms" in stage.group(1)
    child = client.get("/run", params={"tracking_id": zoo.child}).text
    assert "Subflow of" in child and 'href="/run?tracking_id=order-1"' in child


def test_a_step_whose_worker_was_lost_is_marked_rescued(
    client: httpx.Client, db: Storage, unique: Callable[[str], str]
) -> None:
    """A step taken by a worker that died (its lease expired and was rescued) shows
    "rescued" on its step and attempts, apart from retries."""
    lost = Flow(unique("lost"), storage=db, queue="lost").step("a", ok)
    lost.run({}, tracking_id="lost-1")
    db.claim_nodes(worker_id="dead-worker", limit=1, lease_seconds=0.2, queues=["lost"])
    eventually(db.rescue_expired)
    db.claim_nodes(worker_id="dead-again", limit=1, lease_seconds=0.2, queues=["lost"])
    page = client.get("/run", params={"tracking_id": "lost-1"}).text
    assert "rescued \N{MULTIPLICATION SIGN}1" in page
    assert "retried \N{MULTIPLICATION SIGN}" not in page
    assert "attempt 2 of" in page


def test_a_parked_step_shows_what_it_sleeps_or_waits_for(
    db: Storage, unique: Callable[[str], str]
) -> None:
    """Steps a real Worker parked show as `flowsmith status` shows them: a sleep as
    SLEEPING with its wake time, a wait as AWAITING_EVENT with its event's name, its
    timeout (or none) and the command that sends the event; not as PENDING."""
    runs = {
        "nap": Flow(unique("sleeps"), storage=db).sleep("nap", seconds=3600),
        "approval": Flow(unique("waits"), storage=db).wait_for("approval", timeout=7200),
        "signature": Flow(unique("waits_on"), storage=db).wait_for("signature"),
    }
    tracking_ids = {step: flow.run({}).tracking_id for step, flow in runs.items()}
    drive(
        Worker(storage=db, poll_interval=POLL),
        lambda: all(parked(db, tid, step) for step, tid in tracking_ids.items()),
    )
    pages = {}
    with serving(create_app(db)) as base:
        for step, tid in tracking_ids.items():
            pages[step] = httpx.get(f"{base}/run", params={"tracking_id": tid}).text

    def wakes(step: str) -> str:
        wake_at = nodes_of(db, tracking_ids[step])[step].wake_at
        return f'<span class="wakes-at">{format_time(wake_at)}</span>'

    assert '<span class="status SLEEPING">SLEEPING</span>' in pages["nap"]
    assert f"sleeps until {wakes('nap')}" in pages["nap"]
    approval = pages["approval"]
    assert '<span class="status AWAITING_EVENT">AWAITING_EVENT</span>' in approval
    assert f'<code class="event-name">approval</code>, times out {wakes("approval")}' in approval
    assert f"flowsmith send-event {tracking_ids['approval']} approval --data JSON" in approval
    assert '<code class="event-name">signature</code>, no timeout' in pages["signature"]
    for page in pages.values():
        assert '<span class="status PENDING">' not in page


def test_a_compensating_run_is_live_and_shows_its_compensations_without_a_retry(
    client: httpx.Client, db: Storage, zoo: Zoo, unique: Callable[[str], str]
) -> None:
    """A run whose step failed compensates "book" (held until released): the overview
    counts it, its page has the COMPENSATING badge, refreshes (live) and shows the
    node compensate:book; once compensated (FAILED), the page shows that node still
    but no "Retry failed steps" (a compensated run is not retried), unlike a plain
    FAILED run's page. The stylesheet colours COMPENSATING and BLOCKED badges."""
    undo = threading.Event()
    flow = Flow(unique("booking"), storage=db).step(
        "book", ok, compensate=lambda ctx: undo.wait(30)
    )
    flow.step("charge", declined)
    tid = flow.run({}, tracking_id="booking-1").tracking_id
    try:
        eventually(lambda: status_of(db, tid) == FlowStatus.COMPENSATING)
        overview = client.get("/fragments/overview").text
        assert re.search(r'card COMPENSATING.*?<span class="count">1</span>', overview, re.S)
        compensating = client.get("/fragments/run", params={"tracking_id": tid}).text
        assert '<span class="status COMPENSATING">COMPENSATING</span>' in compensating
        assert "data-live-done" not in compensating
        assert '<strong class="step-name">compensate:book</strong>' in compensating
    finally:
        undo.set()
    eventually(lambda: status_of(db, tid) == FlowStatus.FAILED)
    compensated = client.get("/run", params={"tracking_id": tid}).text
    assert '<strong class="step-name">compensate:book</strong>' in compensated
    assert "Retry failed steps" not in compensated and "Cancel run" not in compensated
    assert "Retry failed steps" in client.get("/run", params={"tracking_id": zoo.failed}).text
    css = client.get(re.findall(r'href="([^"]+dashboard\.css)"', compensated)[0]).text
    assert ".status.COMPENSATING {" in css and ".status.BLOCKED {" in css


def test_data_from_the_database_is_shown_as_text(
    client: httpx.Client, db: Storage, zoo: Zoo, unique: Callable[[str], str]
) -> None:
    """Step outputs, errors and tracking_ids are escaped: markup in them never reaches
    the page as markup, in the list, the run page or the failures page."""
    hostile = '<img src=x onerror="alert(1)">&"\''
    Flow(unique("hostile"), storage=db).step("a", ok).run({"x": XSS}, tracking_id=hostile)
    for path, params in [
        ("/run", {"tracking_id": zoo.completed}),
        ("/run", {"tracking_id": hostile}),
        ("/runs", {}),
        ("/failures", {}),
    ]:
        page = client.get(path, params=params).text
        assert "<script>document.title" not in page and "<img src=x" not in page, path
    assert (
        "&lt;script&gt;document.title"
        in client.get("/run", params={"tracking_id": zoo.completed}).text
    )
    listing = client.get("/runs").text
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;&amp;&#34;&#39;" in listing
    assert "tracking_id=%3Cimg+src%3Dx+onerror%3D%22alert%281%29%22%3E%26%22%27" in listing


def test_pages_forbid_scripts_from_anywhere_but_the_dashboard(client: httpx.Client) -> None:
    """Every response has a Content-Security-Policy without inline scripts, and no framing."""
    for path in ["/", "/runs", "/static/live.js"]:
        headers = client.get(path).headers
        assert "script-src 'self'" in headers["content-security-policy"]
        assert "unsafe-inline" not in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"


def test_runs_are_listed_in_pages_that_keep_the_filters(
    client: httpx.Client, db: Storage, unique: Callable[[str], str]
) -> None:
    """50 runs a page, an "Older runs" link to the next that keeps the filters, and the
    next page holds the rest; a tracking_id prefix narrows the list."""
    flow = Flow(unique("bulk"), storage=db).step("a", ok)
    for i in range(55):
        flow.run({}, tracking_id=f"bulk-{i:02d}", delay=3600)
    first = client.get("/runs", params={"flow_name": flow.name}).text
    assert first.count(">bulk-") == 50
    older = re.search(r'<a rel="next" href="([^"]+)"', first)
    assert older and "flow_name=" in older.group(1)
    second = client.get(older.group(1).replace("&amp;", "&")).text
    assert second.count(">bulk-") == 5 and 'rel="next"' not in second
    assert "bulk-00" in second and "bulk-54" in first
    prefixed = client.get("/runs", params={"tracking_id_prefix": "bulk-5"}).text
    assert prefixed.count(">bulk-5") == 5 and "bulk-49" not in prefixed


@pytest.mark.parametrize(
    ("path", "params", "status", "says"),
    [
        ("/runs", {"status": "DONE"}, 400, "unknown status &#39;DONE&#39;"),
        ("/runs", {"since": "yesterday"}, 400, "a duration ago (30m, 2h, 7d)"),
        ("/runs", {"until": "2h"}, 400, "an ISO date or datetime"),
        ("/runs", {"after": "garbage"}, 400, "start from the first page"),
        ("/run", {}, 400, "Give its tracking_id"),
        ("/run", {"tracking_id": "no-such-run"}, 404, "was never enqueued, or it was pruned"),
        ("/failures", {"within": "2y"}, 400, "within must be one of 1h, 24h, 7d"),
    ],
)
def test_a_bad_request_gets_a_page_that_says_what_to_do(
    client: httpx.Client, path: str, params: dict[str, str], status: int, says: str
) -> None:
    """Filters and run names that cannot be used are refused with a message, not a traceback."""
    page = client.get(path, params=params)
    assert page.status_code == status
    assert says in page.text and "Traceback" not in page.text


def test_fragments_refresh_until_the_run_has_ended(client: httpx.Client, zoo: Zoo) -> None:
    """The overview and a run have fragments (no page around them); a live run's page
    asks for refresh, an ended run's fragment says it is done."""
    fragment = client.get("/fragments/overview").text
    assert "<html" not in fragment and "live workers" in fragment
    live = client.get("/run", params={"tracking_id": zoo.running}).text
    assert 'data-refresh="/fragments/run?tracking_id=report-4"' in live
    assert (
        "data-live-done"
        not in client.get("/fragments/run", params={"tracking_id": zoo.running}).text
    )
    ended = client.get("/fragments/run", params={"tracking_id": zoo.completed}).text
    assert "data-live-done" in ended and "<html" not in ended


# -- actions ------------------------------------------------------------------------------


def test_retry_and_cancel_with_credentials_act_and_show_the_run(
    client: httpx.Client, db: Storage, zoo: Zoo
) -> None:
    """With the credentials and the page's token, retry re-queues a failed run (which a
    worker then completes) and cancel cancels a running one."""
    zoo.repair()
    retried = post_action(client, "retry", zoo.repairable)
    assert retried.status_code == 303
    assert retried.headers["location"] == "/run?tracking_id=sync-3&notice=retried"
    eventually(lambda: status_of(db, zoo.repairable) == FlowStatus.COMPLETED)
    assert "Retry queued" in client.get(retried.headers["location"]).text

    cancelled = post_action(client, "cancel", zoo.running)
    assert cancelled.status_code == 303
    assert status_of(db, zoo.running) == FlowStatus.CANCELLED


def test_an_action_without_the_credentials_is_refused(
    client: httpx.Client, db: Storage, zoo: Zoo
) -> None:
    """No Authorization, a wrong password or a wrong user: 401 asking for Basic auth,
    and the run is untouched."""
    for auth in [None, ("ops", "wrong"), ("root", "correct horse")]:
        refused = post_action(client, "retry", zoo.failed, auth=auth)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Basic realm=")
        assert "need the dashboard" in refused.text
    assert status_of(db, zoo.failed) == FlowStatus.FAILED


def test_an_action_without_this_browsers_token_is_refused(
    client: httpx.Client, db: Storage, zoo: Zoo
) -> None:
    """With the right credentials, a form without the token, with another browser's
    token, or without the cookie (as another site's form would be) is refused."""
    base = str(client.base_url).rstrip("/")
    other_token = token_of(httpx.get(f"{base}/run", params={"tracking_id": zoo.running}))
    client.get("/")  # sets this client's cookie
    for data in [
        {"tracking_id": zoo.running},
        {"tracking_id": zoo.running, "csrf_token": other_token},
    ]:
        refused = client.post("/run/cancel", data=data, auth=AUTH)
        assert refused.status_code == 403 and "CSRF" in refused.text
    mine = token_of(client.get("/run", params={"tracking_id": zoo.running}))
    cookieless = httpx.post(
        f"{base}/run/cancel",
        data={"tracking_id": zoo.running, "csrf_token": mine},
        auth=AUTH,
    )
    assert cookieless.status_code == 403
    assert status_of(db, zoo.running) == FlowStatus.RUNNING


def test_a_refused_action_says_why(client: httpx.Client, zoo: Zoo) -> None:
    """Retrying a completed run or cancelling a failed one is refused by the storage:
    409 with its message."""
    page = client.get("/run", params={"tracking_id": zoo.running})
    for action, tracking_id, says in [
        ("retry", zoo.completed, "only a FAILED run can be retried"),
        ("cancel", zoo.failed, "only a pending or running run can be cancelled"),
    ]:
        refused = client.post(
            f"/run/{action}",
            data={"tracking_id": tracking_id, "csrf_token": token_of(page)},
            auth=AUTH,
        )
        assert refused.status_code == 409 and says in refused.text


def test_without_credentials_the_dashboard_is_read_only(db: Storage, zoo: Zoo) -> None:
    """No credentials given: no action form on any page, and every action is refused."""
    with serving(create_app(db, credentials=None)) as base:
        page = httpx.get(f"{base}/run", params={"tracking_id": zoo.failed})
        assert page.status_code == 200 and 'method="post"' not in page.text
        assert "Read-only" in page.text and "set-cookie" not in page.headers
        refused = httpx.post(f"{base}/run/retry", data={"tracking_id": zoo.failed}, auth=AUTH)
        assert refused.status_code == 403 and "read-only" in refused.text
    assert status_of(db, zoo.failed) == FlowStatus.FAILED


def test_credentials_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """$FLOWSMITH_DASHBOARD_PASSWORD enables actions (user admin unless
    $FLOWSMITH_DASHBOARD_USER); unset or empty, the dashboard is read-only."""
    assert Credentials.from_environment({}) is None
    assert Credentials.from_environment({"FLOWSMITH_DASHBOARD_PASSWORD": ""}) is None
    made = Credentials.from_environment({"FLOWSMITH_DASHBOARD_PASSWORD": "pw"})
    assert made == Credentials("admin", "pw") and "pw" not in repr(made)
    named = {"FLOWSMITH_DASHBOARD_PASSWORD": "pw", "FLOWSMITH_DASHBOARD_USER": "ops"}
    assert Credentials.from_environment(named) == Credentials("ops", "pw")
    assert Credentials("ops", "pw").admit("Bearer pw")
    assert not Credentials("ops", "pw").admit("Bearer pw2")
    assert not Credentials("ops", "pw").admit("Basic !!!")


# -- mounting and serving -----------------------------------------------------------------


def test_the_app_mounts_under_a_prefix_of_another_app(db: Storage, zoo: Zoo) -> None:
    """Mounted at /ops/flowsmith in a Starlette (or FastAPI) app, its links, assets,
    cookie and redirects all stay under that prefix."""
    outer = Starlette(routes=[Mount("/ops/flowsmith", create_app(db, credentials=CREDENTIALS))])
    with serving(outer) as base, httpx.Client(base_url=base) as session:
        page = session.get("/ops/flowsmith/run", params={"tracking_id": zoo.running})
        assert page.status_code == 200
        assert 'href="/ops/flowsmith/static/dashboard.css"' in page.text
        assert 'action="/ops/flowsmith/run/cancel"' in page.text
        assert "Path=/ops/flowsmith" in page.headers["set-cookie"]
        assert session.get("/ops/flowsmith/static/live.js").status_code == 200
        done = session.post(
            "/ops/flowsmith/run/cancel",
            data={"tracking_id": zoo.running, "csrf_token": token_of(page)},
            auth=AUTH,
        )
        assert done.status_code == 303
        assert done.headers["location"].startswith("/ops/flowsmith/run?tracking_id=report-4")


def test_an_unreachable_database_gets_a_page_without_its_password() -> None:
    """The database down: the pages answer 503 with the error, the URL's password hidden."""
    app = create_app(url="postgresql://ops:s3cret-pw@127.0.0.1:9/nowhere", credentials=None)
    with serving(app) as base:
        page = httpx.get(f"{base}/")
    assert page.status_code == 503
    assert "unavailable" in page.text or "cannot connect" in page.text
    assert "s3cret-pw" not in page.text and "Traceback" not in page.text


def test_flowsmith_dashboard_serves_until_interrupted(db_url: str, zoo: Zoo) -> None:
    """`flowsmith dashboard --url ... --port N` serves the pages; Ctrl+C stops it cleanly."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowsmith_worker",
            "dashboard",
            "--url",
            db_url,
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FLOWSMITH_DASHBOARD_PASSWORD": ""},
    )
    try:

        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/runs").status_code == 200
            except httpx.TransportError:
                return process.poll() is not None  # ended: fail below with its output

        eventually(answers, timeout=30, interval=0.2)
        assert process.poll() is None, process.communicate()
        assert zoo.failed in httpx.get(f"http://127.0.0.1:{port}/runs").text
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert f"FlowSmith dashboard on http://127.0.0.1:{port}/" in out and "read-only" in out


def test_flowsmith_dashboard_on_an_unmigrated_database_says_to_migrate(tmp_path: Path) -> None:
    """No tables yet: one line naming `flowsmith migrate`, exit 1, nothing served."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowsmith_worker",
            "dashboard",
            "--url",
            f"sqlite:///{tmp_path}/new.db",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "flowsmith migrate" in result.stderr and "Traceback" not in result.stderr


def test_flowsmith_dashboard_without_its_extra_says_what_to_install() -> None:
    """Without uvicorn (the dashboard extra), the command says which pip install to run;
    the rest of `flowsmith` works without it."""
    hide_uvicorn = (
        "import sys; sys.modules['uvicorn'] = None; "
        "from flowsmith_worker.cli import main; main(sys.argv[1:])"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide_uvicorn, "dashboard"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "pip install 'flowsmith-worker[dashboard]'" in result.stderr
    help_text = subprocess.run(
        [sys.executable, "-c", hide_uvicorn, "--help"], capture_output=True, text=True
    )
    assert help_text.returncode == 0 and "dashboard" in help_text.stdout
