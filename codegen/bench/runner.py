"""`qacc bench`: instructions per inference under QEMU, per target and per accumulator width.

    run_bench(["cortex-a53", "cortex-a76"], widths=(16, 32), networks=["conv3x3"], json_path=...)

For every network of codegen.bench.networks (random weights, random calibration data in [0, 1]),
every accumulator width ("16", "32", or "16x32": two-stage accumulation, tiles of
TWO_STAGE_TILE terms in 16 bits summed in 32) and every target: quantize (guaranteed policy; a
layer that cannot fit the width falls back to 32 bits, and the table says so), generate and build
C for the target, count the dynamic instructions of one inference with the QEMU
instruction-count plugin, in total and per layer, and read the arena and flash sizes.
Instruction counts are deterministic.

Side by side, on AArch64 targets, the peer: XNNPACK's qs8 convolution (codegen.bench.peers) on every
conv layer shape of the same network, under the same QEMU CPU and the same plugin. The peer row
of a network sums its conv layers; qacc's figures for the same layers are summed next to it.
On Cortex-M targets, with `cmsis_nn` (`qacc bench --peers`), the peer is Arm's CMSIS-NN
(codegen.bench.cmsis_nn): one call of the s8 function TFLite Micro calls for each conv, depthwise,
dense, pooling and add layer, under the same QEMU board; per layer, its count beside qacc's at
every width and at the best one, and the ratio CMSIS-NN / qacc-best.

Returns (and writes as JSON) {"rows": [...], "peers": [...], "ratios": [...], "goals": [...]}
and prints the tables.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tqdm.auto import tqdm

from codegen.bench import networks as bench_networks
from codegen.core.errors import InfeasibleAccumulatorError, QaccError
from codegen.core.progress import bar
from codegen.targets.table import TARGETS, get_target

DEFAULT_TARGETS = ("cortex-a53", "cortex-a76", "cortex-a55")
ARM_TARGETS = tuple(t for t in TARGETS if t != "host")
TWO_STAGE_TILE = 64
"""acc_tile of the two-stage widths ("16x32"): the tile FashionCNN keeps float accuracy with."""
DEFAULT_NETWORKS = tuple(bench_networks.NETWORKS)
FALLBACK_BITS = 32
CALIB_SAMPLES = 16

# Reference figures from RESEARCH.md / the issue (instructions per MAC).
XNNPACK_NEON_PER_MAC = 0.283
XNNPACK_DOTPROD_PER_MAC = 0.102
GOAL_SDOT_PER_MAC = 0.09
"""Goal of qacc's SDOT path on that layer (the floor is one SDOT per 16 MACs, 0.0625)."""
GOAL_RATIO = 1.9
GOAL_CONV_PER_MAC = 0.15
GOAL_TWO_STAGE = 1.7


class BenchError(QaccError):
    """The benchmark was asked for something it cannot do (unknown target, network...)."""


@dataclass(frozen=True)
class Width:
    """An accumulator configuration of the bench: `bits`, and with `acc2` two-stage accumulation
    (tiles of TWO_STAGE_TILE terms wrap at `bits`, their sum at `acc2`)."""

    bits: int
    acc2: int | None = None

    @property
    def label(self) -> str:
        return f"{self.bits}" if self.acc2 is None else f"{self.bits}x{self.acc2}"


DEFAULT_WIDTHS = (Width(16), Width(16, 32), Width(32))


@dataclass
class _Quantized:
    name: str
    width: Width
    qm: Any
    fallback: list[str] = field(default_factory=list)


def _log(msg: str, stream: TextIO | None) -> None:
    if stream is not None:
        tqdm.write(msg, file=stream)  # clears and redraws the progress bars around the line
        stream.flush()


