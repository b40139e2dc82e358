"""The targets qacc generates code for: compiler, flags family, kernel dialect, emulator.

One row per target in ``TARGETS``. A target names the CMake toolchain file of its family
(``toolchains/<family>.cmake``, which reads the core from the cache variable ``QACC_CPU``), the
compiler and binutils it needs, the Debian packages that provide them, and how to run a binary
under QEMU (``Target.emulator_argv``).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from codegen.core.resources import data_path

TOOLCHAIN_DIR = data_path("toolchains")

Family = Literal["host", "aarch64-linux", "armhf-linux", "cortex-m"]
Dialect = Literal["c", "neon", "dsp", "mve"]


class TargetError(ValueError):
    """An unknown target, or a target whose compiler or emulator is not installed."""


@dataclass(frozen=True)
class Target:
    """One row of the target table. Tool fields are executable names, looked up on PATH."""

    name: str
    family: Family
    cpu: str | None  # -mcpu and QEMU -cpu; None for the host
    dialect: Dialect
    has_dotprod: bool
    compiler: str
    compiler_package: str
    nm: str
    nm_package: str
    emulator: str | None = None  # None: runs natively
    emulator_package: str | None = None
    machine: str | None = None  # QEMU board (-M), Cortex-M only
    c_library_package: str | None = None  # bare-metal C library (newlib), Cortex-M only
    emulator_cpu: str | None = None
    """QEMU's -cpu when it differs from `cpu`: a core QEMU has no model of runs on a model with
    the same instruction set (cortex-a55 on cortex-a76: both ARMv8.2-A with dotprod)."""

    @property
    def toolchain_file(self) -> Path | None:
        """The CMake toolchain file, or None for the host (CMake's default compiler)."""
        if self.family == "host":
            return None
        return TOOLCHAIN_DIR / f"{self.family}.cmake"

    @property
    def is_host(self) -> bool:
        return self.family == "host"

    @property
    def thumb_symbols(self) -> bool:
        """True when function symbols may carry the Thumb bit (bit 0) in their address."""
        return self.family in ("armhf-linux", "cortex-m")

    def cmake_args(self) -> list[str]:
        """Arguments that configure a CMake build tree for this target."""
        if self.toolchain_file is None:
            return []
        return [f"-DCMAKE_TOOLCHAIN_FILE={self.toolchain_file}", f"-DQACC_CPU={self.cpu}"]

    def emulator_argv(
        self,
        exe: str | Path,
        args: Sequence[str] = (),
        plugin: Sequence[str] = (),
        emulator_path: str | None = None,
    ) -> list[str]:
        """The command line that runs ``exe args...`` on this target.

        ``plugin``: ``-plugin`` option words to put before the program. ``emulator_path``: the
        emulator's executable (default: its name, found on PATH). For the host the program runs
        directly and ``plugin`` must be empty.
        """
        exe = str(exe)
        if self.emulator is None:
            if plugin:
                raise TargetError(f"target {self.name} runs natively: no QEMU plugin possible")
            return [exe, *args]
        qemu = emulator_path or self.emulator
        if self.family == "cortex-m":
            if self.machine is None:
                raise TargetError(f"target {self.name} has no QEMU machine in the target table")
            return [
                qemu,
                "-M",
                self.machine,
                "-nographic",
                "-semihosting-config",
                _semihosting_config([Path(exe).name, *args]),
                *plugin,
                "-kernel",
                exe,
            ]
        # qemu-user: -0 fixes argv[0], so the guest sees the same argv wherever the binary lives.
        cpu = self.emulator_cpu or self.cpu
        assert cpu is not None
        return [qemu, "-cpu", cpu, *plugin, "-0", Path(exe).name, exe, *args]


def _semihosting_config(argv: Sequence[str]) -> str:
    """``enable=on,target=native,arg=...`` for qemu-system-arm; QEMU escapes a comma as ',,'."""
    for a in argv:
        if not a or any(c.isspace() for c in a):
            raise TargetError(
                f"argument {a!r} cannot be passed over semihosting (empty or contains whitespace)"
            )
    return ",".join(["enable=on", "target=native", *(f"arg={a.replace(',', ',,')}" for a in argv)])


def _aarch64(cpu: str, has_dotprod: bool, emulator_cpu: str | None = None) -> Target:
    return Target(
        name=cpu,
        family="aarch64-linux",
        cpu=cpu,
        dialect="neon",
        has_dotprod=has_dotprod,
        compiler="aarch64-linux-gnu-gcc",
        compiler_package="gcc-aarch64-linux-gnu",
        nm="aarch64-linux-gnu-nm",
        nm_package="binutils-aarch64-linux-gnu",
        emulator="qemu-aarch64",
        emulator_package="qemu-user",
        emulator_cpu=emulator_cpu,
    )


def _cortex_m(cpu: str, dialect: Dialect, machine: str) -> Target:
    return Target(
        name=cpu,
        family="cortex-m",
        cpu=cpu,
        dialect=dialect,
        has_dotprod=False,
        compiler="arm-none-eabi-gcc",
        compiler_package="gcc-arm-none-eabi",
        nm="arm-none-eabi-nm",
        nm_package="binutils-arm-none-eabi",
        emulator="qemu-system-arm",
        emulator_package="qemu-system-arm",
        machine=machine,
        c_library_package="libnewlib-arm-none-eabi",
    )


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            name="host",
            family="host",
            cpu=None,
            dialect="c",
            has_dotprod=False,
            compiler="cc",
            compiler_package="build-essential",
            nm="nm",
            nm_package="binutils",
        ),
        _aarch64("cortex-a53", has_dotprod=False),  # Raspberry Pi 3
        _aarch64("cortex-a72", has_dotprod=False),  # Raspberry Pi 4
        _aarch64("cortex-a76", has_dotprod=True),  # Raspberry Pi 5: SDOT
        # the in-order little core of most current SoCs (dotprod); QEMU 7.2 has no cortex-a55
        # model, so it runs on cortex-a76's (the same ARMv8.2-A + dotprod instruction set)
        _aarch64("cortex-a55", has_dotprod=True, emulator_cpu="cortex-a76"),
        Target(
            name="cortex-a7",  # Raspberry Pi 2 and many boards
            family="armhf-linux",
            cpu="cortex-a7",
            dialect="neon",
            has_dotprod=False,
            compiler="arm-linux-gnueabihf-gcc",
            compiler_package="gcc-arm-linux-gnueabihf",
            nm="arm-linux-gnueabihf-nm",
            nm_package="binutils-arm-linux-gnueabihf",
            emulator="qemu-arm",
            emulator_package="qemu-user",
        ),
        _cortex_m("cortex-m4", "dsp", "mps2-an386"),
        _cortex_m("cortex-m7", "dsp", "mps2-an500"),
        _cortex_m("cortex-m55", "mve", "mps3-an547"),
    )
}


