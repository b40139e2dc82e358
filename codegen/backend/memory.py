"""Static memory plan: one arena, offsets chosen from tensor liveness.

Terms
-----
* Step i is the execution of `graph.nodes[i]`. A tensor is live from the step that produces it to
  the last step that reads it (inclusive). The graph input is produced before step 0, the graph
  output stays live after the last step.
* A buffer is the storage of one or more tensors: a `reshape` output aliases its input (same
  bytes, no copy), and an in-place kernel (e.g. `add`) writes its output over an input that dies at
  that step. Buffers holding the graph input or an output live outside the arena, in the caller's
  `in`/`out` arrays; all other buffers live in the arena.
* Several outputs: every output stays live after the last step. The buffer of an output is the
  caller's array of the first output it holds (`Buffer.port`); an output whose bytes are already
  in another output's array or in `in` (the same tensor twice, a reshape of another output or of
  the input) is copied into its own array after the last step (`MemoryPlan.output_copies`).
* Two arena buffers conflict when their live ranges share a step. The **lower bound** of the arena
  is the largest sum of the sizes of arena buffers live at one step (the largest sum of
  simultaneously live tensors, in-place pairs counted once). No plan can be smaller.

The planner tries a few placement strategies (two-sided ping-pong at the lower bound, greedy
first-fit/best-fit in several orders) and keeps the smallest arena; on chains the ping-pong
placement always reaches the lower bound. When no strategy reaches it, a seeded local search over
first-fit orders (bounded work, deterministic) tries to close the gap. The remaining gap is
reported. Every plan is checked: conflicting buffers never overlap.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from codegen.core.errors import UnsupportedModelError
from codegen.core.ir import Graph, TensorUnion

ARENA, INPUT, OUTPUT = "arena", "input", "output"


class MemoryPlanError(UnsupportedModelError):
    """The graph's tensors cannot be planned (dangling tensor, bad alias...)."""


@dataclass(frozen=True)
class Buffer:
    """The storage shared by `tensors` (reshape aliases and in-place outputs)."""

    name: str
    tensors: tuple[str, ...]
    size: int
    """Bytes used by the data (int8 elements)."""
    start: int
    end: int
    location: str
    offset: int = 0
    """Byte offset in the arena (0 for buffers outside the arena)."""
    port: int = 0
    """The output (its index in `Graph.outputs`) whose caller array holds an OUTPUT buffer."""

    def conflicts(self, other: Buffer) -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass(frozen=True)
class MemoryPlan:
    buffers: tuple[Buffer, ...]
    tensor_buffer: Mapping[str, str]
    inplace: Mapping[str, str]
    """Node name -> the input tensor whose storage its output reuses."""
    arena_bytes: int
    lower_bound: int
    align: int
    method: str
    output_copies: tuple[tuple[int, str], ...] = ()
    """(output index, tensor) of the outputs the run function copies into their caller array
    after the last step: their bytes are in `in` or in another output's array."""

    @property
    def copy_output(self) -> bool:
        """True when the (first) output is only an alias of the input (the run function copies)."""
        return any(k == 0 for k, _ in self.output_copies)

    def buffer(self, name: str) -> Buffer:
        for b in self.buffers:
            if b.name == name:
                return b
        raise KeyError(name)

    def buffer_of(self, tensor: str) -> Buffer:
        return self.buffer(self.tensor_buffer[tensor])

    @property
    def gap(self) -> int:
        """Bytes above the lower bound (0 when the plan is optimal)."""
        return self.arena_bytes - self.lower_bound

    def summary(self) -> dict[str, Any]:
        """Plain data for report.json."""
        return {
            "arena_bytes": self.arena_bytes,
            "arena_lower_bound": self.lower_bound,
            "arena_gap_bytes": self.gap,
            "align": self.align,
            "method": self.method,
            "inplace": dict(sorted(self.inplace.items())),
            "buffers": [
                {
                    "name": b.name,
                    "tensors": list(b.tensors),
                    "location": b.location,
                    "offset": b.offset,
                    "bytes": b.size,
                    "live": [b.start, b.end],
                }
                for b in self.buffers
            ],
        }


