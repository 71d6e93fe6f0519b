"""A task's DAG laid out for SVG on the server: one column per depth, nodes coloured by state.

Pure layout (no database, no HTML): the steps the task has, plus the template steps it has no
row for (a decision's branch not taken, a step still waiting for its decision or fan-out), go
in; boxes and edges with coordinates come out, and a template draws them. Long runs of batch
workers are drawn as one box (`render.collapse_workers`), as `task show` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tasker_pg.render import collapse_workers
from tasker_pg.responses import StepNotCreated, StepResponse

NODE_W = 190
NODE_H = 46
COL_GAP = 56
ROW_GAP = 14
MARGIN = 10
NAME_CHARS = 24

# The template's reason for a worker template (its workers are drawn instead).
_WORKER_TEMPLATE_MARK = "created workers of"


@dataclass(frozen=True)
class Node:
    """One box: a step (or a run of batch workers, or a template step with no row)."""

    name: str
    label: str
    state: str
    """The step's state; `not_created` for a branch not taken, `not_created_yet` for a step
    that may still be created."""
    detail: str
    """The second line: attempts for a step, `not taken` / `not created yet` otherwise."""
    title: str
    """The tooltip: full name, state and readiness reason."""
    dynamic: bool
    """Created at run time (a decision's branch or a batch worker)."""
    step_uuid: str | None
    x: int
    y: int


@dataclass(frozen=True)
class Edge:
    path: str
    dashed: bool


@dataclass(frozen=True)
class Layout:
    nodes: list[Node]
    edges: list[Edge]
    width: int
    height: int
    node_w: int = NODE_W
    node_h: int = NODE_H


@dataclass(frozen=True)
class TemplateStep:
    """A step of the task's template: its parents by name, and whether it is created at run
    time."""

    name: str
    parents: list[str]
    dynamic: bool


def _short(text: str, width: int = NAME_CHARS) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def layout(
    steps: Sequence[StepResponse],
    not_created: Sequence[StepNotCreated],
    template: Mapping[str, TemplateStep],
    parents: Mapping[str, Sequence[str]],
) -> Layout:
    """Columns by depth (a root at 0, a step one right of its deepest parent), template order
    inside a column. `parents`: each step's parents by name from its edges (a batch worker's
    parent is its fan-out step, an aggregate's its workers); a template step with no row gets
    its template parents."""
    ordered, summaries = collapse_workers(list(steps))
    boxes: list[tuple[str, list[str], Node]] = []
    collapsed_of: dict[str, str] = {}
    position = 0  # collapse_workers keeps order: a run stands for its workers, in sequence
    for step in ordered:
        group = summaries.get(step.name)
        size = int(group.split(" ", 1)[0]) if group is not None else 1
        for member in steps[position : position + size]:
            collapsed_of[member.name] = step.name
        position += size
        tpl = template.get(step.name)
        dynamic = tpl.dynamic if tpl is not None else True  # no template row: a batch worker
        reason = step.readiness_reason or ""
        boxes.append(
            (
                step.name,
                list(parents.get(step.name, step.dependencies)),
                Node(
                    name=step.name,
                    label=_short(step.name),
                    state=step.current_state,
                    detail=group
                    if group is not None
                    else f"{step.current_state} · {step.attempts}/{step.max_attempts}",
                    title=f"{step.name}: {step.current_state}" + (f" ({reason})" if reason else ""),
                    dynamic=dynamic,
                    step_uuid=step.step_uuid,
                    x=0,
                    y=0,
                ),
            )
        )
    for missing in not_created:
        if _WORKER_TEMPLATE_MARK in missing.reason:
            continue
        tpl = template.get(missing.name)
        not_yet = missing.reason.startswith("not created yet")
        boxes.append(
            (
                missing.name,
                list(tpl.parents) if tpl is not None else [],
                Node(
                    name=missing.name,
                    label=_short(missing.name),
                    state="not_created_yet" if not_yet else "not_created",
                    detail="not created yet" if not_yet else "not taken",
                    title=f"{missing.name}: {missing.reason}",
                    dynamic=True,
                    step_uuid=None,
                    x=0,
                    y=0,
                ),
            )
        )
    names = {name for name, _, _ in boxes}
    parents_of: dict[str, list[str]] = {}
    for name, given, _ in boxes:
        seen: list[str] = []
        for parent in given:
            drawn = collapsed_of.get(parent, parent)
            if drawn in names and drawn != name and drawn not in seen:
                seen.append(drawn)
        parents_of[name] = seen

    depths: dict[str, int] = {}

    def depth(name: str, path: frozenset[str]) -> int:
        if name not in depths:
            parents = [p for p in parents_of.get(name, []) if p not in path]
            depths[name] = 1 + max((depth(p, path | {name}) for p in parents), default=-1)
        return depths[name]

    rows_in: dict[int, int] = {}
    placed: dict[str, Node] = {}
    for name, _, node in boxes:
        col = depth(name, frozenset())
        row = rows_in.get(col, 0)
        rows_in[col] = row + 1
        placed[name] = dataclasses.replace(
            node, x=MARGIN + col * (NODE_W + COL_GAP), y=MARGIN + row * (NODE_H + ROW_GAP)
        )
    edges: list[Edge] = []
    for name, _, _ in boxes:
        child = placed[name]
        for parent_name in parents_of[name]:
            source = placed[parent_name]
            x1, y1 = source.x + NODE_W, source.y + NODE_H // 2
            x2, y2 = child.x, child.y + NODE_H // 2
            mid = (x1 + x2) // 2
            edges.append(
                Edge(
                    path=f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}",
                    dashed=child.step_uuid is None or source.step_uuid is None,
                )
            )
    cols = max(rows_in, default=0) + 1
    rows = max(rows_in.values(), default=0)
    return Layout(
        nodes=list(placed.values()),
        edges=edges,
        width=2 * MARGIN + cols * NODE_W + (cols - 1) * COL_GAP,
        height=2 * MARGIN + rows * NODE_H + max(rows - 1, 0) * ROW_GAP,
    )
