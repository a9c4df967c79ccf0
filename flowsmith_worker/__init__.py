"""FlowSmith Worker: durable workflow execution on the database you already have."""

from __future__ import annotations

from flowsmith_worker.config import configure
from flowsmith_worker.context import Context
from flowsmith_worker.errors import (
    DatabaseUnavailable,
    DuplicateFlowName,
    FlowAlreadyCompleted,
    FlowCancelled,
    FlowNotFound,
    FlowSmithError,
    FlowSmithNotConfigured,
    InvalidDatabaseURL,
    PayloadRejected,
    SchemaNotMigrated,
    StepFailed,
    StepOutputNotJSON,
    StepTimeout,
)
from flowsmith_worker.flow import Flow
from flowsmith_worker.rescue import start_watchdog
from flowsmith_worker.retry import exponential, fixed
from flowsmith_worker.run import FlowRun
from flowsmith_worker.storage import InMemoryStorage, create_storage
from flowsmith_worker.storage.base import FlowStatus, NodeStatus
from flowsmith_worker.version import __version__
from flowsmith_worker.worker import Worker

__all__ = [
    "Context",
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
    "NodeStatus",
    "PayloadRejected",
    "SchemaNotMigrated",
    "StepFailed",
    "StepOutputNotJSON",
    "StepTimeout",
    "Worker",
    "__version__",
    "configure",
    "create_storage",
    "exponential",
    "fixed",
    "start_watchdog",
]
