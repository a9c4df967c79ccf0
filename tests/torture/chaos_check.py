"""The checks after a chaos round (issue 11, point 2): the engine against the journal.

The steps' journal (tests/torture/chaos_flows.py) is written by the step
functions themselves, outside the engine's tables. For every run:

* it is over, and ended as the reference model (tests/torture/model.py) says for
  its scripted failures: status, every node's status, attempts and output, and
  ctx.data. An attempt lost to the chaos (RESCUED: its worker died or its lease
  lapsed; RELEASED: handed back by a stopping worker) does not count against
  the step's retries but does take an attempt number, so the model is asked
  about the attempts that counted, renumbered 1, 2, ... (``Counted``);
* every attempt the trace says called the step (FAILED, COMPLETED) is in the
  journal exactly once, and every journaled attempt is in the trace; an attempt
  lost before its first journal line is the exception, which the journal cannot
  see; a journaled attempt the trace calls lost must have lost its worker (a
  SIGKILL), or the database must have been away between its start and its
  rescue (its outcome's write could wait past the lease: at least once);
* the journal's end of an attempt agrees with the trace (completed/raised);
* no step that had COMPLETED (committed so) ran again;
* no two attempts of one node overlapped in time: an attempt ends at its end
  line, or when its SIGKILLed process was dead (waited for). The one overlap
  allowed is a rescued attempt whose worker lived through a database outage:
  its lease lapsed while it ran, which the engine documents
  (test_database_outage.py) and fences (its outcome is never written);
* nothing is left RUNNING, WAITING or PENDING once every worker is stopped;
* no worker died but those killed (a worker may refuse to start while the
  database is away, never end once it started), and each SIGTERMed one stopped
  within a minute;
* a run the chaos retried is judged course by course (see ``check_model``);
* a map's items are nodes of their own (``m[3]``), journaled and counted as steps;
  the map's output is renumbered item by item (``maps_renumbered``).
"""

from __future__ import annotations

import itertools
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from flowsmith_worker.records import AttemptRecord, NodeRecord
from flowsmith_worker.run import FlowRun
from flowsmith_worker.storage import create_storage
from flowsmith_worker.storage.base import AttemptOutcome, FlowStatus, NodeStatus, Storage
from tests.torture import model
from tests.torture.chaos import DIED, STUCK, Record, Retried, Round
from tests.torture.chaos_events import EVENTS_FILE, check_events, parked_shape
from tests.torture.chaos_flows import CHILD_STARTED, MAP, STEP, FlowPlan, StepPlan, StepScript
from tests.torture.engine import Observed, scheduled_failure
from tests.torture.model import FlowShape, NodeEnd, StepShape
from tests.torture.verdict import CALLED, calls_of, check

# Attempts whose call's outcome the engine never got: its worker was lost (RESCUED;
# CANCELLED if its run was over by the rescue) or handed it back (RELEASED).
LOST = frozenset({AttemptOutcome.RESCUED, AttemptOutcome.RELEASED, AttemptOutcome.CANCELLED})
LEFT_OVER = frozenset({NodeStatus.RUNNING, NodeStatus.WAITING, NodeStatus.PENDING})
Key = tuple[str, str, int]  # run, step, attempt


@dataclass
class Call:
    """One call of a step function, as the journal saw it."""

    pid: int
    start: float
    end: float | None = None
    result: str | None = None  # "completed" or the exception's name


def read_journal(path: Path) -> tuple[dict[Key, list[Call]], list[str]]:
    """The calls by (run, step, attempt), and the problems of the file itself."""
    calls: dict[Key, list[Call]] = defaultdict(list)
    problems = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        key = (entry["run"], entry["step"], entry["attempt"])
        if entry["event"] == "start":
            calls[key].append(Call(entry["pid"], entry["t"]))
            continue
        open_ = [c for c in calls[key] if c.pid == entry["pid"] and c.end is None]
        if not open_:
            problems.append(f"{key}: an end without its start")
            continue
        open_[-1].end, open_[-1].result = entry["t"], entry["result"]
    return calls, problems