def resolve_targets(spec: str | Sequence[str]) -> list[str]:
    """'all' (every ARM target), or names separated by commas; each one checked."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(ARM_TARGETS)
    for n in names:
        try:
            get_target(n)
        except ValueError as e:
            raise BenchError(str(e)) from None
        if n == "host":
            raise BenchError("instruction counts need QEMU: bench an ARM target, not host")
    if not names:
        raise BenchError("no target given")
    return names


def resolve_networks(spec: str | Sequence[str]) -> list[str]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(DEFAULT_NETWORKS)
    out: list[str] = []
    for n in names:
        for m in bench_networks.LAYER_GROUP if n == "layers" else (n,):
            if m not in out:
                out.append(m)
    known = {**bench_networks.NETWORKS, **bench_networks.LAYERS}
    unknown = [n for n in out if n not in known]
    if unknown or not out:
        raise BenchError(
            f"unknown network(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join(known)}, all or layers"
        )
    return out


def _width(item: str | int | Width) -> Width:
    if isinstance(item, Width):
        return item
    if isinstance(item, int):
        return Width(item)
    bits, _, acc2 = item.strip().partition("x")
    try:
        return Width(int(bits), int(acc2) if acc2 else None)
    except ValueError:
        raise BenchError(
            f"widths are integers (16) or two-stage pairs (16x32) separated by commas, got {item!r}"
        ) from None


def resolve_widths(spec: str | Sequence[int | str | Width]) -> list[Width]:
    """'16,16x32,32' (or a sequence of ints, labels or Widths) -> Widths, each checked."""
    items = [w for w in spec.split(",") if w.strip()] if isinstance(spec, str) else list(spec)
    widths = [_width(w) for w in items]
    bad = [
        w.label
        for w in widths
        if not 8 <= w.bits <= 32 or (w.acc2 is not None and not w.bits < w.acc2 <= 32)
    ]
    if bad or not widths:
        raise BenchError(
            f"accumulator widths must be in 8..32 (two-stage AxB: A < B <= 32), got "
            f"{', '.join(bad) or '(none)'}"
        )
    return widths


_LAYER_RE = re.compile(r"layer '([^']+)'")


def quantize_net(
    name: str, width: int | Width, model: Any, calib: np.ndarray, log: TextIO | None = None
) -> _Quantized:
    """codegen.quantize at `width` (guaranteed); layers that cannot fit fall back to 32 bits."""
    from codegen import api

    w = _width(width)
    stages: dict[str, Any] = {} if w.acc2 is None else {"acc_stages": 2, "acc_tile": TWO_STAGE_TILE}
    fallback: list[str] = []
    while True:
        acc: int | dict[str, int] = (
            w.bits
            if not fallback
            else {"default": w.bits, **dict.fromkeys(fallback, FALLBACK_BITS)}
        )
        try:
            qm = api.quantize(
                model, calib, acc_bits=acc, overflow="guaranteed", progress=False, **stages
            )
            return _Quantized(name, w, qm, fallback)
        except InfeasibleAccumulatorError as e:
            m = _LAYER_RE.search(str(e))
            if m is None or m.group(1) in fallback or w.bits >= FALLBACK_BITS:
                raise
            _log(f"  {name}: layer {m.group(1)} does not fit {w.label} bits; it uses 32", log)
            fallback.append(m.group(1))


def _size_tool(target: str) -> str | None:
    nm = get_target(target).nm
    tool = nm[: -len("nm")] + "size" if nm.endswith("nm") else "size"
    return shutil.which(tool)


def flash_bytes(target: str, static_lib: Path) -> int | None:
    """text + data of the model's static library (code, constant weights, initialised data)."""
    tool = _size_tool(target)
    if tool is None or not static_lib.is_file():
        return None
    proc = subprocess.run(
        [tool, "-B", "-t", str(static_lib)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return None
    for line in proc.stdout.splitlines():
        f = line.split()
        if len(f) >= 6 and "(TOTALS)" in line:
            return int(f[0]) + int(f[1])
    return None


def conv_shapes(graph: Any) -> dict[str, Any]:
    """{conv layer name: peers.ConvShape} for the conv2d nodes of an integer graph."""
    from codegen.bench.peers import ConvShape

    out: dict[str, ConvShape] = {}
    for n in graph.nodes:
        if n.op != "conv2d":
            continue
        h, w, cin = graph.tensors[n.inputs[0]].shape
        wt = n.params["weight"]
        cout, kh, kw = int(wt.shape[0]), int(wt.shape[1]), int(wt.shape[2])
        if tuple(n.attrs.get("dilation", (1, 1))) != (1, 1):
            continue
        t, b, left, r = (int(p) for p in n.attrs["padding"])
        sh, sw = (int(s) for s in n.attrs["stride"])
        out[n.name] = ConvShape(
            int(h), int(w), int(cin), cout, kh, kw, sh, sw, (t, left, b, r), int(n.attrs["groups"])
        )
    return out


def _one_line(e: BaseException) -> str:
    """The first line of an error, plus the first compiler 'error:' line of a build log."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    detail = next((ln for ln in lines[1:] if "error:" in ln), None)
    return f"{lines[0]} {detail}" if detail else lines[0]


def _per_mac(insns: int | None, macs: int) -> float | None:
    return round(insns / macs, 4) if insns is not None and macs else None


def _totals(instructions: int, macs: Sequence[int]) -> dict[str, Any]:
    """A peer row's MACs, instructions and instructions per MAC over its layers."""
    m = sum(macs)
    per_mac = _per_mac(instructions, m)
    return {"macs": m, "instructions": instructions, "instructions_per_mac": per_mac}


def _measure(
    q: _Quantized,
    target: str,
    xq: np.ndarray,
    work: Path,
    log: TextIO | None,
    progress: bool = True,
) -> dict[str, Any]:
    from codegen import api

    net = bench_networks.get(q.name)
    row: dict[str, Any] = {
        "network": q.name,
        "description": net.description,
        "target": target,
        "acc": q.width.label,
        "acc_bits": q.width.bits,
        "acc_stages": 1 if q.width.acc2 is None else 2,
        "fallback_32bit_layers": q.fallback,
        "macs": int(q.qm.report["macs"]),
    }
    out_dir = work / f"{q.name}-{target}-acc{q.width.label}"
    try:
        c = api.compile(q.qm, target=target, out_dir=out_dir, progress=progress)
        counts = c.count_instructions(xq)
        rep = c.report
    except (QaccError, RuntimeError, OSError, subprocess.SubprocessError) as e:
        row["error"] = _one_line(e)
        _log(f"  {q.name} {target} acc{q.width.label}: FAILED: {row['error']}", log)
        return row
    total = int(counts["total"])
    layer_macs = {str(r["name"]): int(r.get("macs", 0)) for r in rep["layers"]}
    rows = []
    for r in rep["layers"]:
        name = str(r["name"])
        n = counts["layers"].get(name)
        rows.append(
            {
                "name": name,
                "op": r.get("op"),
                "kernel": r.get("kernel"),
                "path": r.get("path"),
                "acc_bits": r.get("acc_bits"),
                "macs": layer_macs[name],
                "instructions": n,
                "instructions_per_mac": _per_mac(n, layer_macs[name]),
            }
        )
    mem = rep.get("memory", {})
    row.update(
        instructions=total,
        instructions_per_mac=_per_mac(total, row["macs"]),
        arena_bytes=mem.get("arena_bytes"),
        weight_bytes=mem.get("flash_weight_bytes"),
        flash_bytes=flash_bytes(target, c.static_lib),
        layers=rows,
    )
    per_mac = row["instructions_per_mac"]
    _log(
        f"  {q.name} {target} acc{q.width.label}: {total:,} instructions"
        + (f" ({per_mac} per MAC)" if per_mac is not None else ""),
        log,
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    return row


def _peer(
    name: str, target: str, shapes: dict[str, Any], log: TextIO | None
) -> dict[str, Any] | None:
    from codegen.bench import peers

    if get_target(target).family != "aarch64-linux" or not shapes:
        return None
    row: dict[str, Any] = {"network": name, "target": target, "peer": "xnnpack-qs8"}
    try:
        counts = peers.xnnpack_conv_many(list(shapes.values()), target)
    except (QaccError, RuntimeError, OSError, subprocess.SubprocessError) as e:
        row["error"] = _one_line(e)
        _log(f"  {name} {target} xnnpack: FAILED: {row['error']}", log)
        return row
    layers = {
        lname: {
            "macs": s.macs,
            "instructions": n,
            "instructions_per_mac": _per_mac(n, s.macs),
            "shape": s.argv(),
        }
        for (lname, s), n in zip(shapes.items(), counts, strict=True)
    }
    total = sum(counts)
    row.update(conv_layers=len(shapes), **_totals(total, [s.macs for s in shapes.values()]))
    row["layers"] = layers
    _log(f"  {name} {target} xnnpack: {total:,} instructions over {len(shapes)} conv layers", log)
    return row


def _cmsis_peer(
    name: str,
    target: str,
    graph: Any,
    rows: list[dict[str, Any]],
    tree: Path,
    log: TextIO | None,
) -> dict[str, Any]:
    """CMSIS-NN on the layers of `graph` that it has a kernel for, beside qacc's measured rows."""
    from codegen.bench import cmsis_nn as cmsis

    row: dict[str, Any] = {"network": name, "target": target, "peer": "cmsis-nn"}
    layers = cmsis.layers_of(graph)
    try:
        counts = cmsis.instructions(list(layers.values()), target, tree)
    except (QaccError, RuntimeError, OSError, subprocess.SubprocessError) as e:
        row["error"] = _one_line(e)
        _log(f"  {name} {target} cmsis-nn: FAILED: {row['error']}", log)
        return row
    measured = {
        r["acc"]: {x["name"]: x for x in r["layers"]}
        for r in rows
        if r["network"] == name and r["target"] == target and "error" not in r
    }
    per_layer: dict[str, Any] = {}
    for (lname, layer), n in zip(layers.items(), counts, strict=True):
        entry: dict[str, Any] = {
            "kind": layer.kind,
            "function": layer.function,
            "macs": layer.macs,
            "instructions": n,
            "instructions_per_mac": _per_mac(n, layer.macs),
        }
        qacc = {
            w: by[lname]["instructions"]
            for w, by in measured.items()
            if lname in by and by[lname]["instructions"]
        }
        for w, v in qacc.items():
            entry[f"qacc_acc{w}"] = v
        if qacc:
            best_w = min(qacc, key=lambda w: (qacc[w], _width(w).bits))
            entry.update(
                qacc_best=qacc[best_w],
                qacc_best_acc_bits=best_w,
                qacc_best_per_mac=_per_mac(qacc[best_w], layer.macs),
                cmsis_nn_over_qacc_best=round(n / qacc[best_w], 3),
            )
        per_layer[lname] = entry
    total = sum(counts)
    row.update(layers_covered=len(layers), **_totals(total, [x.macs for x in layers.values()]))
    row["layers"] = per_layer
    subtotals = {w: s for w in measured if (s := _subtotal(measured[w], list(layers))) is not None}
    for w, v in subtotals.items():
        row[f"qacc_acc{w}_instructions"] = v
    if subtotals and total:
        best_w = min(subtotals, key=lambda w: (subtotals[w], _width(w).bits))
        row.update(
            qacc_best_acc_bits=best_w,
            qacc_best_instructions=subtotals[best_w],
            cmsis_nn_over_qacc_best=round(total / subtotals[best_w], 3),
        )
    _log(
        f"  {name} {target} cmsis-nn: {total:,} instructions over {len(layers)} layer"
        + ("s" if len(layers) != 1 else "")
        + (f"; cmsis-nn/qacc-best {row['cmsis_nn_over_qacc_best']:.2f}" if subtotals else ""),
        log,
    )
    return row


def _subtotal(layers: dict[str, Any], names: Sequence[str]) -> int | None:
    vals = [layers[n]["instructions"] for n in names if n in layers]
    if len(vals) != len(names) or any(v is None for v in vals):
        return None
    return int(sum(vals))


def _ratios(rows: list[dict[str, Any]], peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    by = {(r["network"], r["target"], r["acc"]): r for r in rows if "error" not in r}
    for (net, tgt, a), r16 in by.items():
        if a != "16" or (net, tgt, "32") not in by:
            continue
        r32 = by[(net, tgt, "32")]
        ratio: dict[str, Any] = {
            "network": net,
            "target": tgt,
            "acc32_over_acc16": round(r32["instructions"] / r16["instructions"], 3),
            "layers": {},
        }
        two = by.get((net, tgt, "16x32"))
        if two is not None:
            ratio["acc32_over_acc16x32"] = round(r32["instructions"] / two["instructions"], 3)
        l32 = {x["name"]: x for x in r32["layers"]}
        for x in r16["layers"]:
            y = l32.get(x["name"])
            if y and x["instructions"] and y["instructions"] and x["macs"]:
                ratio["layers"][x["name"]] = round(y["instructions"] / x["instructions"], 3)
        out.append(ratio)
    return out


def conv_subtotal(row: dict[str, Any], names: Sequence[str]) -> int | None:
    """qacc's instructions over the layers `names` of a measured row."""
    layers = {x["name"]: x for x in row.get("layers", [])}
    vals = [layers[n]["instructions"] for n in names if n in layers]
    if len(vals) != len(names) or any(v is None for v in vals):
        return None
    return int(sum(vals))


def _goals(
    rows: list[dict[str, Any]], ratios: list[dict[str, Any]], peers: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    goals: list[dict[str, Any]] = []

    def goal(text: str, measured: float, met: bool) -> None:
        goals.append({"goal": text, "measured": round(measured, 3), "met": met})

    for r in ratios:
        if r["target"] != "cortex-a53":
            continue
        v = r["acc32_over_acc16"]
        goal(
            f"{r['network']} on cortex-a53: whole-network acc32/acc16 >= {GOAL_RATIO}",
            v,
            v >= GOAL_RATIO,
        )
        if "acc32_over_acc16x32" in r:
            v = r["acc32_over_acc16x32"]
            goal(
                f"{r['network']} on cortex-a53: whole-network acc32/two-stage 16x32 "
                f">= {GOAL_TWO_STAGE}",
                v,
                v >= GOAL_TWO_STAGE,
            )
    for p in peers:
        if p.get("peer") != "xnnpack-qs8" or "error" in p or not p["instructions"]:
            continue
        qacc = {
            k[len("qacc_acc") : -len("_conv_instructions")]: v
            for k, v in p.items()
            if k.startswith("qacc_acc") and k.endswith("_conv_instructions") and v
        }
        if p["target"] == "cortex-a53" and "16" in qacc:
            v = p["instructions"] / qacc["16"]
            goal(
                f"{p['network']} on cortex-a53: XNNPACK / qacc acc16 >= {GOAL_RATIO} (conv layers)",
                v,
                v >= GOAL_RATIO,
            )
        if p["target"] == "cortex-a53" and "32" in qacc:
            v = p["instructions"] / qacc["32"]
            goal(
                f"{p['network']} on cortex-a53: XNNPACK / qacc acc32 >= 1 (conv layers, no"
                " dotprod on either side)",
                v,
                v >= 1.0,
            )
        if get_target(p["target"]).has_dotprod and qacc:
            best = min(qacc, key=lambda w: qacc[w])
            v = p["instructions"] / qacc[best]
            goal(
                f"{p['network']} on {p['target']}: XNNPACK / qacc best (acc{best}) >= 1 "
                "(conv layers)",
                v,
                v >= 1.0,
            )
    for r in rows:
        if r["network"] != "conv3x3" or "error" in r:
            continue
        if r["target"] == "cortex-a53" and r["acc"] == "16":
            v = r["instructions_per_mac"]
            goal(
                f"conv3x3 on cortex-a53 at acc16 <= {GOAL_CONV_PER_MAC} "
                f"instructions/MAC (XNNPACK without dotprod: {XNNPACK_NEON_PER_MAC})",
                v,
                v <= GOAL_CONV_PER_MAC,
            )
        if r["target"] == "cortex-a76" and r["acc"] == "32":
            v = r["instructions_per_mac"]
            goal(
                f"conv3x3 on cortex-a76 at acc32 (SDOT path) <= {GOAL_SDOT_PER_MAC}"
                f" instructions/MAC (XNNPACK dotprod: {XNNPACK_DOTPROD_PER_MAC})",
                v,
                v <= GOAL_SDOT_PER_MAC,
            )
    return goals


def run_bench(
    targets: Sequence[str] = DEFAULT_TARGETS,
    widths: Sequence[int | str | Width] = DEFAULT_WIDTHS,
    networks: Sequence[str] = DEFAULT_NETWORKS,
    json_path: str | Path | None = None,
    peer: bool = True,
    out: TextIO | None = sys.stdout,
    log: TextIO | None = sys.stderr,
    calib_samples: int = CALIB_SAMPLES,
    progress: bool = True,
    cmsis_nn: bool = False,
    cmsis_nn_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Count, per network x target x width, and the peers; print tables, write JSON.

    `peer`: XNNPACK on AArch64 targets. `cmsis_nn`: CMSIS-NN on Cortex-M targets, built from
    `cmsis_nn_dir` (default: the tree vendored in the checkout, third_party/CMSIS-NN).
    `progress`: a bar over the measurements (and the builds and runs inside them) on stderr,
    when it is a terminal."""
    tgts = resolve_targets(targets)
    ws = resolve_widths(widths)
    nets = resolve_networks(networks)
    if peer and any(get_target(t).family == "aarch64-linux" for t in tgts):
        from codegen.bench import peers

        peers.check_xnnpack()  # fail early, naming the package, rather than after an hour
    cmsis_tree: Path | None = None
    if cmsis_nn_dir is not None or (
        cmsis_nn and any(get_target(t).family == "cortex-m" for t in tgts)
    ):
        from codegen.bench import cmsis_nn as cmsis

        cmsis_tree = cmsis.check_tree(cmsis_nn_dir)
    rows: list[dict[str, Any]] = []
    peer_rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="qacc-bench-") as tmp,
        bar(
            desc="bench",
            total=len(nets) * len(tgts) * len(ws),
            unit="build+count",
            progress=progress,
            leave=True,
        ) as bench_bar,
    ):
        work = Path(tmp)
        for name in nets:
            net = bench_networks.get(name)
            _log(f"{name}: {net.description}", log)
            calib = bench_networks.calibration_data(net, calib_samples)
            model = bench_networks.build(name, calib)
            quantized = [quantize_net(name, w, model, calib, log) for w in ws]
            xq = quantized[0].qm.quantize_input(calib[:1])[0]
            shapes = conv_shapes(quantized[0].qm.graph)
            for t in tgts:
                for q in quantized:
                    bench_bar.set_postfix_str(f"{name} {t} acc{q.width.label}")
                    rows.append(_measure(q, t, xq, work, log, progress))
                    bench_bar.update()
                if cmsis_nn and cmsis_tree is not None and get_target(t).family == "cortex-m":
                    peer_rows.append(
                        _cmsis_peer(name, t, quantized[0].qm.graph, rows, cmsis_tree, log)
                    )
                if peer:
                    p = _peer(name, t, shapes, log)
                    if p is not None:
                        for r in rows:
                            if r["network"] == name and r["target"] == t and "error" not in r:
                                p[f"qacc_acc{r['acc']}_conv_instructions"] = conv_subtotal(
                                    r, list(shapes)
                                )
                        peer_rows.append(p)
    ratios = _ratios(rows, peer_rows)
    result: dict[str, Any] = {
        "targets": tgts,
        "widths": [w.label for w in ws],
        "networks": {n: bench_networks.get(n).description for n in nets},
        "rows": rows,
        "peers": peer_rows,
        "ratios": ratios,
        "goals": _goals(rows, ratios, peer_rows),
    }
    if json_path is not None:
        jp = Path(json_path)
        jp.parent.mkdir(parents=True, exist_ok=True)
        jp.write_text(json.dumps(result, indent=2) + "\n")
    if out is not None:
        print_tables(result, out)
        if json_path is not None:
            print(f"\nJSON: {json_path}", file=out)
    return result


# ----------------------------------------------------------------------------- tables


def _tail(err: str, n: int = 100) -> str:
    """The end of an error (a compiler's 'error:' line comes last): what the table shows."""
    return err if len(err) <= n else "..." + err[-n:]


def _fmt_int(v: int | None) -> str:
    return f"{v:,}" if v is not None else "-"


def _fmt_f(v: float | None, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if v is not None else "-"


def _table(
    head: list[str], rows: list[list[str]], out: TextIO, left: int = 1, note: bool = False
) -> None:
    """Columns: the first `left` left-aligned, the others right-aligned; with `note`, the last
    column is a free-text note (left-aligned, not padded)."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left or (note and i == len(widths) - 1) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(head), file=out)
    print("-" * max(len(line(head)), sum(widths[:-1]) + 2 * len(widths) - 2), file=out)
    for r in rows:
        print(line(r), file=out)


def print_tables(result: dict[str, Any], out: TextIO = sys.stdout) -> None:
    rows: list[dict[str, Any]] = result["rows"]
    ratio = {(r["network"], r["target"]): r for r in result["ratios"]}
    peers = {(p["network"], p["target"]): p for p in result["peers"]}
    print("\nInstructions per inference (QEMU TCG plugin, deterministic)\n", file=out)
    table: list[list[str]] = []
    for r in rows:
        note = ""
        if r.get("fallback_32bit_layers"):
            note = "32-bit: " + ",".join(r["fallback_32bit_layers"])
        if "error" in r:
            table.append(
                [
                    r["network"],
                    r["target"],
                    f"acc{r['acc']}",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "FAILED: " + _tail(r["error"]),
                ]
            )
            continue
        rt = ratio.get((r["network"], r["target"]))
        table.append(
            [
                r["network"],
                r["target"],
                f"acc{r['acc']}",
                _fmt_int(r["instructions"]),
                _fmt_f(r["instructions_per_mac"]),
                _ratio_cell(rt, r["acc"]),
                _fmt_int(r["arena_bytes"]),
                _fmt_int(r["flash_bytes"]),
                note,
            ]
        )
        last = all(
            x["network"] != r["network"] or x["target"] != r["target"]
            for x in rows[rows.index(r) + 1 :]
        )
        p = peers.get((r["network"], r["target"]))
        if last and p is not None:
            label = "xnnpack" if p.get("peer") != "cmsis-nn" else "cmsis-nn"
            if "error" in p:
                table.append(
                    [
                        r["network"],
                        r["target"],
                        label,
                        "-",
                        "-",
                        "",
                        "",
                        "",
                        "FAILED: " + _tail(p["error"]),
                    ]
                )
            else:
                if label == "cmsis-nn":
                    n_l = p["layers_covered"]
                    vs = f"{n_l} layer{'s' if n_l != 1 else ''}"
                    if "cmsis_nn_over_qacc_best" in p:
                        vs += (
                            f"; cmsis-nn/qacc (acc{p['qacc_best_acc_bits']}) "
                            f"{p['cmsis_nn_over_qacc_best']:.2f}"
                        )
                else:
                    vs = f"conv layers only ({p['conv_layers']})"
                    for w in result["widths"]:
                        q = p.get(f"qacc_acc{w}_conv_instructions")
                        if q:
                            vs += f"; xnnpack/qacc-acc{w} {p['instructions'] / q:.2f}"
                table.append(
                    [
                        r["network"],
                        r["target"],
                        label,
                        _fmt_int(p["instructions"]),
                        _fmt_f(p["instructions_per_mac"]),
                        "",
                        "",
                        "",
                        vs,
                    ]
                )
    _table(
        [
            "network",
            "target",
            "acc",
            "instructions",
            "insn/MAC",
            "acc32/this",
            "arena B",
            "flash B",
            "note",
        ],
        table,
        out,
        left=3,
        note=True,
    )
    _print_layers(result, out)
    _print_cmsis_nn(result, out)
    if result["goals"]:
        print("\nGoals (benchmark figures, not asserted)\n", file=out)
        for g in result["goals"]:
            status = "met" if g["met"] else "NOT met"
            print(f"  [{status:>7}] {g['goal']}: measured {g['measured']}", file=out)


def _ratio_cell(rt: dict[str, Any] | None, acc: str) -> str:
    """acc32's instructions over this row's (the speedup of a narrow or two-stage row)."""
    key = {"16": "acc32_over_acc16", "16x32": "acc32_over_acc16x32"}.get(acc)
    return _fmt_f(rt[key], 2) if rt and key and key in rt else ""


def _print_layers(result: dict[str, Any], out: TextIO) -> None:
    rows = [r for r in result["rows"] if "error" not in r]
    peers = {(p["network"], p["target"]): p for p in result["peers"] if "error" not in p}
    keys = sorted(
        {(r["network"], r["target"]) for r in rows},
        key=lambda k: (list(result["networks"]).index(k[0]), result["targets"].index(k[1])),
    )
    for net, tgt in keys:
        by_w = {r["acc"]: r for r in rows if r["network"] == net and r["target"] == tgt}
        ws = list(by_w)
        p = peers.get((net, tgt))
        print(f"\nPer layer: {net} on {tgt} (instructions, instructions/MAC)\n", file=out)
        head = ["layer", "op", "MACs"]
        for w in ws:
            head += [f"acc{w}", "/MAC", "path"]
        if "16" in by_w and "32" in by_w:
            head.append("32/16")
        cmsis = p is not None and p.get("peer") == "cmsis-nn"
        if p is not None:
            head += ["cmsis-nn", "/MAC", "best", "cmsis/best"] if cmsis else ["xnnpack", "/MAC"]
        table = []
        first = by_w[ws[0]]
        named = {w: {x["name"]: x for x in by_w[w]["layers"]} for w in ws}
        for layer in first["layers"]:
            name = layer["name"]
            cells = [name, str(layer["op"]), _fmt_int(layer["macs"] or None)]
            for w in ws:
                x = named[w].get(name, {})
                cells += [
                    _fmt_int(x.get("instructions")),
                    _fmt_f(x.get("instructions_per_mac")),
                    str(x.get("path") or ""),
                ]
            if "16" in by_w and "32" in by_w:
                a = named["16"].get(name, {}).get("instructions")
                b = named["32"].get(name, {}).get("instructions")
                cells.append(_fmt_f(b / a, 2) if a and b else "-")
            if p is not None:
                pl = p["layers"].get(layer["name"])
                cells += (
                    [_fmt_int(pl["instructions"]), _fmt_f(pl["instructions_per_mac"])]
                    if pl
                    else ["", ""]
                )
                if cmsis:
                    best = pl.get("qacc_best_acc_bits") if pl else None
                    cells += (
                        [f"acc{best}", _fmt_f(pl["cmsis_nn_over_qacc_best"], 2)]
                        if pl and best
                        else ["", ""]
                    )
            table.append(cells)
        _table(head, table, out, left=2)


def _print_cmsis_nn(result: dict[str, Any], out: TextIO) -> None:
    """One line per network and Cortex-M target: CMSIS-NN against qacc's best width."""
    peers = [p for p in result["peers"] if p.get("peer") == "cmsis-nn"]
    if not peers:
        return
    print("\nCMSIS-NN vs qacc (same layers, one call each; ratio > 1: qacc is ahead)\n", file=out)
    ws = [w.label if isinstance(w, Width) else str(w) for w in result["widths"]]
    table = []
    for p in peers:
        if "error" in p:
            table.append([p["network"], p["target"], "-", "-", "-", *["-"] * len(ws), "-", "-"])
            continue
        cells = [
            p["network"],
            p["target"],
            str(p["layers_covered"]),
            _fmt_int(p["instructions"]),
            _fmt_f(p["instructions_per_mac"]),
        ]
        cells += [_fmt_int(p.get(f"qacc_acc{w}_instructions")) for w in ws]
        best = p.get("qacc_best_acc_bits")
        cells += [f"acc{best}" if best else "-", _fmt_f(p.get("cmsis_nn_over_qacc_best"), 2)]
        table.append(cells)
    head = ["network", "target", "layers", "cmsis-nn", "/MAC", *[f"qacc acc{w}" for w in ws]]
    _table([*head, "best", "cmsis/best"], table, out, left=2)


def main_cli(
    targets: str,
    widths: str,
    networks: str,
    json_path: str | None,
    peer: bool = True,
    cmsis_nn: bool = False,
    cmsis_nn_dir: str | None = None,
) -> int:
    """Entry point of `qacc bench`."""
    run_bench(
        resolve_targets(targets),
        resolve_widths(widths),
        resolve_networks(networks),
        json_path,
        peer=peer,
        cmsis_nn=cmsis_nn or cmsis_nn_dir is not None,
        cmsis_nn_dir=cmsis_nn_dir,
    )
    return 0


__all__: list[str] = [
    "DEFAULT_NETWORKS",
    "DEFAULT_TARGETS",
    "BenchError",
    "Width",
    "conv_shapes",
    "main_cli",
    "print_tables",
    "quantize_net",
    "run_bench",
]
