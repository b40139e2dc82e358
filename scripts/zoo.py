#!/usr/bin/env python3
"""The zoo sweep: every torchvision model qacc accepts, quantized, compiled and checked.

    make zoo                                    # every accepted model, the heavy ones too
    .venv/bin/python scripts/zoo.py --models resnet18,mobilenet_v2 --onnx
    .venv/bin/python scripts/zoo.py --models squeezenet1_1 --targets cortex-a53,cortex-m55

For each model of tests/frontend/test_zoo.py's ACCEPTED and HEAVY lists (the same random
weights, BatchNorm statistics, calibration and test images as the test): PTQ at 16-bit
accumulators, `guaranteed`; compile for the host; the C output against the NumPy reference.
With --onnx the model also goes through torch.onnx.export (dynamo) and qacc's ONNX frontend,
quantized with the same settings, and its integer outputs must equal the torch.fx path's (the
table shows that quantization's seconds after the torch path's). With --targets the model is
also compiled for those ARM targets and its first test image run under QEMU (C == reference,
instructions).
Prints a Markdown table (network, MACs, quantize seconds (torch / ONNX), compile seconds, flash
and arena bytes, C == reference, ONNX == torch, peak RSS, per target) and writes it as JSON to
--json. Exits 1 if any model is not bit-exact or fails. Peak RSS is the largest resident set of
this process or of a finished child (the C compiler) so far: run one model per process
(`--models NAME`) for a figure of that model alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import codegen
from tests.frontend import test_onnx, test_zoo


def sweep_one(name: str, out: Path, onnx: bool, targets: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"network": name}
    model = test_zoo.build(name)
    t0 = time.perf_counter()
    qm = test_zoo.quantize(name, model)
    row["quantize_s"] = round(time.perf_counter() - t0, 1)
    row["macs"] = qm.report["macs"]
    t0 = time.perf_counter()
    # no test bench: the host runs the shared library in-process (the weights are built once)
    c = codegen.compile(qm, target="host", out_dir=out / name, testbench=False)
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    memory = c.report["memory"]
    row["flash_bytes"] = memory["flash_weight_bytes"]
    row["arena_bytes"] = memory["arena_bytes"]
    x = test_zoo.data(test_zoo.TEST_IMAGES, seed=1)
    want = qm.reference_int(x)
    row["c_equals_reference"] = bool(np.array_equal(c.run_int(x), want))
    for target in targets:
        row[target] = on_target(qm, target, x[:1], want[:1], out / f"{name}-{target}")
    if onnx:
        path = test_onnx.export(model, x[:1], out / f"{name}.onnx", "dynamo")
        t0 = time.perf_counter()
        qo = test_zoo.quantize(name, path)  # the torch path's settings (nearest rounding)
        row["onnx_quantize_s"] = round(time.perf_counter() - t0, 1)
        row["onnx_equals_torch"] = bool(np.array_equal(qo.reference_int(x), want))
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def peak_rss_mb() -> int:
    """The largest resident set, in MiB, of this process or of a child it waited for (the C
    compiler under CMake and ninja) so far (Linux counts ru_maxrss in KiB)."""
    kib = max(
        resource.getrusage(who).ru_maxrss
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return round(kib / 1024)


def on_target(
    qm: codegen.QuantizedModel, target: str, x: np.ndarray, want: np.ndarray, out: Path
) -> dict[str, Any]:
    """Compile for an ARM target, run one image under QEMU: C == reference, and the count."""
    try:
        c = codegen.compile(qm, target=target, out_dir=out)
        got = c.run_int(x)
        n = c.count_instructions(qm.quantize_input(x))["total"]
    except codegen.QaccError as e:
        return {"error": str(e)}
    return {"c_equals_reference": bool(np.array_equal(got, want)), "instructions": n}


def table(rows: list[dict[str, Any]], targets: list[str]) -> str:
    def yes(v: object) -> str:
        return "-" if v is None else ("yes" if v else "**NO**")

    def on(r: dict[str, Any]) -> str:
        if "error" in r:
            return f"error: {r['error']}"
        return f"{yes(r['c_equals_reference'])}, {r['instructions']:,} instr."

    lines = [
        "| network | MACs | quantize s (torch / ONNX) | compile s | flash B | arena B "
        "| C == reference | ONNX == torch | peak RSS MiB |" + "".join(f" {t} |" for t in targets),
        "|---|--:|--:|--:|--:|--:|---|---|--:|" + "---|" * len(targets),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['network']} | error: {r['error']} ||||||||" + "|" * len(targets))
            continue
        quantize = " / ".join(str(r[k]) for k in ("quantize_s", "onnx_quantize_s") if k in r)
        lines.append(
            f"| {r['network']} | {r['macs']:,} | {quantize} | {r['compile_s']} "
            f"| {r['flash_bytes']:,} | {r['arena_bytes']:,} | {yes(r['c_equals_reference'])} "
            f"| {yes(r.get('onnx_equals_torch'))} | {r['peak_rss_mb']:,} |"
            + "".join(f" {on(r[t])} |" for t in targets)
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated names (default: all accepted)")
    p.add_argument("--onnx", action="store_true", help="also through torch.onnx.export")
    p.add_argument(
        "--targets", default="", help="ARM targets to run one image on under QEMU (commas)"
    )
    p.add_argument("--json", type=Path, default=Path("build/zoo.json"), help="results file")
    a = p.parse_args()
    names = a.models.split(",") if a.models else [*test_zoo.ACCEPTED, *test_zoo.HEAVY]
    targets = [t for t in a.targets.split(",") if t]
    rows = []
    with tempfile.TemporaryDirectory(prefix="qacc-zoo-") as tmp:
        for name in names:
            print(f"{name} ...", file=sys.stderr, flush=True)
            try:
                rows.append(sweep_one(name, Path(tmp), a.onnx, targets))
            except codegen.QaccError as e:
                rows.append({"network": name, "error": str(e)})
    print(table(rows, targets))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(rows, indent=1) + "\n")
    bad = [
        r
        for r in rows
        if "error" in r
        or not r["c_equals_reference"]
        or r.get("onnx_equals_torch") is False
        or any(not r[t].get("c_equals_reference") for t in targets)
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
