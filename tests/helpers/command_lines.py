"""Parsing documented command lines (`--help` examples, README blocks) with the real click commands."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import click

SHELL_OPERATORS = {"&&", "||", ";", "|"}
ELISION = "..."  # "featstore build STORE ... --device cuda": the options shown above, left out


@dataclass(frozen=True)
class ParsedLine:
    program: str
    sub: str
    params: dict[str, Any]
    line: str


def command_tokens(line: str, programs: Mapping[str, click.Group]) -> tuple[str, list[str]] | None:
    """(program, its arguments) of a shell line that runs one of ``programs`` (directly, by a path to it,
    or after torchrun's ``--no-python``), up to the first shell operator; None when it runs none."""
    tokens = shlex.split(line, comments=True)
    for i, token in enumerate(tokens):
        program = token.rsplit("/", 1)[-1]
        if program in programs and (i == 0 or tokens[i - 1] in SHELL_OPERATORS | {"--no-python"}):
            args = []
            for arg in tokens[i + 1:]:
                if arg in SHELL_OPERATORS:
                    break
                args.append(arg)
            return program, args
    return None


def make_existing_paths(command: click.Command, sub: str, argv: list[str], root: Path) -> None:
    """Make, empty, every path the command insists exists, so that parsing checks only the command line."""
    ctx = click.Context(command, info_name=sub)
    opts, _, _ = command.make_parser(ctx).parse_args(list(argv))
    for param in command.get_params(ctx):
        kind = param.type
        if not (isinstance(kind, click.Path) and kind.exists) or opts.get(param.name) is None:
            continue
        values = opts[param.name]
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if not isinstance(value, str):  # click's marker of an option not given
                continue
            path = root / value
            if path.exists():
                continue
            if not kind.file_okay or (kind.dir_okay and not path.suffix):
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()


def parse_command_line(line: str, programs: Mapping[str, click.Group], root: Path) -> ParsedLine | None:
    """Parse ``line`` with the real command, its input paths made under ``root`` (the working directory).

    A line with ``...`` (options elided) may leave out required options; anything it does give must parse.

    Raises:
        AssertionError: the line names no command of its program, or does not parse (click's message).
    """
    found = command_tokens(line, programs)
    if found is None:
        return None
    program, args = found
    assert args, f"`{program}` without a command:\n  {line}"
    group = programs[program]
    sub, argv = args[0], [a for a in args[1:] if a != ELISION]
    elided = len(argv) != len(args) - 1
    command = group.get_command(click.Context(group), sub)
    assert command is not None, f"`{program} {sub}` is not a command:\n  {line}"
    try:
        make_existing_paths(command, sub, argv, root)
        params = command.make_context(sub, list(argv)).params
    except click.MissingParameter:
        if not elided:
            raise AssertionError(f"documented command misses a required option:\n  {line}") from None
        params = {}
    except click.ClickException as err:
        raise AssertionError(f"documented command does not parse ({err.format_message()}):\n  {line}") from err
    return ParsedLine(program, sub, params, line)
