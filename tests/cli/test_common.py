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


def _guarded_program() -> click.Group:
    from cli.common import GuardedGroup, debug_option, domain_errors

    @click.group(cls=GuardedGroup)
    @debug_option
    def program(debug: bool) -> None:
        """A program."""

    @program.command()
    @domain_errors
    def broken() -> None:
        """Fails the way a bug does."""
        {}["missing"]  # noqa: B018 - a KeyError from code that is not ours to blame

    @program.command()
    @domain_errors
    def refused() -> None:
        """Fails the way bad input does."""
        from featstore.store.schema import StoreError

        raise StoreError("the input is bad")

    return program


def test_an_unexpected_error_is_one_line_naming_the_command_and_the_traceback_file(tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("FEATSTORE_DEBUG", raising=False)
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    result = CliRunner().invoke(_guarded_program(), ["broken"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: `program broken` failed unexpectedly: KeyError")
    assert "rerun with --debug" in lines[0] and "Traceback" not in result.output
    saved = list(tmp_path.glob("program-broken-*.traceback.txt"))
    assert len(saved) == 1 and str(saved[0]) in lines[0]
    assert "Traceback (most recent call last)" in saved[0].read_text()
    debug = CliRunner().invoke(_guarded_program(), ["--debug", "broken"])
    assert isinstance(debug.exception, KeyError)  # --debug lets it through, traceback and all
    assert CliRunner().invoke(_guarded_program(), ["broken"], env={"FEATSTORE_DEBUG": "1"}).exception is not None


def test_a_domain_error_stays_its_own_message() -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(_guarded_program(), ["refused"])
    assert result.exit_code == 1 and result.output == "Error: the input is bad\n"


def test_a_reader_that_closes_the_pipe_ends_the_output_quietly(tmp_path) -> None:
    # `featstore info S | head -2`: the reader gone before the command writes. A pipe whose read end
    # is closed before the command starts makes its first write meet EPIPE, every time.
    import os
    import subprocess
    import sys

    from tests.featstore.store.small_store import fill_store

    fill_store(tmp_path / "s", 2)
    for args in (["info", str(tmp_path / "s")], ["query", str(tmp_path / "s"), "select * from segments"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            done = subprocess.run([sys.executable, "-m", "cli.featstore_cli", *args], stdout=write_end,
                                  stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2], timeout=120)
        finally:
            os.close(write_end)
        assert done.returncode in (0, 1) and done.stderr.decode() == "", done.stderr.decode()


def test_a_folder_made_by_a_command_that_fails_before_any_result_is_removed(tmp_path) -> None:
    from cli.common import removed_on_early_failure
    from featstore.training.run_folder import CHECKPOINT_NAME

    run = tmp_path / "run"
    with pytest.raises(RuntimeError), removed_on_early_failure(run, "run"):
        run.mkdir()
        (run / "config.json").write_text("{}")
        raise RuntimeError("the first batch could not be read")
    assert not run.exists()
    with pytest.raises(RuntimeError), removed_on_early_failure(run, "run"):
        run.mkdir()
        (run / CHECKPOINT_NAME).write_bytes(b"weights")
        raise RuntimeError("failed in epoch 3")
    assert (run / CHECKPOINT_NAME).exists()  # a result: kept for --resume
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError), removed_on_early_failure(tmp_path / "mine", "run"):
        raise RuntimeError("a folder that existed before is never removed")
    assert (tmp_path / "mine").is_dir()


def test_a_store_with_a_stored_segment_is_kept_and_an_empty_one_removed(tmp_path) -> None:
    from cli.common import removed_on_early_failure
    from featstore.store.reader import FeatureStore
    from featstore.store.schema import FieldSpec
    from tests.featstore.store.small_store import fill_store

    with pytest.raises(RuntimeError), removed_on_early_failure(tmp_path / "empty", "store"):
        FeatureStore.create(tmp_path / "empty", fields={"verb.global": FieldSpec("float16", (4,))})
        raise RuntimeError("the backbone could not be built")
    assert not (tmp_path / "empty").exists()
    with pytest.raises(RuntimeError), removed_on_early_failure(tmp_path / "partial", "store"):
        fill_store(tmp_path / "partial", 2)
        raise RuntimeError("killed in segment 3")
    assert len(FeatureStore.open(tmp_path / "partial").uids()) == 2


def test_finetune_that_fails_in_its_first_epoch_leaves_no_run_folder(tmp_path) -> None:
    from click.testing import CliRunner

    from cli.featstore_cli import main
    from tests.helpers.tiny_build import make_epic_dataset

    _, annotations = make_epic_dataset(tmp_path / "epic", n_segments=2)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "finetune", str(out), "--annotations", str(annotations), "--frames", str(tmp_path),  # the wrong root
        "--backbone", "r3d_18", "--target", "verb", "--recipe", "r50-3d", "--epochs", "1", "--limit", "2",
        "--clip-frames", "2", "--workers", "0", "--no-progress"])
    assert result.exit_code == 1 and "could not be read" in result.output, result.output
    assert not out.exists()
    again = CliRunner().invoke(main, ["finetune", str(out), "--annotations", str(annotations), "--frames",
                                      str(tmp_path / "nowhere"), "--backbone", "r3d_18", "--target", "verb",
                                      "--recipe", "r50-3d", "--no-progress"])
    assert "already holds a run" not in again.output  # the corrected command is not refused
