"""The token buckets of rate-limited steps (fs_rate_limits), read locked and written back.

The decision is rate_limits.decide's; SqlStorage.take_rate_token calls these inside
its transaction. Must never decide anything itself.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from flowsmith_worker.rate_limits import Bucket
from flowsmith_worker.storage.sql import schema
from flowsmith_worker.storage.sql.dialects import Dialect

R = schema.rate_limits


def _key(flow_name: str, step_name: str) -> tuple[sa.ColumnElement[bool], ...]:
    return R.c.flow_name == flow_name, R.c.step_name == step_name


def lock_bucket(conn: Connection, dialect: Dialect, flow_name: str, step_name: str) -> Bucket:
    """The step's bucket, locked until commit; created full by its first start.

    Inserted if absent first, so there is always a row to lock: two first starts
    racing both lock the one row the insert left, and take turns.
    """
    conn.execute(
        dialect.insert_if_absent(R).values(
            flow_name=flow_name, step_name=step_name, tat=0.0, line_end=0.0
        )
    )
    row = conn.execute(
        dialect.for_update(sa.select(R.c.tat, R.c.line_end).where(*_key(flow_name, step_name)))
    ).one()
    return Bucket(float(row.tat), float(row.line_end))


def save_bucket(conn: Connection, flow_name: str, step_name: str, bucket: Bucket) -> None:
    conn.execute(
        sa.update(R)
        .where(*_key(flow_name, step_name))
        .values(tat=bucket.tat, line_end=bucket.line_end)
    )
