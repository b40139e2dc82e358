"""The Debian packages the build uses are the ones scripts/setup-apt.sh installs, not by accident.

A release once failed on a fresh machine: `libc6-dev-armhf-cross` (the armhf cross compiler's C
library) is only *Recommended* by gcc-arm-linux-gnueabihf, setup-apt.sh installs with
--no-install-recommends, and CI passed only because the package had been installed by hand.

These tests make that visible. Each cross compiler must link a small static program the way the
project's toolchain files do. Then every file the build uses (compilers, their C libraries, specs
files and headers, the emulators, CMake, Chromium, the data set, what scripts/build-plugin.sh
runs) is mapped to its Debian package with `dpkg -S`, and that package must be in what the setup
script really installs: the packages of its `pkgs=( ... )` array plus the closure of their hard
Depends and Pre-Depends over the installed packages (Recommends and Suggests do not count), plus
what every Debian system has (Essential packages, and apt, which the script itself runs). Only the
XNNPACK peer's files may also come from scripts/setup-xnnpack.sh; no target may work by accident
of another script. A missing tool or file fails naming the package to install; nothing is skipped.

The plugin (runtime_c/qemu_plugin/insn_count.c) includes only C library headers and QEMU's
qemu-plugin.h, which (QEMU 7.2) includes only <inttypes.h>, <stdbool.h> and <stddef.h>: it does
not use glib, so no glib file is checked (if it ever includes glib.h, the header scan below fails
to compile it without pkg-config's flags, which makes the need visible).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import pytest

from codegen.bench import peers
from codegen.targets.table import TARGETS, Target

REPO = Path(__file__).resolve().parent.parent
SETUP_APT = "scripts/setup-apt.sh"
SETUP_XNNPACK = "scripts/setup-xnnpack.sh"
CORTEXM_DIR = REPO / "runtime_c" / "cortexm"
PLUGIN_SRC = REPO / "runtime_c" / "qemu_plugin" / "insn_count.c"
PLUGIN_HEADER = REPO / "build" / "plugin" / "include" / "qemu-plugin.h"  # build-plugin.sh's
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # dataset-fashion-mnist
FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# Installed on every machine that can run setup-apt.sh at all: it runs apt-get (and dpkg-query,
# of the Essential package dpkg). Essential packages are added from the dpkg database.
BOOTSTRAP = ("apt",)

# The flags of the toolchain files (toolchains/<family>.cmake); test_flags_match_toolchain_files
# keeps them in step.
LINUX_FLAGS = {
    "aarch64-linux": ["-static"],
    "armhf-linux": ["-mfpu=neon-vfpv4", "-mfloat-abi=hard", "-static"],
}
LINUX_LIBC_PACKAGE = {
    "aarch64-linux": "libc6-dev-arm64-cross",
    "armhf-linux": "libc6-dev-armhf-cross",
}
CORTEX_M_FPU = {
    "cortex-m4": ["-mfpu=fpv4-sp-d16", "-mfloat-abi=hard"],
    "cortex-m7": ["-mfpu=fpv5-d16", "-mfloat-abi=hard"],
    "cortex-m55": ["-mfloat-abi=hard"],
}

PROGRAM = """\
#include <math.h>
#include <stdio.h>

