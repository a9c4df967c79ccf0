"""Database passwords never reach the operator: not in CLI output, errors or log lines.

Whatever shape the URL has (no `://`, libpq key=value, an unescaped `@` in the
password, the password quoted back by the driver), through the real command
line: click's CliRunner for the operator commands, real `flowsmith worker`
processes for the logs, against real PostgreSQL and MariaDB servers where the
driver gets to speak. Every case uses a password of its own, so one case's
redaction can never hide another's leak (redact() remembers passwords per process).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from flowsmith_worker.cli import main
from flowsmith_worker.config import redact, redact_url, secrets_in
from tests.servers import DatabaseServer

# Every command that opens the database, with arguments that get it that far.
COMMANDS = [
    ["migrate"],
    ["flows"],
    ["status", "order-1"],
    ["stats"],
    ["workers"],
    ["retry", "order-1"],
    ["cancel", "order-1"],
    ["prune", "--older-than", "1d"],
    ["queue-limit", "emails", "3"],
]


def secret() -> str:
    return f"Pw-{uuid.uuid4().hex[:10]}"


def shapes(password: str, tail: str) -> dict[str, str]:
    """URLs that once printed ``password`` (or ``tail``), by the way each went wrong."""
    return {
        "no-double-slash": f"postgresql:/fs:{password}@127.0.0.1:1/db",
        "no-colon": f"postgresql//fs:{password}@127.0.0.1:1/db",
        "libpq-keywords": f"host=127.0.0.1 port=1 user=fs password={password} dbname=db",
        "libpq-keywords-quoted": f"host=127.0.0.1 password='{password} {tail}' dbname=db",
        "unescaped-at-postgresql": f"postgresql://fs:{password}@{tail}@127.0.0.1:1/db",
        "unescaped-at-mysql": f"mysql://fs:{password}@{tail}@127.0.0.1:1/db",
        "password-in-query": f"postgresql://fs@127.0.0.1:1/db?password={password}",
        "garbage-port": f"postgresql://fs:{password}@db:port/x",
        "refused-postgresql": f"postgresql://fs:{password}@127.0.0.1:1/db",
        "refused-mysql": f"mysql://fs:{password}@127.0.0.1:1/db",
        # The driver quotes the host back, and here the host is the password.
        "quoted-back-postgresql": f"postgresql://fs:{password}@{password}/db",
        "quoted-back-mysql": f"mysql://fs:{password}@{password}/db",
        # No scheme: "fs:" looked like one. No host: nothing to stop at but the path.
        "no-scheme": f"fs:{password}@127.0.0.1:1/db",
        "no-host": f"postgresql://fs:{password}/db",
        "no-host-no-path": f"postgresql://fs:{password}",
    }


SHAPES = list(shapes("p", "t"))


def assert_hidden(text: str, *secrets: str) -> None:
    for hidden in secrets:
        assert hidden not in text, f"{hidden!r} printed:\n{text}"


@pytest.mark.parametrize("shape", SHAPES)
def test_no_command_prints_the_password_whatever_the_url_shape(shape: str) -> None:
    """Every command that opens the database fails with one line (exit 1, no
    traceback) that shows neither the password nor the pieces an unescaped @ cuts it into."""
    password, tail = secret(), secret()
    url = shapes(password, tail)[shape]
    for args in COMMANDS:
        result = CliRunner().invoke(main, [*args, "--url", url])
        assert result.exit_code == 1, (args, result.output)
        assert isinstance(result.exception, SystemExit), result.exc_info
        assert "Traceback" not in result.output
        assert_hidden(result.output, password, tail)
        assert "***" in result.output, result.output  # the URL is shown, redacted


@pytest.mark.parametrize("shape", ["unescaped-at-postgresql", "unescaped-at-mysql"])
def test_an_unescaped_at_is_refused_before_the_driver_sees_it(shape: str) -> None:
    """An @ inside the password would make the driver take its tail for the host name
    and print it: the URL is refused up front, saying to write the @ as %40."""
    password, tail = secret(), secret()
    result = CliRunner().invoke(main, ["flows", "--url", shapes(password, tail)[shape]])
    assert result.exit_code == 1
    assert "unescaped '@'" in result.output and "%40" in result.output
    assert "could not translate" not in result.output and "Can't connect" not in result.output


def run_worker(workdir: Path, url: str) -> subprocess.CompletedProcess[str]:
    """A `flowsmith worker` process with JSON logs, run until it gives up on ``url``."""
    (workdir / "noflows.py").write_text("")
    command = ["worker", "noflows", "--log-format", "json", "--url", url]
    return subprocess.run(
        [sys.executable, "-m", "flowsmith_worker", *command],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("shape", ["no-double-slash", "libpq-keywords", "unescaped-at-postgresql"])
def test_worker_process_output_has_no_password(shape: str, tmp_path: Path) -> None:
    """`flowsmith worker` with such a URL exits non-zero at once; neither its stdout nor
    its stderr (JSON log lines included) holds the password."""
    password, tail = secret(), secret()
    done = run_worker(tmp_path, shapes(password, tail)[shape])
    assert done.returncode == 1, done.stdout + done.stderr
    assert_hidden(done.stdout + done.stderr, password, tail)
    assert "Traceback" not in done.stderr


def real_server_urls(server: DatabaseServer, password: str, tail: str) -> dict[str, str]:
    """The server's own URL with a wrong password, or a wrong host, in several shapes."""
    real = sa.make_url(server.url_for("flowsmith_absent"))
    escaped = f"{password}%40{tail}"  # a correct %40: the server gets to refuse it

    def with_userinfo(userinfo: str, host: str = f"{real.host}:{real.port}") -> str:
        scheme = real.get_backend_name()
        return f"{scheme}://{userinfo}@{host}/{real.database}"

    return {
        "wrong-password": with_userinfo(f"{real.username}:{escaped}"),
        "wrong-password-unescaped-at": with_userinfo(f"{real.username}:{password}@{tail}"),
        # The driver names the host it cannot resolve: here it is the password.
        "wrong-host": with_userinfo(f"{real.username}:{password}", host=f"{password}:{real.port}"),
    }


