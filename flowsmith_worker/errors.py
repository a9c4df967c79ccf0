"""The exceptions of FlowSmith Worker.

One base, ``FlowSmithError``; each subclass's docstring is its default message.
Driver errors are wrapped with ``raise ... from`` so the cause stays visible.
Each type carries the exit code `flowsmith` ends with when a command meets it:
the engine raises the type where its rule lives, and the command line maps
types to output in one place (cli/app.py), never re-checking the rule.
"""

from __future__ import annotations

from typing import ClassVar

EXIT_ERROR = 1  # any error, and any refusal that is not one of those below
EXIT_NOT_FOUND = 3  # no run has that tracking_id (enqueue: no flow has that name)
EXIT_TAKEN = 4  # enqueue: a run already has that tracking_id; nothing was enqueued


class FlowSmithError(Exception):
    """FlowSmith Worker failed."""

    exit_code: ClassVar[int] = EXIT_ERROR

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class FlowSmithNotConfigured(FlowSmithError):
    """FlowSmith is not configured: call flowsmith.configure(database_url=...) first."""


class SchemaNotMigrated(FlowSmithError):
    """The FlowSmith tables are missing or out of date: run `flowsmith migrate`."""


class CorruptRow(FlowSmithError):
    """A row of the FlowSmith tables holds a value FlowSmith cannot read."""


class DatabaseUnavailable(FlowSmithError):
    """The database did not answer; check that it is running and the URL is right."""


class TransactionConflict(DatabaseUnavailable):
    """The database refused the transaction for a conflict (a deadlock, a serialization
    failure); run it again.

    A DatabaseUnavailable so that every retry of an unavailable database retries
    it too; but the database answered, so it is no outage (see outage.py).
    """


class InvalidDatabaseURL(FlowSmithError):
    """The database URL is not one FlowSmith can use."""


class InvalidSetting(FlowSmithError):
    """A FLOWSMITH_* setting of the environment has a value FlowSmith does not know."""


class DatabaseNotFound(InvalidDatabaseURL):
    """The URL names a SQLite file that does not exist, and it was not to be created."""


class UnsupportedDatabase(FlowSmithError):
    """This database server lacks a feature FlowSmith needs: upgrade it."""


class ConnectionNotUsable(FlowSmithError, TypeError):
    """connection= cannot take this: pass the SQLAlchemy Connection or the Django connection
    of your transaction, on the database of the flow's storage. Nothing was written."""


class InvalidFlowDefinition(FlowSmithError):
    """The flow's definition cannot run (no steps, a step name twice, nested parallel
    groups, a step outside a @workflow body): fix the code that defines it."""


class DuplicateFlowName(InvalidFlowDefinition):
    """Two different flows were defined with the same name."""


class FlowNotFound(FlowSmithError):
    """No flow run has that tracking_id."""

    exit_code = EXIT_NOT_FOUND

    @classmethod
    def for_tracking_id(cls, tracking_id: str) -> FlowNotFound:
        return cls(
            f"no flow run has tracking_id {tracking_id!r} (it was never enqueued, or it "
            "was pruned); `flowsmith flows` lists the runs there are"
        )


class FlowNotDefined(FlowSmithError):
    """No flow of that name is defined in this process: import the module that defines it."""

    exit_code = EXIT_NOT_FOUND


class RunAlreadyEnqueued(FlowSmithError):
    """A run already has that tracking_id: nothing was enqueued."""

    exit_code = EXIT_TAKEN


class FlowAlreadyCompleted(RunAlreadyEnqueued):
    """A flow with this tracking_id has already completed; it will not run again."""

    @classmethod
    def for_run(cls, flow_name: str, tracking_id: str) -> FlowAlreadyCompleted:
        return cls(
            f"flow {flow_name!r} with tracking_id {tracking_id!r} has already completed; "
            "it will not run again (use a new tracking_id for a new run)"
        )


class TrackingIdTaken(RunAlreadyEnqueued):
    """The tracking_id belongs to a run of another flow."""

    @classmethod
    def for_run(cls, tracking_id: str, owner: str, wanted: str) -> TrackingIdTaken:
        return cls(
            f"tracking_id {tracking_id!r} already belongs to a run of flow {owner!r}, "
            f"not {wanted!r}: tracking ids are unique across flows"
        )