int main(int argc, char **argv) {
    (void)argv;
    printf("%f\\n", exp((double)argc));
    return 0;
}
"""


# --- pure functions: the script's package list, Debian relations and versions, the closure ---


def parse_pkgs_array(script: str) -> list[str]:
    """The words of the first ``pkgs=( ... )`` bash array of ``script`` (comments removed)."""
    text = re.sub(r"(?m)(^|\s)#.*$", r"\1", script)
    m = re.search(r"(?m)^\s*pkgs=\(([^)]*)\)", text)
    if m is None:
        raise ValueError("no pkgs=( ... ) array in the script")
    return [w.strip("'\"") for w in m[1].split()]


@dataclass(frozen=True)
class Atom:
    """One alternative of a relation: ``name[:arch] [(op version)]``."""

    name: str
    arch: str | None = None
    op: str | None = None
    version: str | None = None


_ATOM = re.compile(
    r"(?P<name>[a-z0-9][a-z0-9+.-]*)(?::(?P<arch>[a-z0-9-]+))?"
    r"\s*(?:\(\s*(?P<op><<|<=|>=|>>|=|<|>)\s*(?P<version>[^\s)]+)\s*\))?"
    r"\s*(?:\[[^\]]*\])?\s*(?:<[^>]*>\s*)*"
)


def parse_relations(text: str) -> list[list[Atom]]:
    """A Depends-style field: a list of clauses, each a list of alternatives (``a | b``)."""
    clauses = []
    for clause in text.split(","):
        if not clause.strip():
            continue
        alts = []
        for alt in clause.split("|"):
            m = _ATOM.fullmatch(alt.strip())
            if m is None:
                raise ValueError(f"cannot parse relation {alt.strip()!r} in {text!r}")
            alts.append(Atom(m["name"], m["arch"], m["op"], m["version"]))
        clauses.append(alts)
    return clauses


@dataclass(frozen=True)
class Pkg:
    """An installed binary package, as dpkg-query shows it."""

    name: str
    arch: str
    version: str = "1"
    multi_arch: str = "no"
    essential: bool = False
    pre_depends: str = ""
    depends: str = ""
    provides: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}:{self.arch}"


DPKG_FIELDS = (
    "db:Status-Status",
    "Package",
    "Architecture",
    "Version",
    "Multi-Arch",
    "Essential",
    "Pre-Depends",
    "Depends",
    "Provides",
)


def parse_dpkg_query(text: str) -> dict[str, Pkg]:
    """Installed packages by ``name:arch`` from ``dpkg-query -W -f`` with DPKG_FIELDS, \\x1f
    between fields and \\x1e after each package."""
    out = {}
    for record in text.split("\x1e"):
        if not record.strip():
            continue
        status, name, arch, version, ma, ess, pre, dep, prov = record.strip("\n").split("\x1f")
        if status == "installed":
            p = Pkg(name, arch, version, ma or "no", ess == "yes", pre, dep, prov)
            out[p.key] = p
    return out


def _arch_ok(cand: Pkg, atom_arch: str | None, depender_arch: str, native: str) -> bool:
    """dpkg's rule: may ``cand`` satisfy a relation of a ``depender_arch`` package?"""

    def norm(a: str) -> str:
        return native if a in ("all", "native") else a

    if atom_arch is None:
        return cand.multi_arch == "foreign" or norm(cand.arch) == norm(depender_arch)
    if atom_arch == "any":
        return cand.multi_arch == "allowed" or norm(cand.arch) == norm(depender_arch)
    return norm(cand.arch) == norm(atom_arch)


@dataclass(frozen=True)
class Index:
    """Installed packages by name, and by the virtual names they provide."""

    installed: Mapping[str, Pkg]
    native: str
    by_name: Mapping[str, list[Pkg]]
    providers: Mapping[str, list[Pkg]]


def make_index(installed: Mapping[str, Pkg], native: str) -> Index:
    by_name: dict[str, list[Pkg]] = {}
    providers: dict[str, list[Pkg]] = {}
    for p in installed.values():
        by_name.setdefault(p.name, []).append(p)
        for clause in parse_relations(p.provides):
            providers.setdefault(clause[0].name, []).append(p)
    return Index(installed, native, by_name, providers)


def satisfiers(atom: Atom, depender_arch: str, idx: Index) -> list[str]:
    """Keys of the installed packages (real, or providing the name) that satisfy ``atom``.

    Versions are not compared: dpkg keeps the installed set consistent (an installed package's
    versioned relations hold), so a closure over installed packages needs names and
    architectures only."""
    cands = idx.by_name.get(atom.name, []) + idx.providers.get(atom.name, [])
    return list(
        dict.fromkeys(p.key for p in cands if _arch_ok(p, atom.arch, depender_arch, idx.native))
    )


def root_atom(arg: str) -> Atom:
    """An apt-get argument (``name`` or ``name:arch``) as a relation."""
    name, _, arch = arg.partition(":")
    return Atom(name, arch or None)


