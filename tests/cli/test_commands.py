"""The `featstore` and `heads` groups: every command registered, documented, and cheap to list.

Commands are registered explicitly (imported and added in `cli.featstore_cli` / `cli.heads_cli`), so
a misspelt or broken command module fails the import instead of vanishing from the group.
"""
from __future__ import annotations

import subprocess
import sys
from typing import Iterator

import click
import pytest

from cli.featstore_cli import main as featstore_main
from cli.heads_cli import main as heads_main

GROUPS = {"featstore": featstore_main, "heads": heads_main}
# DESIGN section 1: the commands of each program, and those issues added (convert-checkpoint:
# published checkpoints; finetune / finetune-detector: stage 1; derive / copy: EPIC-scale stores).
COMMANDS = {
    "featstore": {"build", "import", "query", "info", "verify", "demo", "convert-checkpoint", "finetune", "finetune-detector", "derive", "copy", "export"},
    "heads": {"train", "eval", "predict", "score", "ablate", "fuse", "submit", "runs", "inspect"},
}


def all_commands() -> Iterator[tuple[str, click.Command]]:
    """(full name, command) of every command and subcommand of both programs."""

    def walk(name: str, command: click.Command) -> Iterator[tuple[str, click.Command]]:
        yield name, command
        if isinstance(command, click.Group):
            for sub_name, sub in sorted(command.commands.items()):
                yield from walk(f"{name} {sub_name}", sub)

    for program, group in GROUPS.items():
        yield from walk(program, group)


COMMAND_IDS = [name for name, _ in all_commands()]


@pytest.mark.parametrize("program", sorted(GROUPS))
def test_every_designed_command_is_registered(program: str) -> None:
    assert set(GROUPS[program].commands) == COMMANDS[program]


@pytest.mark.parametrize("name", COMMAND_IDS)
def test_every_command_and_option_has_help(name: str) -> None:
    command = dict(all_commands())[name]
    assert (command.help or "").strip(), f"`{name}` has no help text"
    undocumented = [param.opts[0] for param in command.params
                    if isinstance(param, click.Option) and not (param.help or "").strip()]
    assert not undocumented, f"`{name}`: options without help: {', '.join(undocumented)}"


@pytest.mark.parametrize("program", sorted(GROUPS))
def test_help_loads_no_torch(program: str) -> None:
    # `--help` of the program and of every command: torch (seconds to import) is loaded inside
    # the commands that use it, never by the command modules themselves. `heads train` is the
    # exception: its --model choices and switch options are read from the head registry, whose
    # builders are torch modules.
    module = {"featstore": "cli.featstore_cli", "heads": "cli.heads_cli"}[program]
    registry_driven = {"heads": ["train"]}.get(program, [])
    script = (
        "import sys\n"
        f"from {module} import main\n"
        "from click.testing import CliRunner\n"
        f"for name in [None, *sorted(set(main.commands) - set({registry_driven!r}))]:\n"
        "    result = CliRunner().invoke(main, ([name] if name else []) + ['--help'])\n"
        "    assert result.exit_code == 0, (name, result.output)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"


def _numeric_parameters() -> Iterator[tuple[str, click.Parameter]]:
    for name, command in all_commands():
        if isinstance(command, click.Group):
            continue
        for param in command.get_params(click.Context(command, info_name=name)):
            if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
                yield f"{name} {param.name}", param


@pytest.mark.parametrize("name", COMMAND_IDS)
def test_every_numeric_option_carries_its_range(name: str) -> None:
    # A bad number is click's one-line usage error before any folder is made: every int and float
    # parameter has a bound in its type, and a float one also refuses nan and inf.
    from cli.common import FiniteFloatRange

    for label, param in _numeric_parameters():
        if not label.startswith(name + " ") or label.count(" ") != name.count(" ") + 1:
            continue
        assert isinstance(param.type, (click.IntRange, click.FloatRange)), f"{label}: {param.type} has no range"
        assert param.type.min is not None or param.type.max is not None, f"{label}: an unbounded range"
        if isinstance(param.type, click.types.FloatParamType):
            assert isinstance(param.type, FiniteFloatRange), f"{label}: accepts nan and inf"


def test_the_range_walk_sees_the_trainers_numbers() -> None:
    seen = {label for label, _ in _numeric_parameters()}
    assert {"heads train lr", "featstore finetune momentum", "featstore finetune-detector weight_decay",
            "featstore build det_score_thresh"} <= seen


@pytest.mark.parametrize("argv", [
    ["heads", "train", "S", "OUT", "--lr", "-1"],
    ["heads", "train", "S", "OUT", "--momentum", "-1"],
    ["heads", "train", "S", "OUT", "--weight-decay", "-1"],
    ["heads", "train", "S", "OUT", "--lr", "inf"],
    ["featstore", "finetune", "OUT", "--momentum", "-1"],
    ["featstore", "finetune", "OUT", "--lr", "inf"],
    ["featstore", "finetune", "OUT", "--lr", "nan"],
    ["featstore", "finetune-detector", "OUT", "--momentum", "-1"],
    ["featstore", "build", "S", "--det-score-thresh", "2"],
], ids=lambda argv: " ".join(argv))
def test_a_bad_number_is_a_usage_error_before_any_folder(argv: list[str], tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    (tmp_path / "S").mkdir()
    result = CliRunner().invoke(GROUPS[argv[0]], argv[1:])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and f"Invalid value for '{argv[-2]}'" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S"]
