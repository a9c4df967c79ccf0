"""Fixtures shared by every tier of the suite (tests/README.md says which test goes where).

``storage`` runs a test on every backend: memory, sqlite, and the real
PostgreSQL and MariaDB servers that tests/servers/ starts once per session;
``sql_url`` and ``database_url`` give a fresh database of one SQL backend. A
fixture only one tier uses lives in that tier's conftest.py. With
FLOWSMITH_TEST_THROUGH_PGBOUNCER=1 every PostgreSQL database is reached through
PgBouncer in transaction mode (tests/servers/pgbouncer.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowsmith_worker.flow import registry
from flowsmith_worker.log import LogEvent
from flowsmith_worker.storage import InMemoryStorage, create_storage
from flowsmith_worker.storage import reset as reset_default_storage
from flowsmith_worker.storage.base import Storage
from tests.servers import DatabaseServer
from tests.servers.fixtures import mysql_server, postgres_server  # noqa: F401 - fixtures
from tests.servers.pgbouncer import bouncer_database, pgbouncer, through_pgbouncer  # noqa: F401 - fixtures

BACKENDS = ["memory", "sqlite", "postgresql", "mysql"]
SQL_BACKENDS = ["sqlite", "postgresql", "mysql"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the server they need, so `make test-unit` can leave them out.

    A test needs a server when one of its parameters is the backend's name
    ("postgresql", "mysql": the ``backend`` and ``sql_url`` fixtures) or when it
    asks for the server fixture itself.
    """
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = [str(value) for value in callspec.params.values()] if callspec else []
        fixtures = set(getattr(item, "fixturenames", ()))
        if {"postgresql", "postgres_server"} & {*params, *fixtures}:
            item.add_marker("postgres")
        if {"mysql", "mysql_server"} & {*params, *fixtures}:
            item.add_marker("mysql")


def database_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    """A fresh, empty database of that backend for this test."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'flowsmith.db'}"
    server: DatabaseServer = request.getfixturevalue(
        "postgres_server" if backend == "postgresql" else "mysql_server"
    )
    name = f"t_{uuid.uuid4().hex[:12]}"
    url = server.create_database(name)
    request.addfinalizer(lambda: server.drop_database(name))
    if backend == "postgresql" and through_pgbouncer():
        return str(request.getfixturevalue("pgbouncer").url_for(name))
    return url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def storage(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[Storage]:
    """A migrated storage on each backend, closed after the test."""
    made: Storage = (
        InMemoryStorage()
        if backend == "memory"
        else create_storage(database_url(request, backend, tmp_path))
    )
    made.migrate()
    yield made
    made.close()


@pytest.fixture(params=SQL_BACKENDS)
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, unmigrated database URL on each SQL backend."""
    return database_url(request, str(request.param), tmp_path)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Names unique to this test, so flows registered by name never collide."""
    suffix = uuid.uuid4().hex[:8]
    made: list[str] = []

    def name(base: str) -> str:
        made.append(f"{base}_{suffix}{len(made)}")
        return made[-1]

    yield name  # type: ignore[misc]
    for flow_name in made:
        registry.unregister(flow_name)


@pytest.fixture(autouse=True)
def _no_default_storage() -> Iterator[None]:
    """No test leaks its configure() into the next one."""
    yield
    reset_default_storage()


@pytest.fixture(scope="session")
def _span_collector() -> Any:
    """The process's OpenTelemetry tracer provider, set once (OpenTelemetry allows no
    other), exporting to an in-memory exporter that keeps spans only while a test asks
    for them (``spans``). Imported here, not at the top: a session that never asks runs
    without OpenTelemetry, as an application that does not trace."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    class Collector(InMemorySpanExporter):
        collecting = False

        def export(self, spans: Any) -> SpanExportResult:
            return super().export(spans) if self.collecting else SpanExportResult.SUCCESS

    collector = Collector()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(collector))
    trace.set_tracer_provider(provider)
    return collector


@pytest.fixture
def spans(_span_collector: Any) -> Iterator[Any]:
    """An InMemorySpanExporter holding the spans this process ended during the test."""
    _span_collector.clear()
    _span_collector.collecting = True
    yield _span_collector
    _span_collector.collecting = False
    _span_collector.clear()


class _CapturedEvents(logging.Handler):
    """Keeps the fields of each of the library's events, and its level as ``log_level``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, LogEvent):
            self.events.append({**record.msg, "log_level": record.levelname.lower()})


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every event the library logs during the test, DEBUG included, as dicts."""
    logger = logging.getLogger("flowsmith_worker")
    handler, level = _CapturedEvents(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.events
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {check}")
        time.sleep(interval)
