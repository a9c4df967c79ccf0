"""Real PostgreSQL and MariaDB servers, started from local binaries.

Why this exists: the engine's guarantees (SKIP LOCKED claiming, lease expiry,
surviving a database restart) only mean something when checked against real
servers, and CI machines here have no Docker. So the test suite, and
``make db-up`` when no Docker engine answers, start throwaway servers from the
distribution packages (``apt-get install postgresql mariadb-server``).

One module per part: admin.py (any server: per-test databases, the login),
process.py (the process, port and data-directory plumbing of a server we run),
postgres.py and mariadb.py (how to run each), fixtures.py (the pytest session
fixtures), __main__.py (``up`` / ``down``).

Layout under a base directory (``tmp_path_factory`` in tests, ``.dbdata/`` for
``make db-up``)::

    postgresql/        data directory (see new_data_dir for when it lives elsewhere:
                       tests put data on /dev/shm, which is 10-30x faster here)
    postgresql.log     server output
    postgresql.json    port / data dir / settings, so ``down`` and a second
                       ``up`` find the server again
    mariadb/ mariadb.log mysql.json   the same for MariaDB

Every server has a superuser ``flowsmith`` with password ``flowsmith-secret``
that has to be sent over TCP, so tests can check passwords never reach logs.

pytest: the session fixtures ``postgres_server`` / ``mysql_server`` start one
server of each kind per session, or use $FLOWSMITH_TEST_POSTGRES_URL /
$FLOWSMITH_TEST_MYSQL_URL. Missing binaries skip those tests, or fail them
when FLOWSMITH_REQUIRE_DATABASES=1 (CI).

Command line::

    python -m tests.servers up [--dir DIR] [--durable]   # prints FLOWSMITH_TEST_*_URL=...
    python -m tests.servers down [--dir DIR]
"""

from tests.servers.admin import (
    PASSWORD,
    REQUIRE_ENV,
    USER,
    DatabaseServer,
    ServerUnavailable,
)
from tests.servers.fixtures import mysql_server, postgres_server, require_restart
from tests.servers.mariadb import find_mariadb, start_mariadb
from tests.servers.postgres import find_postgres, start_postgres
from tests.servers.process import LocalServer

__all__ = [
    "PASSWORD",
    "REQUIRE_ENV",
    "USER",
    "DatabaseServer",
    "LocalServer",
    "ServerUnavailable",
    "find_mariadb",
    "find_postgres",
    "mysql_server",
    "postgres_server",
    "require_restart",
    "start_mariadb",
    "start_postgres",
]