class StepTimeout(FlowSmithError):
    """The step ran longer than its timeout."""


class NotAwaited(FlowSmithError):
    """A step or condition that is not ``async def`` returned a coroutine: declare it async."""


class PayloadRejected(FlowSmithError):
    """A value cannot be stored: it is not standard JSON, too large or nested too deeply."""


class PayloadNotJSON(PayloadRejected):
    """The value is not standard JSON (NaN, Infinity, or a type JSON does not have)."""


class StepOutputNotJSON(PayloadNotJSON):
    """The step returned a value that cannot be stored as JSON."""


class PayloadTooLarge(PayloadRejected):
    """The value is larger, as JSON, than the payload limit (--max-payload-bytes)."""


class PayloadTooDeep(PayloadRejected):
    """The value nests lists and objects deeper than the payload depth limit."""


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


class InvalidIdentifier(FlowSmithError, ValueError):
    """A tracking_id, flow, step or queue name that cannot be stored: nothing was written."""


class ConcurrencyKeyFailed(FlowSmithError, ValueError):
    """A flow's concurrency_key function raised for a run's input: nothing was enqueued."""


class UnreadableRow(FlowSmithError):
    """A stored run holds a value that cannot be read (an unknown status, text that is
    not JSON, e.g. written by hand or by a newer version): `flowsmith status` shows which."""


class Refused(FlowSmithError):
    """The run's state does not allow this: nothing was done."""


class RunStatusUnreadable(Refused):
    """The run's stored status cannot be read: nothing is done to it until it is fixed."""

    @classmethod
    def for_run(cls, tracking_id: str, flow_name: str, why: str) -> RunStatusUnreadable:
        statuses = "PENDING, RUNNING, COMPLETED, FAILED, CANCELLED"
        return cls(
            f"flow run {tracking_id!r} ({flow_name}) has a stored status that cannot be read "
            f"({why}): nothing done; set fs_flows.status to one of {statuses} by hand, "
            "or delete the run"
        )


class RunNotRetryable(Refused):
    """Only a FAILED run can be retried."""

    @classmethod
    def for_run(cls, tracking_id: str, status: str) -> RunNotRetryable:
        if status == "COMPLETED":
            why = "a completed run never runs again; use a new tracking_id for a new run"
        elif status == "CANCELLED":
            why = "a cancelled run stays cancelled; use a new tracking_id for a new run"
        elif status == "COMPENSATING":
            why = "its compensations are undoing its completed steps; it then ends FAILED"
        else:
            why = "it has not failed (a retry or a trigger may have re-queued it already)"
        return cls(
            f"flow run {tracking_id!r} is {status}: only a FAILED run can be retried ({why})"
        )

    @classmethod
    def compensated(cls, tracking_id: str) -> RunNotRetryable:
        return cls(
            f"flow run {tracking_id!r} FAILED and its compensations undid its completed "
            "steps: resuming it would build on undone work, so it is not retried; "
            "start a new run with a new tracking_id"
        )

    @classmethod
    def child_compensated(cls, tracking_id: str, step: str, child: str) -> RunNotRetryable:
        return cls(
            f"flow run {tracking_id!r} is not retried: its subflow step {step!r} would resume "
            f"child run {child!r}, which FAILED and whose compensations undid its completed "
            "steps, so the child is not retried and the step would only fail again; "
            "start a new run with a new tracking_id"
        )

    @classmethod
    def being_retried(cls, tracking_id: str) -> RunNotRetryable:
        return cls(
            f"flow run {tracking_id!r} is already being retried: another retry or trigger "
            "re-queued it a moment ago; `flowsmith status` shows its progress"
        )