def check_round(played: Round, url: str) -> list[str]:
    """Every problem found in ``played``; none if the engine kept every promise."""
    calls, problems = read_journal(played.journal)
    workers = [h for h in played.record.harms if h.action in (DIED, STUCK)]
    problems += [f"worker {h.action}: {h.target}" for h in workers]
    storage = create_storage(url)
    try:
        for tracking_id, (flow_name, _data) in played.runs.items():
            plan = played.plans[flow_name]
            judged = check_run(storage, played.plans, plan, tracking_id, calls, played.record)
            problems += [f"{tracking_id}: {p}" for p in judged.problems]
        problems += check_events(
            played.journal.parent / EVENTS_FILE, played.runs, played.plans, storage
        )
    finally:
        storage.close()
    return problems


@dataclass(frozen=True)
class Judged:
    """A run's problems, and what the model expects of it (for its parent, if a child)."""

    problems: list[str]
    expected: model.RunEnd | None = None
    counted: dict[str, Counted] = field(default_factory=dict)


def check_run(
    storage: Storage,
    plans: dict[str, FlowPlan],
    plan: FlowPlan,
    tracking_id: str,
    calls: dict[Key, list[Call]],
    record: Record,
) -> Judged:
    """Check one run, and first the child run of each of its subflow steps."""
    flow = storage.get_flow(tracking_id=tracking_id, with_payloads=True)
    if flow is None:
        return Judged(["the run is missing"])
    status = FlowStatus(flow.status)
    if status not in (FlowStatus.COMPLETED, FlowStatus.FAILED):
        return Judged([f"the run is {status}, not over"])
    nodes = {n.step_name: n for n in storage.list_nodes(flow_id=flow.id, with_payloads=True)}
    final = (
        FlowRun(storage, plan.name, tracking_id).wait(timeout=0)
        if status is FlowStatus.COMPLETED
        else None
    )
    problems = []
    children: dict[str, Judged] = {}
    for step in plan.steps():
        child_id = f"{tracking_id}:{step.name}"
        if step.child and storage.get_flow(tracking_id=child_id, with_payloads=False):
            child = check_run(storage, plans, plans[step.child], child_id, calls, record)
            children[step.name] = child
            problems += [f"its child {child_id}: {p}" for p in child.problems]
    # A sleep, a wait or a map's own node calls nothing to journal (a map's items do).
    parked = {step.name for step in plan.steps() if step.parks or step.kind == MAP}
    for node in nodes.values():
        if node.status in LEFT_OVER:
            problems.append(f"{node.step_name} left {node.status} in a run that is over")
        own = {k: v for k, v in calls.items() if k[:2] == (tracking_id, node.step_name)}
        if node.step_name not in parked:
            problems += [f"{node.step_name}: {p}" for p in check_node(node, own, record)]
    ran = Ran(flow.input, status, nodes, final, flow.error)
    tried = record.retried.get(tracking_id, [])
    # How each retry left the nodes: as the next one found them, or as they ended.
    next_seen = [later.nodes for later in tried[1:]] + [nodes] if tried else []
    retried = [r for r, after in zip(tried, next_seen, strict=True) if took(r, after)]
    judged = check_model(plan, ran, calls, tracking_id, children, retried)
    return Judged(problems + judged.problems, judged.expected, judged.counted)


def took(retried: Retried, after: dict[str, NodeRecord]) -> bool:
    """Whether a retry of the chaos took, from the nodes as seen ``after`` it (at the
    next retry, or at the end): a node it was to run again has run again (it could
    take no new attempt only if its run were cancelled, which the chaos never does)."""
    again = [n for n in retried.nodes.values() if n.status not in model.DONE]
    return any(after[n.step_name].attempt > n.attempt for n in again)


