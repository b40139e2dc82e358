"""`qacc --help` and every subcommand's help list every option with a meaningful default.

The parser is walked, so options added later are held to the same rule: each option's help says
"(default: X)" with X something a user can read (not "None"), or the option is required.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from codegen import __version__
from codegen.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


PARSER = build_parser()
COMMANDS = _subparsers(PARSER)


def _user_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if not isinstance(
            a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
        )
    ]


def _help_entry(help_text: str, action: argparse.Action) -> str:
    """The help paragraph of one option: its line in the options list (two spaces, the option
    names) and the more deeply indented lines that continue it."""
    entries: list[list[str]] = []
    for line in help_text.splitlines():
        if re.match(r"  \S", line):
            entries.append([line])
        elif line.startswith("   ") and entries:
            entries[-1].append(line)
    names = action.option_strings or [action.metavar or action.dest]
    for entry in entries:
        first = entry[0].strip()
        if any(first == n or first.startswith((f"{n} ", f"{n},")) for n in names):
            return " ".join(s.strip() for s in entry)
    raise AssertionError(f"{names} not in the options list of the help")


def test_every_command_has_help() -> None:
    assert set(COMMANDS) >= {"compile", "verify", "demo", "bench"}
    top = PARSER.format_help()
    for name in COMMANDS:
        assert name in top


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_shows_its_default_or_is_required(command: str) -> None:
    parser = COMMANDS[command]
    text = parser.format_help()
    actions = _user_actions(parser)
    assert actions, f"qacc {command} has no options?"
    assert "(default: None)" not in text
    for action in actions:
        assert action.help, f"qacc {command} {action.dest}: no help text"
        if action.required or not action.option_strings:
            if action.option_strings:
                entry = _help_entry(text, action)
                assert "(required)" in entry, (
                    f"qacc {command} {action.option_strings[0]}: {entry!r}"
                )
            continue
        entry = _help_entry(text, action)
        m = re.search(r"\(default: ([^)]*)\)", entry)
        assert m, f"qacc {command} {action.option_strings[0]}: no '(default: ...)' in {entry!r}"
        assert m.group(1).strip() not in ("None", ""), (
            f"qacc {command} {action.option_strings[0]}: default shown as {m.group(1)!r}; say what "
            "happens when it is not given"
        )


@pytest.mark.slow  # two fresh interpreters that import torch
def test_version_and_help_from_the_command_line() -> None:
    v = subprocess.run(
        [sys.executable, "-m", "codegen.cli", "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert v.returncode == 0 and v.stdout.strip() == f"qacc {__version__}"
    h = subprocess.run(
        [sys.executable, "-m", "codegen.cli", "compile", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert h.returncode == 0 and "--acc-bits ACC_BITS" in h.stdout
    assert "(default: 16)" in h.stdout
