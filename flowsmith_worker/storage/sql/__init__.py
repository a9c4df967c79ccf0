"""The SQL backend: one SqlStorage for SQLite, PostgreSQL and MySQL/MariaDB.

Its modules, each a part of that one class: storage (the Storage methods),
base (engine, connections, retries), enqueue, claim, finish (the batch write),
operators, context, attempts, dashboard (the read side), prepared (server-side
prepared statements), pooler (the transaction-pooler setting), notify
(LISTEN/NOTIFY), lent (a caller's transaction). Beside them: dialects/ (one
class per database: its SQL idioms and its error codes), schema.py (the tables
of the newest version) and migrations/ (each version's frozen step).
"""

from flowsmith_worker.storage.sql.storage import SqlStorage

__all__ = ["SqlStorage"]