def check_node(node: NodeRecord, calls: dict[Key, list[Call]], record: Record) -> list[str]:
    """The journal and the trace of one node agree; no overlap; nothing after completion."""
    problems = []
    attempts = {a.attempt: a for a in node.attempts}
    journaled = {number: made for (_run, _step, number), made in calls.items()}
    for number, made in sorted(journaled.items()):
        if node.status is NodeStatus.COMPLETED and number > node.attempt:
            problems.append(f"attempt {number} ran after the step COMPLETED at {node.attempt}")
        attempt = attempts.get(number)
        if attempt is None:
            problems.append(f"attempt {number} ran (journal) but is not in the trace")
            continue
        if len(made) > 1:
            problems.append(f"attempt {number} called the step {len(made)} times")
        problems += [f"attempt {number}: {p}" for p in agree(attempt, made[0], record)]
    for attempt in node.attempts:
        if attempt.outcome in CALLED and attempt.attempt not in journaled:
            problems.append(f"attempt {attempt.attempt} ({attempt.outcome}) is not in the journal")
    problems += overlaps(node, calls, record)
    return problems


def agree(attempt: AttemptRecord, call: Call, record: Record) -> list[str]:
    """The trace's outcome of an attempt is what its call's journal lines allow.

    A call whose worker was lost (SIGKILLed, or its lease lapsed in a database
    outage) has no outcome of its own: the engine records it RESCUED, or
    CANCELLED when its run was over by the time the rescue came. A subflow's
    start that finds its run over (a sibling failed it) starts no child: CANCELLED."""
    lost = call.pid in record.sigkilled or lease_could_lapse(call, attempt, record)
    if attempt.outcome in LOST:
        released = attempt.outcome is AttemptOutcome.RELEASED and call.pid in record.sigtermed
        no_child = attempt.outcome is AttemptOutcome.CANCELLED and call.result == CHILD_STARTED
        if lost or released or no_child:
            return []
        return [f"{attempt.outcome} though its worker {call.pid} was not lost"]
    if call.end is None:
        return [f"{attempt.outcome} in the trace, but its call never ended (journal)"]
    if call.result == CHILD_STARTED:
        return []  # a subflow step: its child run's end is its own
    completed = call.result == "completed"
    if (attempt.outcome is AttemptOutcome.COMPLETED) != completed:
        return [f"{attempt.outcome} in the trace, {call.result} in the journal"]
    return []


def end_of(call: Call, record: Record) -> float | None:
    """When the call was over: its end line, or its SIGKILLed process's death."""
    return call.end if call.end is not None else record.sigkilled.get(call.pid)


def lease_could_lapse(call: Call, attempt: AttemptRecord, record: Record) -> bool:
    """Whether the database was away (restarted, connections killed) between the call's
    start and the attempt's end in the trace (its rescue): an outcome not yet written
    when the database went away may wait past the lease, so a living worker loses it."""
    end = attempt.ended_at if attempt.ended_at is not None else float("inf")
    return any(start <= end and call.start <= stop for start, stop in record.outages())


def overlaps(node: NodeRecord, calls: dict[Key, list[Call]], record: Record) -> list[str]:
    """Two calls of the node at once, but a rescued one that met an outage."""
    attempts = {a.attempt: a for a in node.attempts}
    made = sorted(
        ((key[2], call) for key, each in calls.items() for call in each), key=lambda x: x[1].start
    )
    problems = []
    for (number, earlier), (later_number, later) in itertools.pairwise(made):
        end = end_of(earlier, record)
        if end is not None and end <= later.start:
            continue
        attempt = attempts.get(number)
        lapsed = (
            attempt is not None
            and attempt.outcome is AttemptOutcome.RESCUED
            and lease_could_lapse(earlier, attempt, record)
        )
        if not lapsed:
            problems.append(f"attempts {number} and {later_number} ran at the same time")
    return problems


# -- the reference model, on the attempts that counted ---------------------------


