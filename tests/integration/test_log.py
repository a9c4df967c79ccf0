"""The worker's console logs on text that anyone who enqueues a flow or raises in a step chose.

A real `flowsmith worker --log-format console` process (its stderr a file, so no
colours), and setup_logging on a stream that says it is a terminal (colours on).
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowsmith_worker import Flow
from flowsmith_worker.log import get_logger, setup_logging
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import FlowStatus, Storage
from tests.conftest import eventually
from tests.support.steps import never_here
from tests.worker_process import WorkerProcess

pytestmark = pytest.mark.slow

# Characters a terminal obeys rather than shows: ESC (clear the screen, retitle the
# window), BEL, the one-byte CSI, CR (overwrite the line), a bidi override.
RAW = ("\x1b", "\x07", "\x9b", "\r", "\u202e")
TRACKING_ID = "order-\x1b[2J\x07\r"
# No CR here: the worker logs an error's last line, and CR ends a line for splitlines().
ERROR = "card \x1b[2J\x1b]0;pwned\x07 declined\u202e\x9b31m"

FLOWS_MODULE = textwrap.dedent(
    f'''
    """Flows for tests/integration/test_log.py."""
    import os

    from flowsmith_worker import Flow


    def explode(ctx):
        raise ValueError({ERROR!r})


    flow = Flow(os.environ["FS_FLOW_NAME"]).step("pay\\x1b[8m", explode)
    '''
)


def test_console_logs_of_a_worker_show_escapes_escaped(
    tmp_path: Path, unique: Callable[[str], str]
) -> None:
    """A step whose flow name, step name, tracking_id and error carry escape sequences:
    the lines `flowsmith worker --log-format console` writes about it (step.failed)
    contain no raw ESC, BEL, CSI, CR or bidi override, and show them as \\x1b etc.
    instead."""
    (tmp_path / "escflows.py").write_text(FLOWS_MODULE)
    url = f"sqlite:///{tmp_path / 'esc.db'}"
    name = unique("esc") + "\x1b[1m"
    storage = create_storage(url)
    storage.migrate()
    worker = WorkerProcess(
        tmp_path,
        url,
        dict(os.environ, FS_FLOW_NAME=name),
        "--log-format",
        "console",
        "--poll-interval",
        "0.1",
        module="escflows",
    )
    try:
        Flow(name, storage=storage).step("pay\x1b[8m", never_here).run({}, tracking_id=TRACKING_ID)
        eventually(lambda: _status(storage, TRACKING_ID) == FlowStatus.FAILED, timeout=20)
        eventually(lambda: b"step.failed" in worker.log_path.read_bytes(), timeout=10)
        worker.signal()
        assert worker.wait(15) == 0, worker.output()
        written = worker.log_path.read_bytes().decode("utf-8")
    finally:
        worker.cleanup()
        storage.close()
    for char in RAW:
        assert char not in written, (char, written)
    assert r"order-\x1b[2J\x07\r" in written
    assert r"\x1b]0;pwned\x07 declined\u202e\x9b31m" in written
    assert r"pay\x1b[8m" in written


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """setup_logging configures the root logger and logging's switches for the process:
    put back what was there."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    switches = ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing")
    saved = {name: getattr(logging, name) for name in switches}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in saved.items():
        setattr(logging, name, value)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Hostile:
    def __repr__(self) -> str:
        return "hostile\x1b[2J"


