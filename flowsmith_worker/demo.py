"""`flowsmith demo`: order flows on SQLite, flaky APIs, and a worker killed mid-run."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from flowsmith_worker.examples.orders import order_flow
from flowsmith_worker.log import setup_logging
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import FlowStatus, NodeStatus, Stats, Storage

DEMO_LEASE_SECONDS = 3
DEMO_CONCURRENCY = 8
KILL_AT_FRACTION = 0.35
DEMO_DEADLINE_SECONDS = 120


def run_demo(db_path: str, flow_count: int, worker_count: int) -> None:
    setup_logging(level="WARNING")  # the workers' logs go to files; keep this screen for the story
    url = _fresh_database(db_path)
    storage = create_storage(url)
    storage.migrate()
    click.echo(f"Enqueuing {flow_count} order flows into {db_path} ...")
    for i in range(flow_count):
        order_flow.storage = storage
        order_flow.run(
            {"product_id": f"p{i % 17}", "user_id": f"user{i}"}, tracking_id=f"order_{i:05d}"
        )
    click.echo(
        f"Starting {worker_count} `flowsmith worker` processes (logs: {db_path}.worker-N.log)"
    )
    workers = [_start_worker(url, db_path, n) for n in range(1, worker_count + 1)]
    started = time.monotonic()
    try:
        _watch(storage, flow_count, workers)
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in workers:
            proc.wait(timeout=30)
    elapsed = time.monotonic() - started
    _summary(storage.stats(), elapsed, url)
    storage.close()


def _fresh_database(db_path: str) -> str:
    for suffix in ("", "-wal", "-shm"):
        Path(db_path + suffix).unlink(missing_ok=True)
    return f"sqlite:///{db_path}"


def _start_worker(url: str, db_path: str, number: int) -> subprocess.Popen[bytes]:
    log = open(f"{db_path}.worker-{number}.log", "wb")  # noqa: SIM115 - lives as long as the worker
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowsmith_worker",
            "worker",
            "flowsmith_worker.examples.orders",
            "--url",
            url,
            "--concurrency",
            str(DEMO_CONCURRENCY),
            "--poll-interval",
            "0.1",
            "--lease",
            str(DEMO_LEASE_SECONDS),
            "--log-format",
            "json",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _finished(stats: Stats) -> int:
    counts = stats.flows_by_status
    return counts.get(FlowStatus.COMPLETED, 0) + counts.get(FlowStatus.FAILED, 0)


_ENDED_STEPS = (NodeStatus.COMPLETED, NodeStatus.FAILED, NodeStatus.SKIPPED, NodeStatus.CANCELLED)


def _steps_ended(stats: Stats) -> int:
    return sum(stats.nodes_by_status.get(status, 0) for status in _ENDED_STEPS)


@dataclass
class Pace:
    """Seconds left, from the pace of the steps since the first one ended.

    Not click's estimate: that divides the time since the bar appeared by the
    flows finished, and a flow finishes only with its last step, so the
    workers' start-up and the first flows' earlier steps made its first
    estimates several times too long. Steps end at a steady pace from the start.
    """

    total_steps: int
    first_at: float | None = None
    first_ended: int = 0

    def seconds_left(self, now: float, ended: int) -> float | None:
        """The estimate at ``now`` with ``ended`` steps ended; None before there is a pace."""
        if self.first_at is None:
            if ended:
                self.first_at, self.first_ended = now, ended
            return None
        if ended <= self.first_ended or now <= self.first_at:
            return None
        per_second = (ended - self.first_ended) / (now - self.first_at)
        return max(0, self.total_steps - ended) / per_second


def _time_left(seconds: float | None) -> str | None:
    if seconds is None or seconds < 0.5:  # no pace yet, or done: "about 0 s" says nothing
        return None
    return f"about {seconds:.0f} s left"


def _watch(storage: Storage, flow_count: int, workers: list[subprocess.Popen[bytes]]) -> None:
    killed = False
    deadline = time.monotonic() + DEMO_DEADLINE_SECONDS
    pace = Pace(total_steps=flow_count * sum(len(stage) for stage in order_flow.stages))
    with click.progressbar(
        length=flow_count,
        label="flows finished",
        show_pos=True,
        show_eta=False,
        item_show_func=_time_left,
    ) as bar:
        done = 0
        while done < flow_count:
            if time.monotonic() > deadline:
                raise click.ClickException(f"the demo did not finish in {DEMO_DEADLINE_SECONDS} s")
            time.sleep(0.2)
            stats = storage.stats()
            now_done = _finished(stats)
            left = pace.seconds_left(time.monotonic(), _steps_ended(stats))
            if left is not None and not killed:
                left += DEMO_LEASE_SECONDS  # the rescue after the kill waits out a lease
            bar.update(now_done - done, current_item=left)
            done = now_done
            if not killed and done >= flow_count * KILL_AT_FRACTION:
                victim = workers[0]
                victim.send_signal(signal.SIGKILL)
                killed = True
                _print_above_the_bar(
                    f"  SIGKILL -> worker 1 (pid {victim.pid}) in the middle of its steps; "
                    f"the others rescue them once the {DEMO_LEASE_SECONDS} s lease expires."
                )


def _print_above_the_bar(text: str) -> None:
    """``text`` on a line of its own, the progress bar drawn again under it at its next update.

    On a terminal the bar's line is cleared first: ending it with a newline
    would leave a broken bar behind. Elsewhere click draws no bar.
    """
    if sys.stdout.isatty():
        click.echo("\r\x1b[K", nl=False)
    click.echo(text)


def _summary(stats: Stats, elapsed: float, url: str) -> None:
    nodes = sum(stats.nodes_by_status.values())
    completed_steps = stats.nodes_by_status.get("COMPLETED", 0)
    retries = stats.attempts - nodes - stats.rescues
    click.echo("")
    click.echo("Summary")
    click.echo(f"  flows completed   {stats.flows_by_status.get('COMPLETED', 0)}")
    click.echo(f"  flows failed      {stats.flows_by_status.get('FAILED', 0)}")
    click.echo(f"  steps completed   {completed_steps}")
    click.echo(f"  retries           {max(retries, 0)}  (after fake API errors)")
    click.echo(f"  rescued steps     {stats.rescues}  (in flight on the killed worker)")
    click.echo(f"  steps per second  {completed_steps / elapsed:.0f}  ({elapsed:.1f} s wall clock)")
    click.echo("")
    command = _flowsmith_command()
    click.echo(f"What happened to one order?   {command} status order_00042 --url {url}")
    click.echo(f"And to all of them?           {command} stats --url {url}")


def _flowsmith_command() -> str:
    """`flowsmith` as the user's shell can run it: the script of this venv, by its path,
    unless PATH already finds that script (the venv is active)."""
    script = Path(sys.executable).parent / "flowsmith"
    if not script.exists():  # not installed as a script: run as `python -m flowsmith_worker`
        return f"{shlex.quote(sys.executable)} -m flowsmith_worker"
    found = shutil.which("flowsmith")
    if found and Path(found).resolve() == script.resolve():
        return "flowsmith"
    relative = os.path.relpath(script)
    return shlex.quote(relative if not relative.startswith("..") else str(script))
