"""Graphs with several outputs: the memory plan keeps every output alive to the end in its
caller's array (outputs whose bytes are elsewhere are copied there), the header names each
output, and the generated C writes every one of them bit for bit like the reference."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from codegen.backend import memory
from codegen.backend.emit import emit
from codegen.backend.lower import lower
from codegen.backend.report import to_markdown
from codegen.core import reference
from codegen.core.formats import IntArray
from codegen.core.ir import Graph, Node, Tensor
from codegen.targets.compiled import compile
from tests.graphs import GraphBuilder


def _heads() -> tuple[Graph, IntArray]:
    """A trunk with a classifier head; the other outputs are an intermediate tensor that later
    layers read (and an in-place add could overwrite), that tensor again, a reshape of it and a
    reshape of the input."""
    b = GraphBuilder("heads", seed=3)
    x = b.input((6, 6, 3))
    f = b.conv2d(x, 8, (3, 3), padding=(1, 1, 1, 1), lo=0)
    g = b.conv2d(f, 8, (3, 3), padding=(1, 1, 1, 1))
    h = b.add(g, f)  # f dies here but for being an output: in place over g, never over f
    y = b.dense(b.flatten(b.global_avgpool(h)), 5)
    return b.result(y, extra=(f, f, b.flatten(f), b.flatten(x)))


def test_outputs_survive_and_the_copies_are_planned() -> None:
    g, _ = _heads()
    y, f, _, f_flat, x_flat = g.outputs
    plan = lower(g).plan
    n = len(g.nodes)
    for k, t in enumerate(g.outputs):
        b = plan.buffer_of(t)
        assert b.end == n, t  # live after the last step
        assert b.location in (memory.OUTPUT, memory.INPUT)
        assert b.location == memory.INPUT or b.port <= k
    assert plan.buffer_of(f) == plan.buffer_of(f_flat)  # a reshape aliases
    assert plan.buffer_of(f).port == 1 and plan.buffer_of(y).port == 0
    add = next(node for node in g.nodes if node.op == "add")
    assert plan.inplace.get(add.name) == add.inputs[0] != f
    # output 2 is output 1 again, output 3 output 1's bytes reshaped, output 4 the input's bytes
    assert plan.output_copies == ((2, f), (3, f_flat), (4, x_flat))
    assert not plan.copy_output


def test_an_intermediate_output_is_not_clobbered_on_random_graphs() -> None:
    """Random branchy graphs with random extra outputs: every output's buffer is outside the
    arena and lives to the end, so no arena reuse can overwrite it."""
    for seed in range(200):
        rng = np.random.default_rng(seed)
        tensors = {"x": Tensor("x", (int(rng.integers(1, 50)),))}
        names: list[str] = ["x"]
        nodes = []
        for i in range(int(rng.integers(2, 10))):
            picks = rng.integers(max(0, len(names) - 3), len(names), int(rng.integers(1, 3)))
            ins = tuple(dict.fromkeys(names[int(j)] for j in picks))
            op = "reshape" if len(ins) == 1 and rng.random() < 0.2 else "op"
            size = tensors[ins[0]].size if op == "reshape" else int(rng.integers(1, 50))
            t = f"t{i}"
            tensors[t] = Tensor(t, (size,))
            names.append(t)
            nodes.append(Node(f"n{i}", op, ins, t))
        extra = tuple(str(t) for t in rng.choice(names[1:], int(rng.integers(1, 4))))
        g = Graph(f"dag{seed}", tuple(nodes), tensors, "x", names[-1], extra_outputs=extra)
        plan = memory.plan(g, inplace={n.name: (0,) for n in nodes})
        copied = dict(plan.output_copies)
        ports: dict[str, int] = {}
        for k, t in enumerate(g.outputs):
            b = plan.buffer_of(t)
            assert b.location != memory.ARENA and b.end == len(nodes)
            if k not in copied:
                assert b.location == memory.OUTPUT and b.port == k
                assert ports.setdefault(b.name, k) == k  # one caller array per buffer
            else:
                assert copied[k] == t
        assert not set(plan.inplace.values()) & set(g.outputs)


def test_header_names_every_output() -> None:
    g, _ = _heads()
    files = emit(g, "heads")
    header = files["heads.h"]
    macros = dict(re.findall(r"^#define (QACC_HEADS_\w+) (.+)$", header, re.M))
    assert macros["QACC_HEADS_OUTPUTS"] == str(len(g.outputs))
    args = ", ".join(f"int8_t *out{k}" for k in range(len(g.outputs)))
    assert f"int qacc_heads_run(const int8_t *in, {args});" in header
    for k, t in enumerate(g.outputs):
        tensor = g.tensors[t]
        fmt = tensor.fmt
        assert fmt is not None
        assert macros[f"QACC_HEADS_OUTPUT{k}_NAME"] == f'"{t}"'
        assert macros[f"QACC_HEADS_OUTPUT{k}_SIZE"] == str(tensor.size)
        shape = ", ".join(map(str, tensor.shape))
        assert macros[f"QACC_HEADS_OUTPUT{k}_SHAPE"] == f"{{ {shape} }}"
        assert macros[f"QACC_HEADS_OUTPUT{k}_ZERO_POINT"] == str(fmt.zero_point)
        assert float(macros[f"QACC_HEADS_OUTPUT{k}_SCALE"].split()[0]) == fmt.scale
    assert "QACC_HEADS_OUTPUT_SIZE" not in macros  # several outputs: numbered macros only
    report = json.loads(files["report.json"])
    assert [o["tensor"] for o in report["outputs"]] == list(g.outputs)
    assert [o["parameter"] for o in report["outputs"]] == [f"out{k}" for k in range(5)]
    md = to_markdown(report)
    for k, t in enumerate(g.outputs):
        assert re.search(rf"\| output {k} format \| \S+ [\dx]+ \({t}\) \|", md), k


def test_every_output_is_bit_exact_under_asan_ubsan(tmp_path: Path) -> None:
    """Through the sanitized test bench (the in-process cffi path: test_real_networks.py)."""
    g, x = _heads()
    want = reference.run(g, x).outputs
    c = compile(g, out_dir=tmp_path / "heads", sanitize=True, progress=False)
    got = c.run_int_q(x)
    assert isinstance(got, tuple) and len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a, b)
    assert len(np.unique(want[0])) > 2 and len(np.unique(want[1])) > 2
    one = c.run_int_q(x[0])  # one sample in, one sample per output out
    assert all(np.array_equal(a, b[0]) for a, b in zip(one, want, strict=True))
