"""Compile reports: report.json rendered as report.md and a self-contained report.html.

    report = json.loads((out / "report.json").read_text())
    pngs = plots(report)                       # {"headroom": PNG bytes, "bits": ..., "sweep": ...}
    md = to_markdown(report)                   # links the PNGs written next to it
    html = to_html(report, pngs)               # images embedded as data: URIs, inline CSS
    write_reports(out, report)                 # all of it, what codegen.compile does

`report` is what codegen.compile writes to report.json: the generated code's figures (target,
memory plan, per-layer kernels and accumulation paths), the quantizer's report under
"quantization" (per-layer bits, formats, bounds, observed accumulators, overflow counts; a
"sweep" of accuracy against accumulator width when one ran; method-specific extra keys), and,
once counted (Compiled.count_instructions), the dynamic instructions under "instructions".

Everything here is a pure function of the report (no clock, no paths): the same report gives
byte-identical files. Plots are matplotlib figures on the Agg canvas (no pyplot state, no
display needed).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from codegen.core.resources import data_path

TEMPLATES = data_path("templates", "report")

REPORT_FILES = ("report.json", "report.md", "report.html")
PLOT_FILES = {
    "headroom": "report-headroom.png",
    "bits": "report-bits.png",
    "sweep": "report-sweep.png",
}
PLOT_TITLES = {
    "headroom": "Accumulator headroom per layer",
    "bits": "Bits per layer",
    "sweep": "Accuracy against accumulator width",
}

# Keys of the quantizer's report that have their own place in the rendering; any other key is
# method-specific and goes to the generic details table.
KNOWN_QUANT_KEYS = frozenset(
    {
        "model",
        "method",
        "overflow_policy",
        "input_format",
        "layers",
        "macs",
        "weight_bytes",
        "calibration_samples",
        "calibration_overflow_events",
        "sweep",
    }
)
KNOWN_LAYER_KEYS = frozenset(
    {
        "name",
        "op",
        "input_format",
        "output_format",
        "input_bits",
        "output_bits",
        "K",
        "acc_bits",
        "weight_bits",
        "bound",
        "acc_limit",
        "bound_fits",
        "observed_max_abs_acc",
        "overflow_events",
        "overflow_samples",
        "macs",
        "weight_frac",
        "search",
    }
)


# ----------------------------------------------------------------------------- view model


@dataclass
class Table:
    """A table ready to render: header, rows of strings, and which columns are numbers."""

    head: list[str]
    rows: list[list[str]] = field(default_factory=list)
    numeric: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.numeric:
            self.numeric = [False] * len(self.head)

    @classmethod
    def columns(cls, spec: str) -> Table:
        """An empty table from "name, #number column, ..." (a leading # right-aligns)."""
        cols = spec.split(", ")
        return cls([c.lstrip("#") for c in cols], numeric=[c.startswith("#") for c in cols])


ACCUMULATOR_COLUMNS = (
    "layer, op, #K, #acc bits, path, input, weights, output, #bound, #limit 2^(A-1), "
    "#headroom bits, #observed max |acc|, #overflow events, #overflow samples, #MACs, "
    "#instructions, search bx/bw"
)
KERNEL_COLUMNS = (
    "layer, op, kernel, path, input, output, #MACs, #weight bytes, #instructions, #instructions/MAC"
)


def _int(v: Any) -> str:
    return f"{int(v):,}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _scalar(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _value(v: Any) -> str:
    """A details-table cell: scalars as they are, short lists of scalars joined, else a pointer."""
    if _is_scalar(v):
        return _scalar(v)
    if isinstance(v, (list, tuple)) and len(v) <= 8 and all(_is_scalar(x) for x in v):
        return ", ".join(_scalar(x) for x in v)
    kind = f"{len(v)} items" if isinstance(v, (list, tuple, dict)) else type(v).__name__
    return f"({kind}; see report.json)"


def _quant(report: Mapping[str, Any]) -> Mapping[str, Any]:
    q = report.get("quantization")
    return q if isinstance(q, Mapping) else {}


def _headroom(bound: Any, acc_bits: Any) -> float | None:
    """log2(2^(A-1) / bound): the bits left between the guaranteed bound and the limit."""
    if not isinstance(bound, (int, float)) or not isinstance(acc_bits, int) or bound <= 0:
        return None
    return (acc_bits - 1) - math.log2(bound)


def _weight_format(row: Mapping[str, Any]) -> str:
    bits = row.get("weight_bits")
    if bits is None:
        return "-"
    frac = row.get("weight_frac")
    if isinstance(frac, (list, tuple)) and len(frac) == 2:
        lo, hi = frac
        return f"s{bits}.{lo}" if lo == hi else f"s{bits}.{lo}..{hi}"
    return f"s{bits}"


def _candidates(row: Mapping[str, Any]) -> str:
    """The bit-width search candidates as input/weight bits, the chosen one starred."""
    cands = row.get("search")
    if not isinstance(cands, list):
        return "-"
    out = []
    for c in cands:
        if not isinstance(c, Mapping):
            continue
        bx, bw = c.get("input_bits"), c.get("weight_bits")
        star = "*" if bx == row.get("input_bits") and bw == row.get("weight_bits") else ""
        out.append(f"{bx}/{bw}{star}")
    return " ".join(out) or "-"


def _instructions(report: Mapping[str, Any]) -> Mapping[str, Any]:
    ins = report.get("instructions")
    return ins if isinstance(ins, Mapping) else {}


def _merged_layers(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per layer: the quantizer's row updated with the generated code's row."""
    quant = [r for r in _quant(report).get("layers", []) if isinstance(r, Mapping)]
    code = {str(r["name"]): r for r in report.get("layers", []) if isinstance(r, Mapping)}
    rows = [dict(r, _code=code.get(str(r.get("name")), {})) for r in quant]
    seen = {str(r.get("name")) for r in quant}
    rows += [dict(r, _code=r) for name, r in code.items() if name not in seen]
    return rows


def weighted_layers(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Merged rows of the layers with an accumulator (conv, dense) that the quantizer reported."""
    return [r for r in _merged_layers(report) if "K" in r and "acc_bits" in r]


def accumulator_table(report: Mapping[str, Any]) -> Table:
    """Per weighted layer: K, bits and formats, bound vs 2^(A-1), observed, overflow, path."""
    ins = _instructions(report).get("layers", {})
    t = Table.columns(ACCUMULATOR_COLUMNS)
    for r in weighted_layers(report):
        code = r["_code"]
        head = _headroom(r.get("bound"), r.get("acc_bits"))
        fits = r.get("bound_fits", True)
        t.rows.append(
            [
                str(r.get("name")),
                str(r.get("op", "-")),
                _int(r.get("K")),
                _int(r.get("acc_bits")),
                str(code.get("path") or "-"),
                f"{r.get('input_format', '-')} ({r.get('input_bits', '-')} b)",
                f"{_weight_format(r)} ({r.get('weight_bits', '-')} b)",
                f"{r.get('output_format', '-')} ({r.get('output_bits', '-')} b)",
                _int(r.get("bound")) + ("" if fits else " (exceeds)"),
                _int(r.get("acc_limit", 2 ** (int(r["acc_bits"]) - 1))),
                f"{head:.2f}" if head is not None else "-",
                _int(r.get("observed_max_abs_acc")),
                _int(r.get("overflow_events")),
                _int(r.get("overflow_samples")),
                _int(r.get("macs", code.get("macs"))),
                _int(ins.get(str(r.get("name")))),
                _candidates(r),
            ]
        )
    return t


def kernel_table(report: Mapping[str, Any]) -> Table:
    """Per layer of the generated code: kernel, path, formats, MACs, weights, instructions."""
    ins = _instructions(report).get("layers", {})
    t = Table.columns(KERNEL_COLUMNS)
    for r in _merged_layers(report):
        code = r["_code"]
        if not code:
            continue  # folded away (a reshape the kernels read in place, a fused table)
        name = str(r.get("name"))
        n, m = ins.get(name), code.get("macs")
        per_mac = f"{n / m:.3f}" if isinstance(n, int) and isinstance(m, int) and m else "-"
        t.rows.append(
            [
                name,
                str(code.get("op", r.get("op", "-"))),
                str(code.get("kernel", "-"))
                + (f" + table of {code['fused_lut']}" if code.get("fused_lut") else ""),
                str(code.get("path") or "-"),
                str(r.get("input_format", "-")),
                str(r.get("output_format", "-")),
                _int(m),
                _int(code.get("weight_bytes")),
                _int(n),
                per_mac,
            ]
        )
    return t


def summary_table(report: Mapping[str, Any]) -> Table:
    """The model and its target in one two-column table."""
    q = _quant(report)
    mem = report.get("memory", {}) if isinstance(report.get("memory"), Mapping) else {}
    rows: list[tuple[str, str]] = [
        ("model", _scalar(report.get("model", q.get("model")))),
        ("C name", _scalar(report.get("name"))),
        ("method", _scalar(q.get("method"))),
        ("overflow policy", _scalar(q.get("overflow_policy"))),
        ("target", _scalar(report.get("target"))),
        ("dialect", _scalar(report.get("dialect"))),
    ]
    widths = sorted({int(r["acc_bits"]) for r in report.get("layers", []) if r.get("acc_bits")})
    rows.append(("accumulator widths", ", ".join(map(str, widths)) or "-"))
    rows.append(("MACs per inference", _int(report.get("macs", q.get("macs")))))
    fused = report.get("fused_luts")
    if isinstance(fused, Mapping) and fused:  # tables applied in their producer's store step
        rows.append(("fused tables", ", ".join(f"{t} into {p}" for t, p in sorted(fused.items()))))
    arena = _int(mem.get("arena_bytes"))
    if "arena_lower_bound" in mem:
        arena += f" (lower bound {_int(mem['arena_lower_bound'])})"
    rows += [
        ("arena bytes", arena),
        ("scratch bytes", _int(mem.get("scratch_bytes"))),
        ("RAM bytes (arena + scratch)", _int(mem.get("ram_bytes"))),
        ("flash bytes (weights)", _int(mem.get("flash_weight_bytes"))),
    ]
    outs = report.get("outputs") or [report.get("output")]  # one row per output of the C
    named = [("input", report.get("input"))]
    named += [("output" if len(outs) == 1 else f"output {k}", o) for k, o in enumerate(outs)]
    for key, io_ in named:
        if isinstance(io_, Mapping):
            shape = "x".join(str(d) for d in io_.get("shape", []))
            zp = io_.get("zero_point", 0)
            rows.append(
                (
                    f"{key} format",
                    f"{io_.get('format')} {shape} ({io_.get('tensor')}"
                    + (f", zero point {zp})" if zp else ")"),
                )
            )
    if "calibration_samples" in q:
        rows.append(("calibration samples", _int(q["calibration_samples"])))
        rows.append(
            ("overflow events on calibration data", _int(q.get("calibration_overflow_events")))
        )
    ins = _instructions(report)
    if "total" in ins:
        where = f" ({ins['target']}, QEMU)" if ins.get("target") else ""
        rows.append((f"instructions per inference{where}", _int(ins["total"])))
    rows.append(("generator", _scalar(report.get("generator"))))
    t = Table(["", ""], numeric=[False, False])
    t.rows = [[k, v] for k, v in rows]
    return t


def sweep_table(report: Mapping[str, Any]) -> Table | None:
    """The accuracy sweep (method, policy, width -> accuracy; None = infeasible), if one ran."""
    sweep = _quant(report).get("sweep")
    if not isinstance(sweep, Mapping) or not sweep.get("rows"):
        return None
    t = Table.columns("method, policy, #acc bits, #accuracy")
    for r in sweep["rows"]:
        acc = r.get("accuracy")
        t.rows.append(
            [
                str(r.get("method", "-")) + (f" ({r['rounding']})" if r.get("rounding") else ""),
                str(r.get("policy", "-")),
                _int(r.get("acc_bits")),
                f"{100 * acc:.2f}%" if isinstance(acc, (int, float)) else "infeasible",
            ]
        )
    fa = sweep.get("float_accuracy")
    if isinstance(fa, (int, float)):
        t.rows.append(["float", "-", "-", f"{100 * fa:.2f}%"])
    return t


def details_table(report: Mapping[str, Any]) -> Table | None:
    """Method-specific keys of the quantizer's report (adaptive, transform...), generically."""
    q = _quant(report)
    rows: list[list[str]] = []
    for key in sorted(k for k in q if k not in KNOWN_QUANT_KEYS):
        v = q[key]
        if isinstance(v, Mapping) and all(_is_scalar(x) for x in v.values()):
            rows += [[f"{key}.{k}", _value(x)] for k, x in sorted(v.items(), key=lambda i: i[0])]
        else:
            rows.append([str(key), _value(v)])
    if not rows:
        return None
    t = Table(["key", "value"])
    t.rows = rows
    return t


def layer_details_table(report: Mapping[str, Any]) -> Table | None:
    """Method-specific per-layer keys, one row per (layer, key)."""
    rows = []
    for r in _quant(report).get("layers", []):
        if not isinstance(r, Mapping):
            continue
        for key in sorted(k for k in r if k not in KNOWN_LAYER_KEYS):
            rows.append([str(r.get("name")), str(key), _value(r[key])])
    if not rows:
        return None
    t = Table(["layer", "key", "value"])
    t.rows = rows
    return t


# ----------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _finish_layer_plot(fig: Any, ax: Any, names: Sequence[str], plot: str) -> bytes:
    """Layer names along x, a grid, the legend above the data, the title; the PNG."""
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45 if len(names) > 6 else 0, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", fontsize=8, ncol=3)
    ax.set_title(PLOT_TITLES[plot])
    fig.tight_layout()
    return _png(fig)


def _fig_width(n: int) -> float:
    return min(16.0, max(6.0, 0.45 * n + 2.0))


def plot_headroom(report: Mapping[str, Any]) -> bytes | None:
    """log2 of the guaranteed bound and of the observed maximum |acc| against A - 1, per layer."""
    from matplotlib.ticker import MaxNLocator

    rows = weighted_layers(report)
    if not rows:
        return None
    names = [str(r["name"]) for r in rows]
    x = list(range(len(rows)))

    def log2(v: Any) -> float:
        return math.log2(v) if isinstance(v, (int, float)) and v > 0 else 0.0

    fig = _figure(_fig_width(len(rows)), 4.0)
    ax = fig.add_subplot()
    ax.bar(x, [log2(r.get("bound")) for r in rows], 0.6, color="#9ecae1", label="guaranteed bound")
    observed = [(i, r.get("observed_max_abs_acc")) for i, r in enumerate(rows)]
    ax.scatter(
        [i for i, v in observed if v is not None],
        [log2(v) for _, v in observed if v is not None],
        color="#08519c",
        zorder=3,
        label="observed max |acc|",
    )
    limit = [int(r["acc_bits"]) - 1 for r in rows]
    ax.hlines(limit, [i - 0.4 for i in x], [i + 0.4 for i in x], color="#cb181d", linewidth=2.5)
    ax.plot([], [], color="#cb181d", linewidth=2.5, label="limit 2^(A-1)")
    ax.set_ylabel("log2 |accumulator|")
    ax.set_ylim(0, max(limit) + 4)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish_layer_plot(fig, ax, names, "headroom")


def plot_bits(report: Mapping[str, Any]) -> bytes | None:
    """Input, weight and output bits per layer (grouped bars)."""
    rows = [r for r in _merged_layers(report) if "input_bits" in r]
    if not rows:
        return None
    names = [str(r["name"]) for r in rows]
    fig = _figure(_fig_width(len(rows)), 4.0)
    ax = fig.add_subplot()
    series = [
        ("input_bits", "input", "#6baed6"),
        ("weight_bits", "weights", "#fd8d3c"),
        ("output_bits", "output", "#74c476"),
    ]
    w = 0.27
    for k, (key, label, color) in enumerate(series):
        pts = [(i, r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), int)]
        ax.bar([i + (k - 1) * w for i, _ in pts], [v for _, v in pts], w, label=label, color=color)
    ax.set_ylabel("bits")
    top = max(int(r.get(key, 0) or 0) for r in rows for key, _, _ in series)
    ax.set_ylim(0, top + 3)
    ax.set_yticks(range(0, top + 3, 2 if top > 8 else 1))
    return _finish_layer_plot(fig, ax, names, "bits")


def plot_sweep(report: Mapping[str, Any]) -> bytes | None:
    """Accuracy against accumulator width, one line per (method, policy[, rounding]); x marks
    infeasible."""
    sweep = _quant(report).get("sweep")
    if not isinstance(sweep, Mapping) or not sweep.get("rows"):
        return None
    series: dict[tuple[str, str], list[tuple[int, float | None]]] = {}
    for r in sweep["rows"]:
        policy = str(r.get("policy", "?"))
        key = (
            str(r.get("method", "?")),
            f"{policy}, {r['rounding']}" if r.get("rounding") else policy,
        )
        series.setdefault(key, []).append((int(r["acc_bits"]), r.get("accuracy")))
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    widths: set[int] = set()
    infeasible_labelled = False
    for (method, policy), pts in sorted(series.items()):
        pts.sort()
        widths.update(a for a, _ in pts)
        ok = [(a, 100 * v) for a, v in pts if isinstance(v, (int, float))]
        line = ax.plot(
            [a for a, _ in ok], [v for _, v in ok], marker="o", label=f"{method} ({policy})"
        )
        bad = [a for a, v in pts if not isinstance(v, (int, float))]
        if bad:
            ax.scatter(
                bad,
                [0.0] * len(bad),
                marker="x",
                color=line[0].get_color(),
                zorder=3,
                clip_on=False,
                label=None if infeasible_labelled else "infeasible",
            )
            infeasible_labelled = True
    fa = sweep.get("float_accuracy")
    if isinstance(fa, (int, float)):
        ax.axhline(100 * fa, color="black", linestyle="--", linewidth=1, label="float")
    ax.set_xlabel("accumulator bits")
    ax.set_ylabel("accuracy (%)")
    seen = [100 * v for pts in series.values() for _, v in pts if isinstance(v, (int, float))]
    low = 0.0 if infeasible_labelled or not seen else max(0.0, float(int(min(seen) - 5)))
    ax.set_ylim(low, 100)
    ax.set_xticks(sorted(widths))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(PLOT_TITLES["sweep"])
    fig.tight_layout()
    return _png(fig)


def plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """Every plot the report has data for: {"headroom" | "bits" | "sweep": PNG bytes}."""
    made = {"headroom": plot_headroom(report), "bits": plot_bits(report)}
    made["sweep"] = plot_sweep(report)
    return {k: v for k, v in made.items() if v is not None}


# ----------------------------------------------------------------------------- rendering


@functools.cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=lambda name: bool(name and name.endswith(".html.j2")),
    )
    env.filters["md"] = lambda s: str(s).replace("\\", "\\\\").replace("|", "\\|")
    return env


