"""The README cannot drift from the code.

- The two newcomer commands at the top are the ones `.ci/run` runs (the test command verbatim).
- The bash block of "Try it on the demo store" runs, command by command, against a `--quick` demo
  built in a temporary folder (the `quick_demo` fixture of tests/conftest.py, shared per session).
- Every `featstore` / `heads` subcommand the README names anywhere exists (`--help` works), and
  every `--option` written after one is an option of that subcommand.
- The Python blocks of "From Python" run (the `StoreDataset` linear probe, the store's own calls)
  against a small store where the demo's would be.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli.featstore_cli import main as featstore_main
from cli.heads_cli import main as heads_main
from tests.conftest import QuickDemo
from tests.helpers.stores import make_small_store

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DEMO_SECTION = "## Try it on the demo store"
PYTHON_SECTION = "## From Python"
GROUPS: dict[str, click.Group] = {"featstore": featstore_main, "heads": heads_main}
SHELL_OPERATORS = {"&&", "||", ";", "|"}


# ------------------------------------------------------------------------------------------------
# reading the README


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return re.findall(r"^```([\w-]*)\n(.*?)^```", text, flags=re.S | re.M)


def inline_spans(text: str) -> list[str]:
    """Inline code spans outside the fenced blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def section(text: str, heading: str) -> str:
    """The text under a `## ` heading, up to the next one."""
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def logical_lines(block: str) -> list[str]:
    """A shell block's commands: continuation lines joined, blank and comment-only lines dropped."""
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip() and not current.lstrip().startswith("#"):
            lines.append(current.strip())
        current = ""
    return lines


def demo_commands(text: str) -> list[str]:
    """The commands of the bash block in "Try it on the demo store"."""
    blocks = [body for language, body in fenced_blocks(section(text, DEMO_SECTION)) if language == "bash"]
    assert len(blocks) == 1, f"{DEMO_SECTION!r} should hold exactly one bash block, found {len(blocks)}"
    return logical_lines(blocks[0])


def named_commands(text: str) -> list[tuple[str, str, list[str], str]]:
    """Every `featstore X ...` / `heads X ...` in the README's shell blocks and inline code.

    A program counts where a shell command starts: at the start of a line or span, after `&&`,
    `;` or `|`, or after torchrun's `--no-python`; a path to it (`.venv/bin/featstore`) counts too.
    Simple `NAME="..."` assignments of a block are expanded where `$NAME` is used.

    Returns:
        (program, subcommand, the arguments up to the next shell operator, the source line).
    """
    sources: list[str] = []
    for language, body in fenced_blocks(text):
        if language not in ("bash", "sh", "shell"):
            continue
        variables: dict[str, str] = {}
        for line in logical_lines(body):
            assignment = re.fullmatch(r"([A-Za-z_]\w*)=(.*)", line)
            if assignment:
                variables[assignment[1]] = " ".join(shlex.split(assignment[2]))
                continue
            for name, value in variables.items():
                line = re.sub(rf"\$\{{?{name}\}}?(?!\w)", value, line)
            sources.append(line)
    sources.extend(inline_spans(text))

    found = []
    for source in sources:
        try:
            tokens = shlex.split(source, comments=True)
        except ValueError:  # prose in backticks with an unbalanced quote: not a command
            continue
        for i, token in enumerate(tokens):
            program = token.rsplit("/", 1)[-1]
            if program not in GROUPS or i + 1 >= len(tokens):
                continue
            if i > 0 and tokens[i - 1] not in SHELL_OPERATORS | {"--no-python"}:
                continue
            args = []
            for arg in tokens[i + 2:]:
                if arg in SHELL_OPERATORS:
                    break
                args.append(arg)
            found.append((program, tokens[i + 1], args, source))
    return found


# ------------------------------------------------------------------------------------------------
# the first commands


def test_the_first_commands_set_up_and_run_the_demo_and_the_tests() -> None:
    text = README.read_text()
    first = section(text, "## First commands")
    commands = [line for language, body in fenced_blocks(first) if language == "bash" for line in logical_lines(body)]
    assert commands == [
        "python3 -m venv --system-site-packages .venv && .venv/bin/pip install -q -e . && .venv/bin/featstore demo",
        'python3 -m venv --system-site-packages .venv && .venv/bin/pip install -q -e ".[test]" '
        "$(ls ../shared/wheels/detectron2-*.whl 2>/dev/null) && .venv/bin/python .ci/newest_dependencies.py "
        "&& .venv/bin/python -m pytest -q -n auto",
    ]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, ".ci/run must run the README's test command verbatim"


