"""The README cannot drift: its first commands match .ci/run, and every command it names exists."""
from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from cli.featstore_cli import main as featstore_main
from cli.heads_cli import main as heads_main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert lines[-1] in README


def test_the_first_command_runs_the_demo() -> None:
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "featstore demo" in first_block and "pip install" in first_block


def _code(text: str) -> str:
    """The README's code: fenced blocks and inline code spans (prose is left out)."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return "\n".join(blocks + spans)


def test_every_command_the_readme_names_exists() -> None:
    code = _code(README)
    for program, group in (("featstore", featstore_main), ("heads", heads_main)):
        named = set(re.findall(rf"\b{program} ([a-z]+)\b", code))
        assert len(named) >= 4, (program, named)
        for command in named:
            assert command in group.commands, f"README names `{program} {command}`, which does not exist"
            assert CliRunner().invoke(group, [command, "--help"]).exit_code == 0
