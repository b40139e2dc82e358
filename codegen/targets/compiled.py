"""`codegen.compile(qm, target, out_dir)` and the `Compiled` model it returns.

    c = codegen.compile(qm, target="host", out_dir="out/net")
    c.run_int(x)      # == qm.reference_int(x), the integers of the generated C (in-process, cffi)
    c.run(x)          # the same, dequantized
    c.run_int_q(xq)   # already quantized NHWC int inputs (what tests use with bare graphs)
    c.report          # report.json: RAM (arena + scratch), flash (weights), arena lower bound...

out_dir holds the sources, the header, the CMake files, lib<name>.a, report.json and build/.
On the host the generated sources are also built as a shared library that cffi loads (ABI mode);
otherwise (or with sanitize=True, since a sanitized library cannot be loaded into Python) runs go
through the file-based test bench, executed through the target's runner (an emulator).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from codegen.backend.emit import emit, model_c_name, write_files
from codegen.backend.report import write_reports
from codegen.core.errors import QaccError
from codegen.core.formats import IntArray
from codegen.core.ir import Graph
from codegen.core.progress import bar, ticker
from codegen.targets.build import BuildResult, Launcher, Target, build, resolve_target


class ModelLike(Protocol):
    """What compile() needs from a quantized model: its integer graph and its name."""

    @property
    def graph(self) -> Graph: ...
    @property
    def name(self) -> str: ...


class OutputDirError(QaccError):
    """The output directory cannot be used."""


class RunTimeoutError(QaccError):
    """A test bench (under its emulator) did not finish within the time limit; it was killed."""


TIMEOUT_ENV = "QACC_EMULATOR_TIMEOUT"
"""Environment variable: the time limit in seconds of one test bench run (default 600)."""


def run_timeout() -> float:
    """The time limit of a test bench run: $QACC_EMULATOR_TIMEOUT seconds, else 600."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return 600.0
    try:
        t = float(value)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise QaccError(
            f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds; fix or unset it"
        )
    return t


def _check_int8(xq: npt.ArrayLike, shape: tuple[int, ...], what: str) -> tuple[np.ndarray, bool]:
    """(batch as contiguous int8 (N, size), whether a batch axis was given)."""
    a = np.asarray(xq)
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and a.size and np.all(np.floor(a) == a):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{what} must be integers (quantized NHWC values), got {a.dtype}")
    batched = a.shape[1:] == shape
    if not batched and a.shape != shape:
        raise ValueError(f"{what} shape {a.shape} is neither {shape} nor (N, *{shape})")
    if a.size and (a.min() < -128 or a.max() > 127):
        raise ValueError(f"{what} values leave the int8 container [-128, 127]")
    a = a.reshape((-1, int(np.prod(shape, dtype=np.int64))))
    return np.ascontiguousarray(a, dtype=np.int8), batched


def run_testbench(
    executable: str | Path,
    xq: npt.ArrayLike,
    input_shape: tuple[int, ...],
    output_shape: tuple[int, ...],
    launcher: Launcher | None = None,
    timeout: float | None = None,
    progress: bool = True,
) -> IntArray:
    """Run a generated test bench of a single-output model on int inputs through files; returns
    int64 outputs (`run_testbench_outputs` for several outputs)."""
    return run_testbench_outputs(
        executable, xq, input_shape, [output_shape], launcher, timeout, progress
    )[0]