def dependency_closure(roots: Iterable[str], installed: Mapping[str, Pkg], native: str) -> set[str]:
    """What ``apt-get install --no-install-recommends roots`` installs, seen on this machine.

    ``roots`` are apt package arguments (``name`` or ``name:arch``). Follows Pre-Depends and
    Depends over ``installed``; of ``a | b`` it takes the first alternative that an installed
    package satisfies (apt's choice), with every installed provider when it is a virtual name.
    """
    idx = make_index(installed, native)
    todo = [k for r in roots for k in satisfiers(root_atom(r), native, idx)]
    seen: set[str] = set()
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        pkg = installed[key]
        for clause in parse_relations(pkg.pre_depends) + parse_relations(pkg.depends):
            for atom in clause:
                found = satisfiers(atom, pkg.arch, idx)
                if found:
                    todo += found
                    break
    return seen


def parse_dpkg_search(text: str) -> dict[str, list[str]]:
    """``dpkg -S`` output: path -> owning packages as dpkg names them (``libc6-dev:arm64``)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("diversion by") or ": " not in line:
            continue
        owners, _, path = line.partition(": ")
        out[path] = [o.strip() for o in owners.split(",")]
    return out


def dpkg_candidates(path: str) -> list[str]:
    """Names under which dpkg may know ``path``: as given (without ``..``), with its directory
    resolved (a package may own the symlink itself), fully resolved (alternatives), and each
    under merged /usr (/usr/bin/tar is /bin/tar to dpkg)."""
    p = Path(path)
    names = [] if ".." in p.parts else [path]
    names += [str(Path(os.path.realpath(p.parent)) / p.name), os.path.realpath(p)]
    for n in list(names):
        parts = Path(n).parts
        if len(parts) > 2 and parts[1] == "usr" and Path("/", parts[2]).is_symlink():
            names.append(str(Path("/", *parts[2:])))
    return list(dict.fromkeys(names))


def parse_make_deps(text: str) -> list[str]:
    """The prerequisites of ``gcc -M`` output, without the source itself."""
    words = text.replace("\\\n", " ").split()
    return list(dict.fromkeys(w for w in words[2:] if w != "\\"))


# --- what the build uses ---


@dataclass(frozen=True)
class Item:
    """A file the build uses: its name, its path (None: not found), what uses it (for headers:
    the compiler that includes them), the package to install when it is missing."""

    name: str
    path: str | None
    role: str
    package: str
    header: bool = False


@dataclass(frozen=True)
class Compiler:
    id: str
    target: Target
    flags: list[str]
    lib_files: tuple[str, ...]
    lib_package: str
    header_package: str
    link_extra: list[str] = field(default_factory=list)

    @property
    def cc(self) -> str:
        return self.target.compiler


def _compilers() -> list[Compiler]:
    out = []
    for family, libc in LINUX_LIBC_PACKAGE.items():
        t = next(t for t in TARGETS.values() if t.family == family)
        flags = [f"-mcpu={t.cpu}", *LINUX_FLAGS[family]]
        out.append(Compiler(t.compiler, t, flags, ("crt1.o", "libc.a", "libm.a"), libc, libc))
    for t in TARGETS.values():
        if t.family != "cortex-m":
            continue
        assert t.cpu is not None and t.c_library_package is not None
        board_ld = CORTEXM_DIR / f"{t.machine}.ld"
        out.append(
            Compiler(
                f"{t.compiler}-{t.cpu}",
                t,
                [f"-mcpu={t.cpu}", "-mthumb", *CORTEX_M_FPU.get(t.cpu, []), "--specs=rdimon.specs"],
                ("rdimon.specs", "rdimon-crt0.o", "librdimon.a", "libc.a", "libm.a"),
                t.c_library_package,
                "libnewlib-dev",
                [
                    f"-I{CORTEXM_DIR}",
                    f"-L{CORTEXM_DIR}",
                    f"-T{board_ld}",
                    str(CORTEXM_DIR / "startup.c"),
                    str(CORTEXM_DIR / "qacc_cycles.c"),
                ],
            )
        )
    return out


COMPILERS = _compilers()


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _which(tool: str, role: str, package: str) -> Item:
    return Item(tool, shutil.which(tool), role, package)


def _print_file_name(cc: str, flags: Sequence[str], name: str, role: str, package: str) -> Item:
    out = _run([cc, *flags, f"-print-file-name={name}"]).stdout.strip() if shutil.which(cc) else ""
    # GCC echoes the bare name back when it cannot find the file.
    found = out if out != name and Path(out).is_file() else None
    return Item(f"{cc} {' '.join(flags)} -print-file-name={name}", found, role, package)


def _headers(
    cc: str, flags: Sequence[str], source: str, tmp: Path, role: str, package: str
) -> tuple[list[Item], str | None]:
    """The headers ``cc flags`` reads for ``source`` (``gcc -M``), or the compiler's error."""
    if shutil.which(cc) is None:
        return [], f"{cc} is not installed"
    src = tmp / "headers.c"
    src.write_text(source)
    proc = _run([cc, *flags, "-M", str(src)])
    if proc.returncode != 0:
        return [], f"{cc} {' '.join(flags)} -M failed:\n{proc.stderr.strip()}"
    paths = [p for p in parse_make_deps(proc.stdout) if not p.startswith(str(REPO))]
    return [Item(p, p, role, package, header=True) for p in paths], None


