"""Database errors are told apart by their code, never by their words (storage/sql/dialects/).

Every code we classify, built in memory as each driver builds its exceptions, with
the code set and a message in another language; English words with another code
are not misread. The errors provoked on real servers: tests/integration/test_dialect_errors.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import mysql.connector.errors
import psycopg.errors
import psycopg2
import psycopg2.errors
import pytest
import sqlalchemy as sa

from flowsmith_worker.storage.sql import prepared as sql_prepared
from flowsmith_worker.storage.sql.dialects import DbError, Dialect
from flowsmith_worker.storage.sql.dialects.mysql import MYSQL
from flowsmith_worker.storage.sql.dialects.postgresql import POSTGRESQL
from flowsmith_worker.storage.sql.dialects.sqlite import SQLITE
from tests.support.dbapi import wrapped

# -- errors built as the drivers build them --------------------------------------------


def _psycopg2_error(sqlstate: str, message: str) -> sa.exc.DBAPIError:
    """psycopg2's exception for ``sqlstate``, with the code set as it sets it
    (its pgcode is read-only: unpickling is the driver's own way to fill it)."""
    error = psycopg2.errors.lookup(sqlstate)(message)
    error.__setstate__({"pgerror": message, "pgcode": sqlstate})
    return wrapped(error, psycopg2.Error)


def _mysql_error(errno: int, message: str) -> sa.exc.DBAPIError:
    """mysql-connector's exception for ``errno``, from its own factory."""
    error = mysql.connector.errors.get_mysql_exception(errno, message, None)
    return wrapped(error, mysql.connector.errors.Error)


def _sqlite_error(code: int, message: str) -> sa.exc.DBAPIError:
    """sqlite3's exception with the extended result code, as Python 3.11+ sets it."""
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code
    return wrapped(error, sqlite3.Error)


# Each code we classify, with its error message in German, French or Spanish.
_BUILT: list[tuple[Dialect, Callable[[], sa.exc.DBAPIError], DbError]] = [
    (POSTGRESQL, lambda: _psycopg2_error("40P01", "Verklemmung entdeckt"), DbError.DEADLOCK),
    (
        POSTGRESQL,
        lambda: _psycopg2_error("40001", "konnte Zugriff nicht serialisieren"),
        DbError.SERIALIZATION_FAILURE,
    ),
    (
        POSTGRESQL,
        lambda: _psycopg2_error("55P03", "Abbruch wegen Sperrzeitüberschreitung"),
        DbError.LOCK_TIMEOUT,
    ),
    *(
        (POSTGRESQL, (lambda s=s: _psycopg2_error(s, "Verbindung abgebrochen")), kind)
        for s, kind in [
            ("08000", DbError.CONNECTION_LOST),
            ("08003", DbError.CONNECTION_LOST),
            ("08006", DbError.CONNECTION_LOST),
            ("08007", DbError.CONNECTION_LOST),
            ("57P01", DbError.CONNECTION_LOST),
            ("57P02", DbError.CONNECTION_LOST),
            ("25P03", DbError.CONNECTION_LOST),
            ("57P05", DbError.CONNECTION_LOST),
            ("08001", DbError.CANNOT_CONNECT),
            ("08004", DbError.CANNOT_CONNECT),
            ("57P03", DbError.CANNOT_CONNECT),
            ("53300", DbError.TOO_MANY_CONNECTIONS),
            ("25006", DbError.READ_ONLY),
            ("23505", DbError.UNIQUE_VIOLATION),
            ("42P01", DbError.UNDEFINED_TABLE),
            ("42703", DbError.UNDEFINED_COLUMN),
        ]
    ),
    *(
        (MYSQL, (lambda n=n: _mysql_error(n, "Le serveur a répondu autrement")), kind)
        for n, kind in [
            (1213, DbError.DEADLOCK),
            (1205, DbError.LOCK_TIMEOUT),
            (3572, DbError.LOCK_TIMEOUT),
            (1020, DbError.SERIALIZATION_FAILURE),
            (2006, DbError.CONNECTION_LOST),
            (2013, DbError.CONNECTION_LOST),
            (2055, DbError.CONNECTION_LOST),
            (1053, DbError.CONNECTION_LOST),
            (1927, DbError.CONNECTION_LOST),
            (4031, DbError.CONNECTION_LOST),
            (2002, DbError.CANNOT_CONNECT),
            (2003, DbError.CANNOT_CONNECT),
            (1040, DbError.TOO_MANY_CONNECTIONS),
            (1203, DbError.TOO_MANY_CONNECTIONS),
            (1226, DbError.TOO_MANY_CONNECTIONS),
            (1290, DbError.READ_ONLY),
            (1792, DbError.READ_ONLY),
            (1836, DbError.READ_ONLY),
            (1062, DbError.UNIQUE_VIOLATION),
            (1586, DbError.UNIQUE_VIOLATION),
            (1146, DbError.UNDEFINED_TABLE),
            (1054, DbError.UNDEFINED_COLUMN),
        ]
    ),
    *(
        (SQLITE, (lambda c=c: _sqlite_error(c, "la base de datos está bloqueada")), kind)
        for c, kind in [
            (sqlite3.SQLITE_BUSY, DbError.BUSY),
            (sqlite3.SQLITE_BUSY_SNAPSHOT, DbError.BUSY),
            (sqlite3.SQLITE_LOCKED, DbError.BUSY),
            (sqlite3.SQLITE_READONLY, DbError.READ_ONLY),
            (sqlite3.SQLITE_CANTOPEN, DbError.CANNOT_CONNECT),
            (sqlite3.SQLITE_CONSTRAINT_UNIQUE, DbError.UNIQUE_VIOLATION),
            (sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY, DbError.UNIQUE_VIOLATION),
        ]
    ),
]


@pytest.mark.parametrize(("dialect", "build", "kind"), _BUILT)
def test_each_code_is_classified_whatever_the_language(
    dialect: Dialect, build: Callable[[], sa.exc.DBAPIError], kind: DbError
) -> None:
    """Every code we classify, built by its driver with a message in another language,
    is the kind its code says; conflicts are run again, the unavailable are transient."""
    error = build()
    assert dialect.classify(error) is kind
    assert dialect.is_conflict(error) == (
        kind in {DbError.DEADLOCK, DbError.SERIALIZATION_FAILURE, DbError.LOCK_TIMEOUT}
    )
    if kind in {DbError.UNIQUE_VIOLATION, DbError.UNDEFINED_TABLE, DbError.UNDEFINED_COLUMN}:
        assert not dialect.is_transient(error)
    else:
        assert dialect.is_transient(error)


def test_psycopg3_reports_its_code_as_sqlstate() -> None:
    """psycopg (3), the driver of Django connections lent to FlowSmith, names it sqlstate."""
    error = psycopg.errors.lookup("40P01")("Verklemmung entdeckt")
    assert POSTGRESQL.classify(error) is DbError.DEADLOCK


@pytest.mark.parametrize(
    ("dialect", "build", "kind"),
    [
        (
            POSTGRESQL,
            lambda: _psycopg2_error("23505", "ERROR: deadlock detected"),
            DbError.UNIQUE_VIOLATION,
        ),
        (
            POSTGRESQL,
            lambda: _psycopg2_error(
                "22001", 'could not serialize access; relation "fs_flows" does not exist'
            ),
            None,
        ),
        (
            MYSQL,
            lambda: _mysql_error(
                1064, "Lock wait timeout exceeded; Table 'fs_flows' doesn't exist"
            ),
            None,
        ),
        (
            MYSQL,
            lambda: _mysql_error(1062, "Deadlock found when trying to get lock"),
            DbError.UNIQUE_VIOLATION,
        ),
        (
            SQLITE,
            lambda: _sqlite_error(
                sqlite3.SQLITE_CONSTRAINT_CHECK, "deadlock: no such table: fs_flows"
            ),
            None,
        ),
    ],
)
def test_english_words_with_another_code_are_not_misread(
    dialect: Dialect, build: Callable[[], sa.exc.DBAPIError], kind: DbError | None
) -> None:
    """A message naming a deadlock, a lock timeout or a missing table, with a code that
    means something else, is what its code says; none is a conflict."""
    error = build()
    assert dialect.classify(error) is kind
    assert not dialect.is_conflict(error)


def test_a_changed_plan_of_a_prepared_statement_is_known_by_its_code() -> None:
    """0A000 on EXECUTE of one of our prepared statements, in German ("gecachter Plan
    darf den Ergebnistyp nicht ändern"), is a lost statement to prepare afresh; the
    same code on a PREPARE of ours (a fresh plan) or on another statement is not."""
    error = _psycopg2_error("0A000", "gecachter Plan darf den Ergebnistyp nicht ändern").orig
    assert sql_prepared.is_lost_statement(error, "EXECUTE fs_claim(1)")
    assert not sql_prepared.is_lost_statement(error, "PREPARE fs_claim AS SELECT 1")
    assert not sql_prepared.is_lost_statement(error, "SELECT 1")
