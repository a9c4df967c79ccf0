"""Behind a connection pooler in transaction mode: one setting, no session state.

A pooler in transaction mode (PgBouncer's ``pool_mode = transaction``, pgcat,
RDS Proxy once pinning is avoided) may run each transaction on another server
connection, so anything a session holds is lost or, worse, lands on another
client: a PREPAREd statement is missing (or already exists) on the next
connection, and a LISTEN registers some server connection, whose
notifications then reach whichever client uses it next, never the listener.

FLOWSMITH_PG_POOLER=transaction turns off everything of that kind at once:
prepared statements (as FLOWSMITH_PG_PREPARE=off alone does) and the worker's
LISTEN (as ``--no-listen`` does: it polls). The rest of FlowSmith holds nothing
across transactions: no SET, no temporary table, and the one advisory lock
(``flowsmith migrate`` on PostgreSQL) is pg_advisory_xact_lock, released at
commit. ``session`` (or unset) is a direct connection or a pooler in session
mode, where a connection is the client's for as long as it is open.

Set it in every process that reaches the database through such a pooler (the
workers and the application that enqueues): it is read from the environment
when a storage is created, so a URL in code needs no change.
"""

from __future__ import annotations

import os

from flowsmith_worker.errors import InvalidSetting

POOLER_ENV = "FLOWSMITH_PG_POOLER"
TRANSACTION = "transaction"
SESSION = "session"


def transaction_pooling() -> bool:
    """Whether FLOWSMITH_PG_POOLER says a pooler in transaction mode is in the way.

    A value we do not know is refused: a typo must not quietly leave prepared
    statements and LISTEN on behind PgBouncer.
    """
    value = os.environ.get(POOLER_ENV, "").strip().lower()
    if value in ("", SESSION):
        return False
    if value == TRANSACTION:
        return True
    raise InvalidSetting(
        f"{POOLER_ENV}={os.environ[POOLER_ENV]!r} is not a pooler mode: set it to "
        f"{TRANSACTION!r} behind PgBouncer in transaction mode (or pgcat, RDS Proxy), "
        f"{SESSION!r} or nothing for a direct connection or a pooler in session mode"
    )
