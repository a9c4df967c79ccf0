"""`flowsmith status` (flowsmith_worker/cli/status.py) and what the listings share with it:
--watch, relative times, delayed starts, tables within 100 columns, --wide, colour.

Runs are real, on real databases; the commands run through click's CliRunner.
Nothing sleeps: --watch's pause is replaced by one that moves the run on (real
claims and writes on the database), and the views are rendered for a chosen
"now" where a test needs an exact time.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable

import click
import pytest
from click.testing import CliRunner

from flowsmith_worker import Flow
from flowsmith_worker.cli import main
from flowsmith_worker.cli import status as cli_status
from flowsmith_worker.cli.format import (
    TABLE_WIDTH,
    Styled,
    format_table,
)
from flowsmith_worker.readable import (
    format_both,
    format_relative,
    iso_time,
)
from flowsmith_worker.storage.base import Lease, Storage
from tests.integration.conftest import Db
from tests.support.cli import (
    cli,
    cli_json,
    doomed,
    iso_seconds,
    ok,
    row_of,
    run_line,
)

Names = Callable[[str], str]


def claim(storage: Storage, step: str) -> Lease:
    """Claim the one runnable step of the default queue, checked to be ``step``."""
    (claimed,) = storage.claim_nodes(worker_id="w", limit=1, lease_seconds=60, queues=["default"])
    assert claimed.step_name == step
    return claimed.lease


def frames(output: str) -> int:
    """How many times the run was printed."""
    return sum(1 for line in output.splitlines() if line.startswith("Run "))


# -- --watch ------------------------------------------------------------------------------


def test_watch_prints_the_run_again_as_it_moves_on_until_it_ends(
    db: Db, unique: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--watch reads the run after each pause and, off a terminal, prints it again only
    when it moved on, until it ends; it then exits with the run's code (1: FAILED)."""
    flow = Flow(unique("watched"), storage=db.storage).step("first", ok).step("second", doomed)
    tracking_id = unique("watched")
    flow.run(tracking_id=tracking_id)
    pauses: list[float] = []

    def move_on(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 2:
            db.storage.complete_node(lease=claim(db.storage, "first"), output={"a": 1})
        if len(pauses) == 3:
            lease = claim(db.storage, "second")
            db.storage.fail_node(lease=lease, error="ValueError: no", retry_delay=None)

    monkeypatch.setattr(cli_status, "pause", move_on)
    result = cli(db.url, "status", tracking_id, "--watch", "--interval", "1.5s")
    assert result.exit_code == 1, result.output
    assert pauses == [1.5, 1.5, 1.5]
    # The first pause changed nothing: three pictures for three states.
    assert frames(result.stdout) == 3
    statuses = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("Status")]
    assert statuses == ["PENDING", "RUNNING", "FAILED"]
    assert "ValueError: no" in result.stdout.split("Status    FAILED")[1]


def test_watch_of_a_completed_run_prints_it_once_and_exits_0(
    sqlite_db: Db, unique: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--watch of a run that has ended prints it once, never pauses, and exits 0 for
    COMPLETED; --watch with --json is a usage error (exit 2)."""
    flow = Flow(unique("done"), storage=sqlite_db.storage).step("only", ok)
    tracking_id = unique("done")
    flow.run(tracking_id=tracking_id)
    sqlite_db.storage.complete_node(lease=claim(sqlite_db.storage, "only"), output=None)

    def never(seconds: float) -> None:
        raise AssertionError("an ended run is not watched")

    monkeypatch.setattr(cli_status, "pause", never)
    result = cli(sqlite_db.url, "status", tracking_id, "--watch")
    assert result.exit_code == 0, result.output
    assert frames(result.stdout) == 1 and run_line(result.stdout, "Status") == "COMPLETED"
    both = cli(sqlite_db.url, "status", tracking_id, "--watch", "--json")
    assert both.exit_code == 2 and "choose one" in both.output


def test_ctrl_c_ends_the_watch_quietly_with_exit_130(
    sqlite_db: Db, unique: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while --watch waits ends it with exit code 130 (as a shell reports SIGINT),
    no traceback, no "Aborted!", nothing on stderr."""
    flow = Flow(unique("pending"), storage=sqlite_db.storage).step("only", ok)
    tracking_id = unique("pending")
    flow.run(tracking_id=tracking_id)

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_status, "pause", interrupted)
    result = cli(sqlite_db.url, "status", tracking_id, "--watch")
    assert result.exit_code == 130, result.output
    assert frames(result.stdout) == 1
    assert result.stderr == "" and "Aborted" not in result.output


