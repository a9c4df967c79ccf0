"""The README's state diagrams (section "States") name exactly the states of the code.

Each Mermaid ``stateDiagram-v2`` block says which enum it draws in a ``%% EnumName``
comment. A state of the enum missing from its diagram, or a state in the diagram that
the enum does not have, fails the suite; so does a line the parser does not understand
(it could hide a state), and an arrow that progress.py's rules take but the diagram
does not draw.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import pytest

from flowsmith_worker import FlowStatus, NodeStatus, progress

README = Path(__file__).resolve().parents[2] / "README.md"
ENUMS: dict[str, type[StrEnum]] = {"FlowStatus": FlowStatus, "NodeStatus": NodeStatus}
START_OR_END = "[*]"

_BLOCK = re.compile(r"^```mermaid\n(.*?)^```", re.MULTILINE | re.DOTALL)
_ARROW = re.compile(r"^(\S+)\s*-->\s*(\S+?)\s*(?::.*)?$")
_STATE = re.compile(r"^state\s+(\w+)\s*$")
_IGNORED = re.compile(r"^(stateDiagram-v2|direction\s+(LR|RL|TB|BT))$")
_ENUM_NAME = re.compile(r"^%%\s*(\w+)\s*$")


@dataclass(frozen=True)
class Diagram:
    enum_name: str
    states: frozenset[str]
    arrows: frozenset[tuple[str, str]]


def parse_diagram(block: str) -> Diagram:
    """The enum a block draws, its states and its arrows; ValueError on any other line."""
    enum_name = ""
    states: set[str] = set()
    arrows: set[tuple[str, str]] = set()
    for raw in block.splitlines():
        line = raw.strip()
        if not line or _IGNORED.match(line):
            continue
        if named := _ENUM_NAME.match(line):
            enum_name = named[1]
        elif arrow := _ARROW.match(line):
            arrows.add((arrow[1], arrow[2]))
            states.update({arrow[1], arrow[2]} - {START_OR_END})
        elif declared := _STATE.match(line):
            states.add(declared[1])
        elif not line.startswith("%%"):
            raise ValueError(f"a line the diagram check does not understand: {line!r}")
    if enum_name not in ENUMS:
        raise ValueError(f"a state diagram must name its enum ({', '.join(ENUMS)}) in %% ...")
    return Diagram(enum_name, frozenset(states), frozenset(arrows))


def diagrams(text: str) -> dict[str, Diagram]:
    """The state diagrams of a README's text, by the enum each one draws."""
    found = [parse_diagram(b) for b in _BLOCK.findall(text) if "stateDiagram-v2" in b]
    by_enum = {d.enum_name: d for d in found}
    if len(by_enum) != len(found):
        raise ValueError("two state diagrams draw the same enum")
    return by_enum


def mismatches(text: str) -> list[str]:
    """What differs between the diagrams and the enums, one line each (none: in sync)."""
    drawn = diagrams(text)
    problems = [f"no state diagram draws {name}" for name in ENUMS if name not in drawn]
    for name, diagram in drawn.items():
        values = {str(member) for member in ENUMS[name]}
        problems += [f"{name}.{v} is not in its diagram" for v in sorted(values - diagram.states)]
        problems += [f"{name} has no state {s}" for s in sorted(diagram.states - values)]
    return problems


def sabotaged(old: str, new: str) -> str:
    """The README's text with ``old`` (which must be there) replaced by ``new``, once."""
    text = README.read_text()
    assert old in text
    return text.replace(old, new, 1)


def test_the_readme_draws_every_state_and_no_other() -> None:
    """Both diagrams exist, and each names exactly the values of its enum."""
    assert mismatches(README.read_text()) == []


def test_a_state_left_out_of_a_diagram_is_reported() -> None:
    """The check itself can fail: a node diagram without its arrows into and out of SKIPPED."""
    lines = README.read_text().splitlines()
    text = "\n".join(line for line in lines if not ("-->" in line and "SKIPPED" in line))
    assert mismatches(text) == ["NodeStatus.SKIPPED is not in its diagram"]


def test_a_state_the_enum_does_not_have_is_reported() -> None:
    """The check itself can fail: a run diagram naming a PAUSED state."""
    text = sabotaged("PENDING --> RUNNING: a worker claims", "PENDING --> PAUSED: a worker claims")
    assert mismatches(text) == ["FlowStatus has no state PAUSED"]


def test_two_diagrams_of_one_enum_or_none_for_an_enum_are_refused() -> None:
    """Each enum has one diagram: two of NodeStatus is an error, none of FlowStatus too."""
    with pytest.raises(ValueError, match="the same enum"):
        mismatches(sabotaged("%% FlowStatus", "%% NodeStatus"))
    unnamed = sabotaged("    %% FlowStatus\n", "")
    with pytest.raises(ValueError, match="must name its enum"):
        mismatches(unnamed)


def test_a_line_the_check_cannot_read_fails_it() -> None:
    """A line that is neither an arrow, a state, a comment nor a layout setting could
    hide a state: it is an error, not skipped."""
    text = sabotaged("    [*] --> PENDING: enqueued", "    [*] -> PENDING")
    with pytest.raises(ValueError, match="does not understand"):
        mismatches(text)


def test_the_moves_progress_decides_are_drawn() -> None:
    """Each set of statuses progress.py moves in bulk, and each fate a node can meet, is
    an arrow of the node diagram: cancel, a run's failure, a retry of the run, a retry of
    an attempt (from RUNNING or WAITING) and each ending."""
    arrows = diagrams(README.read_text())["NodeStatus"].arrows
    wanted = {(str(s), str(NodeStatus.CANCELLED)) for s in progress.ENDED_BY_CANCEL}
    wanted |= {(str(s), str(NodeStatus.CANCELLED)) for s in progress.STOPPED_BY_RUN_FAILURE}
    wanted |= {(str(s), str(NodeStatus.PENDING)) for s in progress.RESUMED_ON_RETRY}
    for running in (NodeStatus.RUNNING, NodeStatus.WAITING):
        wanted.add((str(running), str(progress.Retry.status)))
        wanted |= {(str(running), str(ending.status)) for ending in progress.Ending}
    assert wanted - arrows == set()