@dataclass(frozen=True)
class Counted:
    """A node's attempts that counted against its retries, renumbered 1, 2, ..."""

    actual: tuple[int, ...]  # the engine's attempt number of counted attempt 1, 2, ...
    last: int  # the engine's last attempt number

    @classmethod
    def of(cls, node: NodeRecord | None) -> Counted:
        if node is None:
            return cls((), 0)
        counted = tuple(a.attempt for a in node.attempts if a.outcome not in LOST)
        return cls(counted, max((a.attempt for a in node.attempts), default=0))

    def number(self, counted: int) -> int:
        """The engine's number of counted attempt ``counted`` (past the trace: the next ones)."""
        if counted <= len(self.actual):
            return self.actual[counted - 1]
        return self.last + counted - len(self.actual)

    def renumbered(self, actual: int) -> int:
        return self.actual.index(actual) + 1 if actual in self.actual else actual


def effective_step(
    step: StepPlan, scripts: dict[str, StepScript], counted: Counted, children: dict[str, Judged]
) -> StepShape:
    """The model's step: it fails on the counted attempts whose engine number is scripted
    to; a subflow step (no retries) on its first if its child run is to fail."""
    if step.child is not None:
        child = children.get(step.name)
        to_fail = (
            child is not None
            and child.expected is not None
            and (child.expected.status is FlowStatus.FAILED)
        )
        return StepShape(step.name, 0, frozenset({1} if to_fail else ()), step.condition)
    allowance = step.retries + 1
    script = scripts[step.name]
    # A retry of the run gives the step its allowance afresh, after the attempts made.
    most = len(counted.actual) + allowance
    fails = frozenset(n for n in range(1, most + 1) if counted.number(n) in script.fails_on)
    return StepShape(step.name, step.retries, fails, step.condition)


def map_shape(
    step: StepPlan, scripts: dict[str, StepScript], counted: dict[str, Counted]
) -> StepShape:
    """The model's map: each item fails on its counted attempts scripted to (as a step)."""
    items = [
        effective_step(replace(step, name=name, kind=STEP), scripts, counted[name], {})
        for name in step.node_names()[1:]
    ]
    shape = model.MapShape(
        step.items,
        tuple(item.fails_on for item in items),
        step.retries,
        step.allow_failures,
        step.max_parallel,
    )
    return StepShape(step.name, map=shape)


_ATTEMPT = re.compile(r"attempt (\d+) is scheduled to fail")


def maps_renumbered(
    plan: FlowPlan,
    nodes: dict[str, NodeRecord],
    ends: dict[str, NodeEnd],
    final: dict[str, Any] | None,
    counted: dict[str, Counted],
) -> tuple[dict[str, NodeEnd], dict[str, Any] | None]:
    """``ends`` and ``final`` with each map's own node as the model words it: its
    attempts but those lost (a stopped map's is CANCELLED), and its output (the
    items' outputs, or {"output"}/{"error"}) renumbered item by item."""
    ends, final = dict(ends), None if final is None else dict(final)
    for step in (step for step in plan.steps() if step.kind == MAP):
        node = nodes.get(step.name)
        if node is None:
            continue
        kept = tuple(
            a.outcome for a in node.attempts if a.outcome not in LOST - {AttemptOutcome.CANCELLED}
        )
        output = map_output(node.output, step, counted)
        ends[step.name] = NodeEnd(node.status, len(kept), kept, output)
        if final is not None and step.name in final:
            final[step.name] = map_output(final[step.name], step, counted)
    return ends, final


def map_output(output: Any, step: StepPlan, counted: dict[str, Counted]) -> Any:
    if not isinstance(output, list):
        return output
    renumbered: list[Any] = []
    for name, each in zip(step.node_names()[1:], output, strict=False):
        mine = counted[name]
        if step.allow_failures and isinstance(each, dict) and "error" in each:
            renumbered.append({"error": renumbered_text(each["error"], mine)})
        elif step.allow_failures and isinstance(each, dict) and "output" in each:
            renumbered.append({"output": renumbered_output(each["output"], mine)})
        else:
            renumbered.append(renumbered_output(each, mine))
    return renumbered