# -- times ----------------------------------------------------------------------------------


def test_a_delayed_run_and_a_step_waiting_for_its_retry_say_when_they_start(
    db: Db, unique: Names
) -> None:
    """A run enqueued with a delay shows when it starts (relative and UTC), its first step
    "in ..." (--wide: "due <time>"), --json its run_after in ISO-8601; a step waiting for
    its retry's backoff shows when it runs again, and its run no start."""
    flow = Flow(unique("later"), storage=db.storage).step("first", doomed, retries=1)
    delayed, retrying = unique("delayed"), unique("retrying")
    flow.run(tracking_id=delayed, delay=600)

    shown = cli(db.url, "status", delayed)
    assert shown.exit_code == 0, shown.output
    in_ten_minutes = r"in (9m5\ds|10m00s)"
    assert re.fullmatch(rf".*Z \({in_ten_minutes}\)", run_line(shown.stdout, "Starts"))
    assert re.fullmatch(in_ten_minutes, " ".join(row_of(shown.stdout, "first")[4:6]))
    wide = row_of(cli(db.url, "status", delayed, "--wide").stdout, "first")
    assert wide[4] == "due" and wide[5].endswith("Z")
    [step] = cli_json(db.url, "status", delayed)["steps"]
    assert 590 < iso_seconds(step["run_after"]) - db.storage.current_time() <= 600

    flow.run(tracking_id=retrying)
    lease = claim(db.storage, "first")
    db.storage.fail_node(lease=lease, error="ValueError: later", retry_delay=120)
    waiting = cli(db.url, "status", retrying)
    assert run_line(waiting.stdout, "Status") == "RUNNING"
    assert "Starts" not in waiting.stdout
    first = row_of(waiting.stdout, "first")
    assert first[2:4] == ["PENDING", "1/2"]
    assert re.fullmatch(r"in (1m5\ds|2m00s)", " ".join(first[4:6]))