def get_target(name: str) -> Target:
    """The target called ``name``; TargetError (one line, naming the known targets) otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        known = ", ".join(TARGETS)
        raise TargetError(f"unknown target {name!r}; known targets: {known}") from None


def _missing(tool: str, package: str, target: Target, what: str) -> TargetError:
    return TargetError(
        f"target {target.name} needs the {what} {tool}, which is not installed: "
        f"apt-get install {package} (or run `make setup`)"
    )


def check_tools(target: Target | str) -> None:
    """Raise TargetError naming the Debian package to install if a tool of ``target`` is missing.

    Checks the compiler, its nm (used to find marker symbols), the emulator and, for Cortex-M,
    newlib (the rdimon semihosting specs).
    """
    t = get_target(target) if isinstance(target, str) else target
    if shutil.which(t.compiler) is None:
        raise _missing(t.compiler, t.compiler_package, t, "compiler")
    if shutil.which(t.nm) is None:
        raise _missing(t.nm, t.nm_package, t, "binutils tool")
    if t.emulator is not None and shutil.which(t.emulator) is None:
        assert t.emulator_package is not None
        raise _missing(t.emulator, t.emulator_package, t, "emulator")
    if t.c_library_package is not None and not _has_rdimon_specs(t.compiler):
        raise _missing("newlib (rdimon.specs)", t.c_library_package, t, "C library")


def _has_rdimon_specs(compiler: str) -> bool:
    try:
        out = subprocess.run(
            [compiler, "-print-file-name=rdimon.specs"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return False
    # GCC echoes the bare name back when it cannot find the file.
    return out != "rdimon.specs" and Path(out).is_file()
