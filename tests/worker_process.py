"""A real `flowsmith worker` subprocess for tests that send signals and read logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class WorkerProcess:
    """A `flowsmith worker MODULE` subprocess whose output (stdout and stderr) goes to a file."""

    def __init__(
        self, workdir: Path, url: str, env: dict[str, str], *args: str, module: str
    ) -> None:
        self.log_path = workdir / f"worker-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        command = [sys.executable, "-m", "flowsmith_worker", "worker", module, "--url", url]
        self.proc = subprocess.Popen(
            [*command, "--log-format", "json", *args],
            cwd=workdir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.output().splitlines() if line.strip()]

    def wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while '"worker.started"' not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not started after {timeout} s:\n{self.output()}")
            time.sleep(0.05)

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> float:
        """Send ``sig``; return the monotonic time it was sent."""
        os.kill(self.pid, sig)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.pid} still running {timeout} s later:\n{self.output()[-3000:]}"
            ) from None

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