def test_relative_times_count_from_the_database_clock_not_this_hosts(
    db: Db, unique: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With this host's clock two hours ahead, a run created just now is still "Ns ago"
    in `flows` and a run delayed by 10 minutes still starts "in 10m" in `status`: the
    stored times and "now" both come from the database clock."""
    flow = Flow(unique("clock"), storage=db.storage).step("only", ok)
    recent, delayed = unique("recent"), unique("delayed")
    flow.run(tracking_id=recent)
    flow.run(tracking_id=delayed, delay=600)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 7200)

    listed = row_of(cli(db.url, "flows").stdout, recent)
    assert re.fullmatch(r"\d+s", listed[3]) and listed[4] == "ago", listed
    starts = run_line(cli(db.url, "status", delayed).stdout, "Starts")
    assert re.fullmatch(r".*\(in (9m5\ds|10m00s)\)", starts)


def test_relative_times_are_measured_from_the_clock_given() -> None:
    """Relative times count from the "now" given (the database clock), past and future, in
    two units at most; --json times are ISO-8601 UTC to the millisecond; a hand-edited
    value is UNREADABLE (null in JSON), not a traceback."""
    now = 1_714_564_803.0
    assert format_relative(now - 3.4, now) == "3s ago"
    assert format_relative(now, now) == "0s ago"
    assert format_relative(now - 185, now) == "3m05s ago"
    assert format_relative(now - 7260, now) == "2h01m ago"
    assert format_relative(now - 3 * 86400 - 4 * 3600, now) == "3d04h ago"
    assert format_relative(now + 25, now) == "in 25s"
    assert format_relative(now + 599.6, now) == "in 10m00s"
    assert format_relative(None, now) == "-"
    assert format_relative("abc", now) == "UNREADABLE"  # type: ignore[arg-type]
    assert format_relative(float("inf"), now) == "UNREADABLE"
    assert format_both(now - 60, now) == "2024-05-01T11:59:03Z (1m00s ago)"
    assert iso_time(1_714_564_803.9) == "2024-05-01T12:00:03.900Z"
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"
    assert iso_time("abc") is None and iso_time(float("nan")) is None and iso_time(None) is None


def test_status_renders_any_moment_from_the_records_and_a_given_now(
    sqlite_db: Db, unique: Names
) -> None:
    """The status view is a function of the records and "now": the same run read once
    shows "5s ago" or "2h00m ago" depending only on the clock it is given."""
    flow = Flow(unique("moment"), storage=sqlite_db.storage).step("only", ok)
    tracking_id = unique("moment")
    flow.run(tracking_id=tracking_id)
    sqlite_db.storage.complete_node(lease=claim(sqlite_db.storage, "only"), output=None)
    snapshot = cli_status.read_snapshot(sqlite_db.storage, tracking_id)
    finished = snapshot.flow.finished_at
    assert finished is not None

    def at(now: float) -> str:
        return cli_status.render_run(dataclasses.replace(snapshot, now=now), wide=False)

    assert "(5s ago), after" in run_line(at(finished + 5), "Finished")
    assert "(2h00m ago), after" in run_line(at(finished + 7200), "Finished")
    assert row_of(at(finished + 7200), "only")[4:6][1] == "ago"


# -- width, --wide, colour ---------------------------------------------------------------------


def test_tables_fit_100_columns_and_wide_shows_every_cell_whole(db: Db, unique: Names) -> None:
    """A 200-character tracking id and a long error: every line of `flows` and `status`
    fits 100 columns, the long cells cut with "..."; --wide prints them whole, with the
    queue and the UTC times."""
    long_error = "ValueError: " + ", ".join(["the card was declined"] * 10)
    flow = Flow(unique("wide"), storage=db.storage).step("a_step_name_of_some_length", ok)
    tracking_id = unique("t") + "x" * 180
    flow.run(tracking_id=tracking_id)
    lease = claim(db.storage, "a_step_name_of_some_length")
    db.storage.fail_node(lease=lease, error=long_error, retry_delay=None)

    for args in (["flows"], ["status", tracking_id]):
        narrow = cli(db.url, *args)
        assert narrow.exit_code in (0, 1), narrow.output
        assert max(len(line) for line in narrow.stdout.splitlines()) <= TABLE_WIDTH
        assert tracking_id not in narrow.stdout and long_error not in narrow.stdout
        assert "..." in narrow.stdout
        wide = cli(db.url, *args, "--wide")
        assert tracking_id in wide.stdout and long_error in wide.stdout
        assert max(len(line) for line in wide.stdout.splitlines()) > TABLE_WIDTH
    assert "QUEUE" in cli(db.url, "flows", "--wide").stdout
    assert "QUEUE" not in cli(db.url, "flows").stdout


def test_format_table_narrows_the_columns_named_widest_first() -> None:
    """Given a width, only the columns named in shrink narrow, the widest first, and never
    below their floor; without one nothing is cut; Styled cells align as plain text."""
    rows: list[list[object]] = [["a" * 60, "short", 7, "E" * 80]]
    headers = ("ID", "NAME", "N", "ERROR")
    lines = format_table(headers, rows, width=100, shrink=("ID", "ERROR")).splitlines()
    assert max(len(line) for line in lines) == 100
    id_cell, name, number, error = lines[1].split()
    assert (name, number) == ("short", "7")
    assert id_cell == "a" * 41 + "..." and error == "E" * 41 + "..."
    assert "a" * 60 in format_table(headers, rows)
    floor = format_table(headers, rows, width=10, shrink=("ID", "ERROR")).splitlines()[1]
    assert floor.split()[0] == "a" * 7 + "..."

    plain = format_table(("S", "N"), [["FAILED", 1], ["OK", 22]])
    styled = format_table(("S", "N"), [[Styled("FAILED", fg="red"), 1], ["OK", 22]])
    assert "\x1b[31m" in styled and click.unstyle(styled) == plain


def test_colour_only_on_a_terminal_and_never_under_no_color(sqlite_db: Db, unique: Names) -> None:
    """Statuses are coloured when the output is a terminal (CliRunner's color=True), plain
    in a pipe or a file, and plain on a terminal too when NO_COLOR is set."""
    flow = Flow(unique("red"), storage=sqlite_db.storage).step("only", doomed)
    tracking_id = unique("red")
    flow.run(tracking_id=tracking_id)
    lease = claim(sqlite_db.storage, "only")
    sqlite_db.storage.fail_node(lease=lease, error="ValueError: declined", retry_delay=None)
    red = click.style("FAILED", fg="red", bold=True)
    runner = CliRunner()
    for args in (["status", tracking_id], ["flows"]):
        command = [*args, "--url", sqlite_db.url]
        terminal = runner.invoke(main, command, color=True)
        assert red in terminal.stdout, terminal.output
        piped = runner.invoke(main, command)
        assert "FAILED" in piped.stdout and "\x1b[" not in piped.stdout
        no_color = runner.invoke(main, command, color=True, env={"NO_COLOR": "1"})
        assert "FAILED" in no_color.stdout and "\x1b[" not in no_color.stdout