def _plugin_includes() -> str:
    """The system #includes of the plugin and of QEMU's qemu-plugin.h (when fetched)."""
    texts = [PLUGIN_SRC.read_text()]
    if PLUGIN_HEADER.is_file():
        texts.append(PLUGIN_HEADER.read_text())
    names = {
        m[1]
        for t in texts
        for m in re.finditer(r"(?m)^\s*#\s*include\s*<([^>]+)>", t)
        if m[1] != "qemu-plugin.h"
    }
    return "".join(f"#include <{n}>\n" for n in sorted(names))


Resolved = tuple[list[Item], list[str]]  # the files, and problems met while resolving them


def _compiler_items(c: Compiler, tmp: Path) -> Resolved:
    t = c.target
    items = [
        _which(c.cc, "the build compiles with it", t.compiler_package),
        _which(t.nm, "the build reads symbols with it", t.nm_package),
    ]
    role = f"{c.cc} -mcpu={t.cpu} links it" if t.family == "cortex-m" else f"{c.cc} links it"
    items += [_print_file_name(c.cc, c.flags, f, role, c.lib_package) for f in c.lib_files]
    hdrs, err = _headers(c.cc, c.flags, PROGRAM, tmp, f"{c.cc} includes", c.header_package)
    return items + hdrs, [err] if err else []


def _qemu_items(tmp: Path) -> Resolved:
    emulators = {t.emulator: t.emulator_package for t in TARGETS.values() if t.emulator}
    role = "codegen/targets/qemu.py runs it"
    return [_which(e, role, p or "qemu-user") for e, p in sorted(emulators.items())], []


def _cmake_items(tmp: Path) -> Resolved:
    return [
        _which("cmake", "the build runs it", "cmake"),
        _which("ninja", "the build runs it (cmake -G Ninja)", "ninja-build"),
    ], []


def _chromium_items(tmp: Path) -> Resolved:
    return [_which("chromium", "tests/backend/test_report.py runs it", "chromium")], []


def _existing(path: Path, role: str, package: str) -> Item:
    return Item(str(path), str(path) if path.exists() else None, role, package)


def _fashion_items(tmp: Path) -> Resolved:
    role = "codegen/data/datasets.py reads it"
    return [_existing(FASHION_DIR / f, role, "dataset-fashion-mnist") for f in FASHION_FILES], []


