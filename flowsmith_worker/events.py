"""send_event: deliver an event to a run's ``wait_for`` step (see parking.py).

Owns checking what is sent before anything is written (the names, the payload);
the storage stores it and wakes the wait in one transaction.
"""

from __future__ import annotations

import functools
from typing import Any

from flowsmith_worker import payload as payloads
from flowsmith_worker.async_calls import call_with_connection
from flowsmith_worker.identifiers import MAX_TRACKING_ID_LENGTH, check_identifier
from flowsmith_worker.records import EventSent
from flowsmith_worker.storage import default_storage
from flowsmith_worker.storage.base import Storage

MAX_EVENT_NAME_LENGTH = 200  # fs_events.name: an event is named after its wait_for step
MAX_IDEMPOTENCY_KEY_LENGTH = 255  # fs_events.idempotency_key


def send_event(
    tracking_id: str,
    name: str,
    payload: Any = None,
    *,
    idempotency_key: str | None = None,
    connection: Any = None,
    storage: Storage | None = None,
) -> EventSent:
    """Send the event ``name`` to the run ``tracking_id``: its payload (any JSON value)
    becomes the output of the run's ``wait_for(name)`` step.

    A run not at that step yet keeps the event until it gets there. With
    ``idempotency_key``, sending again with the same key delivers it once (the
    second answer says ``delivered=False``). With ``connection`` (a SQLAlchemy
    Connection or Django connection) the event commits or rolls back with the
    application's own writes. Raises FlowNotFound for an unknown run and
    EventRefused for a finished run, a name the run does not wait for, or a
    second event of the same name without the first one's key.
    """
    check_identifier("tracking_id", tracking_id, MAX_TRACKING_ID_LENGTH)
    check_identifier("event name", name, MAX_EVENT_NAME_LENGTH)
    if idempotency_key is not None:
        check_identifier("idempotency_key", idempotency_key, MAX_IDEMPOTENCY_KEY_LENGTH)
    text = payloads.encode(payload, what=f"the payload of event {name!r}")
    return (storage or default_storage()).send_event(
        tracking_id=tracking_id,
        name=name,
        payload=text,
        idempotency_key=idempotency_key,
        connection=connection,
    )


async def send_event_async(
    tracking_id: str,
    name: str,
    payload: Any = None,
    *,
    idempotency_key: str | None = None,
    connection: Any = None,
    storage: Storage | None = None,
) -> EventSent:
    """``send_event`` for async code (a FastAPI webhook): the event loop goes on meanwhile.

    ``connection`` may also be an AsyncConnection or AsyncSession (SQLAlchemy's
    asyncio extension): the event commits or rolls back with it, as for run_async.
    """
    send = functools.partial(
        send_event,
        tracking_id,
        name,
        payload,
        idempotency_key=idempotency_key,
        storage=storage,
    )
    return await call_with_connection(send, connection)
