"""ctx.data from the rows: each payload stored once, rebuilt when it is read.

The run's input is stored once (fs_flows.input) and each step's output once
(its node's fs_nodes.output). The ctx.data a step sees is rebuilt when its node
is claimed: the run's input plus the outputs of the COMPLETED steps of the
stages before it, in plan order (progress.context_data). That is exactly the
snapshot the storage used to copy into every node, because a COMPLETED output
never changes; the final ctx.data of a run (what FlowRun.wait returns) and the
input snapshots of ``flowsmith status`` are rebuilt the same way.

Schema version 4 dropped fs_nodes.input, where older versions kept that copy.

fs_flows.input also keeps the run span's traceparent (tracing.py), under the
reserved key TRACE_PARENT_KEY, until the schema has a column for it: every
reader here takes it out (split_trace), so no ctx.data, record or output has it.

Values are parsed here, never trusted: a value that does not parse (a row
changed outside FlowSmith) raises CorruptRow naming the column and the run, so
the engine fails that run instead of rolling back the same claim forever.

Must never trust a stored value, and never write: it reads what storage.py and
finish.py wrote.
"""

from __future__ import annotations

import functools
import json
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from flowsmith_worker import progress
from flowsmith_worker.errors import CorruptRow
from flowsmith_worker.plan import Plan
from flowsmith_worker.records import TRACE_PARENT_KEY
from flowsmith_worker.storage.base import NewFlow, NodeStatus
from flowsmith_worker.storage.sql import schema

F, N = schema.flows, schema.nodes


def corrupt(where: str, tracking_id: str, problem: str) -> CorruptRow:
    return CorruptRow(
        f"{where} {problem}; FlowSmith did not write that: correct the value, "
        f"then `flowsmith retry {shlex.quote(tracking_id)}`"
    )


def parse_plan(text: str, tracking_id: str) -> Plan:
    """The stored plan of a run; CorruptRow if it is not one FlowSmith wrote."""
    try:
        return _plan_from_json(text)
    except json.JSONDecodeError as exc:
        problem = f"is not valid JSON ({exc})"
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # JSON, not a plan's shape
        problem = f"is not a plan ({type(exc).__name__}: {exc})"
    raise corrupt(f"fs_flows.plan of run {tracking_id!r}", tracking_id, problem)


def input_to_store(flow: NewFlow) -> dict[str, Any]:
    """The run's input as fs_flows.input keeps it: with its traceparent, if it has one."""
    if flow.trace_parent is None:
        return flow.input
    return {**flow.input, TRACE_PARENT_KEY: flow.trace_parent}


def split_trace(run_input: Mapping[str, Any]) -> tuple[Mapping[str, Any], str | None]:
    """A stored input as the run was given it, and the traceparent kept in it (if any)."""
    if TRACE_PARENT_KEY not in run_input:  # a run enqueued by a process that does not trace
        return run_input, None
    data = dict(run_input)
    trace_parent = data.pop(TRACE_PARENT_KEY)
    return data, trace_parent if isinstance(trace_parent, str) else None


def stored_input(text: str) -> Any:
    """fs_flows.input parsed, without the traceparent kept in it."""
    value = json.loads(text)
    return split_trace(value)[0] if isinstance(value, Mapping) else value


@functools.lru_cache(maxsize=512)
def _plan_from_json(text: str) -> Plan:
    """Parsed once per distinct text: every run of a flow version stores the same
    plan, and a run's plan is read again at each step it moves on. A Plan is
    frozen, so sharing one is safe; errors are not cached."""
    return Plan.from_json(text)


class StoredJson:
    """A stored JSON text, parsed anew for each use.

    Each claimed node gets its own copy of ctx.data, as it always had: parallel
    siblings claimed together run in different threads and must not share a
    list or dict one of them might change in place.
    """

    def __init__(self, text: str | None, where: str, tracking_id: str) -> None:
        self._text = text
        self._value: Any = None
        self.where = where
        self.tracking_id = tracking_id

    @classmethod
    def parsed(cls, value: Any, where: str, tracking_id: str) -> StoredJson:
        """A value the caller has parsed already: every use gets that same object."""
        stored = cls(None, where, tracking_id)
        stored._value = value
        return stored

    def value(self) -> Any:
        if self._text is None:
            return self._value
        try:
            return json.loads(self._text)
        # JSONDecodeError, UnicodeDecodeError of bytes, and RecursionError of a
        # document nested deeper than the parser goes (never written by FlowSmith).
        except (ValueError, RecursionError) as exc:
            raise corrupt(self.where, self.tracking_id, f"is not valid JSON ({exc})") from None


@dataclass(frozen=True)
class StoredOutput:
    step_name: str
    position: int
    output: StoredJson