def _build_plugin_items(tmp: Path) -> Resolved:
    """The host compiler (the plugin's, and the host target's) and the tools the script runs."""
    cc = os.environ.get("CC", "cc")
    role = "scripts/build-plugin.sh runs it"
    items = [
        _which(cc, "scripts/build-plugin.sh compiles the plugin with it", "build-essential"),
        _which("nm", "the host target reads symbols with it", "binutils"),
        *(
            _print_file_name(cc, ["-shared"], f, f"{cc} -shared links it", "libc6-dev")
            for f in ("crti.o", "libc.so")
        ),
        _which("apt-get", role, "apt"),
        _which("dpkg-query", role, "dpkg"),
        _which("dpkg-source", role, "dpkg-dev"),
        _which("tar", role, "tar"),
        _which("xz", f"{role} (tar -xa of the .orig.tar.xz)", "xz-utils"),
        _which("awk", role, "mawk"),
    ]
    hdrs, err = _headers(
        cc, ["-std=c11"], _plugin_includes(), tmp, f"{cc} includes (plugin)", "libc6-dev"
    )
    return items + hdrs, [err] if err else []


def _xnnpack_items(tmp: Path) -> Resolved:
    role = "codegen/bench/peers.py builds or runs with it"
    return [
        _existing(peers.XNNPACK_HEADER, role, "libxnnpack-dev:arm64"),
        _existing(peers.XNNPACK_LIB, role, "libxnnpack-dev:arm64"),
        _existing(peers.ARM64_LOADER, role, "libc6:arm64"),
    ], []


@dataclass(frozen=True)
class Group:
    id: str
    scripts: tuple[str, ...]  # the setup scripts whose closure may provide the files
    resolve: Callable[[Path], Resolved]


GROUPS = [
    *(Group(c.id, (SETUP_APT,), partial(_compiler_items, c)) for c in COMPILERS),
    Group("qemu", (SETUP_APT,), _qemu_items),
    Group("cmake", (SETUP_APT,), _cmake_items),
    Group("chromium", (SETUP_APT,), _chromium_items),
    Group("fashion-mnist", (SETUP_APT,), _fashion_items),
    Group("build-plugin", (SETUP_APT,), _build_plugin_items),
    Group("xnnpack-peer", (SETUP_APT, SETUP_XNNPACK), _xnnpack_items),
]


# --- the dpkg database (read once) ---


@cache
def native_arch() -> str:
    return _run(["dpkg", "--print-architecture"]).stdout.strip()


@cache
def installed_packages() -> dict[str, Pkg]:
    fmt = "\x1f".join(f"${{{f}}}" for f in DPKG_FIELDS) + "\x1e"
    proc = _run(["dpkg-query", "-W", f"-f={fmt}"])
    assert proc.returncode == 0, proc.stderr
    return parse_dpkg_query(proc.stdout)


def script_roots(script: str) -> list[str]:
    return parse_pkgs_array((REPO / script).read_text())


@cache
def allowed(scripts: tuple[str, ...]) -> frozenset[str]:
    """What ``scripts`` install, plus what every machine that can run them has."""
    db = installed_packages()
    roots = [r for s in scripts for r in script_roots(s)]
    roots += [*BOOTSTRAP, *(k for k, p in db.items() if p.essential)]
    return frozenset(dependency_closure(roots, db, native_arch()))


def dpkg_owners(paths: Iterable[str]) -> dict[str, list[str]]:
    paths = list(dict.fromkeys(paths))
    if not paths:
        return {}
    # Exit status 1 when some path has no owner: those are simply absent from the answer.
    return parse_dpkg_search(_run(["dpkg", "-S", *paths]).stdout)


def owner_keys(owner: str, db: Mapping[str, Pkg]) -> set[str]:
    """Installed keys of a package as ``dpkg -S`` names it (an unqualified name: any arch)."""
    if ":" in owner:
        return {owner} & db.keys()
    return {k for k, p in db.items() if p.name == owner}


