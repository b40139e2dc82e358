#!/usr/bin/env python3
"""The long fuzz campaign: random graphs and quantized models, generated C == reference.

    make fuzz N=10000               # host, every 4th CMake project with ASan + UBSan
    .venv/bin/python scripts/fuzz.py -n 200 --target cortex-a53 --seed 3

Prints the cases run, mismatches, errors and infeasible widths; exits 1 on any mismatch or error.
A failing case is replayed from its id: g<seed> is codegen.tools.fuzz.random_graph(seed),
m<seed> is codegen.tools.fuzz.random_model(seed) through codegen.quantize.
"""

from __future__ import annotations

import argparse
import sys

from codegen.tools import fuzz


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=10000, help="number of cases")
    p.add_argument("--seed", type=int, default=0, help="campaign seed (cases seed*1e9 + i)")
    p.add_argument("--target", default="host", help="host or an ARM target (QEMU)")
    p.add_argument("--per-project", type=int, default=60, help="cases per CMake project")
    p.add_argument("--model-share", type=float, default=0.25, help="share of torch models")
    p.add_argument("--sanitize-every", type=int, default=4, help="host: every k-th project ASan")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile jobs")
    a = p.parse_args()
    stats = fuzz.run_campaign(
        a.n,
        a.seed,
        a.target,
        per_project=a.per_project,
        sanitize_every=a.sanitize_every,
        model_share=a.model_share,
        jobs=a.jobs,
        log=lambda line: print(line, flush=True),
    )
    print(stats.summary())
    return 0 if stats.ok else 1


if __name__ == "__main__":
    sys.exit(main())
