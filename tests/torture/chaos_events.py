"""The chaos run's events (issue 11 x issue 14): a sender thread, and the checks after.

While the chaos loop harms workers and the database, EventSender sends the event of
every wait of every run of the round: half at once (before their runs reach the
wait), the others once their wait is seen parked, or their run over (failed); with
one idempotency key per wait: a send whose answer was lost to the chaos (a restart, a killed
connection) is sent again with that key, and now and then a send that was answered
is repeated with it too. Once every run is over, each wait gets one more event,
without a key: a finished run must refuse it. Each look for parked waits is also a
look for a parked node holding a lease (none may). Every answer is a line of ``events.jsonl``
beside the journal.

The checks (``check_events``): no event delivered twice; a refusal only for a run
that is over; a wait that completed has the payload it was sent as its output; a
sleep resumed no earlier than its wake time (database clock) and its parked attempt
ended before it; no parked node was ever seen holding a lease.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from flowsmith_worker import send_event
from flowsmith_worker.errors import EventRefused
from flowsmith_worker.records import NodeRecord
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import (
    FINISHED_FLOW_STATUSES,
    AttemptOutcome,
    FlowStatus,
    NodeStatus,
    Storage,
)
from flowsmith_worker.storage.sql import SqlStorage, schema
from tests.torture import model
from tests.torture.chaos_flows import SLEEP, WAIT, FlowPlan, StepPlan

EVENTS_FILE = "events.jsonl"
LEASED_WHILE_PARKED = "a parked node holds a lease"
GAVE_UP = "the database did not answer"
LATER_SHARE = 0.5  # of the events, sent once their wait parked (the others at once)
POLL = (0.05, 0.3)  # seconds between two looks for parked waits
REPEAT_SHARE = 0.3  # of answered sends, sent again with the same key
PATIENCE = 120.0  # seconds a send is tried again while the database is away


@dataclass(frozen=True)
class Wait:
    tracking_id: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.tracking_id}/{self.name}"


def waits_of(
    runs: dict[str, tuple[str, dict[str, object]]], plans: dict[str, FlowPlan]
) -> list[Wait]:
    """The waits of the round's runs (children's runs have none)."""
    return [
        Wait(tracking_id, step.name)
        for tracking_id, (flow_name, _data) in runs.items()
        for step in plans[flow_name].steps()
        if step.kind == WAIT
    ]


class EventSender:
    """A thread sending the round's events while the chaos runs (see the module)."""

    def __init__(self, url: str, waits: list[Wait], path: Path, seed: int) -> None:
        self.url, self.waits, self.path = url, waits, path
        self.rng = random.Random(seed)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="event-sender", daemon=True)

    def start(self) -> EventSender:
        self.thread.start()
        return self

    def finish(self) -> None:
        """Once every run is over: the sends left, then a late one to every wait."""
        self.stopping.set()
        self.thread.join(PATIENCE * 2)
        storage = create_storage(self.url)
        try:
            for wait in self.waits:
                self._send(storage, wait, model.LATE)
        finally:
            storage.close()

    def _run(self) -> None:
        """Half the events at once (before their runs get far); each of the others once
        its wait has parked or its run is over (failed), a little after it was seen."""
        storage = create_storage(self.url)
        later = [wait for wait in self.waits if self.rng.random() < LATER_SHARE]
        try:
            for wait in self.waits:
                if wait not in later:
                    self._send_first(storage, wait)
            while later and not self.stopping.wait(self.rng.uniform(*POLL)):
                ready = self._ready(storage, later)
                for wait in ready:
                    self._send_first(storage, wait)
                    later.remove(wait)
            for wait in later:  # stopping: every run is over
                self._send_first(storage, wait)
        finally:
            storage.close()

    def _send_first(self, storage: Storage, wait: Wait) -> None:
        self._send(storage, wait, model.FIRST)
        if self.rng.random() < REPEAT_SHARE:
            self._send(storage, wait, model.AGAIN_SAME_KEY)

    def _ready(self, storage: Storage, waits: list[Wait]) -> list[Wait]:
        """The waits parked now, or whose run is over; none while the database is away.
        Looks for a parked node holding a lease on the way."""
        assert isinstance(storage, SqlStorage)
        runs, nodes = schema.flows, schema.nodes
        parked = sa.select(runs.c.tracking_id, nodes.c.step_name, nodes.c.lease_expires_at).where(
            runs.c.id == nodes.c.flow_id,
            nodes.c.status == NodeStatus.PENDING,
            nodes.c.wake_at.is_not(None),
        )
        over = sa.select(runs.c.tracking_id).where(runs.c.status.in_(FINISHED_FLOW_STATUSES))
        try:
            with storage.engine.connect() as conn:
                found = conn.execute(parked).all()
                finished = {row.tracking_id for row in conn.execute(over)}
        except Exception:  # the database away: look again next time
            return []
        for row in found:
            if row.lease_expires_at is not None:  # lease_owner stays, for the trace
                self._write({"problem": LEASED_WHILE_PARKED, "step": row.step_name})
        waiting = {(row.tracking_id, row.step_name) for row in found}
        return [w for w in waits if (w.tracking_id, w.name) in waiting or w.tracking_id in finished]

    def _send(self, storage: Storage, wait: Wait, why: str) -> None:
        """Send until answered (the same key each time: a lost answer is no lost event)."""
        key = None if why == model.LATE else wait.key
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                sent = send_event(
                    wait.tracking_id,
                    wait.name,
                    model.payload_of(wait.name),
                    idempotency_key=key,
                    storage=storage,
                )
                answer = model.WOKE if sent.woke else model.DELIVERED
                self._note(wait, why, answer if sent.delivered else model.NOT_DELIVERED)
                return
            except EventRefused as refused:
                over = "already has one" not in str(refused)
                self._note(wait, why, model.REFUSED_OVER if over else model.REFUSED_SENT)
                return
            except Exception as error:  # the chaos: the database away, a connection killed
                if time.monotonic() > deadline:
                    self._note(wait, why, f"{GAVE_UP}: {error}")
                    return
                time.sleep(0.2)

    def _note(self, wait: Wait, why: str, answer: str) -> None:
        self._write({"run": wait.tracking_id, "wait": wait.name, "why": why, "answer": answer})

    def _write(self, line: dict[str, Any]) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps({**line, "t": time.time()}) + "\n")


