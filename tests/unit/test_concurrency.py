"""A flow's concurrency limit is checked when the flow is defined, with a message that
says what to give (flowsmith_worker/concurrency.py), in both flow APIs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from flowsmith_worker import Flow
from flowsmith_worker.concurrency import places_free
from flowsmith_worker.decorators import step, workflow
from flowsmith_worker.flow import registry

Names = Callable[[str], str]


def by_customer(ctx: Any) -> str:
    return str(ctx.data["customer"])


@pytest.mark.parametrize(
    ("limit", "error", "message"),
    [
        (0, ValueError, "max_concurrent=0 must be 1 or more"),
        (-2, ValueError, "max_concurrent=-2 must be 1 or more"),
        (1.5, TypeError, "max_concurrent=1.5 must be a whole number"),
        (True, TypeError, "max_concurrent=True must be a whole number"),
        (None, ValueError, "concurrency_key= needs max_concurrent=N"),
    ],
)
def test_a_limit_that_is_not_a_count_of_one_or_more_is_refused(
    unique: Names, limit: Any, error: type[Exception], message: str
) -> None:
    """max_concurrent below 1, not a whole number, or missing beside a key: refused at
    definition, naming the flow, and the flow is not registered."""
    name = unique("limited")
    with pytest.raises(error, match=f"flow {name!r}: {message}".replace(".", r"\.")):
        Flow(name, concurrency_key=by_customer, max_concurrent=limit)
    assert registry.lookup(name) is None


def test_a_limit_without_a_key_or_a_key_that_is_no_function_is_refused(unique: Names) -> None:
    """max_concurrent= alone says to give concurrency_key=; a key that is not callable
    (a column name, say) says to give a function of ctx."""
    with pytest.raises(ValueError, match="max_concurrent= needs concurrency_key="):
        Flow(unique("nokey"), max_concurrent=2)
    with pytest.raises(TypeError, match="must be a function of ctx"):
        Flow(unique("column"), concurrency_key="customer", max_concurrent=2)  # type: ignore[arg-type]


def test_the_decorator_api_refuses_the_same_and_registers_nothing(unique: Names) -> None:
    """@workflow(concurrency_key=..., max_concurrent=0) raises the Flow's error, and no
    half-built workflow stays registered under its name."""
    name = unique("decorated")
    with pytest.raises(ValueError, match="must be 1 or more"):

        @workflow(name, concurrency_key=by_customer, max_concurrent=0)
        def decorated() -> None:
            @step
            def only(ctx: Any) -> None:
                return None

    assert registry.lookup(name) is None


def test_free_places_are_never_negative() -> None:
    """A limit lowered below the runs in flight frees no place until enough of them end."""
    assert places_free(3, 1) == 2
    assert places_free(2, 2) == 0
    assert places_free(1, 4) == 0
