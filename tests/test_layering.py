"""The package layout is the pipeline: each stage imports only itself and the stages below it.

Read from the source with `ast`, function-level (lazy) imports included, so a cycle cannot hide
inside a function body. docs/architecture.md draws the same order.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "codegen"

STAGES = (
    "core",  # errors, the IR, THE number semantics and reference, resources, progress
    "frontend",  # model -> float IR
    "quant",  # float IR -> integer IR
    "backend",  # integer IR -> C sources and reports
    "targets",  # C -> library -> run on a target, count instructions
    "api",  # codegen.quantize / codegen.compile
    "data",  # data sets, demo networks, float training
    "bench",  # instruction counts and the peer libraries
    "tools",  # the workflows behind the CLI commands
    "cli",  # the qacc command and the package facade
)
RANK = {s: i for i, s in enumerate(STAGES)}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stage(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "cli"  # the package facade, codegen/__init__.py
    if parts[1] in ("api", "cli"):
        return parts[1]
    assert parts[1] in RANK, f"{module}: not in a stage folder (add it to STAGES or move it)"
    return parts[1]


def imports(path: Path, modules: set[str]) -> set[str]:
    """The qacc modules that `path` imports (`from codegen.x import y` counts codegen.x.y when
    that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "codegen"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "codegen":
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {m: imports(p, modules) - {m} for m, p in files.items()}


def test_every_module_lives_in_a_stage() -> None:
    for m in graph():
        stage(m)


def test_no_stage_imports_a_higher_one() -> None:
    bad = [
        f"{m} ({stage(m)}) imports {i} ({stage(i)})"
        for m, deps in sorted(graph().items())
        for i in sorted(deps)
        if RANK[stage(i)] > RANK[stage(m)]
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    g = graph()
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def stage_graph() -> dict[str, set[str]]:
    """Which stages each stage imports (docs/architecture.md shows it)."""
    out: dict[str, set[str]] = defaultdict(set)
    for m, deps in graph().items():
        for i in deps:
            if stage(i) != stage(m):
                out[stage(m)].add(stage(i))
    return out


def test_the_core_imports_no_other_stage() -> None:
    assert not stage_graph().get("core"), stage_graph()["core"]


if __name__ == "__main__":
    for s in STAGES:
        print(f"{s:9} -> {', '.join(sorted(stage_graph().get(s, ()), key=RANK.get)) or '-'}")