# ----------------------------------------------------------------------------- liveness


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def plan(
    graph: Graph,
    inplace: Mapping[str, Sequence[int]] | None = None,
    align: int = 1,
) -> MemoryPlan:
    """Plan the arena of `graph`.

    `inplace` maps a node name to the indices of the inputs its kernel may overwrite with its
    output (elementwise kernels); the planner uses one when that input dies at the node, lives in
    the arena and is as large as the output. `align` rounds every offset and size up (1 for the
    portable C dialect).
    """
    if align < 1:
        raise ValueError("align must be >= 1")
    inplace = inplace or {}
    n = len(graph.nodes)
    produced: dict[str, int] = {graph.input: -1}
    for i, node in enumerate(graph.nodes):
        if node.output in produced:
            raise MemoryPlanError(f"tensor {node.output!r} is produced twice")
        produced[node.output] = i
    last_use: dict[str, int] = {t: s for t, s in produced.items()}
    for i, node in enumerate(graph.nodes):
        for t in node.inputs:
            if t not in produced or produced[t] >= i:
                raise MemoryPlanError(
                    f"node {node.name!r} reads {t!r} before it is produced; nodes must be in"
                    " topological order"
                )
            last_use[t] = max(last_use[t], i)
    for out in graph.outputs:
        if out not in produced:
            raise MemoryPlanError(f"graph output {out!r} is never produced")
        last_use[out] = n

    classes = TensorUnion(produced, produced)
    for node in graph.nodes:
        if node.op == "reshape":
            classes.union(node.inputs[0], node.output)

    def class_range(members: list[str]) -> tuple[int, int]:
        return min(produced[t] for t in members), max(last_use[t] for t in members)

    def members_of() -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for t in sorted(produced, key=lambda t: (produced[t], t)):
            groups.setdefault(classes.find(t), []).append(t)
        return groups

    def location(members: list[str]) -> str:
        if graph.input in members:
            return INPUT
        if any(t in members for t in graph.outputs):
            return OUTPUT
        return ARENA

    def size(members: list[str]) -> int:
        return max(graph.tensors[t].size for t in members)

    # In-place: merge the output's buffer into a dying input's buffer.
    used_inplace: dict[str, str] = {}
    for i, node in enumerate(graph.nodes):
        groups = members_of()
        out_root = classes.find(node.output)
        out_members = groups[out_root]
        if location(out_members) != ARENA:
            continue
        for j in inplace.get(node.name, ()):
            t = node.inputs[j]
            root = classes.find(t)
            members = groups[root]
            if root == out_root or location(members) != ARENA:
                continue
            if class_range(members)[1] != i or size(members) < size(out_members):
                continue
            classes.union(root, out_root)
            used_inplace[node.name] = t
            break

    groups = members_of()
    raw: list[Buffer] = []
    for root, members in groups.items():
        start, end = class_range(members)
        where = location(members)
        port = min((k for k, t in enumerate(graph.outputs) if t in members), default=0)
        raw.append(Buffer(root, tuple(members), size(members), start, end, where, 0, port))
    raw.sort(key=lambda b: (b.start, b.name))

    arena = [b for b in raw if b.location == ARENA]
    sizes = {b.name: _round_up(b.size, align) for b in arena}
    bound = 0
    for step in range(n):
        bound = max(bound, sum(sizes[b.name] for b in arena if b.start <= step <= b.end))

    best: tuple[int, str, dict[str, int]] | None = None
    for method, strategy in _STRATEGIES:
        offsets = strategy(arena, sizes, bound, align)
        if offsets is None:
            continue
        total = max((offsets[b.name] + sizes[b.name] for b in arena), default=0)
        if best is None or total < best[0]:
            best = (total, method, offsets)
    assert best is not None
    if best[0] > bound:
        searched = _search(arena, sizes, bound, align, best[2])
        if searched[0] < best[0]:
            best = (searched[0], f"{best[1]}+search", searched[1])
    total, method, offsets = best
    buffers = tuple(replace(b, offset=offsets.get(b.name, 0)) for b in raw)
    tensor_buffer = {t: b.name for b in buffers for t in b.tensors}
    by_name = {b.name: b for b in buffers}
    copies = tuple(
        (k, t)
        for k, t in enumerate(graph.outputs)
        if by_name[tensor_buffer[t]].location == INPUT or by_name[tensor_buffer[t]].port != k
    )
    result = MemoryPlan(
        buffers=buffers,
        tensor_buffer=tensor_buffer,
        inplace=used_inplace,
        arena_bytes=total,
        lower_bound=bound,
        align=align,
        method=method if arena else "empty",
        output_copies=copies,
    )
    verify(result)
    return result


# ----------------------------------------------------------------------------- placement

Offsets = dict[str, int]
Strategy = Callable[[list[Buffer], Mapping[str, int], int, int], Offsets | None]


def _fits(o: int, s: int, taken: list[tuple[int, int]]) -> bool:
    return all(o + s <= a or b <= o for a, b in taken)


def _lowest(size: int, taken: list[tuple[int, int]], align: int) -> int:
    for o in sorted({0, *(_round_up(b, align) for _, b in taken)}):
        if _fits(o, size, taken):
            return o
    raise AssertionError("unreachable: the end of the highest block always fits")


def _highest(size: int, limit: int, taken: list[tuple[int, int]], align: int) -> int | None:
    cands = {limit - size, *(a - size for a, _ in taken)}
    for o in sorted((c - c % align for c in cands if c >= 0), reverse=True):
        if o + size <= limit and _fits(o, size, taken):
            return o
    return None


def _best(size: int, taken: list[tuple[int, int]], align: int) -> int:
    """The offset of the smallest free gap that holds `size` (the top if none does)."""
    best: tuple[int, int] | None = None
    ends = sorted({0, *(_round_up(b, align) for _, b in taken)})
    for o in ends:
        if not _fits(o, size, taken):
            continue
        above = [a for a, _ in taken if a >= o + size]
        room = min(above) - o if above else 1 << 62
        if best is None or room < best[0]:
            best = (room, o)
    assert best is not None
    return best[1]