def closure_problems(items: Sequence[Item], scripts: tuple[str, ...]) -> list[str]:
    """One line per file whose package ``scripts`` do not install (headers: per package)."""
    db = installed_packages()
    ok = allowed(scripts)
    if len(scripts) == 1:
        which = f"which {scripts[0]} does not install: add it to its pkgs list"
    else:
        which = (
            f"which neither {' nor '.join(scripts)} installs: add it to the pkgs list of "
            f"{scripts[-1]}"
        )
    problems: list[str] = []
    found = [i for i in items if i.path is not None]
    owners = dpkg_owners(c for i in found for c in dpkg_candidates(i.path or ""))
    headers: dict[tuple[str, str], list[str]] = {}
    for i in items:
        if i.path is None:
            problems.append(
                f"{i.name}: not found ({i.role}): apt-get install {i.package} (or run make setup)"
            )
            continue
        known = next((c for c in dpkg_candidates(i.path) if c in owners), None)
        if known is None:
            problems.append(
                f"{i.path} ({i.role}) belongs to no Debian package (installed by hand?): "
                f"the build must use the one of {i.package}, installed by {scripts[-1]}"
            )
            continue
        pkgs = owners[known]
        if any(owner_keys(o, db) & ok for o in pkgs):
            continue
        if i.header:
            headers.setdefault((", ".join(pkgs), i.role), []).append(known)
            continue
        what = "package" if len(pkgs) == 1 else "packages"
        problems.append(f"{known} ({i.role}) belongs to Debian {what} {', '.join(pkgs)}, {which}")
    for (pkgs_s, role), paths in headers.items():
        what = "package" if "," not in pkgs_s else "packages"
        if len(paths) == 1:
            problems.append(f"{paths[0]} ({role} it) belongs to Debian {what} {pkgs_s}, {which}")
        else:
            problems.append(
                f"{paths[0]} and {len(paths) - 1} more headers ({role} them) belong to Debian "
                f"{what} {pkgs_s}, {which}"
            )
    return problems


# --- the tests ---


