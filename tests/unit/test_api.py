"""The public API around the engine: configuration, the registry, backoff, and
passwords kept out of help texts. In process, on SQLite files or in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import tenacity
from click.testing import CliRunner

import flowsmith_worker as flowsmith
from flowsmith_worker import (
    DuplicateFlowName,
    Flow,
    FlowSmithNotConfigured,
    InMemoryStorage,
    InvalidFlowDefinition,
    errors,
)
from flowsmith_worker.cli import main
from flowsmith_worker.config import DEFAULT_DATABASE_URL, resolve_database_url
from flowsmith_worker.retry import as_wait_strategy, retry_delay
from flowsmith_worker.storage.sql import SqlStorage

Names = Callable[[str], str]


# -- configuration ----------------------------------------------------------------------


def test_url_order_is_argument_then_flowsmith_then_database_url_then_sqlite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FLOWSMITH_DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert resolve_database_url(None) == DEFAULT_DATABASE_URL == "sqlite:///flowsmith.db"
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db/app")
    assert resolve_database_url(None) == "postgresql://app@db/app"
    monkeypatch.setenv("FLOWSMITH_DATABASE_URL", "mysql://fs@db/fs")
    assert resolve_database_url(None) == "mysql://fs@db/fs"
    assert resolve_database_url("sqlite:///given.db") == "sqlite:///given.db"


def test_configure_without_a_url_uses_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLOWSMITH_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    storage = flowsmith.configure(pool_min=1, pool_max=2, pool_timeout=5)
    assert isinstance(storage, SqlStorage)
    assert str(tmp_path / "env.db") in storage.url_for_display


def test_running_a_flow_unconfigured_says_how_to_configure(
    monkeypatch: pytest.MonkeyPatch, unique: Names
) -> None:
    monkeypatch.delenv("FLOWSMITH_DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    flow = Flow(unique("f")).step("a", lambda ctx: 1)
    with pytest.raises(FlowSmithNotConfigured, match=r"flowsmith\.configure"):
        flow.run({})


def test_bad_pool_settings_are_refused_when_configured() -> None:
    with pytest.raises(ValueError, match="pool_min"):
        flowsmith.configure("sqlite:///x.db", pool_min=5, pool_max=2)


# -- the registry -------------------------------------------------------------------------


def test_a_second_different_flow_of_the_same_name_is_an_error(unique: Names) -> None:
    name = unique("orders")
    Flow(name)
    with pytest.raises(DuplicateFlowName, match=name):
        Flow(name)


def test_mistakes_in_a_flow_built_by_hand_are_invalid_flow_definitions(unique: Names) -> None:
    """Flow's builder refuses a definition that cannot run with InvalidFlowDefinition (a
    FlowSmithError, exit code 1), saying which flow and what is wrong: a step name
    twice, nested parallel groups, a run of a flow without steps, or a run started
    inside the flow's own parallel() block. A duplicate flow name is one too."""
    storage = InMemoryStorage()
    flow = Flow(unique("by_hand"), storage=storage).step("a", lambda ctx: 1)
    with pytest.raises(InvalidFlowDefinition, match="already has a step named 'a'") as raised:
        flow.step("a", lambda ctx: 2)
    assert raised.value.exit_code == 1
    nested = pytest.raises(InvalidFlowDefinition, match="parallel groups cannot nest")
    with nested, flow.parallel(), flow.parallel():
        pass
    inside = pytest.raises(InvalidFlowDefinition, match="inside its own parallel")
    with inside, flow.parallel():
        flow.step("b", lambda ctx: 2)
        flow.run({})
    with pytest.raises(InvalidFlowDefinition, match="has no steps"):
        Flow(unique("empty"), storage=storage).run({})
    assert issubclass(DuplicateFlowName, InvalidFlowDefinition)


def test_the_same_definition_executed_again_replaces_the_old_one(unique: Names) -> None:
    """A module imported twice (as __main__ and by name, or reloaded) is not a conflict."""
    name = unique("reloaded")
    flows = [Flow(name) for _ in range(2)]  # one source line: the same definition site
    assert flowsmith.flow.registry.lookup(name) is flows[1]


def test_a_flow_input_must_be_json(unique: Names) -> None:
    flow = Flow(unique("f"), storage=InMemoryStorage()).step("a", lambda ctx: 1)
    with pytest.raises(flowsmith.FlowSmithError, match="JSON"):
        flow.run({"when": object()})


def test_overlong_tracking_ids_are_refused_before_the_database(unique: Names) -> None:
    flow = Flow(unique("f"), storage=InMemoryStorage()).step("a", lambda ctx: 1)
    with pytest.raises(ValueError, match="255"):
        flow.run({}, tracking_id="x" * 256)


def test_every_error_a_caller_can_catch_is_exported() -> None:
    """Each FlowSmithError subclass is importable from the package and listed in __all__,
    so applications catch our errors without importing private modules."""
    defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.FlowSmithError)
    }
    assert defined - set(flowsmith.__all__) == set()
    for name in defined:
        assert getattr(flowsmith, name) is getattr(errors, name)


# -- backoff ------------------------------------------------------------------------------


def test_tenacity_wait_strategies_are_accepted_as_backoff() -> None:
    wait = as_wait_strategy(tenacity.wait_exponential(multiplier=1, max=8))
    assert [retry_delay(wait, n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 8]
    assert retry_delay(as_wait_strategy(2.5), 3) == 2.5
    jittered = [retry_delay(flowsmith.exponential(1, 60, jitter=1), 3) for _ in range(20)]
    assert all(4 <= d <= 5 for d in jittered) and len(set(jittered)) > 1


# -- passwords and help --------------------------------------------------------------------


def test_help_has_examples_and_never_the_database_url_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2@db/app")
    runner = CliRunner()
    commands = ([], ["migrate"], ["worker"], ["demo"], ["status"], ["flows"], ["stats"], ["prune"])
    for command in commands:
        result = runner.invoke(main, [*command, "--help"])
        assert result.exit_code == 0, result.output
        assert "hunter2" not in result.output
        assert "Example" in result.output
