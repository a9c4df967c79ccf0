"""FlowSmith Worker: durable workflow execution on the database you already have."""

from __future__ import annotations

from flowsmith_worker.config import configure
from flowsmith_worker.context import Context
from flowsmith_worker.errors import (
    ConnectionNotUsable,
    CorruptRow,
    DatabaseNotFound,
    DatabaseUnavailable,
    DuplicateFlowName,
    FlowAlreadyCompleted,
    FlowCancelled,
    FlowNotFound,
    FlowSmithError,
    FlowSmithNotConfigured,
    InvalidDatabaseURL,
    InvalidIdentifier,
    InvalidSetting,
    NotAwaited,
    PayloadNotJSON,
    PayloadRejected,
    PayloadTooDeep,
    PayloadTooLarge,
    RunNotCancellable,
    RunNotRetryable,
    SchemaNotMigrated,
    StepFailed,
    StepOutputNotJSON,
    StepTimeout,
    SubflowCycle,
    SubflowTaken,
    TrackingIdTaken,
    UnreadableRow,
    UnsupportedDatabase,
)
from flowsmith_worker.flow import Flow
from flowsmith_worker.rescue import start_watchdog
from flowsmith_worker.retry import exponential, fixed
from flowsmith_worker.run import FlowRun, get_run
from flowsmith_worker.storage import InMemoryStorage, create_storage
from flowsmith_worker.storage.base import AttemptOutcome, FlowStatus, NodeStatus
from flowsmith_worker.version import __version__
from flowsmith_worker.worker import Worker

__all__ = [
    "AttemptOutcome",
    "ConnectionNotUsable",
    "Context",
    "CorruptRow",
    "DatabaseNotFound",
    "DatabaseUnavailable",
    "DuplicateFlowName",
    "Flow",
    "FlowAlreadyCompleted",
    "FlowCancelled",
    "FlowNotFound",
    "FlowRun",
    "FlowSmithError",
    "FlowSmithNotConfigured",
    "FlowStatus",
    "InMemoryStorage",
    "InvalidDatabaseURL",
    "InvalidIdentifier",
    "InvalidSetting",
    "NodeStatus",
    "NotAwaited",
    "PayloadNotJSON",
    "PayloadRejected",
    "PayloadTooDeep",
    "PayloadTooLarge",
    "RunNotCancellable",
    "RunNotRetryable",
    "SchemaNotMigrated",
    "StepFailed",
    "StepOutputNotJSON",
    "StepTimeout",
    "SubflowCycle",
    "SubflowTaken",
    "TrackingIdTaken",
    "UnreadableRow",
    "UnsupportedDatabase",
    "Worker",
    "__version__",
    "configure",
    "create_storage",
    "exponential",
    "fixed",
    "get_run",
    "start_watchdog",
]