@pytest.mark.parametrize("c", COMPILERS, ids=lambda c: c.id)
def test_cross_compiler_links_a_static_program(c: Compiler, tmp_path: Path) -> None:
    if shutil.which(c.cc) is None:
        pytest.fail(f"{c.cc} is not installed: apt-get install {c.target.compiler_package}")
    src = tmp_path / "prog.c"
    src.write_text(PROGRAM)
    argv = [c.cc, *c.flags, *c.link_extra, str(src), "-o", str(tmp_path / "prog"), "-lm"]
    proc = _run(argv)
    assert proc.returncode == 0, (
        f"{' '.join(argv)} failed (is {c.lib_package} installed?):\n{proc.stderr.strip()}"
    )


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.id)
def test_files_come_from_setup_scripts(group: Group, tmp_path: Path) -> None:
    items, problems = group.resolve(tmp_path)
    problems += closure_problems(items, group.scripts)
    if problems:
        pytest.fail(f"{group.id}:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.mark.parametrize("script", [SETUP_APT, SETUP_XNNPACK])
def test_setup_script_packages_are_installed(script: str) -> None:
    idx = make_index(installed_packages(), native_arch())
    missing = [r for r in script_roots(script) if not satisfiers(root_atom(r), idx.native, idx)]
    assert not missing, f"{script} lists packages that are not installed: {missing}; run it"


def test_flags_match_toolchain_files() -> None:
    """The flags above are the toolchain files' (and every Cortex-M target has its flags)."""
    cortex_m = (REPO / "toolchains" / "cortex-m.cmake").read_text()
    assert {t.cpu for t in TARGETS.values() if t.family == "cortex-m"} == set(CORTEX_M_FPU)
    for cpu, fpu in CORTEX_M_FPU.items():
        assert f'set(_qacc_fpu "{" ".join(fpu)}")' in cortex_m, cpu
    assert "--specs=rdimon.specs" in cortex_m
    for family, flags in LINUX_FLAGS.items():
        text = (REPO / "toolchains" / f"{family}.cmake").read_text()
        assert all(f in text for f in flags), (family, flags)


# --- unit tests of the pure functions, on hand-written inputs ---


def test_parse_pkgs_array() -> None:
    script = """set -e
# pkgs=(commented out)
pkgs=(
  build-essential cmake  # the build (and its generator)
  libc6-dev:arm64 'quoted'
  # a comment line (with parentheses)
  last
)
for p in "${pkgs[@]}"; do :; done  # ${#pkgs[@]}
"""
    assert parse_pkgs_array(script) == [
        "build-essential",
        "cmake",
        "libc6-dev:arm64",
        "quoted",
        "last",
    ]
    with pytest.raises(ValueError):
        parse_pkgs_array("echo no array")


def test_parse_relations() -> None:
    text = "libc6 (>= 2.34), gcc-12 (>= 12.1) | gcc-11, python3:any, foo:arm64 [amd64] <!nocheck>"
    assert parse_relations(text) == [
        [Atom("libc6", None, ">=", "2.34")],
        [Atom("gcc-12", None, ">=", "12.1"), Atom("gcc-11")],
        [Atom("python3", "any")],
        [Atom("foo", "arm64")],
    ]
    assert parse_relations("") == []
    with pytest.raises(ValueError):
        parse_relations("Bad Name")


def test_dependency_closure() -> None:
    db = {
        p.key: p
        for p in (
            Pkg("gcc-cross", "amd64", depends="cpp-cross (= 12), libc-x | libc-y", provides=""),
            Pkg("cpp-cross", "amd64", version="12"),
            Pkg("libc-y", "all", multi_arch="foreign", depends="tiny"),
            Pkg("tiny", "amd64"),
            # Only Recommended by gcc-cross: never in the closure.
            Pkg("libc6-dev-cross", "all"),
            # Of two alternatives, the first installed one (apt's choice).
            Pkg("tool", "amd64", pre_depends="awk", depends="lib-missing | lib-compat | lib"),
            Pkg("lib", "amd64"),
            Pkg("lib-compat", "amd64"),
            Pkg("mawk", "amd64", multi_arch="foreign", provides="awk"),
            Pkg("gawk", "amd64", provides="awk"),
            Pkg("py", "amd64", depends="python3:any, libz"),
            Pkg("python3", "amd64", multi_arch="allowed"),
            Pkg("libz", "amd64", multi_arch="same"),
            Pkg("libz", "arm64", multi_arch="same"),
            Pkg("dev", "arm64", multi_arch="same", depends="libz (>= 1), helper"),
            Pkg("helper", "amd64", multi_arch="foreign"),
        )
    }
    assert dependency_closure(["gcc-cross"], db, "amd64") == {
        "gcc-cross:amd64",
        "cpp-cross:amd64",
        "libc-y:all",  # libc-x is not installed; libc-y is
        "tiny:amd64",
    }
    # Both installed providers of the virtual awk; lib-compat, not lib.
    assert dependency_closure(["tool"], db, "amd64") == {
        "tool:amd64",
        "mawk:amd64",
        "gawk:amd64",
        "lib-compat:amd64",
    }
    # Architecture: an unqualified relation stays in the depender's architecture; M-A foreign
    # crosses it; python3:any takes an M-A allowed package.
    assert dependency_closure(["py"], db, "amd64") == {"py:amd64", "python3:amd64", "libz:amd64"}
    assert dependency_closure(["dev:arm64"], db, "amd64") == {
        "dev:arm64",
        "libz:arm64",
        "helper:amd64",
    }
    assert dependency_closure(["dev"], db, "amd64") == set()  # no native dev installed


def test_parse_dpkg_output() -> None:
    rec = "\x1f".join(["installed", "libc6-dev", "arm64", "2.36", "same", "", "", "libc6", ""])
    gone = "\x1f".join(["config-files", "old", "amd64", "1", "", "", "", "", ""])
    assert list(parse_dpkg_query(f"{rec}\x1e{gone}\x1e")) == ["libc6-dev:arm64"]
    search = (
        "libc6-dev:arm64, libc6-dev:amd64: /usr/include/stdio.h\n"
        "diversion by foo from: /usr/bin/x\n"
        "cmake: /usr/bin/cmake\n"
    )
    assert parse_dpkg_search(search) == {
        "/usr/include/stdio.h": ["libc6-dev:arm64", "libc6-dev:amd64"],
        "/usr/bin/cmake": ["cmake"],
    }
    deps = (
        "prog.o: /tmp/prog.c /usr/include/stdio.h \\\n /usr/include/math.h /usr/include/stdio.h\n"
    )
    assert parse_make_deps(deps) == ["/usr/include/stdio.h", "/usr/include/math.h"]