def run_testbench_outputs(
    executable: str | Path,
    xq: npt.ArrayLike,
    input_shape: tuple[int, ...],
    output_shapes: Sequence[tuple[int, ...]],
    launcher: Launcher | None = None,
    timeout: float | None = None,
    progress: bool = True,
) -> tuple[IntArray, ...]:
    """Run a generated test bench on int inputs through files; returns int64 outputs, one array
    per output (the test bench writes a sample's outputs one after the other).

    `launcher(executable, args)` gives the command line (an emulator for cross targets).
    `timeout` (default: `run_timeout()`, $QACC_EMULATOR_TIMEOUT or 600 s): a run that takes longer
    is killed and reported as RunTimeoutError. `progress`: a bar on stderr (a terminal only)
    counting the outputs written so far."""
    limit = run_timeout() if timeout is None else timeout
    x8, batched = _check_int8(xq, input_shape, "input")
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in output_shapes]
    out_size = sum(sizes)
    with tempfile.TemporaryDirectory(prefix="qacc-tb-") as tmp:
        fin, fout = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        fin.write_bytes(x8.tobytes())
        args = [str(fin), str(fout)]
        argv = launcher(str(executable), args) if launcher else [str(executable), *args]
        try:
            with ticker(
                f"run {Path(executable).name}",
                progress=progress and x8.shape[0] > 1,
                total=x8.shape[0],
                unit="input",
                poll=lambda: fout.stat().st_size // max(out_size, 1),
            ):
                proc = subprocess.run(
                    argv,
                    capture_output=True,
                    text=True,
                    timeout=limit,
                    check=False,
                )
        except subprocess.TimeoutExpired:
            raise RunTimeoutError(
                f"{Path(argv[0]).name} did not finish running {Path(executable).name} within "
                f"{limit:g} s and was killed; check that the emulator works, or raise the limit "
                f"with {TIMEOUT_ENV}=SECONDS"
            ) from None
        if proc.returncode != 0:
            raise RuntimeError(
                f"test bench {executable} failed with exit code {proc.returncode}:\n"
                + proc.stderr[-4000:]
            )
        y = np.frombuffer(fout.read_bytes(), dtype=np.int8)
    if y.size != x8.shape[0] * out_size:
        raise RuntimeError(f"test bench wrote {y.size} values, expected {x8.shape[0] * out_size}")
    return _split(y.reshape((x8.shape[0], out_size)), output_shapes, batched)


def _split(
    y: npt.NDArray[np.int8], shapes: Sequence[tuple[int, ...]], batched: bool
) -> tuple[IntArray, ...]:
    """(N, total) int8 rows holding the outputs one after the other -> one int64 array each."""
    bounds = np.cumsum([0] + [int(np.prod(s, dtype=np.int64)) for s in shapes])
    outs = []
    for shape, a, b in zip(shapes, bounds[:-1], bounds[1:], strict=True):
        v = y[:, a:b].astype(np.int64).reshape((y.shape[0], *shape))
        outs.append(v if batched else v[0])
    return tuple(outs)