# The colours the console renderer itself writes: Select Graphic Rendition only.
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def test_coloured_console_logs_escape_values_and_tracebacks(
    restored_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal (colours on) the only escape sequences in a line are the renderer's
    own colours: a tracking_id, an error, an object whose repr is hostile and the
    message of a logged exception's traceback are shown escaped."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    setup_logging("console")
    log = get_logger("test")
    log.warning("step.failed", tracking_id=TRACKING_ID, error=ERROR, value=_Hostile())
    try:
        raise ValueError(ERROR)
    except ValueError:
        log.exception("worker.loop_failed")

    written = terminal.getvalue()
    assert _SGR.search(written), "colours are on: the test would prove nothing otherwise"
    uncoloured = _SGR.sub("", written)
    for char in RAW:
        assert char not in uncoloured, (char, written)
    assert r"order-\x1b[2J\x07\r" in uncoloured
    assert r"hostile\x1b[2J" in uncoloured
    assert r"ValueError: card \x1b[2J\x1b]0;pwned\x07 declined\u202e\x9b31m" in uncoloured


def _status(storage: Storage, tracking_id: str) -> FlowStatus | None:
    record = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
    return None if record is None else record.status


def test_json_lines_carry_a_utc_iso_timestamp(
    restored_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each JSON line's timestamp is the time it was logged, in UTC, written as
    structlog's ISO stamper writes it (microseconds, a trailing Z)."""
    import datetime
    import json

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging("json")
    before = datetime.datetime.now(datetime.UTC)
    get_logger("test").info("step.completed", seconds=0.1)
    after = datetime.datetime.now(datetime.UTC)
    stamp = json.loads(stream.getvalue())["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamp), stamp
    logged = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before - datetime.timedelta(microseconds=1) <= logged <= after


# A process of a user's application: its own logging set-up (SETUP), then flowsmith
# imported, configured, a flow enqueued and run to its end by a Worker in-process.
APP_SCRIPT = textwrap.dedent(
    """
    import logging
    import sys

    SETUP

    from flowsmith_worker import Flow, Worker, configure

    storage = configure(sys.argv[1])
    storage.migrate()
    Flow("quiet").step("one", lambda ctx: 1).run({}, tracking_id="t-1")
    Worker(storage, poll_interval=0.05).run_until_idle(timeout=30)
    """
)


def _run_app(tmp_path: Path, setup: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "app.py"
    script.write_text(APP_SCRIPT.replace("SETUP", setup))
    done = subprocess.run(
        [sys.executable, str(script), f"sqlite:///{tmp_path / 'app.db'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize(
    "setup",
    ["", "logging.basicConfig(level=logging.WARNING)"],
    ids=["no-logging-setup", "basicConfig-WARNING"],
)
def test_an_application_sees_nothing_below_its_level(tmp_path: Path, setup: str) -> None:
    """Importing the library, configuring it, enqueuing and running a flow print nothing,
    to stdout or stderr, in an application that configured no logging, or WARNING."""
    done = _run_app(tmp_path, setup)
    assert (done.stdout, done.stderr) == ("", "")


def test_an_application_at_debug_gets_the_events_through_its_own_handler(tmp_path: Path) -> None:
    """With logging.basicConfig(level=DEBUG) and a plain format, the library's events
    arrive through the application's handler, from flowsmith_worker.* loggers, as
    "event key=value" lines."""
    done = _run_app(
        tmp_path,
        'logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s %(message)s")',
    )
    lines = done.stderr.splitlines()
    assert "DEBUG flowsmith_worker.flow flow.enqueued flow=quiet tracking_id=t-1" in "\n".join(
        lines
    ), done.stderr
    completed = [line for line in lines if " step.completed " in line]
    assert completed and completed[0].startswith("INFO flowsmith_worker.executor "), lines
    assert "tracking_id=t-1" in completed[0] and "step=one" in completed[0], completed
    assert done.stdout == ""


def test_worker_log_level_warning_writes_warnings_and_errors_only(
    tmp_path: Path, unique: Callable[[str], str]
) -> None:
    """`flowsmith worker --log-level WARNING`: a step that fails for good is logged
    (step.failed, a warning), its start-up and the step lines below WARNING are not."""
    (tmp_path / "escflows.py").write_text(FLOWS_MODULE)
    url = f"sqlite:///{tmp_path / 'level.db'}"
    name = unique("level")
    storage = create_storage(url)
    storage.migrate()
    env = dict(os.environ, FS_FLOW_NAME=name)
    worker = WorkerProcess(
        tmp_path, url, env, "--log-level", "warning", "--poll-interval", "0.1", module="escflows"
    )
    try:
        Flow(name, storage=storage).step("pay\x1b[8m", never_here).run({}, tracking_id="t-1")
        eventually(lambda: _status(storage, "t-1") == FlowStatus.FAILED, timeout=20)
        eventually(lambda: b"step.failed" in worker.log_path.read_bytes(), timeout=10)
        worker.signal()
        assert worker.wait(15) == 0, worker.output()
        lines = worker.log_lines()
    finally:
        worker.cleanup()
        storage.close()
    assert "step.failed" in [line["event"] for line in lines]
    assert {line["level"] for line in lines} <= {"warning", "error"}, lines


def test_the_cli_renders_other_loggers_lines_too_redacted(
    restored_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under setup_logging (what `flowsmith worker` calls), a line of the user's own
    module (stdlib logging, %-style arguments, a traceback) becomes a JSON line like
    ours, with its level and logger name, and without a database password we know."""
    import json

    from flowsmith_worker.config import remember_secrets

    remember_secrets("postgresql://app:Hunter2-S3cret@db/app")
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging("json", "INFO")
    app_log = logging.getLogger("myapp.billing")
    app_log.debug("not shown: below the level")
    try:
        raise ConnectionError("login Hunter2-S3cret refused")
    except ConnectionError:
        app_log.exception("charging %s failed", "order-7")
    (line,) = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["event"] == "charging order-7 failed"
    assert (line["level"], line["logger"]) == ("error", "myapp.billing")
    assert "ConnectionError: login *** refused" in line["exception"]
    assert "Hunter2-S3cret" not in stream.getvalue()


def test_an_application_using_structlog_processor_formatter_gets_our_fields() -> None:
    """An application whose handler uses structlog's ProcessorFormatter (structlog's
    own stdlib integration) renders the library's events field by field."""
    import json

    import structlog

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ]
        )
    )
    logger = logging.getLogger("flowsmith_worker")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        get_logger("flowsmith_worker.executor").bind(step="pay").info("step.completed", seconds=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert json.loads(stream.getvalue()) == {"step": "pay", "seconds": 1, "event": "step.completed"}
