"""The context handed to every step."""

from __future__ import annotations

from typing import Any


class Context:
    """The data a flow carries from step to step.

    ``data`` holds the flow's input plus each completed step's output under the
    step's name. While a step runs, ``tracking_id``, ``step`` and ``attempt`` say
    which run this is: use ``f"{ctx.tracking_id}:{ctx.step}"`` as the idempotency
    key of a payment API, so an at-least-once retry cannot charge twice.
    """

    def __init__(
        self,
        data: dict[str, Any] | None = None,
        *,
        tracking_id: str | None = None,
        step: str | None = None,
        attempt: int = 0,
    ) -> None:
        self.data: dict[str, Any] = dict(data or {})
        self.tracking_id = tracking_id
        self.step = step
        self.attempt = attempt

    def __repr__(self) -> str:
        return f"Context(data={self.data!r}, tracking_id={self.tracking_id!r}, step={self.step!r})"