class Compiled:
    """A generated, built model. Create it with `codegen.compile`."""

    def __init__(
        self,
        graph: Graph,
        model: str,
        target: Target,
        out_dir: Path,
        build: BuildResult,
        qm: Any = None,
        progress: bool = True,
    ):
        self.graph = graph
        self.model = model
        self.name = build.name
        self.target = target
        self.out_dir = out_dir
        self.build = build
        self.qm = qm
        self.progress = progress
        """Progress bars (on a terminal's stderr) for test bench runs and instruction counts."""
        self._ffi: Any = None
        self._lib: Any = None

    def __repr__(self) -> str:
        return (
            f"Compiled({self.model!r}, target={self.target.name!r}, out_dir={str(self.out_dir)!r})"
        )

    # -- files

    @property
    def header(self) -> Path:
        return self.out_dir / f"{self.name}.h"

    @property
    def static_lib(self) -> Path:
        return self.out_dir / f"lib{self.name}.a"

    @property
    def testbench(self) -> Path | None:
        return self.build.testbench

    @property
    def report(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.out_dir / "report.json").read_text())
        return data

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.graph.user_shape(self.graph.input)

    @property
    def output_shape(self) -> tuple[int, ...]:
        """The (first) output's shape; `output_shapes` has every output's."""
        return self.graph.user_shape(self.graph.output)

    @property
    def output_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(self.graph.user_shape(t) for t in self.graph.outputs)

    # -- running

    def _load(self) -> Any:
        if self._lib is None:
            so = self.build.shared_lib
            if so is None:
                return None
            import cffi

            # dlopen caches by path: load a copy named after its content, so a rebuilt library in
            # the same directory is never confused with an older one loaded by this process.
            digest = hashlib.sha256(so.read_bytes()).hexdigest()[:16]
            copy = so.with_name(f"_cffi_{self.name}_{digest}.so")
            if not copy.exists():
                shutil.copy2(so, copy)
            ffi = cffi.FFI()
            outs = ", ".join("int8_t *" for _ in self.graph.outputs)
            ffi.cdef(f"int qacc_{self.name}_run(const int8_t *in, {outs});")
            self._ffi, self._lib = ffi, ffi.dlopen(str(copy))
        return self._lib

    def run_int_q(self, xq: npt.ArrayLike) -> Any:
        """Run on quantized NHWC ints, (N, *input_shape) or one sample; returns int64 outputs in
        the output format, NHWC, with the same batch layout as the input: one array, or a tuple
        in the model's order for a model with several outputs."""
        outs = self.run_int_q_outputs(xq)
        return outs[0] if len(outs) == 1 else outs

    def run_int_q_outputs(self, xq: npt.ArrayLike) -> tuple[IntArray, ...]:
        """`run_int_q`, always as a tuple (one array per output)."""
        lib = self._load()
        if lib is None:
            if self.build.testbench is None:
                raise QaccError("this build has neither a shared library nor a test bench to run")
            return run_testbench_outputs(
                self.build.testbench,
                xq,
                self.input_shape,
                self.output_shapes,
                self.target.argv,
                progress=self.progress,
            )
        x8, batched = _check_int8(xq, self.input_shape, "input")
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in self.output_shapes]
        ys = [np.empty((x8.shape[0], size), dtype=np.int8) for size in sizes]
        run = getattr(lib, f"qacc_{self.name}_run")
        ffi = self._ffi
        show = self.progress and x8.shape[0] > 1
        for i in bar(range(x8.shape[0]), f"run {self.name}", progress=show, unit="input"):
            outs = [ffi.from_buffer("int8_t[]", y[i]) for y in ys]
            rc = run(ffi.from_buffer("int8_t[]", x8[i]), *outs)
            if rc != 0:
                raise RuntimeError(f"qacc_{self.name}_run returned {rc}")
        return _split(np.concatenate(ys, axis=1), self.output_shapes, batched)

    def _model(self, what: str) -> Any:
        fn = getattr(self.qm, what, None)
        if fn is None:
            raise QaccError(
                f"{what} needs the quantized model; compile a QuantizedModel, or use run_int_q"
            )
        return fn

    def run_int(self, x: npt.ArrayLike) -> Any:
        """Float NCHW inputs -> the generated C's integer outputs (== qm.reference_int(x): a
        tuple for a model with several outputs)."""
        return self.run_int_q(self._model("quantize_input")(x))

    def run(self, x: npt.ArrayLike) -> Any:
        """Float NCHW inputs -> dequantized outputs of the generated C (a tuple for a model
        with several outputs)."""
        return self._model("dequantize_output")(self.run_int(x))

    # -- instruction counts

    def count_instructions(self, x: npt.ArrayLike, timeout_s: float = 600.0) -> dict[str, Any]:
        """Dynamic instructions of one inference under QEMU, in total and per layer.

        `x`: quantized NHWC ints (one sample or a batch), or float NCHW inputs when this was
        compiled from a quantized model; the first sample is counted. The test bench runs it with
        the QEMU instruction-count plugin; the model in the test bench calls qacc_mark() before
        the first layer and after each layer (QACC_LAYER_MARKS), so "layers" holds the counts
        between consecutive marks, keyed by node name in execution order, and "total" the count
        from the first mark to the last (everything qacc_<name>_run executes between its NULL
        check and its return, including the few instructions of each marker call).
        Returns {"total": int, "layers": {layer name: int}}. Host builds cannot be counted.
        The counts are also recorded in report.json ("instructions", with the target) and the
        report.md / report.html next to it are rendered again with them.
        """
        from codegen.targets import qemu, table

        a = np.asarray(x)
        if a.dtype.kind == "f" and self.qm is not None:
            a = np.asarray(self._model("quantize_input")(a))
        x8, _ = _check_int8(a, self.input_shape, "input")
        if x8.shape[0] == 0:
            raise ValueError("count_instructions needs at least one sample")
        if self.build.testbench is None:
            raise QaccError("count_instructions needs the test bench; compile with testbench=True")
        row = table.get_target(self.target.name)
        names = [str(layer["name"]) for layer in self.report["layers"]]
        with tempfile.TemporaryDirectory(prefix="qacc-count-") as tmp:
            fin, fout = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
            fin.write_bytes(x8[:1].tobytes())
            res = qemu.run_under_emulator(
                row,
                self.build.testbench,
                [str(fin), str(fout)],
                timeout_s,
                count_insns=True,
                progress=self.progress,
            )
        if res.returncode != 0 or res.counts is None:
            raise RuntimeError(
                f"test bench {self.build.testbench} failed with exit code {res.returncode}:\n"
                + res.stderr[-4000:]
            )
        marks = res.counts.marks
        if len(marks) != len(names) + 1:
            raise RuntimeError(
                f"expected {len(names) + 1} layer marks from the test bench, got {len(marks)}"
            )
        phases = res.counts.phases()
        counts = {
            "total": marks[-1] - marks[0],
            "layers": dict(zip(names, phases, strict=True)),
        }
        write_reports(self.out_dir, {**self.report, "instructions": {**counts, "target": row.name}})
        return counts