# ------------------------------------------------------------------------------------------------
# the demo block runs


def _environment(workdir: Path) -> dict[str, str]:
    """PATH with this interpreter's `featstore` / `heads` first (the ones installed with the package);
    where they are not installed, small wrappers that run this checkout's CLI with this interpreter."""
    env = dict(os.environ)
    scripts = Path(sys.executable).parent
    if not all((scripts / name).is_file() for name in GROUPS):
        scripts = workdir / ".bin"
        scripts.mkdir(exist_ok=True)
        for name in GROUPS:
            wrapper = scripts / name
            wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m cli.{name}_cli "$@"\n')
            wrapper.chmod(0o755)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(scripts), env.get("PATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # small heads on a shared CPU: one thread each is faster, not slower
    return env


def test_the_demo_block_runs_against_a_demo(quick_demo: QuickDemo) -> None:
    commands = demo_commands(README.read_text())
    assert len(commands) >= 8
    covered = {(program, sub) for program, sub, _, _ in named_commands("```bash\n" + "\n".join(commands) + "\n```")}
    for wanted in (("featstore", "info"), ("featstore", "query"), ("featstore", "verify"), ("heads", "eval"),
                   ("heads", "score"), ("heads", "fuse"), ("heads", "ablate")):
        assert wanted in covered, f"the demo block should show {' '.join(wanted)}"
    env = _environment(quick_demo.root)
    assert shutil.which("featstore", path=env["PATH"]), "no featstore command to run"
    for command in commands:
        result = subprocess.run(["bash", "-c", f"set -euo pipefail\n{command}"], cwd=quick_demo.root, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (
            f"README command failed (exit {result.returncode}):\n  {command}\n"
            f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}")
    # What the commands said they made is there.
    out = quick_demo.out
    for made in ("val_predictions.parquet", "runs/fused/metrics.json", "runs/sap/metrics.json",
                 "ablation/results.md"):
        assert (out / made).is_file(), made


# ------------------------------------------------------------------------------------------------
# every command and option the README names exists


def _help(program: str, sub: str) -> str:
    result = CliRunner().invoke(GROUPS[program], [sub, "--help"])
    assert result.exit_code == 0, (
        f"README names `{program} {sub}`, but `{program} {sub} --help` fails:\n{result.output}")
    return result.output


def test_every_subcommand_and_option_in_the_readme_exists() -> None:
    named = named_commands(README.read_text())
    subcommands = {(program, sub) for program, sub, _, _ in named}
    # The README shows both tools at work: a parse that finds nothing would pass vacuously.
    assert {("featstore", "demo"), ("featstore", "build"), ("heads", "train"), ("heads", "submit")} <= subcommands
    helps = {key: _help(*key) for key in sorted(subcommands)}
    for program, sub, args, source in named:
        for arg in args:
            if not arg.startswith("--") or arg == "--":
                continue
            option = arg.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", helps[program, sub]), (
                f"README passes {option} to `{program} {sub}`, which has no such option:\n  {source}")


# ------------------------------------------------------------------------------------------------
# the Python blocks run


@pytest.mark.usefixtures("one_thread")
def test_the_from_python_blocks_run_on_a_small_store(tmp_path: Path, monkeypatch, capsys) -> None:
    # The heads' trainer block needs a store of SAOA's fields; heads/trainer.py's tests train from Python.
    blocks = [body for language, body in fenced_blocks(section(README.read_text(), PYTHON_SECTION))
              if language == "python" and "from heads" not in body]
    assert len(blocks) >= 2 and "StoreDataset" in blocks[0], f"{PYTHON_SECTION!r} should open with the probe"
    make_small_store(tmp_path / "demo-out", 48)  # demo-out/store, as the blocks name it
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, f"README.md, {PYTHON_SECTION}", "exec"), {"__name__": "readme_block"})  # noqa: S102
    printed = capsys.readouterr().out
    assert re.search(r"linear probe on verb.global: verb top-1 \d+\.\d% on 24 segments", printed), printed
