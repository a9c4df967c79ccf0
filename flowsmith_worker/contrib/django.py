"""Enqueue in a Django transaction: ``flow.run(..., connection=django.db.connection)``.

The run is written on Django's own DBAPI connection (psycopg 3, which Django
prefers, psycopg2 or sqlite3), inside its transaction: it commits with the
surrounding ``transaction.atomic()`` block or rolls back with it. Outside any
atomic block the enqueue is a transaction of its own, as a Django ORM write
is. The enqueue joins the caller's block without a savepoint, as the ORM's
own multi-statement writes (``save()``, ``bulk_create()``) do: an error while
enqueuing (a tracking_id of another flow, a completed run) marks the whole
block for rollback, so an order is never committed without its flow. Wrap the
call in an atomic block of its own to catch such an error and go on.

The flow's storage (``configure()``) must be on the database Django's
connection is on, with the ``fs_*`` tables (``flowsmith migrate``): its
workers run the run once Django commits.

Django is imported only when a Django connection is passed: this module
needs nothing of it otherwise.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


def is_django_connection(connection: Any) -> bool:
    """Whether ``connection`` is a Django database connection (or django.db.connection)."""
    if "django.db" not in sys.modules:
        return False  # nobody imported Django, so this cannot be one of its connections
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.utils.connection import ConnectionProxy

    return isinstance(connection, BaseDatabaseWrapper | ConnectionProxy)


@contextlib.contextmanager
def transaction_of(connection: Any) -> Iterator[Any]:
    """The DBAPI connection of Django's ``connection``, in its transaction; the
    storage lends it to SQLAlchemy (storage/sql/lent.py), so this module needs
    nothing of ours.

    ``atomic(savepoint=False)``: inside the caller's atomic block it joins that
    block's transaction; outside one it is a transaction of its own.
    """
    from django.db import transaction

    with transaction.atomic(using=connection.alias, savepoint=False):
        connection.ensure_connection()
        yield connection.connection
