"""Build a generated model directory with CMake.

`build(out_dir, target)` configures and builds the directory's own CMakeLists.txt into
`out_dir/build`: the static library lib<name>.a (copied to out_dir), and, when asked, a shared
library for in-process runs (host only) and the file-based test bench. `build_many` builds several
generated directories in one CMake project through the root CMakeLists.txt (one configure step,
one parallel build), which is what the test-suite uses for its sanitizer builds.

A target is a `BuildTarget` (or any object with its fields); `HOST` is the native compiler. The
rows of codegen.targets.table.TARGETS are adapted by `from_table`: their toolchain file and QACC_CPU
configure CMake, their `emulator_argv` runs the test bench, their `check_tools` names the Debian
package to install when a tool is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from codegen.backend.layouts import A64, NeonTarget
from codegen.core.errors import QaccError
from codegen.core.progress import enabled, ticker
from codegen.core.resources import data_path

ROOT = data_path()  # the top-level CMakeLists.txt

WARNING_FLAGS: tuple[str, ...] = ("-Wall", "-Wextra", "-pedantic")
WERROR_FLAG = "-Werror"
SANITIZE_FLAGS: tuple[str, ...] = (
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
)


class BuildError(QaccError):
    """CMake or the compiler failed on generated code."""


class ToolMissingError(QaccError):
    """A build tool (cmake, a compiler) is not installed."""


Launcher = Callable[[str, Sequence[str]], list[str]]
"""(executable, arguments) -> the command line that runs it on the target."""


class Target(Protocol):
    """What `build` and `Compiled` need to know about a target."""

    @property
    def name(self) -> str: ...
    @property
    def dialect(self) -> str: ...
    @property
    def toolchain_file(self) -> Path | None: ...
    @property
    def c_flags(self) -> tuple[str, ...]: ...
    @property
    def cmake_defines(self) -> Mapping[str, str]: ...
    @property
    def neon(self) -> NeonTarget: ...
    @property
    def shared(self) -> bool: ...
    @property
    def align(self) -> int: ...
    def argv(self, executable: str, args: Sequence[str] = ()) -> list[str]: ...
    def check(self) -> None: ...


def _native(executable: str, args: Sequence[str]) -> list[str]:
    return [executable, *args]


@dataclass(frozen=True)
class BuildTarget:
    name: str
    dialect: str = "c"
    toolchain_file: Path | None = None
    """CMake toolchain file (None: the native compiler)."""
    c_flags: tuple[str, ...] = ("-O2",)
    cmake_defines: Mapping[str, str] = field(default_factory=dict)
    shared: bool = False
    """Whether a shared library built for this target can be loaded into this Python process."""
    align: int = 1
    """Arena alignment the target's kernels want."""
    neon: NeonTarget = A64
    """The core's NEON features, which the backend's kernel choice reads (neon dialect)."""
    launcher: Launcher = _native
    """Runs the target's executables (an emulator command line for cross targets)."""
    checker: Callable[[], None] | None = None
    """Raises a one-line error naming the package to install when a tool is missing."""

    def argv(self, executable: str, args: Sequence[str] = ()) -> list[str]:
        return self.launcher(executable, args)

    def check(self) -> None:
        if self.checker is not None:
            self.checker()


HOST = BuildTarget("host", shared=True)


def from_table(t: Any) -> BuildTarget:
    """A BuildTarget from a row of codegen.targets.table.TARGETS (toolchain file + QACC_CPU,
    emulator, NEON features)."""
    if getattr(t, "is_host", False):
        return HOST
    cpu = getattr(t, "cpu", None)

    def launch(executable: str, args: Sequence[str]) -> list[str]:
        argv: list[str] = t.emulator_argv(executable, list(args))
        return argv

    def check() -> None:
        from codegen.targets import table

        try:
            table.check_tools(t)
        except ValueError as e:
            raise ToolMissingError(str(e)) from None

    return BuildTarget(
        name=t.name,
        dialect=t.dialect,
        toolchain_file=t.toolchain_file,
        cmake_defines={"QACC_CPU": cpu} if cpu else {},
        launcher=launch,
        checker=check,
        neon=NeonTarget(aarch64=t.family == "aarch64-linux", dotprod=t.has_dotprod),
    )


