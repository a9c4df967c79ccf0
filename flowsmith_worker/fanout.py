"""Dynamic fan-out (``flow.map``): a node per item of a list, decided purely.

Design (issue 14, point 3).

* The map step is a step of the plan (PlannedStep.kind MAP, alone in its stage)
  with a node of its own, created when its stage is reached like any step's. The
  worker that claims it calls ``items(ctx)`` (the step's condition first), and
  hands the list to the storage (Storage.start_map), which in one transaction
  makes the map node WAITING (no lease, no slot: like a subflow step) and inserts
  every item node with set-based INSERTs, ITEMS_PER_INSERT rows each: 10,000
  items are 20 statements, never one per item.
* An item node is an ordinary fs_nodes row of the map's stage: named
  ``charge_items[17]`` (``item_name``), with a NEGATIVE group_index,
  ``-(1 + index)`` (``group_index_of``). The sign marks an item without a new
  column: a plan step's node has group_index >= 0, so ctx.data and a run's final
  data (which read COMPLETED nodes with group_index >= 0) never see an item's
  output, only the map's list. Until it completes, an item node's ``output``
  holds its item (JSON), read once per attempt by the worker that runs it
  (Storage.map_item): the claim, the batch write and the lease are those of any
  node, unchanged.
* ``max_parallel=N``: the first N items are inserted runnable, the others HELD:
  PENDING with run_after at parking.FOREVER, which the claim's due-time condition
  already skips (no statement added to the claim). Each item that ends (COMPLETED,
  or FAILED under allow_failures) releases the held item of lowest index
  (run_after = now), in the transaction that writes its end, under its run's
  lock. So at most N items of a map are ever released and unended: at most N run
  at once across all workers. A retried or rescued item keeps its place.
* Completion: the end of an item asks whether any item of the map has not ended
  (one query, stopping at the first it finds; a COUNT would visit every item at
  each item's end); the last one collects the items' outputs, in item order, into
  the map node's output (``collect``, joining the stored JSON texts, nothing
  parsed), completes it and moves the run on as any finished step does. An empty
  list completes the map at once with ``[]``.
* Failure: an item follows its own retries (the map's ``retries``, per item).
  Failed for good, it fails the run as a failed parallel sibling does: the items
  not started are stopped, those running end when they report. With
  ``allow_failures=True`` it ends FAILED but the map goes on, and the map's output
  is a list, in item order, of ``{"output": value}`` or ``{"error": message}``.
  An item lost more than ``max_rescues`` times is such a failure too. Resuming a
  FAILED run (``flowsmith retry``) runs again only its failed and stopped items,
  one UPDATE per chunk of IDS_PER_STATEMENT; the completed ones keep their outputs
  (``held_on_resume`` keeps max_parallel). The failure stops the map's WAITING node
  too (CANCELLED, as its items not started), so nothing of the run is in flight and
  its compensations can begin; a retry puts it back to WAITING for its items, never
  runs ``items(ctx)`` again once they were started.
* Why not at the claim: a claim that skipped the items of a map at its limit would
  count that map's RUNNING items in every claim; holding them costs one release
  per ended item, only for maps with a limit.
* Shown: `flowsmith status` gives a map one row counting its items by status
  (``progress_of``; HELD for those waiting under max_parallel); FlowRun.trace()
  and ``--json`` list the items after their map, in item order
  (``in_plan_order``); FlowRun.map_progress(name). Metrics count items under the
  map's name.

Costs: on the item path only, one read of the item per attempt (map_item) and,
at an item's end, the query for an unended item (plus, under max_parallel, the
release: a read and an update). The claim, the batch write and chaining are
unchanged; a map is a step alone in its stage and is never chained after.

Not yet (next): the dashboard lists items one row each; trace() rebuilds each
item's ctx.data (heavy for 10,000 items: use map_progress or
``with_payloads=False``); a map inside a parallel group is refused.

Must never do I/O (as progress.py): every input is a plain value.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from flowsmith_worker.parking import FOREVER
from flowsmith_worker.records import NodeRecord, NodeStatus

# Rows per INSERT of item nodes: 500 rows of 12 values stay under every
# database's bound-parameter limit (SQLite 32,766, PostgreSQL 65,535).
ITEMS_PER_INSERT = 500
# Ids per ``id IN (...)`` of a statement about many items (SQLite binds at most 32,766).
IDS_PER_STATEMENT = 5000
# Ended items: what the map waits for. FAILED only under allow_failures (else a
# failed item fails the run, and the map waits no more).
ENDED = frozenset({NodeStatus.COMPLETED, NodeStatus.FAILED})
_ITEM_NAME = re.compile(r"^(?P<map>.+)\[(?P<index>\d+)\]$")


def chunks(values: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """``values`` in slices of at most ``size``: one statement each."""
    return (values[start : start + size] for start in range(0, len(values), size))


def item_name(map_name: str, index: int) -> str:
    """The step name of the node of item ``index`` of the map ``map_name``."""
    return f"{map_name}[{index}]"


# How many characters a map's name must leave free, within a step name's limit, for
# its items' "[N]" suffix: indexes up to 10 digits (ten billion items, far past any
# list a run's payload limits let through).
ITEM_SUFFIX_ROOM = len(item_name("", 10**10 - 1))


def parse_item_name(step_name: str) -> tuple[str, int] | None:
    """(map name, item index) of an item node's step name; None for any other name."""
    found = _ITEM_NAME.match(step_name)
    if found is None:
        return None
    return found["map"], int(found["index"])