def renumbered_text(error: str, counted: Counted) -> str:
    """An item's error as the model words it: its counted attempt number."""
    return _ATTEMPT.sub(
        lambda found: f"attempt {counted.renumbered(int(found[1]))} is scheduled to fail", error
    )


def renumbered_output(output: Any, counted: Counted) -> Any:
    if isinstance(output, dict) and "attempt" in output:
        return {**output, "attempt": counted.renumbered(output["attempt"])}
    return output


@dataclass(frozen=True)
class Ran:
    """How the engine says a run went."""

    input: dict[str, Any]
    status: FlowStatus
    nodes: dict[str, NodeRecord]
    final: dict[str, Any] | None  # ctx.data of a COMPLETED run
    error: str | None


def check_model(
    plan: FlowPlan,
    ran: Ran,
    calls: dict[Key, list[Call]],
    tracking_id: str,
    children: dict[str, Judged],
    retried: list[Retried] | None = None,
) -> Judged:
    """The run's end is one the model allows for its script, given the attempts lost.

    A subflow step is, to the model, a step that fails if its child run is to fail,
    and whose output is the child's final ctx.data (the model's, for ``children``).

    A run the chaos retried (``retried``: how it was at each retry that took) ran
    several courses: each must have ended FAILED as the model says from where the
    one before left its nodes (the first from nothing), and the last as the model
    says from the last retry's nodes (model.run's ``start``: a FAILED or stopped
    node runs again with a fresh allowance, attempt numbers counting on; a step's
    script names the attempts that fail however many retries came before).
    """
    data = ran.input
    counted = {
        name: Counted.of(ran.nodes.get(name)) for step in plan.steps() for name in step.node_names()
    }
    scripts = {name: StepScript.from_json(s) for name, s in data["script"].items()}
    shape = FlowShape(
        tuple(
            tuple(
                parked_shape(s, ran.nodes.get(s.name))
                if s.parks
                else map_shape(s, scripts, counted)
                if s.kind == MAP
                else effective_step(s, scripts, counted[s.name], children)
                for s in stage
            )
            for stage in plan.stages
        ),
        data,
    )
    start: dict[str, NodeEnd] = {}
    for number, before in enumerate(retried or [], 1):
        course = course_before(before, counted, children)
        try:
            check(shape, model.run(shape, start), course)
        except AssertionError as failure:
            return Judged([f"before retry {number}, not as the model says ({failure})"])
        start = course.nodes
    ends = {name: node_end(node, counted[name], children) for name, node in ran.nodes.items()}
    ends, final = maps_renumbered(plan, ran.nodes, ends, ran.final, counted)
    final = renumbered_data(final, counted, children)
    observed = Observed(
        ran.status,
        ends,
        final if ran.status is FlowStatus.COMPLETED else None,
        renumbered_error(ran.error, ends, counted, set(children)),
        journal_calls(calls, tracking_id, counted),
    )
    expected = with_children_data(model.run(shape, start), children)
    try:
        check(shape, expected, observed)
    except AssertionError as failure:
        said = f"model: {expected.status} {expected.nodes} {expected.data}"
        done = f"engine: {observed.status} {observed.nodes} {observed.data} {observed.error!r}"
        done += f" journal: {observed.calls}"
        return Judged([f"not as the model says ({failure}); {said}; {done}"], expected, counted)
    return Judged([], expected, counted)


def course_before(
    retried: Retried, counted: dict[str, Counted], children: dict[str, Judged]
) -> Observed:
    """The FAILED run as a retry found it, as the model words it. Its attempts are the
    first of the final trace's, so they are renumbered alike; the journal's share of
    them is checked with the whole journal, at the run's end."""
    ends = {name: node_end(n, counted[name], children) for name, n in retried.nodes.items()}
    error = renumbered_error(retried.error, ends, counted, set(children))
    return Observed(FlowStatus.FAILED, ends, None, error, calls_of(ends))