def _context(report: Mapping[str, Any]) -> dict[str, Any]:
    q = _quant(report)
    tables = [
        ("Accumulators per layer", accumulator_table(report)),
        ("Generated kernels", kernel_table(report)),
        ("Accuracy sweep", sweep_table(report)),
        ("Method details", details_table(report)),
        ("Per-layer method details", layer_details_table(report)),
    ]
    notes = []
    if weighted_layers(report):
        notes.append(
            "bound: the largest |exact sum| any input in the input format can produce "
            f"({q.get('overflow_policy', 'guaranteed')} policy); limit 2^(A-1): the accumulator "
            "of A bits holds [-2^(A-1), 2^(A-1) - 1]; headroom: log2(limit / bound); observed: "
            "the largest |accumulator| on the calibration data."
        )
    if "total" not in _instructions(report):
        notes.append(
            "instructions: not counted for this build (Compiled.count_instructions on an ARM "
            "target fills them in)."
        )
    model = report.get("model", q.get("model", "model"))
    return {
        "title": f"qacc report: {model} for {report.get('target', '?')}",
        "generator": report.get("generator", "qacc"),
        "summary": summary_table(report),
        "tables": [(title, t) for title, t in tables if t is not None and t.rows],
        "notes": notes,
    }


def to_markdown(report: Mapping[str, Any], plot_names: Sequence[str] | None = None) -> str:
    """report.md: the same tables as the HTML; the plots linked as the PNG files next to it.

    `plot_names`: the plots that exist (default: those the report has data for)."""
    names = list(plots(report)) if plot_names is None else list(plot_names)
    figures = [
        {"title": PLOT_TITLES[n], "file": PLOT_FILES[n]} for n in PLOT_FILES if n in set(names)
    ]
    return _env().get_template("report.md.j2").render(**_context(report), figures=figures)


