"""The `qacc` command line. Errors are one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from codegen.quant.training import TrainData

from codegen.core.errors import QaccError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
MODEL_FILE = "model.qacc"


def _demo(args: argparse.Namespace) -> int:
    from codegen.tools import demo

    return demo.main(args.full, args.model, args.epochs)


def _sweep(args: argparse.Namespace) -> int:
    from codegen.tools import sweep

    return sweep.main(
        args.model,
        Path(args.out),
        _int_list(args.widths, "--widths"),
        [m.strip() for m in args.methods.split(",") if m.strip()],
        args.qat_epochs,
        args.epochs,
        rounding=[r.strip() for r in args.rounding.split(",") if r.strip()],
        clip=args.clip,
        cle=args.cle,
        brevitas=[a.strip() for a in (args.brevitas or "").split(",") if a.strip()],
        brevitas_bits=[_int_list(b, "--brevitas-bits") for b in args.brevitas_bits],
        policies=[p.strip() for p in args.policies.split(",") if p.strip()],
        train_samples=args.train_samples,
        test_samples=args.test_samples,
        check_c=args.check_c,
    )


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QaccError(f"{what} must be integers separated by commas, got '{text}'") from None


def _bench(args: argparse.Namespace) -> int:
    from codegen.bench import runner

    return runner.main_cli(
        args.targets,
        args.widths,
        args.networks,
        args.json,
        not args.no_peer,
        cmsis_nn=args.peers,
        cmsis_nn_dir=args.cmsis_nn,
    )


def _rate(args: argparse.Namespace) -> int:
    from codegen.tools import rate

    return rate.main_cli(args.rates, args.transforms, args.epochs, args.train_samples, args.out)


def _load_array(path: str, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise QaccError(f"{what} file '{path}' does not exist")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise QaccError(
            f"{what} file '{path}' is not a .npy array ({e}); save it with numpy.save"
        ) from None
    if not isinstance(arr, np.ndarray):
        raise QaccError(
            f"{what} file '{path}' holds several arrays; save one array with numpy.save"
        )
    return arr


def _acc_bits(args: argparse.Namespace) -> int | dict[str, int]:
    if not args.layer_acc_bits:
        return int(args.acc_bits)
    out: dict[str, int] = {"default": int(args.acc_bits)}
    for item in args.layer_acc_bits:
        name, _, bits = item.partition("=")
        if not name or not bits.isdigit():
            raise QaccError(f"--layer-acc-bits takes NAME=BITS, got '{item}'")
        out[name] = int(bits)
    return out


def _compile(args: argparse.Namespace) -> int:
    import codegen
    from codegen.targets.build import resolve_target
    from codegen.tools.modelfile import load_model
    from codegen.tools.outdir import staged_output

    resolve_target(args.target).check()  # an unknown target or a missing tool fails first
    model = load_model(args.model)
    calib = _load_array(args.calib, "calibration")
    labels = _load_array(args.labels, "labels") if args.labels else None
    train: TrainData | None = None
    if args.train_data or args.train_labels:
        if not (args.train_data and args.train_labels):
            raise QaccError("give both --train-data and --train-labels (or neither)")
        files = args.train_labels.split(",")
        ys = tuple(None if f == "none" else _load_array(f, "training labels") for f in files)
        x_train = _load_array(args.train_data, "training data")
        if len(ys) > 1:
            train = (x_train, ys)
        elif ys[0] is None:
            raise QaccError("--train-labels 'none' is for one output of several; give a .npy")
        else:
            train = (x_train, ys[0])
    with staged_output(Path(args.out), force=args.force) as tmp:
        qm = codegen.quantize(
            model,
            calib,
            acc_bits=_acc_bits(args),
            overflow=args.overflow,
            labels=labels,
            method=args.method,
            acc_stages=args.acc_stages,
            acc_tile=args.acc_tile,
            margin=args.margin,
            name=args.name,
            rounding=args.rounding,
            clip=args.clip,
            cle=args.cle,
            w_bits=args.w_bits,
            a_bits=args.a_bits,
            scale=args.scale,
            bits_per_weight=args.bits_per_weight,
            transform=args.transform,
            transform_deploy=args.transform_deploy,
            train=train,
            epochs=args.train_epochs,
        )
        compiled = codegen.compile(qm, target=args.target, out_dir=tmp)
        save_model(qm, args.target, tmp)
        mem = compiled.report["memory"]
    print(
        f"qacc: wrote {args.out}: lib{compiled.name}.a + {compiled.name}.h for {args.target}; "
        f"{qm.report['macs']} MACs, arena {mem['arena_bytes']} B (lower bound "
        f"{mem['arena_lower_bound']} B), weights {mem['flash_weight_bytes']} B; "
        f"report: {Path(args.out) / 'report.html'}"
    )
    return 0


def save_model(qm: Any, target: str, out: Path) -> None:
    """Keep what `qacc verify` needs next to the sources: the quantized model and the target."""
    # report.json already holds the quantizer's report (codegen.compile merges it)
    with open(out / MODEL_FILE, "wb") as f:
        pickle.dump({"qm": qm, "target": target}, f)


def _verify(args: argparse.Namespace) -> int:
    from codegen.targets.build import resolve_target
    from codegen.targets.compiled import run_testbench_outputs

    out = Path(args.dir)
    saved = out / MODEL_FILE
    if not saved.is_file():
        raise QaccError(f"{out} is not an output directory of qacc compile (no {MODEL_FILE})")
    with open(saved, "rb") as f:
        data = pickle.load(f)
    qm, target = data["qm"], resolve_target(data["target"])
    target.check()  # a missing emulator fails here, naming the package to install
    x = _load_array(args.inputs, "inputs")
    report = json.loads((out / "report.json").read_text())
    bench = out / "build" / f"{report['name']}_testbench"
    if not bench.is_file():
        raise QaccError(f"{bench} is missing; run qacc compile again")
    in_shape = qm.graph.tensors[qm.graph.input].shape
    xq = qm.quantize_input(x).reshape((len(x), *in_shape))  # a sequence's (N, L, C): (N, 1, L, C)
    g = qm.graph
    wants = qm.run_reference(x).outputs  # every output, in the model's order
    gots = run_testbench_outputs(
        bench,
        xq,
        in_shape,
        [g.tensors[t].shape for t in g.outputs],
        getattr(target, "launcher", None),
    )
    diff = [
        np.abs(got.reshape(w.shape) - w).reshape(len(x), -1)
        for got, w in zip(gots, wants, strict=True)
    ]
    bad = np.any(np.concatenate(diff, axis=1) != 0, axis=1)
    worst = max(int(d.max()) for d in diff)
    print(
        f"qacc verify: {len(x)} inputs on {data['target']}: {len(x) - int(bad.sum())} bit-exact, "
        f"{int(bad.sum())} differ" + (f" (max |difference| {worst})" if bad.any() else "")
    )
    return 1 if bad.any() else 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with "(required)" or "(default: ...)"; an option whose default is
    not a plain value (None: computed, or off) says what it means in its own help text instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and action.required and action.option_strings:
            return f"{action.help} (required)"
        if action.help and "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from codegen import __version__
    from codegen.data import models
    from codegen.quant.rounding import DEFAULT_ROUNDING, ROUNDINGS
    from codegen.targets.table import TARGETS

    def ptq_options(q: argparse.ArgumentParser, check: bool) -> None:
        """--clip and --cle (compile: argparse checks the values; sweep: codegen does)."""
        from codegen.quant.equalize import ADAPTIVE_CLE, CLES, DEFAULT_CLE
        from codegen.quant.ptq import CLIPS, DEFAULT_CLIP

        q.add_argument(
            "--clip",
            choices=CLIPS if check else None,
            default=DEFAULT_CLIP,
            help="ptq: activation clipping; mse picks per input width the range (the "
            "calibration maximum or 2, 4, 8 times below, saturating) of least input error; "
            "search ranks every such range by the network output",
        )
        q.add_argument(
            "--cle",
            choices=CLES if check else None,
            default=None,
            help="ptq and adaptive: cross-layer equalization of the float network first "
            "(weights: equal weight ranges; activations: equal channel maxima, a tighter "
            f"accumulator bound) (default: {DEFAULT_CLE} for ptq, {ADAPTIVE_CLE} for adaptive)",
        )

    p = argparse.ArgumentParser(
        prog="qacc",
        description="Quantize PyTorch CNNs for narrow accumulators and generate bit-exact C.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"qacc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="Fashion-MNIST end to end in a few minutes: float, PTQ per accumulator width, short "
        "fine-tunes, bit-exact C on host and QEMU, instruction counts",
        formatter_class=HelpFormatter,
    )
    d.add_argument(
        "--full",
        action="store_true",
        help="the full-length run instead (float training if no checkpoint fits, width sweeps on "
        "two networks, 6-epoch adaptive training, QEMU on 500 images; `make paper`)",
    )
    d.add_argument(
        "--model",
        choices=sorted(models.ZOO),
        default=None,
        help="--full only: first network (default: fashion_cnn)",
    )
    d.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="--full only: its float training epochs (default: 4; cached)",
    )
    d.set_defaults(func=_demo)

    c = sub.add_parser(
        "compile",
        help="quantize a model and generate + build its C library",
        formatter_class=HelpFormatter,
    )
    c.add_argument(
        "model",
        metavar="MODEL",
        help="path/to/file.py:callable returning the nn.Module with weights loaded, or an ONNX "
        "float model (model.onnx, e.g. from torch.onnx.export)",
    )
    c.add_argument("--calib", required=True, help="calibration inputs, N x C x H x W float32 .npy")
    c.add_argument(
        "--labels",
        default=None,
        help="labels of the calibration inputs (.npy, int) (default: none; bit widths are "
        "then ranked by output error against float)",
    )
    c.add_argument("--acc-bits", type=int, default=16, help="accumulator width, 8..32")
    c.add_argument(
        "--layer-acc-bits",
        action="append",
        default=[],
        metavar="NAME=BITS",
        help="per-layer accumulator width (repeatable) (default: --acc-bits for every layer)",
    )
    c.add_argument(
        "--acc-stages",
        type=int,
        default=1,
        help="2: two-stage accumulation (ptq): tiles of T terms in --acc-bits, their sums in 32 "
        "bits; T is chosen per layer so that no tile can overflow",
    )
    c.add_argument(
        "--acc-tile",
        type=int,
        default=None,
        help="with --acc-stages 2: quantize the weights so that every tile of this many terms "
        "(1, 2, 4 or a multiple of 8) fits --acc-bits (default: the 32-bit weights, and the "
        "largest tile they allow)",
    )
    c.add_argument(
        "--overflow",
        choices=("guaranteed", "profiled"),
        default="guaranteed",
        help="overflow policy",
    )
    c.add_argument("--margin", type=float, default=2.0, help="profiled policy: range margin")
    c.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        default=None,
        help="ptq: weight rounding; optq and gpfq push each column's rounding error onto the "
        f"columns not yet quantized, inside the accumulator budget (AXE); nearest rounds each "
        f"(default: {DEFAULT_ROUNDING}; nearest with --acc-stages 2)",
    )
    ptq_options(c, check=True)
    c.add_argument(
        "--method",
        choices=("ptq", "adaptive", "transform"),
        default="ptq",
        help="post-training; adaptive (trained steps and offsets, A2Q+ accumulator constraint, "
        "needs --train-data); transform (KLT + bit allocation, retrained with --train-data)",
    )
    c.add_argument("--w-bits", type=int, default=4, help="adaptive: weight bits, 2..8")
    c.add_argument(
        "--a-bits", type=int, default=4, help="adaptive: activation bits, 2..8 (logits keep 8)"
    )
    c.add_argument(
        "--scale", choices=("dyadic", "pow2"), default="dyadic", help="adaptive: scale kind"
    )
    c.add_argument(
        "--bits-per-weight", type=float, default=2.0, help="transform: average bits per weight"
    )
    c.add_argument(
        "--transform",
        choices=("klt", "elt", "uniform"),
        default="klt",
        help="transform: kind (uniform: the baseline without a transform)",
    )
    c.add_argument(
        "--transform-deploy",
        choices=("auto", "factored", "reconstructed"),
        default="auto",
        help="transform: coefficient layer + 1x1 transform layer, reconstructed weights, or "
        "whichever takes less flash",
    )
    c.add_argument(
        "--train-data",
        default=None,
        help="adaptive/transform: training inputs, N x C x H x W float32 .npy (default: none)",
    )
    c.add_argument(
        "--train-labels",
        default=None,
        help="adaptive/transform: training labels, .npy int (default: none); a model with "
        "several outputs takes one file per output, comma-separated, 'none' for an output "
        "trained by distillation only",
    )
    c.add_argument(
        "--train-epochs", type=int, default=2, help="adaptive/transform: training epochs"
    )
    c.add_argument("--target", default="host", help=f"one of: {', '.join(TARGETS)}")
    c.add_argument("--name", default=None, help="C name of the model (default: the class name)")
    c.add_argument("--out", required=True, help="output directory (must not exist)")
    c.add_argument("--force", action="store_true", help="replace an existing output directory")
    c.set_defaults(func=_compile)

    v = sub.add_parser(
        "verify",
        help="run the built code and the reference; exit 0 only if bit-exact",
        formatter_class=HelpFormatter,
    )
    v.add_argument("dir", metavar="DIR", help="output directory of qacc compile")
    v.add_argument("--inputs", required=True, help="inputs, N x C x H x W float32 .npy")
    v.set_defaults(func=_verify)

    w = sub.add_parser(
        "sweep",
        help="Fashion-MNIST accuracy against accumulator width: PTQ vs adaptive W4A4 training",
        formatter_class=HelpFormatter,
    )
    w.add_argument(
        "--model", choices=sorted(models.ZOO), default="fashion_ds", help="network to sweep"
    )
    w.add_argument("--epochs", type=int, default=6, help="float training epochs (cached)")
    w.add_argument(
        "--qat-epochs",
        type=int,
        default=6,
        help="adaptive training epochs per width (with distillation from the float network)",
    )
    w.add_argument(
        "--widths", default="32,20,16,14,12,10", help="accumulator widths separated by commas"
    )
    w.add_argument("--methods", default="ptq,adaptive", help="ptq and/or adaptive (commas)")
    w.add_argument(
        "--train-samples",
        type=int,
        default=None,
        help="adaptive and Brevitas A2Q+ training: a random subset of that many training images "
        "(default: all 60 000)",
    )
    w.add_argument(
        "--test-samples",
        type=int,
        default=None,
        help="evaluate on the first that many test images (default: all 10 000)",
    )
    w.add_argument(
        "--check-c",
        type=int,
        default=0,
        metavar="N",
        help="generate and build every qacc row's C for the host and check it bit-exact against "
        "the integer reference on the first N test images (default: 0, no check)",
    )
    w.add_argument(
        "--policies",
        default="guaranteed,profiled",
        help="ptq overflow policies, guaranteed and/or profiled (commas)",
    )
    w.add_argument(
        "--rounding",
        default=DEFAULT_ROUNDING,
        help=f"ptq weight rounding, one or more of {', '.join(ROUNDINGS)} (commas)",
    )
    ptq_options(w, check=False)
    w.add_argument(
        "--brevitas",
        nargs="?",
        const="gpfq",
        default=None,
        metavar="ALGS",
        help="add Brevitas as a peer at every width: its accumulator-aware PTQ (AXE) with gpfq "
        "and/or gptq, and/or a2q+ (its accumulator-aware training, at the adaptive rows' bits, "
        "images, epochs and optimiser) (commas; bare flag: gpfq); needs pip install '.[peers]' "
        "(default: none, no peer)",
    )
    w.add_argument(
        "--brevitas-bits",
        nargs="+",
        default=["8,8"],
        metavar="W,A",
        help="--brevitas: weight and activation bits of every layer; several pairs (e.g. 8,8 6,6 "
        "4,4): each width keeps the pair of best accuracy, as the AXE paper's Pareto frontier "
        "(default: 8,8)",
    )
    w.add_argument(
        "--out", default="out/sweep", help="directory for sweep.png, sweep.md and sweep.json"
    )
    w.set_defaults(func=_sweep)

    b = sub.add_parser(
        "bench",
        help="instructions per inference under QEMU per target and accumulator width, with XNNPACK "
        "(AArch64) and CMSIS-NN (Cortex-M, --peers)",
        formatter_class=HelpFormatter,
    )
    b.add_argument(
        "--targets",
        default="cortex-a53,cortex-a76,cortex-a55",
        help="ARM targets separated by commas, or 'all'",
    )
    b.add_argument(
        "--widths",
        default="16,16x32,32",
        help="accumulator widths separated by commas; AxB: two-stage accumulation (tiles of "
        "64 terms in A bits, summed in B bits)",
    )
    b.add_argument(
        "--networks",
        default="all",
        help="conv3x3,demo,resnet8,ds_cnn,mobilenet_v1,allcnn_c (commas) or 'all'; 'layers' (or "
        "conv3x3_16,dw3x3,pw1x1,dense256,maxpool,avgpool,gap,add,mul,softmax,concat,gconv3x3,"
        "dw3x3_m2): single layers",
    )
    b.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the results as JSON (default: no JSON file)",
    )
    b.add_argument("--no-peer", action="store_true", help="skip the XNNPACK peer rows")
    b.add_argument(
        "--peers",
        action="store_true",
        help="also run CMSIS-NN beside qacc on Cortex-M targets (per layer, and the ratio)",
    )
    b.add_argument(
        "--cmsis-nn",
        default=None,
        metavar="DIR",
        help="CMSIS-NN source tree for --peers (default: third_party/CMSIS-NN of the checkout)",
    )
    b.set_defaults(func=_bench)

    r = sub.add_parser(
        "rate",
        help="rate-accuracy curve of transform quantization vs uniform on Fashion-MNIST",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    r.add_argument("--rates", default="1,2,3,4,5,6,7,8", help="bits per weight (commas)")
    r.add_argument("--transforms", default="klt", help="klt and/or elt (commas)")
    r.add_argument("--epochs", type=int, default=1, help="retraining epochs (0: no retraining)")
    r.add_argument(
        "--train-samples", type=int, default=20000, help="training images used for retraining"
    )
    r.add_argument("--out", default="build/rate", help="output directory")
    r.set_defaults(func=_rate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except QaccError as e:
        print(f"qacc: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("qacc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in qacc, not in the user's input: still one line by default
        if os.environ.get("QACC_DEBUG"):
            raise
        print(
            f"qacc: internal error: {type(e).__name__}: {e}; this is a bug in qacc, please report "
            "it (QACC_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