def with_children_data(expected: model.RunEnd, children: dict[str, Judged]) -> model.RunEnd:
    """``expected`` with each completed subflow step's output the child's final data."""
    nodes, data = dict(expected.nodes), dict(expected.data)
    for name, child in children.items():
        end = nodes.get(name)
        if child.expected is None or end is None or end.status is not NodeStatus.COMPLETED:
            continue
        nodes[name] = replace(end, output=child.expected.data)
        if name in data:
            data[name] = child.expected.data
    return replace(expected, nodes=nodes, data=data)


def node_end(node: NodeRecord, counted: Counted, children: dict[str, Judged]) -> NodeEnd:
    outcomes = tuple(a.outcome for a in node.attempts if a.outcome not in LOST)
    output = renumbered_output(node.output, counted)
    if node.step_name in children and isinstance(node.output, dict):
        output = renumbered_data(node.output, children[node.step_name].counted, {})
    return NodeEnd(node.status, len(outcomes), outcomes, output)


def renumbered_data(
    final: dict[str, Any] | None, counted: dict[str, Counted], children: dict[str, Judged]
) -> dict[str, Any]:
    """ctx.data with each step's output renumbered (a child's data, by its own steps)."""
    renumbered = {}
    for key, value in (final or {}).items():
        if key in children and isinstance(value, dict):
            renumbered[key] = renumbered_data(value, children[key].counted, {})
        elif key in counted:
            renumbered[key] = renumbered_output(value, counted[key])
        else:
            renumbered[key] = value
    return renumbered


def renumbered_error(
    error: str | None, ends: dict[str, NodeEnd], counted: dict[str, Counted], subflows: set[str]
) -> str | None:
    """The run's error as the model words it: the failing step's counted attempt
    (a timeout, or a subflow step's failed child, is the model's scheduled failure)."""
    if error is None:
        return None
    for name, end in ends.items():
        if end.status is not NodeStatus.FAILED or not end.attempts:
            continue
        actual = counted[name].number(end.attempt)
        model_words = scheduled_failure(name, end.attempt)
        timed_out = f"step {name!r} ran " in error
        if scheduled_failure(name, actual) in error or timed_out or name in subflows:
            return f"{error}\n{model_words}"
    return error


def journal_calls(
    calls: dict[Key, list[Call]], tracking_id: str, counted: dict[str, Counted]
) -> dict[str, list[int]]:
    """The counted attempts the journal saw called, renumbered, in call order."""
    seen: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for (run, step, number), made in calls.items():
        if run != tracking_id or step not in counted or number not in counted[step].actual:
            continue
        seen[step] += [(call.start, counted[step].renumbered(number)) for call in made]
    return {step: [n for _t, n in sorted(each)] for step, each in seen.items()}


def explain(played: Round, url: str, tracking_id: str) -> str:
    """A run's trace and journal lines, to read when a check failed for it."""
    lines = [f"trace and journal of {tracking_id}:"]
    storage = create_storage(url)
    try:
        flow = storage.get_flow(tracking_id=tracking_id, with_payloads=False)
        assert flow is not None
        lines.append(f"  run {flow.status} error={flow.error!r}")
        for node in storage.list_nodes(flow_id=flow.id):
            made = [(a.attempt, str(a.outcome), a.worker_id) for a in node.attempts]
            lines.append(f"  {node.step_name} {node.status} {node.attempt} {made}")
    finally:
        storage.close()
    lines += [
        f"  journal {line}"
        for line in played.journal.read_text().splitlines()
        if f'"run": "{tracking_id}"' in line
    ]
    for before in played.record.retried.get(tracking_id, []):
        made = {name: (str(n.status), n.attempt) for name, n in before.nodes.items()}
        lines.append(f"  retried by the chaos when its nodes were {made}")
    sigkilled, sigtermed = played.record.sigkilled, played.record.sigtermed
    lines.append(f"  sigkilled {sigkilled} sigtermed {sigtermed}")
    lines += [f"  harm {harm}" for harm in played.record.harms]
    return "\n".join(lines)
