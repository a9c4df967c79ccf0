"""``python -m tests.servers up|down``: the servers of ``make db-up`` when Docker is not there."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tests.servers.admin import URL_ENV, ServerUnavailable
from tests.servers.fixtures import STARTERS
from tests.servers.mariadb import MariaDBServer
from tests.servers.postgres import PostgresServer
from tests.servers.process import LocalServer

SERVER_CLASSES: dict[str, type[LocalServer]] = {
    "postgresql": PostgresServer,
    "mysql": MariaDBServer,
}
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _up(base_dir: Path, fast: bool) -> int:
    started = 0
    for kind, starter in STARTERS.items():
        try:
            server = starter(base_dir, fast, detached=True)
        except ServerUnavailable as exc:
            print(f"*** SKIPPED {kind}: {exc.reason}", file=sys.stderr)
            continue
        url = server.create_database("flowsmith", exist_ok=True)
        print(f"{URL_ENV[kind]}={url}", flush=True)
        print(f"{kind}: port {server.port}, data {server.data_dir}", file=sys.stderr)
        started += 1
    print(
        f"stop with: python -m tests.servers down --dir {base_dir}",
        file=sys.stderr,
    )
    return 0 if started else 1


def _down(base_dir: Path) -> int:
    for kind, server_class in SERVER_CLASSES.items():
        server = server_class.load(base_dir, kind)
        if server is None:
            continue
        was_running = server.is_running()
        server.stop()
        print(f"{kind}: {'stopped' if was_running else 'was not running'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``up`` / ``down`` for the Makefile's db-up / db-down without Docker."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.servers",
        description="Start or stop the test database servers (db-up / db-down without Docker).",
    )
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument(
        "--dir",
        type=Path,
        default=_REPO_ROOT / ".dbdata",
        help="data directory (default: .dbdata/ in the repo)",
    )
    parser.add_argument(
        "--durable", action="store_true", help="keep fsync and friends on (for benchmarks)"
    )
    args = parser.parse_args(argv)
    base_dir: Path = args.dir.resolve()
    if args.command == "up":
        return _up(base_dir, fast=not args.durable)
    return _down(base_dir)


if __name__ == "__main__":
    sys.exit(main())