class RunNotCancellable(Refused):
    """Only a pending or running run can be cancelled."""

    @classmethod
    def compensating(
        cls, tracking_id: str, waits_for: list[tuple[str, str | None]]
    ) -> RunNotCancellable:
        """A COMPENSATING run none of whose compensations started yet: it waits for the
        steps ``waits_for`` (name, child tracking_id of a subflow step or None), in
        flight when the run failed; say what it waits for and how to end the wait."""
        if not waits_for:
            return cls.for_run(tracking_id, "COMPENSATING")
        waits = "; ".join(
            f"subflow step {step!r}, whose child run {child!r} has not ended: cancel child "
            f"{child!r} first (`flowsmith cancel {child}`)"
            if child is not None
            else f"step {step!r}, still in flight: its attempt ends it"
            for step, child in waits_for
        )
        return cls(
            f"flow run {tracking_id!r} is COMPENSATING and cannot be cancelled (stopping "
            f"would leave it half undone); no compensation has started yet: it waits for "
            f"{waits}. A step in flight when the run failed is waited for, as it may "
            f"complete and need undoing; then the compensations run and the run ends FAILED"
        )

    @classmethod
    def for_run(cls, tracking_id: str, status: str) -> RunNotCancellable:
        if status == "COMPENSATING":
            return cls(
                f"flow run {tracking_id!r} is COMPENSATING: its compensations are undoing its "
                "completed steps, and stopping them halfway would leave it half undone; it "
                "ends FAILED when they end (`flowsmith status` shows them)"
            )
        return cls(
            f"flow run {tracking_id!r} is {status}: only a pending or running run can be "
            "cancelled (a FAILED run starts nothing more unless it is retried)"
        )


class SubflowTaken(FlowSmithError):
    """The child run is already the subflow of another step."""

    @classmethod
    def for_run(cls, tracking_id: str) -> SubflowTaken:
        return cls(
            f"tracking_id {tracking_id!r} is already the subflow of another step; "
            "give each parent its own child tracking_id"
        )


class SubflowCycle(FlowSmithError):
    """A subflow names its own run, or a run it is part of, as its child: it would wait forever."""

    @classmethod
    def for_chain(cls, tracking_ids: list[str]) -> SubflowCycle:
        cycle = " -> ".join(repr(t) for t in tracking_ids)
        return cls(
            f"subflow cycle {cycle}: run {tracking_ids[-1]!r} would wait for itself; give the "
            "subflow a tracking_id of its own (the default is '<parent tracking_id>:<step>')"
        )


class EventRefused(Refused):
    """The event was not sent: its run does not wait for it, or is over."""

    @classmethod
    def run_finished(
        cls, tracking_id: str, name: str, status: str, compensated: bool = False
    ) -> EventRefused:
        if status == "COMPENSATING":
            hint = (
                "it failed for good and its compensations are undoing its completed steps: "
                "it waits for nothing more and is never retried; start a new run with a new "
                "tracking_id"
            )
        elif compensated:
            hint = (
                "its compensations undid its completed steps, so it is never retried and "
                "waits for nothing more; start a new run with a new tracking_id"
            )
        elif status == "FAILED":
            hint = "`flowsmith retry` it first, then send the event"
        else:
            hint = "a finished run waits for nothing more"
        return cls(f"event {name!r} not sent: flow run {tracking_id!r} is {status} ({hint})")

    @classmethod
    def not_awaited(
        cls, tracking_id: str, flow_name: str, name: str, waits: list[str]
    ) -> EventRefused:
        known = ", ".join(repr(w) for w in waits) or "none"
        return cls(
            f"event {name!r} not sent: flow {flow_name!r} (run {tracking_id!r}) has no "
            f"wait_for step of that name (its waits: {known})"
        )

    @classmethod
    def wait_over(cls, tracking_id: str, name: str) -> EventRefused:
        return cls(
            f"event {name!r} not sent: the wait_for step {name!r} of run {tracking_id!r} is "
            "over (it timed out and went on without one); an event is taken only while "
            "its wait waits, or before the run gets there"
        )

    @classmethod
    def already_sent(cls, tracking_id: str, name: str) -> EventRefused:
        return cls(
            f"event {name!r} not sent: run {tracking_id!r} already has one (a wait takes one "
            "event); to send the same event again safely, give both sends one idempotency key"
        )