def to_html(report: Mapping[str, Any], pngs: Mapping[str, bytes] | None = None) -> str:
    """report.html, self-contained: inline CSS, every plot a data: URI, no script, no links out.

    `pngs`: the plots to embed (default: plots(report))."""
    pngs = plots(report) if pngs is None else pngs
    figures = [
        {
            "name": n,
            "title": PLOT_TITLES[n],
            "src": "data:image/png;base64," + base64.b64encode(pngs[n]).decode("ascii"),
        }
        for n in PLOT_FILES
        if n in pngs
    ]
    return _env().get_template("report.html.j2").render(**_context(report), figures=figures)


def write_reports(out_dir: str | Path, report: Mapping[str, Any] | None = None) -> list[Path]:
    """Write report.md, report.html and the plot PNGs into out_dir (report.json too when
    `report` is given; otherwise it is read from out_dir/report.json). Returns the paths."""
    out = Path(out_dir)
    written = []
    if report is None:
        report = json.loads((out / "report.json").read_text())
    else:
        (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        written.append(out / "report.json")
    pngs = plots(report)
    for name, fname in PLOT_FILES.items():
        path = out / fname
        if name in pngs:
            path.write_bytes(pngs[name])
            written.append(path)
        elif path.exists():
            path.unlink()  # a plot the updated report no longer has
    (out / "report.md").write_text(to_markdown(report, list(pngs)))
    (out / "report.html").write_text(to_html(report, pngs))
    return [*written, out / "report.md", out / "report.html"]


__all__ = [
    "PLOT_FILES",
    "REPORT_FILES",
    "Table",
    "accumulator_table",
    "details_table",
    "kernel_table",
    "layer_details_table",
    "plot_bits",
    "plot_headroom",
    "plot_sweep",
    "plots",
    "summary_table",
    "sweep_table",
    "to_html",
    "to_markdown",
    "weighted_layers",
    "write_reports",
]
