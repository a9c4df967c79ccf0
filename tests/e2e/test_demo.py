"""`flowsmith demo`: every order completed despite the killed workers, and on a terminal
its progress bar, its estimate, its closing hints."""

from __future__ import annotations

import os
import pty
import re
import select
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowsmith_worker.demo import Pace

# What a terminal shows of a line: the text after its last carriage return, without
# the escape sequences (colours, cursor, "clear to the end of the line").
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# The venv's own scripts, and a PATH without them: a shell where the venv is not active.
VENV_BIN = Path(sys.executable).parent
PLAIN_PATH = "/usr/local/bin:/usr/bin:/bin"


def run_on_a_terminal(command: list[str], cwd: Path, timeout: float = 120) -> str:
    """What ``command`` writes to a pseudo-terminal, as it wrote it."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        cwd=cwd,
        env={**os.environ, "PATH": PLAIN_PATH, "COLUMNS": "160"},
    )
    os.close(terminal)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: the process closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
    finally:
        os.close(controller)
        process.wait(timeout=30)
    assert process.returncode == 0, output.decode(errors="replace")
    return output.decode(errors="replace")


def shown_lines(output: str) -> list[str]:
    return [
        ESCAPES.sub("", line.split("\r")[-1]) for line in output.replace("\r\n", "\n").split("\n")
    ]


@pytest.mark.slow
def test_the_demo_on_a_terminal_keeps_its_bar_whole_and_its_hints_work(tmp_path: Path) -> None:
    """The SIGKILL line clears the bar's line and the bar goes on under it (no broken bar
    left above), and the closing hint names a command that runs where the venv is not on
    PATH."""
    output = run_on_a_terminal(
        [str(VENV_BIN / "flowsmith"), "demo", "--flows", "60", "--db", str(tmp_path / "d.db")],
        cwd=tmp_path,
    )
    lines = shown_lines(output)
    bars = [line for line in lines if "flows finished" in line]
    assert bars and all("60/60" in bar for bar in bars), bars  # only the finished bar stays
    assert any(line.startswith("  SIGKILL -> worker 1 (pid ") for line in lines), lines
    (hint,) = [line for line in lines if line.startswith("What happened to one order?")]
    command = shlex.split(hint.split("?", 1)[1])
    assert command[0] == str(VENV_BIN / "flowsmith")  # PATH would not find `flowsmith`
    status = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PATH": PLAIN_PATH},
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert "order_00042" in status.stdout


def test_the_time_left_comes_from_the_steps_pace_not_from_the_start_up() -> None:
    """Worker start-up (no step ending) counts for nothing: the estimate is the steps left
    over the pace since the first step ended. (click's own estimate, the time since the
    bar appeared over the flows finished, said 63 s for a 9 s demo.)"""
    pace = Pace(total_steps=1200)
    assert pace.seconds_left(0.0, 0) is None  # the workers are starting
    assert pace.seconds_left(1.5, 0) is None
    assert pace.seconds_left(1.6, 20) is None  # the first steps ended: the pace starts here
    assert pace.seconds_left(2.6, 220) == pytest.approx(980 / 200)
    assert pace.seconds_left(3.6, 420) == pytest.approx(780 / 200)
    assert pace.seconds_left(9.0, 1200) == 0


def test_the_demo_completes_every_order_and_rescues_the_killed_workers_steps(
    tmp_path: Path,
) -> None:
    """`flowsmith demo` (what `make demo` runs) ends with every flow completed."""
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowsmith_worker",
            "demo",
            "--flows",
            "60",
            "--db",
            str(tmp_path / "demo.db"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SIGKILL -> worker 1" in done.stdout
    assert "flows completed   60" in done.stdout
    assert "steps completed   240" in done.stdout
    assert time.monotonic() - started < 60