def group_index_of(index: int) -> int:
    """An item node's group_index: negative, so no reader of plan steps' nodes takes it."""
    return -(1 + index)


def index_of(group_index: int) -> int:
    return -group_index - 1


def released_at_start(count: int, max_parallel: int | None) -> int:
    """How many of ``count`` items are runnable at once when the map starts."""
    return count if max_parallel is None else min(count, max_parallel)


def held_on_resume(resumed: Sequence[int], running: int, max_parallel: int | None) -> set[int]:
    """Which of the ``resumed`` item indexes stay held when a FAILED run is resumed:
    those beyond the places that ``running`` items (still reporting) leave free."""
    if max_parallel is None:
        return set()
    free = max(0, max_parallel - running)
    return set(sorted(resumed)[free:])


def not_a_list(map_name: str, items: Any) -> TypeError:
    """The error of a map whose ``items`` did not return a list."""
    return TypeError(
        f"map step {map_name!r}: items(ctx) returned a {type(items).__name__} "
        f"({_short(items)}), not a list; return a list (or tuple) of the items, "
        "one node runs per item"
    )


def collect(items: Iterable[tuple[str, str | None, str | None]], allow_failures: bool) -> str:
    """The map's output (JSON text) from its items' (status, output, error), in item order.

    Joined from the stored JSON texts, nothing parsed: 10,000 outputs are one
    string join. Without allow_failures every item COMPLETED: a list of outputs.
    With it, a list of {"output": value} or {"error": the error's last line}.
    """
    if not allow_failures:
        return "[" + ",".join(output or "null" for _status, output, _error in items) + "]"
    parts = [
        '{"output":' + (output or "null") + "}"
        if status == NodeStatus.COMPLETED
        else '{"error":' + json.dumps(last_line(error)) + "}"
        for status, output, error in items
    ]
    return "[" + ",".join(parts) + "]"


def last_line(error: str | None) -> str:
    """An item's error as the map's output keeps it: the exception and its message."""
    text = (error or "").strip()
    return text.splitlines()[-1] if text else ""


# An item not yet released by max_parallel, as `flowsmith status` counts it.
HELD = "HELD"


@dataclass(frozen=True)
class MapProgress:
    """How far a map's items are: how many in each status (HELD: waiting for a place
    under max_parallel), for `flowsmith status` and FlowRun.map_progress."""

    name: str
    counts: dict[str, int]

    @property
    def items(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """E.g. "10 items: 7 COMPLETED, 2 RUNNING, 1 HELD" (the most advanced first)."""
        order = ["COMPLETED", "FAILED", "RUNNING", "PENDING", HELD, "CANCELLED"]
        parts = [f"{self.counts[s]} {s}" for s in order if self.counts.get(s)]
        parts += [f"{n} {s}" for s, n in sorted(self.counts.items()) if s not in order and n]
        noun = "item" if self.items == 1 else "items"
        return f"{self.items} {noun}: {', '.join(parts)}" if parts else f"0 {noun}"


def progress_of(map_name: str, nodes: Iterable[NodeRecord]) -> MapProgress:
    """The progress of the map ``map_name`` from its run's nodes (its items among them)."""
    counts: Counter[str] = Counter()
    for node in nodes:
        found = parse_item_name(node.step_name)
        if found is None or found[0] != map_name or node.group_index >= 0:
            continue
        held = node.status == NodeStatus.PENDING and node.run_after >= FOREVER
        counts[HELD if held else str(node.status)] += 1
    return MapProgress(map_name, dict(counts))


def is_item(node: NodeRecord) -> bool:
    """Whether the node is an item of a map (see group_index_of)."""
    return node.group_index < 0


def items_of_maps_done(nodes: Iterable[NodeRecord]) -> set[int]:
    """The ids of the items of each map COMPLETED among ``nodes`` (a run's): a retry
    leaves them alone, a FAILED one (under allow_failures) too."""
    listed = list(nodes)
    done = {n.position for n in listed if not is_item(n) and n.status == NodeStatus.COMPLETED}
    return {n.id for n in listed if is_item(n) and n.position in done}


def in_plan_order(nodes: Iterable[NodeRecord]) -> list[NodeRecord]:
    """Nodes by stage, each map's items after the map's own node, in item order."""
    return sorted(nodes, key=lambda n: (n.position, n.group_index < 0, abs(n.group_index)))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
