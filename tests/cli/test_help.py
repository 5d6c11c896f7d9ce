"""`--help` that pastes: every example of every command parses with the real command, shown as written.

- Each command (both programs, all subcommands) shows at least one example line (a line that starts
  with `featstore `, `heads ` or `torchrun `, indented under the prose).
- Each example sits in a click ``\\b`` paragraph, so that click prints it as written instead of
  re-wrapping it mid-option (``--meta-`` / ``dir``); the rendered help holds every example line whole.
- Each example parses with the real command (`click.Command.make_context`), the paths it names made
  under a temporary folder first.
- No help names a file users do not have (DESIGN.md, ../shared), and the commands with ``--amp`` all
  state the same rule for its defaults.
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Iterator

import click
import pytest
from click.testing import CliRunner

from cli.common import AMP_RULE
from cli.featstore_cli import main as featstore_main
from cli.heads_cli import main as heads_main
from tests.helpers.command_lines import parse_command_line

GROUPS: dict[str, click.Group] = {"featstore": featstore_main, "heads": heads_main}
EXAMPLE_START = re.compile(r"^\s+(featstore|heads|torchrun) ")
NO_REWRAP = "\b"


def commands() -> Iterator[tuple[str, click.Command]]:
    """(program and command, command) of every command of both programs (groups left out)."""
    for program, group in GROUPS.items():
        for name, command in sorted(group.commands.items()):
            yield f"{program} {name}", command


COMMANDS = dict(commands())


def examples(help_text: str) -> list[tuple[str, bool]]:
    """(example, whether it sits in a ``\\b`` paragraph) of a command's help, continuation lines joined."""
    found: list[tuple[str, bool]] = []
    protected = False
    pending = ""
    for line in inspect.cleandoc(help_text).splitlines():
        if not line.strip():
            protected = False
            continue
        if line.strip() == NO_REWRAP:
            protected = True
            continue
        if pending:
            pending += " " + line.strip()
        elif EXAMPLE_START.match(line):
            pending = line.strip()
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        found.append((pending, protected))
        pending = ""
    return found


def rendered(name: str) -> str:
    program, sub = name.split(" ", 1)
    result = CliRunner().invoke(GROUPS[program], [sub, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_shows_an_example_click_prints_as_written(name: str) -> None:
    found = examples(COMMANDS[name].help or "")
    assert found, f"`{name} --help` shows no example"
    loose = [line for line, protected in found if not protected]
    assert not loose, f"`{name} --help`: put a line holding only \\b before these examples, or click re-wraps them:\n" + \
        "\n".join(loose)
    shown = rendered(name)
    for line in inspect.cleandoc(COMMANDS[name].help or "").splitlines():
        if EXAMPLE_START.match(line):
            assert line.strip() in shown, f"`{name} --help` does not show this example as written:\n  {line.strip()}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_example_parses_with_the_real_command(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for line, _ in examples(COMMANDS[name].help or ""):
        parsed = parse_command_line(line, GROUPS, tmp_path)
        assert parsed is not None, line


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_names_no_file_users_do_not_have(name: str) -> None:
    shown = rendered(name)
    for missing in ("DESIGN", "../shared"):
        assert missing not in shown, f"`{name} --help` cites {missing}: cite a file of docs/ or the README"


def test_the_help_of_every_amp_option_states_one_rule() -> None:
    with_amp = sorted(name for name, command in COMMANDS.items()
                      if any("--amp" in getattr(p, "opts", ()) for p in command.params))
    assert {"featstore build", "featstore finetune", "featstore finetune-detector"} <= set(with_amp)
    rule = "".join(AMP_RULE.split())  # whitespace-free: click wraps lines, and after hyphens too
    for name in with_amp:
        assert rule in "".join(rendered(name).split()), f"`{name} --help` does not state the --amp rule"


def test_the_example_finder_sees_protected_and_loose_examples() -> None:
    help_text = """Do a thing.

    Example:

    \b
        featstore info st \\
            --json
        featstore verify st

        heads eval runs/x
    """
    assert examples(help_text) == [("featstore info st --json", True), ("featstore verify st", True),
                                   ("heads eval runs/x", False)]