def _prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} exists and is not a directory; choose another out_dir")
    if out.is_dir() and any(out.iterdir()):
        report = out / "report.json"
        try:
            ours = json.loads(report.read_text()).get("generator", "").startswith("qacc")
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OutputDirError(
                f"{out} is not empty and was not written by qacc; choose a new or empty out_dir"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def compile(
    qm: ModelLike | Graph,
    target: str | Target = "host",
    out_dir: str | Path | None = None,
    *,
    sanitize: bool = False,
    testbench: bool = True,
    jobs: int | None = None,
    keep_failed: bool = False,
    progress: bool = True,
) -> Compiled:
    """Generate C for `qm` (a quantized model, or an integer Graph) and build it for `target`.

    Everything that can be wrong with the graph is reported before anything is written. A failed
    build removes out_dir again unless keep_failed. sanitize=True builds with ASan + UBSan (runs
    then go through the test bench, not in-process). Besides the sources, out_dir gets
    report.json, report.md and a self-contained report.html (codegen.backend.report).
    `progress`: bars on stderr, when it is a terminal, for the build and later test bench runs.
    """
    graph = qm if isinstance(qm, Graph) else qm.graph
    model = graph.name if isinstance(qm, Graph) else (qm.name or graph.name)
    tgt = resolve_target(target)
    files = emit(graph, model, tgt)
    quant_report = getattr(qm, "report", None)
    if quant_report:  # the quantizer's per-layer formats, bounds and overflow counts
        merged = {**json.loads(files["report.json"]), "quantization": quant_report}
        files["report.json"] = json.dumps(merged, indent=2, sort_keys=True) + "\n"
    if out_dir is None:
        out = Path(tempfile.mkdtemp(prefix=f"qacc-{model_c_name(graph, model)}-"))
    else:
        out = Path(out_dir).resolve()
    _prepare_out_dir(out)
    write_files(files, out)
    write_reports(out)  # report.md, report.html and their plots, from report.json
    try:
        result = build(
            out,
            tgt,
            shared=tgt.shared and not sanitize,
            testbench=testbench or sanitize or not tgt.shared,
            sanitize=sanitize,
            jobs=jobs,
            progress=progress,
        )
    except BaseException:
        if not keep_failed:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return Compiled(graph, model, tgt, out, result, None if isinstance(qm, Graph) else qm, progress)


__all__ = ["Compiled", "ModelLike", "compile", "run_testbench", "run_testbench_outputs"]
