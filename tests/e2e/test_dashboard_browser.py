"""The dashboard in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium,
never a downloaded browser) against a real server on a SQLite database with runs in
every state and a worker thread (tests/dashboard_support.py).

The screenshots of the main pages go to $FLOWSMITH_SCREENSHOTS_DIR when it is set
(the README's come from `FLOWSMITH_SCREENSHOTS_DIR=.github/screenshots`), else to
the test's temporary directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from flowsmith_worker.dashboard import Credentials, create_app
from flowsmith_worker.storage.base import FlowStatus, Storage
from tests.conftest import eventually
from tests.dashboard_support import (  # noqa: F401 - the *_fixture: fixtures
    XSS,
    Zoo,
    db_fixture,
    db_url_fixture,
    serving,
    status_of,
    zoo_fixture,
)

CHROMIUM = Path("/usr/bin/chromium")
CREDENTIALS = Credentials("ops", "correct horse")
LOGIN = {"username": "ops", "password": "correct horse"}
SCREEN = {"width": 1280, "height": 860}
# Long enough for a step and two refreshes on a busy machine.
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium from Debian's package (.ci/run installs it), headless."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package")
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=str(CHROMIUM))
        yield launched
        launched.close()


@pytest.fixture
def base(db: Storage, zoo: Zoo) -> Iterator[str]:
    """The dashboard's URL, refreshing live pages every half second."""
    with serving(create_app(db, credentials=CREDENTIALS, refresh_seconds=0.5)) as url:
        yield url


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page of a browser that knows the dashboard's credentials."""
    context = browser.new_context(http_credentials=LOGIN, viewport=SCREEN)
    yield context.new_page()
    context.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("FLOWSMITH_SCREENSHOTS_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def status_badge(page: Page) -> Locator:
    return page.locator("h1 .status")


def test_each_page_loads_filters_and_opens_a_run(
    base: str, page: Page, zoo: Zoo, screenshots: Path
) -> None:
    """Overview, runs, a filter, a run (its steps, subflow link and attempts), the
    failures and workers pages all load in Chromium; screenshots of each."""
    page.goto(f"{base}/")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.locator(".card.FAILED .count")).to_have_text("2")
    page.screenshot(path=screenshots / "overview.png", full_page=True)

    page.get_by_role("link", name="Runs", exact=True).click()
    for tracking_id in zoo.tracking_ids():
        expect(page.get_by_role("link", name=tracking_id, exact=True)).to_be_visible()
    page.screenshot(path=screenshots / "runs.png", full_page=True)
    page.get_by_label("Status").select_option("FAILED")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"/runs\?status=FAILED&"))
    rows = page.locator("table.runs tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.filter(has_text=zoo.failed)).to_have_count(1)
    expect(rows.filter(has_text=zoo.repairable)).to_have_count(1)

    page.goto(f"{base}/runs")
    page.get_by_role("link", name=zoo.completed, exact=True).click()
    expect(status_badge(page)).to_have_text("COMPLETED")
    expect(page.locator(".stage.parallel .step")).to_have_count(2)
    page.get_by_role("link", name=zoo.child).click()
    expect(page.get_by_text("Subflow of")).to_be_visible()
    page.get_by_role("link", name=zoo.completed).click()
    for details in page.locator("details").all():
        details.locator("summary").click()
    page.screenshot(path=screenshots / "run.png", full_page=True)

    page.goto(f"{base}/run?tracking_id={zoo.failed}")
    expect(page.get_by_text("retried \N{MULTIPLICATION SIGN}1")).to_be_visible()
    page.get_by_role("link", name="Failures").click()
    expect(page.locator("table.failures tbody tr")).to_have_count(2)
    page.screenshot(path=screenshots / "failures.png", full_page=True)
    page.get_by_role("link", name="Workers").click()
    expect(page.locator("table tbody tr")).to_have_count(1)
    page.screenshot(path=screenshots / "workers.png", full_page=True)


def test_a_script_in_a_step_output_shows_as_text(base: str, page: Page, zoo: Zoo) -> None:
    """A step output holding <script> and an onerror image is shown as those characters;
    neither runs (the page title stays the dashboard's)."""
    page.goto(f"{base}/run?tracking_id={zoo.completed}")
    page.locator("details").first.locator("summary").click()
    output = page.locator("pre.output").first
    expect(output).to_contain_text('<script>document.title = \\"owned\\"</script>')
    assert XSS.startswith("<script>")
    assert page.title() == f"Run {zoo.completed} · FlowSmith"
    assert page.locator("img[src=x]").count() == 0


def test_retry_a_failed_run_and_watch_it_complete_live(
    base: str, page: Page, db: Storage, zoo: Zoo
) -> None:
    """Retry in the browser re-queues the failed run; the page, never reloaded, shows
    it RUNNING and then COMPLETED through its live refresh."""
    zoo.repair(then_wait=True)
    page.goto(f"{base}/run?tracking_id={zoo.repairable}")
    expect(status_badge(page)).to_have_text("FAILED")
    page.get_by_role("button", name="Retry failed steps").click()
    expect(page.get_by_text("Retry queued")).to_be_visible()
    eventually(lambda: status_of(db, zoo.repairable) == FlowStatus.RUNNING)
    page.evaluate("window.notReloaded = true")
    zoo.proceed.set()
    expect(status_badge(page)).to_have_text("COMPLETED", timeout=WAIT_MS)
    assert page.evaluate("window.notReloaded") is True


def test_cancel_a_running_run(base: str, page: Page, db: Storage, zoo: Zoo) -> None:
    """Cancel in the browser: the run is CANCELLED, and the page says what that means."""
    page.goto(f"{base}/run?tracking_id={zoo.running}")
    page.get_by_role("button", name="Cancel run").click()
    expect(status_badge(page)).to_have_text("CANCELLED")
    expect(page.get_by_text("pending steps never start")).to_be_visible()
    assert status_of(db, zoo.running) == FlowStatus.CANCELLED


def test_an_action_without_credentials_is_refused(
    base: str, browser: Browser, db: Storage, zoo: Zoo
) -> None:
    """A browser without the dashboard's credentials (or with wrong ones) sees the Retry
    button, but pressing it is refused with 401; the run stays FAILED."""
    for credentials in [None, {"username": "ops", "password": "guess"}]:
        context = browser.new_context(http_credentials=credentials)
        page = context.new_page()
        page.goto(f"{base}/run?tracking_id={zoo.failed}")
        with page.expect_response(f"{base}/run/retry") as answer:
            page.get_by_role("button", name="Retry failed steps").click()
        assert answer.value.status == 401
        context.close()
    assert status_of(db, zoo.failed) == FlowStatus.FAILED


def test_every_page_is_readable_and_usable_without_javascript(
    base: str, browser: Browser, db: Storage, zoo: Zoo
) -> None:
    """With JavaScript off, every page shows its content and the forms still work."""
    context = browser.new_context(java_script_enabled=False, http_credentials=LOGIN)
    page = context.new_page()
    page.goto(f"{base}/")
    expect(page.locator(".card.RUNNING .count")).to_have_text("1")
    page.goto(f"{base}/runs?status=PENDING")
    expect(page.get_by_role("link", name=zoo.pending, exact=True)).to_be_visible()
    page.goto(f"{base}/run?tracking_id={zoo.running}")
    page.get_by_role("button", name="Cancel run").click()
    expect(status_badge(page)).to_have_text("CANCELLED")
    for path in ["/failures", "/workers"]:
        page.goto(f"{base}{path}")
        expect(page.locator("table tbody tr").first).to_be_visible()
    context.close()
    assert status_of(db, zoo.running) == FlowStatus.CANCELLED