def _greedy(key: Callable[[Buffer], Any], fit: Callable[..., int] = _lowest) -> Strategy:
    def place(
        arena: list[Buffer], sizes: Mapping[str, int], bound: int, align: int
    ) -> Offsets | None:
        offsets: Offsets = {}
        placed: list[Buffer] = []
        for b in sorted(arena, key=key):
            taken = [
                (offsets[p.name], offsets[p.name] + sizes[p.name]) for p in placed if p.conflicts(b)
            ]
            offsets[b.name] = fit(sizes[b.name], taken, align)
            placed.append(b)
        return offsets

    return place


def _two_sided(
    arena: list[Buffer], sizes: Mapping[str, int], bound: int, align: int
) -> Offsets | None:
    """Ping-pong inside an arena of exactly `bound` bytes: each buffer goes to the side opposite
    to the latest conflicting buffer. Optimal on chains; may fail (None) on other graphs."""
    offsets: Offsets = {}
    side: dict[str, int] = {}
    placed: list[Buffer] = []
    for b in arena:  # in start order
        conflicting = [p for p in placed if p.conflicts(b)]
        taken = [(offsets[p.name], offsets[p.name] + sizes[p.name]) for p in conflicting]
        prefer = 1 - side[conflicting[-1].name] if conflicting else 0
        s = sizes[b.name]
        choice: tuple[int, int] | None = None
        for sd in (prefer, 1 - prefer):
            if sd == 0:
                o = _lowest(s, taken, align)
                if o + s <= bound:
                    choice = (o, 0)
                    break
            else:
                hi = _highest(s, bound, taken, align)
                if hi is not None:
                    choice = (hi, 1)
                    break
        if choice is None:
            return None
        offsets[b.name], side[b.name] = choice
        placed.append(b)
    return offsets


SEARCH_BUDGET = 300_000
"""Conflict checks the local search may spend (deterministic; ~0.1-0.5 s of Python at most)."""


def _first_fit(
    order: list[int], conflicts: list[list[int]], sizes: list[int], align: int
) -> tuple[int, list[int]]:
    offsets = [-1] * len(order)
    total = 0
    for i in order:
        taken = [(offsets[j], offsets[j] + sizes[j]) for j in conflicts[i] if offsets[j] >= 0]
        o = _lowest(sizes[i], taken, align)
        offsets[i] = o
        total = max(total, o + sizes[i])
    return total, offsets


def _search(
    arena: list[Buffer], sizes: Mapping[str, int], bound: int, align: int, start: Offsets
) -> tuple[int, Offsets]:
    """Local search over first-fit orders, from the order of `start`'s offsets (first-fit in
    increasing offset order of any valid plan gives a plan at least as small, so this never
    loses). Moves one buffer to another position; keeps moves that are not worse. Seeded, so
    deterministic; stops at the lower bound or when the budget is spent."""
    n = len(arena)
    size = [sizes[b.name] for b in arena]
    conflicts = [[j for j in range(n) if j != i and arena[i].conflicts(arena[j])] for i in range(n)]
    order = sorted(range(n), key=lambda i: (start[arena[i].name], i))
    total, offsets = _first_fit(order, conflicts, size, align)
    rng = random.Random(0x9ACC)
    for _ in range(SEARCH_BUDGET // max(1, n * n)):
        if total <= bound or n < 2:
            break
        cand = order.copy()
        cand.insert(rng.randrange(n), cand.pop(rng.randrange(n)))
        t, offs = _first_fit(cand, conflicts, size, align)
        if t <= total:
            order, total, offsets = cand, t, offs
    return total, {b.name: offsets[i] for i, b in enumerate(arena)}


_STRATEGIES: tuple[tuple[str, Strategy], ...] = (
    ("two-sided", _two_sided),
    ("greedy-by-size", _greedy(lambda b: (-b.size, b.start, b.name))),
    ("greedy-by-start", _greedy(lambda b: (b.start, -b.size, b.name))),
    ("best-fit-by-size", _greedy(lambda b: (-b.size, b.start, b.name), _best)),
    ("greedy-by-area", _greedy(lambda b: (-b.size * (b.end - b.start + 1), b.start, b.name))),
    ("greedy-by-lifetime", _greedy(lambda b: (-(b.end - b.start), -b.size, b.name))),
)


def verify(p: MemoryPlan) -> None:
    """Raise if two conflicting arena buffers overlap or a buffer leaves the arena."""
    arena = [b for b in p.buffers if b.location == ARENA]
    for b in arena:
        if b.offset < 0 or b.offset + b.size > p.arena_bytes or b.offset % p.align:
            raise AssertionError(f"buffer {b.name} at {b.offset}+{b.size} leaves the arena")
    for i, a in enumerate(arena):
        for b in arena[i + 1 :]:
            if a.conflicts(b) and a.offset < b.offset + b.size and b.offset < a.offset + a.size:
                raise AssertionError(f"live buffers {a.name} and {b.name} overlap")
    if p.arena_bytes < p.lower_bound:
        raise AssertionError("arena below its lower bound")
