"""cli.common: a command's parameters rendered back to the command line that gives them."""
from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest

from cli.common import (
    IntList,
    command_argv,
    command_defaults,
    command_params,
    format_command,
)


@click.command("toy")
@click.argument("store", type=click.Path(path_type=Path))
@click.argument("extra", nargs=-1)
@click.option("--model", default="saoa", help="A choice with a default.")
@click.option("--lr", default=1e-4, type=float, help="A float.")
@click.option("--steps", default="", type=IntList(), help="Integers.")
@click.option("--tag", "tags", multiple=True, help="Repeatable.")
@click.option("--size", nargs=2, type=int, default=(4, 3), help="Two numbers.")
@click.option("--normalize/--no-normalize", default=None, help="A switch that may stay unset.")
@click.option("--progress/--no-progress", default=True, help="A switch set by default.")
@click.option("--no-gating", "gating", flag_value=False, default=None, help="A flag that sets False.")
@click.option("--resume", is_flag=True, help="A plain flag.")
@click.option("-v", "--verbose", count=True, help="A count.")
@click.option("--where", help="Free text.")
def toy(**params: object) -> None:
    """A command with one parameter of each kind."""


def parse(argv: list[str]) -> dict:
    return toy.make_context("toy", list(argv)).params


def test_defaults_are_what_click_passes_without_the_options() -> None:
    defaults = command_defaults(toy)
    assert defaults == {**parse(["s"]), "store": None}
    assert defaults["steps"] == () and defaults["size"] == (4, 3) and defaults["tags"] == ()


@pytest.mark.parametrize("given", [
    {},
    {"model": "sap", "lr": 0.03, "steps": (11, 14), "where": "participant_id = 'P01'"},
    {"tags": ("a", "b c"), "size": (8, 2), "verbose": 2},
    {"normalize": True, "progress": False, "gating": False, "resume": True},
    {"normalize": False, "extra": ("x", "y")},
    {"lr": 1e-05, "steps": (3,)},
])
def test_rendered_argv_parses_back_to_the_same_params(given: dict) -> None:
    params = command_params(toy, store=Path("/data/my store"), **given)
    argv = command_argv(toy, params)
    assert parse(argv) == params
    # Through a shell and back.
    line = format_command("featstore toy", toy, params)
    assert shlex.split(line)[:2] == ["featstore", "toy"]
    assert parse(shlex.split(line)[2:]) == params


def test_defaults_are_omitted_and_arguments_come_first() -> None:
    params = command_params(toy, store=Path("s"), lr=0.5)
    assert command_argv(toy, params) == ["s", "--lr", "0.5"]
    assert command_argv(toy, params, always=("model", "resume")) == ["s", "--model", "saoa", "--lr", "0.5"]


def test_an_argument_that_looks_like_an_option_goes_after_a_double_dash() -> None:
    params = command_params(toy, store=Path("-odd"), resume=True)
    argv = command_argv(toy, params)
    assert argv == ["--resume", "--", "-odd"]
    assert parse(argv) == params


def test_unknown_names_and_unwritable_values_are_errors() -> None:
    with pytest.raises(ValueError, match="no parameter.*modle"):
        command_params(toy, modle="sap")
    with pytest.raises(ValueError, match="no parameter.*bogus"):
        command_argv(toy, {"store": Path("s"), "bogus": 1})
    with pytest.raises(ValueError, match="--no-gating"):
        command_argv(toy, command_params(toy, store=Path("s"), gating=True))
    with pytest.raises(ValueError, match="cannot be set back to None"):
        command_argv(toy, command_params(toy, store=Path("s"), model=None))
    with pytest.raises(ValueError, match="STORE"):
        command_argv(toy, command_params(toy))


def test_int_list_reads_and_writes_comma_separated_integers() -> None:
    assert parse(["s", "--steps", "11, 14"])["steps"] == (11, 14)
    assert IntList().render((11, 14)) == "11,14"
    with pytest.raises(click.BadParameter, match="comma-separated list of integers"):
        parse(["s", "--steps", "11,x"])