@pytest.mark.parametrize("server_fixture", ["postgres_server", "mysql_server"])
def test_real_servers_refusing_a_login_never_reveal_the_password(
    request: pytest.FixtureRequest, server_fixture: str, tmp_path: Path
) -> None:
    """A real PostgreSQL or MariaDB refusing the password, or a host that does not
    resolve: every command and a worker process fail with a message, never the password."""
    server: DatabaseServer = request.getfixturevalue(server_fixture)
    password, tail = secret(), secret()
    for name, url in real_server_urls(server, password, tail).items():
        for args in (["migrate"], ["flows"], ["status", "x"]):
            result = CliRunner().invoke(main, [*args, "--url", url])
            assert result.exit_code == 1, (name, result.output)
            assert "Traceback" not in result.output
            assert_hidden(result.output, password, tail)
        worker = run_worker(tmp_path, url)
        assert worker.returncode == 1, (name, worker.stderr)
        assert_hidden(worker.stdout + worker.stderr, password, tail)
    refused = CliRunner().invoke(
        main, ["flows", "--url", real_server_urls(server, password, tail)["wrong-password"]]
    )
    # The server's own reason gets through, with the user name but no password.
    assert "authentication failed" in refused.output or "Access denied" in refused.output


def test_log_lines_never_carry_a_password_the_process_was_given(tmp_path: Path) -> None:
    """Log lines of a `flowsmith` process, tracebacks of chained driver errors
    included, have every password from a URL it was given replaced by ***."""
    password = secret()
    script = textwrap.dedent(
        f"""
        from flowsmith_worker.config import parse_database_url
        from flowsmith_worker.log import get_logger, setup_logging

        setup_logging("json")
        parse_database_url("postgresql://fs:{password}@db.example/app")
        log = get_logger("test")
        log.warning("database.unavailable", error="driver said: host {password!r}")
        try:
            try:
                raise OSError("connect to {password} failed")
            except OSError as exc:
                raise RuntimeError("wrapped") from exc
        except RuntimeError:
            log.exception("worker.loop_failed")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "worker.loop_failed" in done.stderr and "connect to *** failed" in done.stderr
    assert_hidden(done.stdout + done.stderr, password)


def test_redact_url_and_secrets_in_every_shape() -> None:
    """The redacted form of each shape keeps its user and host and hides the password;
    secrets_in finds the password, and the pieces an unescaped @ cuts it into."""
    assert redact_url("postgresql:/u:pw1@h/db") == "postgresql:/u:***@h/db"
    assert redact_url("postgresql//u:pw1@h/db") == "postgresql//u:***@h/db"
    assert redact_url("host=h password='a b' user=u") == "host=h password=*** user=u"
    assert redact_url("postgresql://u:pw-a@pw-b@h/db") == "postgresql://u:***@h/db"
    assert redact_url("mysql://u:pw1@h/db?passwd=x") == "mysql://u:***@h/db?passwd=***"
    assert secrets_in("postgresql://u:pw-a@pw-b@h/db") == {"pw-a@pw-b", "pw-a", "pw-b"}
    assert secrets_in("postgresql://u:p%40ss@h/db") == {"p%40ss", "p@ss"}
    assert secrets_in("host=h password=pw2") == {"pw2"}
    assert secrets_in("sqlite:///tmp/flowsmith.db") == set()
    # Too short to hide anything, and hiding it would blot out every "p" of a message.
    assert redact("cannot parse the URL", ["p"]) == "cannot parse the URL"
    assert redact("cannot parse the URL", ["parse"]) == "cannot *** the URL"
