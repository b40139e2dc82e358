"""Cross toolchains, emulators and the instruction-count plugin, for every target.

Each ARM target builds tests/targets/c with CMake and its toolchain file, runs the result under
QEMU through codegen.targets.qemu and must print what the host build prints. A missing compiler,
emulator or CMake fails (naming the Debian package), it never skips.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from codegen.targets import table
from codegen.targets.build import failure_message
from codegen.targets.qemu import (
    EmulatorTimeoutError,
    InsnCounts,
    parse_counts,
    run_under_emulator,
)
from codegen.targets.table import TARGETS, Target, TargetError, check_tools, get_target

FIXTURE = Path(__file__).parent / "c"
ARM_TARGETS = [name for name, t in TARGETS.items() if not t.is_host]
N = 1000  # phase 1 iterations; phase 2 runs 2 * N
TIMEOUT_S = 60.0

Builder = Callable[[str], Path]


def _require_tool(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: apt-get install {package} (or run `make setup`)")
    return path


def _check(target: Target) -> None:
    try:
        check_tools(target)
    except TargetError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def build(tmp_path_factory: pytest.TempPathFactory) -> Builder:
    """Configure and build tests/targets/c for a target (once per session); returns the build
    dir."""
    done: dict[str, Path] = {}

    def _build(name: str) -> Path:
        if name in done:
            return done[name]
        target = get_target(name)
        _check(target)
        cmake = _require_tool("cmake", "cmake")
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        out = tmp_path_factory.mktemp(f"build-{name}")
        for cmd in (
            [cmake, "-S", str(FIXTURE), "-B", str(out), *generator, *target.cmake_args()],
            [cmake, "--build", str(out)],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
            if proc.returncode != 0:
                log = proc.stdout[-3000:] + proc.stderr[-3000:]
                pytest.fail(f"{' '.join(cmd)} failed for {name}:\n{log}")
        done[name] = out
        return out

    return _build


@pytest.fixture(scope="session")
def host_output(build: Builder) -> str:
    exe = build("host") / "phases"
    result = run_under_emulator("host", exe, [str(N)], timeout_s=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("phase1 "), result.stdout
    return result.stdout


@pytest.mark.qemu
@pytest.mark.parametrize("name", ARM_TARGETS)
def test_phases_match_host_with_deterministic_counts(
    name: str, build: Builder, host_output: str
) -> None:
    exe = build(name) / "phases"
    first = run_under_emulator(name, exe, [str(N)], timeout_s=TIMEOUT_S, count_insns=True)
    assert first.returncode == 0, first.stderr
    assert first.stdout == host_output
    second = run_under_emulator(name, exe, [str(N)], timeout_s=TIMEOUT_S, count_insns=True)
    assert second.stdout == host_output
    assert first.counts is not None
    assert first.counts == second.counts, "instruction counts differ between two identical runs"

    counts = first.counts
    assert len(counts.marks) == 3, counts
    assert counts.marks[0] < counts.marks[1] < counts.marks[2] <= counts.total, counts
    phase1, phase2 = counts.phases()
    assert phase2 > phase1, counts
    # The loop dominates both phases: doubling the iterations about doubles the count.
    assert 1.8 < phase2 / phase1 < 2.2, counts


@pytest.mark.qemu
@pytest.mark.parametrize(("name", "path"), [("cortex-m55", "mve"), ("cortex-a76", "sdot")])
def test_vector_dot_product_intrinsics(name: str, path: str, build: Builder) -> None:
    expected = sum(((i * 37 + 11) % 256 - 128) * ((i * 91 + 5) % 256 - 128) for i in range(64))
    result = run_under_emulator(name, build(name) / "dot_s8", timeout_s=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [path, str(expected), str(expected)]


@pytest.mark.qemu
@pytest.mark.parametrize("name", [n for n, t in TARGETS.items() if t.family == "cortex-m"])
def test_cortex_m_cycle_counter_reads_zero_on_qemu(name: str, build: Builder) -> None:
    result = run_under_emulator(name, build(name) / "cycles", timeout_s=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["available", "0", "cycles", "0"]


@pytest.mark.qemu
@pytest.mark.parametrize(
    ("name", "emulator"), [("cortex-a53", "qemu-aarch64"), ("cortex-m4", "qemu-system-arm")]
)
def test_time_limit_kills_the_emulator(name: str, emulator: str, build: Builder) -> None:
    exe = build(name) / "phases"
    with pytest.raises(
        EmulatorTimeoutError, match=rf"^{emulator} did not finish within 1 s running phases$"
    ):
        run_under_emulator(name, exe, ["2147483647"], timeout_s=1.0)


def test_host_runs_natively_and_refuses_counting(build: Builder) -> None:
    exe = build("host") / "phases"
    with pytest.raises(TargetError, match="need QEMU"):
        run_under_emulator("host", exe, [str(N)], count_insns=True)


def test_unknown_target_names_the_known_ones() -> None:
    with pytest.raises(TargetError) as info:
        get_target("cortex-x1")
    message = str(info.value)
    assert "\n" not in message
    assert "'cortex-x1'" in message
    for name in TARGETS:
        assert name in message


@pytest.mark.parametrize(
    ("name", "missing", "package"),
    [
        ("cortex-a72", "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
        ("cortex-a72", "qemu-aarch64", "qemu-user"),
        ("cortex-a7", "qemu-arm", "qemu-user"),
        ("cortex-m7", "arm-none-eabi-gcc", "gcc-arm-none-eabi"),
        ("cortex-m55", "qemu-system-arm", "qemu-system-arm"),
    ],
)
def test_missing_tool_names_the_package(
    name: str, missing: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_which = shutil.which

    def which(cmd: str, *args: object, **kwargs: object) -> str | None:
        return None if cmd == missing else real_which(cmd)

    monkeypatch.setattr(table.shutil, "which", which)
    with pytest.raises(TargetError) as info:
        check_tools(name)
    message = str(info.value)
    assert "\n" not in message
    assert missing in message and f"apt-get install {package}" in message


def test_target_table() -> None:
    assert [t.dialect for t in TARGETS.values()] == [
        "c", "neon", "neon", "neon", "neon", "neon", "dsp", "dsp", "mve"
    ]  # fmt: skip
    assert [n for n, t in TARGETS.items() if t.has_dotprod] == ["cortex-a76", "cortex-a55"]
    # QEMU has no cortex-a55 model: it runs on the a76's (the same ARMv8.2-A + dotprod ISA)
    assert get_target("cortex-a55").emulator_argv("/b/p")[:3] == [
        "qemu-aarch64", "-cpu", "cortex-a76"
    ]  # fmt: skip
    for t in TARGETS.values():
        if t.toolchain_file is not None:
            assert t.toolchain_file.is_file(), t.toolchain_file
    argv = get_target("cortex-m55").emulator_argv("/b/phases", ["7"])
    assert argv[:3] == ["qemu-system-arm", "-M", "mps3-an547"]
    assert "enable=on,target=native,arg=phases,arg=7" in argv
    assert argv[-2:] == ["-kernel", "/b/phases"]
    assert get_target("cortex-a76").emulator_argv("/b/p", ["1"]) == [
        "qemu-aarch64", "-cpu", "cortex-a76", "-0", "p", "/b/p", "1"
    ]  # fmt: skip


def test_parse_counts() -> None:
    counts = parse_counts("total 100\nmark 10\nmark 40\nmark 90\n")
    assert counts == InsnCounts(total=100, marks=(10, 40, 90))
    assert counts.phases() == (30, 50)


def test_a_model_too_large_for_the_flash_is_one_line() -> None:
    """The linker's region overflow (a zoo model on a 2 MiB Cortex-M board) becomes one line;
    other failures keep the build's output."""
    linker = (
        "[7/7] Linking C executable net_testbench\nFAILED: net_testbench\n"
        "ld: net_testbench section `.rodata' will not fit in region `CODE'\n"
        "ld: region `CODE' overflowed by 344176 bytes\ncollect2: error: ld returned 1 exit status\n"
    )
    msg = failure_message(["cmake", "--build", "b"], linker)
    assert msg.startswith("the program does not fit the board's memory: the linker's CODE region")
    assert "344,176 bytes" in msg and "\n" not in msg
    other = failure_message(["cmake", "--build", "b"], "x.c:1: error: nope\n")
    assert other.startswith("build failed (cmake --build b ...):") and "error: nope" in other
