"""The chaos run's short fixed-seed pass (issue 11, point 5), one per backend.

Real `flowsmith worker` processes, real servers, real SIGKILLs, SIGTERMs,
database crashes and killed connections; then every check of
tests/torture/chaos_check.py. The long run is ``make torture``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.test_database_outage import _durable_commits
from tests.servers import DatabaseServer, LocalServer, require_restart
from tests.torture.chaos import Database, Settings, play, summary
from tests.torture.chaos_check import check_round

pytestmark = pytest.mark.slow
SEED = 20261201
RUNS = 60
SECONDS = 20.0


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path, unique: Callable[[str], str]
) -> Database:
    """A fresh database; on a server, committing durably (a crash then loses nothing)."""
    if request.param == "sqlite":
        path = tmp_path / "chaos.db"
        return Database(f"sqlite:///{path}", "sqlite", path=path)
    server: DatabaseServer = request.getfixturevalue(
        "postgres_server" if request.param == "postgresql" else "mysql_server"
    )
    require_restart(server)
    assert isinstance(server, LocalServer)
    name = f"t_{unique('c')[-12:]}"
    url = server.create_database(name)
    _durable_commits(server, name)
    return Database(url, request.param, server, name)


def test_a_short_chaos_run_keeps_every_promise(database: Database, tmp_path: Path) -> None:
    """60 runs under 20 s of SIGKILLs, SIGTERMs, database crashes and killed connections
    (fixed seed): every run ends as the model says for its script, the journal and the
    trace agree, no completed step ran again, no two attempts of a node overlapped,
    nothing is left running."""
    played = play(Settings(SEED, database.kind, SECONDS, RUNS), database, tmp_path)
    print(summary(played))
    assert played.record.harms, "the chaos did nothing"
    assert check_round(played, database.url) == []