# -- the checks ---------------------------------------------------------------------

DELIVERED = frozenset({model.DELIVERED, model.WOKE})
# As chaos_check.LOST: attempts the chaos took (its worker lost, or handed back).
LOST = frozenset({AttemptOutcome.RESCUED, AttemptOutcome.RELEASED, AttemptOutcome.CANCELLED})


def check_events(
    path: Path,
    runs: dict[str, tuple[str, dict[str, object]]],
    plans: dict[str, FlowPlan],
    storage: Storage,
) -> list[str]:
    """Every problem with the round's events and sleeps (see the module)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    problems = [f"{line['problem']}: {line['step']}" for line in lines if "problem" in line]
    answers: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for line in lines:
        if "wait" in line:
            answers.setdefault((line["run"], line["wait"]), []).append(line)
    for tracking_id, (flow_name, _data) in runs.items():
        record = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
        if record is None:
            continue  # check_run reports it
        nodes = {n.step_name: n for n in storage.list_nodes(flow_id=record.id, with_payloads=True)}
        for step in plans[flow_name].steps():
            node = nodes.get(step.name)
            if step.kind == WAIT:
                said = answers.get((tracking_id, step.name), [])
                found = check_wait(record.status, node, said)
            elif step.kind == SLEEP and node is not None:
                found = check_sleep(node)
            else:
                continue
            problems += [f"{tracking_id}: {step.name}: {problem}" for problem in found]
    return problems


def check_wait(
    status: FlowStatus, node: NodeRecord | None, said: list[dict[str, Any]]
) -> list[str]:
    """A wait's sends and its end agree: delivered once at most, refused only by a
    finished run (the late send, or a run that was over), its payload its output."""
    problems = [f"{line['why']}: {line['answer']}" for line in said if GAVE_UP in line["answer"]]
    delivered = [line for line in said if line["answer"] in DELIVERED]
    if len(delivered) > 1:
        problems.append(f"its event was delivered {len(delivered)} times: {delivered}")
    for line in said:
        refused_over = line["answer"] == model.REFUSED_OVER
        if line["answer"] == model.REFUSED_SENT:
            problems.append(f"refused as sent already though every send had its key: {line}")
        if line["why"] == model.LATE and not refused_over:
            problems.append(f"an event for a finished run was not refused: {line}")
        # A run that COMPLETED got to its wait: an event could only be refused after it.
        if refused_over and line["why"] != model.LATE and status == FlowStatus.COMPLETED:
            problems.append(f"refused though its run ended {status}: {line}")
    if not any(line["why"] == model.LATE for line in said):
        problems.append("no late event was sent")
    if node is not None and node.status == NodeStatus.COMPLETED:
        if node.output != model.payload_of(node.step_name):
            problems.append(f"completed with {node.output!r}, not the payload it was sent")
        # A first send answered "not delivered" was stored by a try whose answer was lost.
        stored = [line for line in said if line["why"] == model.FIRST and line not in delivered]
        if not delivered and not stored:
            problems.append("completed though no event was delivered to it")
    return problems


def check_sleep(node: NodeRecord) -> list[str]:
    """A sleep that parked woke no earlier than its wake time (database clock)."""
    if node.wake_at is None:
        return []
    problems = []
    for attempt in node.attempts:
        ended = attempt.ended_at
        if attempt.outcome is AttemptOutcome.PARKED and ended is not None and ended > node.wake_at:
            problems.append(f"attempt {attempt.attempt} parked past the wake time")
        if attempt.outcome is AttemptOutcome.COMPLETED and attempt.started_at < node.wake_at:
            problems.append(
                f"woke at {attempt.started_at}, before its wake time {node.wake_at} "
                "(database clock)"
            )
    return problems


def parked_shape(step: StepPlan, node: NodeRecord | None) -> model.StepShape:
    """The model's shape of a sleep or a wait of the chaos run. A wait's event was sent
    at a random moment: before the wait was reached if the wait did not park first."""
    if step.kind == SLEEP:
        return model.StepShape(step.name, sleep=model.SleepShape(step.seconds))
    counted = [a.outcome for a in (node.attempts if node else ()) if a.outcome not in LOST]
    parked_first = counted[:1] == [AttemptOutcome.PARKED]
    return model.StepShape(
        step.name, wait=model.WaitShape(model.ONCE_PARKED if parked_first else model.BEFORE)
    )