def resolve_target(target: str | Target) -> Target:
    """A target from a name ("host" or a row of codegen.targets.table) or a target object."""
    if isinstance(target, BuildTarget):
        return target
    if not isinstance(target, str):
        return target if hasattr(target, "argv") else from_table(target)
    if target == "host":
        return HOST
    from codegen.targets import table

    try:
        row = table.get_target(target)
    except ValueError as e:
        raise BuildError(str(e)) from None
    return from_table(row)


@dataclass(frozen=True)
class BuildResult:
    source_dir: Path
    build_dir: Path
    name: str
    static_lib: Path
    shared_lib: Path | None
    testbench: Path | None
    log: str


def _cmake() -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        raise ToolMissingError("cmake is not installed; install the Debian package 'cmake'")
    return cmake


_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE_PERCENT = re.compile(r"^\[\s*(\d+)%\]")
STEPS_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]"


def _run_with_bar(cmd: Sequence[str], cwd: Path | None, desc: str) -> tuple[int, str]:
    """Run `cmd`, reading its output line by line to move a progress bar: Ninja's [n/N] or
    Make's [ p%] step lines; before the first one (and for the configure step) the bar shows the
    elapsed time. Returns (exit code, stdout and stderr interleaved)."""
    lines: list[str] = []
    with (
        ticker(desc) as bar,
        subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if m := _NINJA_STEP.match(line):
                n, total = int(m.group(1)), int(m.group(2))
            elif m := _MAKE_PERCENT.match(line):
                n, total = int(m.group(1)), 100
            else:
                continue
            bar.bar_format = STEPS_FORMAT
            bar.total, bar.n = total, n
            bar.refresh()
        rc = proc.wait()
    return rc, "".join(lines)


def _run(
    cmd: Sequence[str],
    log: list[str],
    cwd: Path | None = None,
    desc: str = "",
    progress: bool = False,
) -> None:
    """Run one CMake step; its output goes to `log`; BuildError with the tail on failure.
    With `progress` (and stderr a terminal), a bar named `desc` follows the build steps."""
    log.append("$ " + " ".join(cmd))
    if enabled(progress):
        rc, output = _run_with_bar(cmd, cwd, desc)
    else:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    log.append(output)
    if rc != 0:
        raise BuildError(failure_message(cmd, output))


_OVERFLOW_RE = re.compile(r"region `(\w+)' overflowed by (\d+) bytes")


def failure_message(cmd: Sequence[str], output: str) -> str:
    """What a failed build step tells the user: one line when the program does not fit the
    board's memory (the linker's region overflow), else the tail of the build's output."""
    m = _OVERFLOW_RE.search(output)
    if m is not None:
        return (
            f"the program does not fit the board's memory: the linker's {m[1]} region overflows "
            f"by {int(m[2]):,} bytes (the model's weights and code); choose a smaller model or a "
            "target with more flash"
        )
    tail = "\n".join(output.strip().splitlines()[-40:])
    return f"build failed ({' '.join(cmd[:3])} ...):\n{tail}"


def configure_args(
    target: Target,
    *,
    shared: bool,
    testbench: bool,
    sanitize: bool,
    werror: bool,
    extra_defines: Mapping[str, str] | None = None,
) -> list[str]:
    """The `-D...` and `-G` arguments of the configure step.

    Our flags go to QACC_C_FLAGS / QACC_LINK_FLAGS, which the generated CMakeLists.txt applies to
    the model's own targets only: CMAKE_C_FLAGS stays the toolchain file's (-mcpu, float ABI...).
    """
    flags = [*target.c_flags, *WARNING_FLAGS]
    if werror:
        flags.append(WERROR_FLAG)
    if sanitize:
        flags += SANITIZE_FLAGS
    defines: dict[str, str] = {
        "CMAKE_BUILD_TYPE": "",
        "QACC_C_FLAGS": ";".join(flags),
        "QACC_LINK_FLAGS": ";".join(SANITIZE_FLAGS if sanitize else ()),
        "QACC_BUILD_SHARED": "ON" if shared else "OFF",
        "QACC_BUILD_TESTBENCH": "ON" if testbench else "OFF",
    }
    if target.toolchain_file is not None:
        defines["CMAKE_TOOLCHAIN_FILE"] = str(Path(target.toolchain_file).resolve())
    defines.update(target.cmake_defines)
    defines.update(extra_defines or {})
    args = [f"-D{k}={v}" for k, v in defines.items()]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    return args


def model_name(source_dir: Path) -> str:
    """The C name of the model generated in `source_dir` (from its report.json)."""
    try:
        name: str = json.loads((source_dir / "report.json").read_text())["name"]
    except (OSError, ValueError, KeyError) as e:
        raise BuildError(f"{source_dir} is not a directory generated by qacc ({e})") from e
    return name


def _artifacts(
    source_dir: Path, bdir: Path, name: str, shared: bool, testbench: bool, log: str
) -> BuildResult:
    static = bdir / f"lib{name}.a"
    so = bdir / f"lib{name}_shared.so" if shared else None
    tb = bdir / f"{name}_testbench" if testbench else None
    for p in (static, so, tb):
        if p is not None and not p.exists():
            raise BuildError(f"the build did not produce {p}")
    return BuildResult(source_dir, bdir, name, static, so, tb, log)


def _jobs(jobs: int | None) -> int:
    return jobs or max(1, min(4, os.cpu_count() or 1))


def build(
    source_dir: str | Path,
    target: str | Target = "host",
    *,
    build_dir: str | Path | None = None,
    shared: bool | None = None,
    testbench: bool = True,
    sanitize: bool = False,
    werror: bool = True,
    jobs: int | None = None,
    progress: bool = True,
) -> BuildResult:
    """Configure and build one generated directory; copy lib<name>.a next to its sources.

    `shared` defaults to whether the target can load a shared library in-process (host).
    `progress`: bars on stderr for the configure and build steps (only when it is a terminal).
    """
    src = Path(source_dir).resolve()
    tgt = resolve_target(target)
    tgt.check()
    name = model_name(src)
    shared = tgt.shared if shared is None else shared
    bdir = Path(build_dir).resolve() if build_dir is not None else src / "build"
    log: list[str] = []
    cmake = _cmake()
    args = configure_args(tgt, shared=shared, testbench=testbench, sanitize=sanitize, werror=werror)
    what = f"{name} for {tgt.name}"
    _run([cmake, "-S", str(src), "-B", str(bdir), *args], log, None, f"configure {what}", progress)
    _run(
        [cmake, "--build", str(bdir), "-j", str(_jobs(jobs))], log, None, f"build {what}", progress
    )
    result = _artifacts(src, bdir, name, shared, testbench, "\n".join(log))
    shutil.copy2(result.static_lib, src / result.static_lib.name)
    return result


def build_many(
    source_dirs: Sequence[str | Path],
    build_dir: str | Path,
    target: str | Target = "host",
    *,
    shared: bool = False,
    testbench: bool = True,
    sanitize: bool = False,
    werror: bool = True,
    jobs: int | None = None,
    keep_going: bool = True,
    progress: bool = True,
) -> dict[Path, BuildResult | BuildError]:
    """Build several generated directories in one CMake project (the repository's root
    CMakeLists.txt): one configure, one parallel build. With `keep_going`, a directory whose code
    fails to build gets a BuildError in the result instead of stopping the others. `progress`:
    bars on stderr (a terminal only) for both steps."""
    srcs = [Path(s).resolve() for s in source_dirs]
    bdir = Path(build_dir).resolve()
    tgt = resolve_target(target)
    tgt.check()
    log: list[str] = []
    cmake = _cmake()
    args = configure_args(
        tgt,
        shared=shared,
        testbench=testbench,
        sanitize=sanitize,
        werror=werror,
        extra_defines={"QACC_MODEL_DIRS": ";".join(str(s) for s in srcs)},
    )
    what = f"{len(srcs)} models for {tgt.name}"
    _run([cmake, "-S", str(ROOT), "-B", str(bdir), *args], log, None, f"configure {what}", progress)
    cmd = [cmake, "--build", str(bdir), "-j", str(_jobs(jobs))]
    if keep_going:
        cmd += ["--", "-k", "0"] if "Ninja" in args else ["--", "-k"]
    failure: BuildError | None = None
    try:
        _run(cmd, log, None, f"build {what}", progress)
    except BuildError as e:
        if not keep_going:
            raise
        failure = e
    results: dict[Path, BuildResult | BuildError] = {}
    for i, s in enumerate(srcs):
        sub = bdir / "models" / f"{i}_{s.name}"
        try:
            results[s] = _artifacts(s, sub, model_name(s), shared, testbench, "\n".join(log))
        except BuildError as e:
            results[s] = BuildError(f"{e}\n{failure}" if failure else str(e))
    return results
