"""What a subflow step asks for: which child run to start (or resume), and its input.

One type for the three places that meet it: ``Flow.subflow`` and the
``@subflow`` decorator build a ChildRequest each time the step runs, and the
executor turns it into the child's enqueue request. It sits below flow.py and
executor.py, so the child's flow is described by what is asked of it (a
protocol that Flow meets) rather than by importing Flow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from flowsmith_worker.records import NewFlow


class ChildFlow(Protocol):
    """A flow a child run can be made of: a ``Flow``."""

    def new_run(self, ctx: dict[str, Any], tracking_id: str) -> NewFlow: ...


@dataclass(frozen=True)
class ChildRequest:
    """The child run a subflow step starts: ``flow`` under ``tracking_id``.

    The same tracking_id again (a retry, a resumed parent) resumes that child
    run instead of starting another. ``data`` is the child's input; None gives
    it the parent step's ctx.data.
    """

    flow: ChildFlow
    tracking_id: str
    data: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        # Made in user code at run time: a wrong flow fails the step with this
        # message rather than an AttributeError deep in the executor.
        if not callable(getattr(self.flow, "new_run", None)):
            raise TypeError(
                f"ChildRequest(flow={self.flow!r}): the flow must be a Flow "
                "(for a @workflow, its .flow)"
            )

    def new_run(self, parent_data: Mapping[str, Any]) -> NewFlow:
        """The child's enqueue request, validated by its flow."""
        data = parent_data if self.data is None else self.data
        return self.flow.new_run(dict(data), self.tracking_id)