@dataclass(frozen=True)
class RunPayloads:
    """One run's input and completed outputs, read once however many of its
    nodes are claimed together."""

    tracking_id: str
    input: StoredJson
    outputs: Sequence[StoredOutput]  # of COMPLETED nodes, in plan order

    def data_before(self, position: float) -> dict[str, Any]:
        """The ctx.data a node of stage ``position`` starts with."""
        return self.data_and_trace(position)[0]

    def data_and_trace(self, position: float) -> tuple[dict[str, Any], str | None]:
        """data_before(position), and the run span's traceparent stored with the run."""
        stored = self.input.value()
        if not isinstance(stored, Mapping):
            raise corrupt(self.input.where, self.tracking_id, "is not a JSON object")
        run_input, trace_parent = split_trace(stored)
        earlier = ((o.step_name, o.output.value()) for o in self.outputs if o.position < position)
        return progress.context_data(run_input, earlier), trace_parent

    def final_data(self) -> dict[str, Any]:
        """The ctx.data after every stage: the output of a COMPLETED run."""
        return self.data_before(math.inf)


def _run_input(tracking_id: str, text: str) -> StoredJson:
    return StoredJson(text, f"fs_flows.input of run {tracking_id!r}", tracking_id)


def _outputs(
    conn: Connection, tracking_ids: Mapping[int, str], which: sa.ColumnElement[bool]
) -> dict[int, list[StoredOutput]]:
    """The COMPLETED outputs of the nodes ``which`` selects, by run, in plan order."""
    rows = conn.execute(
        sa.select(N.c.flow_id, N.c.step_name, N.c.position, N.c.output)
        # group_index < 0: a map's item, whose output is in the map's (see fanout.py).
        .where(which, N.c.status == NodeStatus.COMPLETED, N.c.group_index >= 0)
        .order_by(N.c.flow_id, N.c.position, N.c.group_index)
    ).all()
    found: dict[int, list[StoredOutput]] = {flow_id: [] for flow_id in tracking_ids}
    for r in rows:
        tracking_id = tracking_ids[r.flow_id]
        where = f"fs_nodes.output of step {r.step_name!r} of run {tracking_id!r}"
        stored = StoredJson(r.output, where, tracking_id)
        found[r.flow_id].append(StoredOutput(r.step_name, r.position, stored))
    return found


def read_for_claimed(conn: Connection, claimed: Sequence[Any]) -> dict[int, RunPayloads]:
    """The payloads that the claimed nodes start with, by run.

    The claim returned each run's input once (``run_input``, on one of its
    nodes' rows, None on the others); only the outputs of
    earlier stages are read here, in one statement, and none at all when every
    node is of its run's first stage. Claiming the last siblings of a parallel
    group does not read the outputs of those that already finished.
    """
    stages: dict[int, int] = {}
    runs: dict[int, Any] = {}
    for node in claimed:
        stages[node.flow_id] = max(node.position, stages.get(node.flow_id, 0))
        if node.run_input is not None:  # on one node's row of each run
            runs[node.flow_id] = node
    tracking_ids = {flow_id: node.tracking_id for flow_id, node in runs.items()}
    earlier = [
        sa.and_(N.c.flow_id == flow_id, N.c.position < position)
        for flow_id, position in stages.items()
        if position > 0
    ]
    outputs = _outputs(conn, tracking_ids, sa.or_(*earlier)) if earlier else {}
    return {
        flow_id: RunPayloads(
            node.tracking_id,
            _run_input(node.tracking_id, node.run_input),
            outputs.get(flow_id, []),
        )
        for flow_id, node in runs.items()
    }


def read_run(conn: Connection, which: sa.ColumnElement[bool]) -> RunPayloads | None:
    """Every payload of the run ``which`` selects; None if it is gone (pruned)."""
    row = conn.execute(sa.select(F.c.id, F.c.tracking_id, F.c.input).where(which)).first()
    if row is None:
        return None
    outputs = _outputs(conn, {row.id: row.tracking_id}, N.c.flow_id == row.id)
    return RunPayloads(row.tracking_id, _run_input(row.tracking_id, row.input), outputs[row.id])


def final_data(conn: Connection, flow_id: int, tracking_id: str, run_input: Any) -> dict[str, Any]:
    """The output of a COMPLETED run whose input the caller has already parsed."""
    where = f"fs_flows.input of run {tracking_id!r}"
    outputs = _outputs(conn, {flow_id: tracking_id}, N.c.flow_id == flow_id)
    stored = StoredJson.parsed(run_input, where, tracking_id)
    return RunPayloads(tracking_id, stored, outputs[flow_id]).final_data()
