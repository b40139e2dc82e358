"""Run a cross-compiled binary under QEMU, with a time limit and optional instruction counts.

Instruction counts come from the TCG plugin runtime_c/qemu_plugin/insn_count.c, built by
``make plugin`` into build/plugin/libinsn_count.so (override with $QACC_QEMU_PLUGIN). Test
binaries call a ``noinline`` function ``void qacc_mark(int id)`` between phases; its address is
found with the target's ``nm`` and the plugin records the running count each time it is entered.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from codegen.core.progress import ticker
from codegen.core.resources import data_path
from codegen.targets.table import Target, TargetError, check_tools, get_target

PLUGIN_ENV = "QACC_QEMU_PLUGIN"
DEFAULT_PLUGIN = data_path("build", "plugin", "libinsn_count.so")  # scripts/build-plugin.sh


class EmulatorError(RuntimeError):
    """The emulator could not run the program, or the instruction counts could not be read."""


class EmulatorTimeoutError(EmulatorError):
    """The emulator did not finish within the time limit (it was killed)."""


@dataclass(frozen=True)
class InsnCounts:
    """Dynamic guest instruction counts of one run.

    ``total``: every instruction executed (including C runtime start-up and exit).
    ``marks``: the count of instructions executed before each entry of the marker function, in
    execution order (QEMU 7.2 plugins cannot read the id argument).
    """

    total: int
    marks: tuple[int, ...]

    def phases(self) -> tuple[int, ...]:
        """Instructions between consecutive marks (len(marks) - 1 values)."""
        return tuple(b - a for a, b in zip(self.marks, self.marks[1:], strict=False))


class RunResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    counts: InsnCounts | None


def plugin_path() -> Path:
    """The instruction-count plugin; EmulatorError (one line, what to run) when not built."""
    path = Path(os.environ.get(PLUGIN_ENV) or DEFAULT_PLUGIN)
    if not path.is_file():
        raise EmulatorError(
            f"QEMU instruction-count plugin not found at {path}: run `make plugin` in a checkout, "
            f"or `bash {data_path('scripts', 'build-plugin.sh')}` (or set {PLUGIN_ENV})"
        )
    return path


def marker_address(target: Target, exe: str | Path, symbol: str) -> int | None:
    """Address of function ``symbol`` in ``exe`` (Thumb bit cleared), None if it is absent."""
    nm = shutil.which(target.nm)
    if nm is None:
        raise TargetError(
            f"target {target.name} needs {target.nm}, which is not installed: "
            f"apt-get install {target.nm_package} (or run `make setup`)"
        )
    proc = subprocess.run(
        [nm, "--defined-only", str(exe)], capture_output=True, text=True, check=False, timeout=60
    )
    if proc.returncode != 0:
        raise EmulatorError(f"{target.nm} failed on {exe}: {_last_line(proc.stderr)}")
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2] == symbol and fields[1] in ("T", "t", "W", "w"):
            addr = int(fields[0], 16)
            return addr & ~1 if target.thumb_symbols else addr
    return None


def parse_counts(text: str) -> InsnCounts:
    """Parse the plugin's report: ``total N`` then one ``mark N`` line per snapshot."""
    total: int | None = None
    marks: list[int] = []
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "total":
            total = int(value)
        elif key == "mark":
            marks.append(int(value))
        elif key == "error":
            raise EmulatorError(f"instruction-count plugin: {value}")
    if total is None:
        raise EmulatorError("instruction-count plugin report has no total line")
    return InsnCounts(total=total, marks=tuple(marks))


def _plugin_option(plugin: Path, out: Path, marker: int | None) -> list[str]:
    # QEMU option syntax: a literal comma inside a value is written ',,'.
    words = [str(plugin).replace(",", ",,"), f"out={str(out).replace(',', ',,')}"]
    if marker is not None:
        words.append(f"marker={marker:#x}")
    return ["-plugin", ",".join(words)]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def run_under_emulator(
    target: Target | str,
    exe: str | Path,
    args: Sequence[str] = (),
    timeout_s: float = 60.0,
    count_insns: bool = False,
    marker_symbol: str | None = "qacc_mark",
    progress: bool = True,
) -> RunResult:
    """Run ``exe args...`` for ``target``; returns (returncode, stdout, stderr, counts | None).

    The host target runs the program directly (instruction counting there is an error). Other
    targets run under their QEMU; qemu-user guests get an empty environment and a fixed argv[0],
    so counts do not depend on the caller's environment or on where the binary lives. With
    ``count_insns`` the instruction-count plugin is loaded and, if ``marker_symbol`` is defined in
    ``exe``, its entries are recorded. Raises TargetError when a tool is missing (naming the
    package), EmulatorTimeoutError when the program runs longer than ``timeout_s`` (the emulator
    is killed), EmulatorError when the counts cannot be read. `progress`: a bar with the elapsed
    time on stderr while the program runs (when stderr is a terminal).
    """
    t = get_target(target) if isinstance(target, str) else target
    exe_path = Path(exe).resolve()
    if not exe_path.is_file():
        raise EmulatorError(f"no executable at {exe_path}")
    if t.is_host:
        if count_insns:
            raise TargetError(
                "instruction counts need QEMU: target host runs natively; "
                "count on an ARM target instead"
            )
        return _run([str(exe_path), *args], None, timeout_s, str(exe_path), exe_path.name, progress)

    check_tools(t)
    assert t.emulator is not None
    emulator = shutil.which(t.emulator) or t.emulator
    # qemu-user hands its own environment to the guest; keep it empty for reproducible counts.
    env: dict[str, str] | None = {} if t.family != "cortex-m" else None

    if not count_insns:
        argv = t.emulator_argv(exe_path, args, emulator_path=emulator)
        return _run(argv, env, timeout_s, t.emulator, exe_path.name, progress)

    plugin = plugin_path()
    marker = marker_address(t, exe_path, marker_symbol) if marker_symbol else None
    with tempfile.TemporaryDirectory(prefix="qacc-insn-") as tmp:
        out = Path(tmp) / "counts.txt"
        argv = t.emulator_argv(
            exe_path, args, plugin=_plugin_option(plugin, out, marker), emulator_path=emulator
        )
        result = _run(argv, env, timeout_s, t.emulator, exe_path.name, progress)
        if not out.is_file():
            raise EmulatorError(
                f"{t.emulator} wrote no instruction counts running {exe_path.name} "
                f"(exit {result.returncode}): {_last_line(result.stderr)}"
            )
        counts = parse_counts(out.read_text())
    return result._replace(counts=counts)


def _run(
    argv: list[str],
    env: dict[str, str] | None,
    timeout_s: float,
    tool: str,
    name: str,
    progress: bool = True,
) -> RunResult:
    try:
        with ticker(f"{Path(tool).name} {name}", progress=progress):
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=env,
                timeout=timeout_s,
                check=False,
            )
    except subprocess.TimeoutExpired:
        # subprocess.run has killed and reaped the emulator.
        raise EmulatorTimeoutError(
            f"{tool} did not finish within {timeout_s:g} s running {name}"
        ) from None
    except OSError as e:
        raise EmulatorError(f"cannot run {tool} for {name}: {e.strerror or e}") from None
    return RunResult(
        returncode=proc.returncode,
        stdout=proc.stdout.decode(errors="replace"),
        stderr=proc.stderr.decode(errors="replace"),
        counts=None,
    )
