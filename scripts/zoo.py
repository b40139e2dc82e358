#!/usr/bin/env python3
"""The zoo sweep: every torchvision model qacc accepts, quantized, compiled and checked.

    make zoo                                    # every accepted model, the heavy ones too
    .venv/bin/python scripts/zoo.py --models resnet18,mobilenet_v2 --onnx

For each model of tests/frontend/test_zoo.py's ACCEPTED and HEAVY lists (the same random
weights, BatchNorm statistics, calibration and test images as the test): PTQ at 16-bit
accumulators, `guaranteed`; compile for the host; the C output against the NumPy reference.
With --onnx the model also goes through torch.onnx.export and qacc's ONNX frontend, and its
integer outputs must equal the torch.fx path's. Prints a Markdown table (network, MACs,
quantize and compile seconds, flash and arena bytes, C == reference, ONNX == torch) and writes
it as JSON to --json. Exits 1 if any model is not bit-exact or fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import codegen
from tests.frontend import test_onnx, test_zoo


def sweep_one(name: str, out: Path, onnx: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"network": name}
    model = test_zoo.build(name)
    t0 = time.perf_counter()
    qm = test_zoo.quantize(name, model)
    row["quantize_s"] = round(time.perf_counter() - t0, 1)
    row["macs"] = qm.report["macs"]
    t0 = time.perf_counter()
    c = codegen.compile(qm, target="host", out_dir=out / name)
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    memory = c.report["memory"]
    row["flash_bytes"] = memory["flash_weight_bytes"]
    row["arena_bytes"] = memory["arena_bytes"]
    x = test_zoo.data(test_zoo.TEST_IMAGES, seed=1)
    want = qm.reference_int(x)
    row["c_equals_reference"] = bool(np.array_equal(c.run_int(x), want))
    if onnx:
        path = test_onnx.export(model, x[:1], out / f"{name}.onnx", "dynamo")
        qo = codegen.quantize(
            str(path),
            test_zoo.data(test_zoo.CALIB_IMAGES, seed=0),
            acc_bits=16,
            overflow="guaranteed",
            progress=False,
            name=name,
        )
        row["onnx_equals_torch"] = bool(np.array_equal(qo.reference_int(x), want))
    return row


def table(rows: list[dict[str, Any]]) -> str:
    def yes(v: object) -> str:
        return "-" if v is None else ("yes" if v else "**NO**")

    lines = [
        "| network | MACs | quantize s | compile s | flash B | arena B | C == reference "
        "| ONNX == torch |",
        "|---|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['network']} | error: {r['error']} |||||||")
            continue
        lines.append(
            f"| {r['network']} | {r['macs']:,} | {r['quantize_s']} | {r['compile_s']} "
            f"| {r['flash_bytes']:,} | {r['arena_bytes']:,} | {yes(r['c_equals_reference'])} "
            f"| {yes(r.get('onnx_equals_torch'))} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated names (default: all accepted)")
    p.add_argument("--onnx", action="store_true", help="also through torch.onnx.export")
    p.add_argument("--json", type=Path, default=Path("build/zoo.json"), help="results file")
    a = p.parse_args()
    names = a.models.split(",") if a.models else [*test_zoo.ACCEPTED, *test_zoo.HEAVY]
    rows = []
    with tempfile.TemporaryDirectory(prefix="qacc-zoo-") as tmp:
        for name in names:
            print(f"{name} ...", file=sys.stderr, flush=True)
            try:
                rows.append(sweep_one(name, Path(tmp), a.onnx))
            except codegen.QaccError as e:
                rows.append({"network": name, "error": str(e)})
    print(table(rows))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(rows, indent=1) + "\n")
    bad = [
        r
        for r in rows
        if "error" in r or not r["c_equals_reference"] or r.get("onnx_equals_torch") is False
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
