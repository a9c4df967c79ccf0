"""The exceptions of FlowSmith Worker.

One base, ``FlowSmithError``; each subclass's docstring is its default message.
Driver errors are wrapped with ``raise ... from`` so the cause stays visible.
"""

from __future__ import annotations


class FlowSmithError(Exception):
    """FlowSmith Worker failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class FlowSmithNotConfigured(FlowSmithError):
    """FlowSmith is not configured: call flowsmith.configure(database_url=...) first."""


class SchemaNotMigrated(FlowSmithError):
    """The FlowSmith tables are missing or out of date: run `flowsmith migrate`."""


class DatabaseUnavailable(FlowSmithError):
    """The database did not answer; check that it is running and the URL is right."""


class InvalidDatabaseURL(FlowSmithError):
    """The database URL is not one FlowSmith can use."""


class UnsupportedDatabase(FlowSmithError):
    """This database server lacks a feature FlowSmith needs: upgrade it."""


class DuplicateFlowName(FlowSmithError):
    """Two different flows were defined with the same name."""


class FlowNotFound(FlowSmithError):
    """No flow run has that tracking_id."""


class FlowAlreadyCompleted(FlowSmithError):
    """A flow with this tracking_id has already completed; it will not run again."""

    @classmethod
    def for_run(cls, flow_name: str, tracking_id: str) -> FlowAlreadyCompleted:
        return cls(
            f"flow {flow_name!r} with tracking_id {tracking_id!r} has already completed; "
            "it will not run again (use a new tracking_id for a new run)"
        )


class TrackingIdTaken(FlowSmithError):
    """The tracking_id belongs to a run of another flow."""

    @classmethod
    def for_run(cls, tracking_id: str, owner: str, wanted: str) -> TrackingIdTaken:
        return cls(
            f"tracking_id {tracking_id!r} already belongs to a run of flow {owner!r}, "
            f"not {wanted!r}: tracking ids are unique across flows"
        )


class StepTimeout(FlowSmithError):
    """The step ran longer than its timeout."""


class StepOutputNotJSON(FlowSmithError):
    """The step returned a value that cannot be stored as JSON."""


class StepFailed(FlowSmithError):
    """A step failed after all its attempts."""

    def __init__(self, step: str, attempts: int, error: str, tracking_id: str = "") -> None:
        self.step = step
        self.attempts = attempts
        self.error = error
        self.tracking_id = tracking_id
        last_line = error.strip().splitlines()[-1] if error.strip() else "unknown error"
        super().__init__(
            f"step {step!r} of flow {tracking_id!r} failed after {attempts} attempt(s): {last_line}"
        )


class FlowCancelled(FlowSmithError):
    """The flow was cancelled."""
