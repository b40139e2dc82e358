"""The `qacc` command line. Errors are one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from codegen.errors import QaccError

EXIT_USER_ERROR = 2


def _demo(args: argparse.Namespace) -> int:
    from codegen import demo

    return demo.main(args.model, args.epochs)


def build_parser() -> argparse.ArgumentParser:
    from codegen import __version__, models

    p = argparse.ArgumentParser(
        prog="qacc",
        description="Quantize PyTorch CNNs for narrow accumulators and generate bit-exact C.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"qacc {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="Fashion-MNIST end to end: train, quantize per accumulator width, generate C",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("--model", choices=sorted(models.ZOO), default="fashion_cnn",
                   help="demo network")
    d.add_argument("--epochs", type=int, default=4, help="training epochs (cached)")
    d.set_defaults(func=_demo)
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


if __name__ == "__main__":
    sys.exit(main())
