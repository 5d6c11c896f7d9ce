"""README "Reproduce the paper" cannot rot (issue 23).

- Every `featstore` / `heads` command of the section parses with the real click command (the files and
  folders it names are made empty in a temporary folder first), and the commands that have a config
  builder make their library config, which checks the settings together.
- The recipe is the report's: Table 1's builds load the stage-1 checkpoints the section trains on
  P01-P25 and the train/val detector (150k recipe); Table 2's load the ones trained on every training
  segment and the trainval detector; R(2+1)D-34 at 128 x 128 without cropping; clips at 60 fps.
- The flow ResNet50-3D's `python` line makes a 2-channel stem from a file in the RGB layout.
- `docs/readings.toml`, the ablation grid of the readings, loads and sets each reading both ways.
- Slow: the Table-1 chain at demo scale (stage 1 -> build from the stage-1 checkpoints and the
  train/val detector -> heads -> fuse), on the quick demo's sample and stage-1 verb net.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from click.testing import CliRunner

from cli.featstore_build import make_build_config
from cli.featstore_cli import main as featstore_main
from cli.featstore_finetune import make_finetune_config
from cli.featstore_finetune_detector import make_detector_finetune_config
from cli.heads_cli import main as heads_main
from cli.heads_cli import make_train_config
from tests.helpers.command_lines import ParsedLine, make_existing_paths
from heads.grid import load_grid
from tests.conftest import QuickDemo
from tests.helpers.threads import torch_threads

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Reproduce the paper"
GROUPS: dict[str, click.Group] = {"featstore": featstore_main, "heads": heads_main}
BUILDERS = {("featstore", "build"): lambda p: make_build_config(dict(p), command="c"),
            ("featstore", "finetune"): lambda p: make_finetune_config(dict(p), command="c"),
            ("featstore", "finetune-detector"): lambda p: make_detector_finetune_config(dict(p), command="c"),
            ("heads", "train"): lambda p: make_train_config(dict(p))}


# ------------------------------------------------------------------------------------------------
# reading the section


def _section(text: str, heading: str, level: str = "## ") -> str:
    start = text.index(heading)
    end = text.find(f"\n{level}", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def _bash_lines(text: str) -> list[str]:
    """The section's shell commands in order: continuations joined, comments dropped, variables expanded."""
    lines: list[str] = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        variables: dict[str, str] = {}
        current = ""
        for raw in body.splitlines():
            if raw.rstrip().endswith("\\"):
                current += raw.rstrip()[:-1] + " "
                continue
            line, current = (current + raw).strip(), ""
            if not line or line.startswith("#"):
                continue
            for name in sorted(variables, key=len, reverse=True):
                line = re.sub(rf"\$\{{?{name}\}}?(?!\w)", variables[name], line)
            assignments = [re.fullmatch(r"([A-Za-z_]\w*)=(.*)", token) for token in shlex.split(line)]
            if all(assignments):
                variables.update({m[1]: m[2] for m in assignments})  # type: ignore[index]
                continue
            lines.append(line)
    return lines


def _parse(lines: list[str], root: Path) -> list[ParsedLine]:
    parsed = []
    for line in lines:
        tokens = shlex.split(line)
        if Path(tokens[0]).name not in GROUPS:
            continue
        program, sub, argv = Path(tokens[0]).name, tokens[1], tokens[2:]
        group = GROUPS[program]
        command = group.get_command(click.Context(group), sub)
        assert command is not None, f"`{program} {sub}` is not a command:\n  {line}"
        make_existing_paths(command, sub, argv, root)
        try:
            params = command.make_context(sub, list(argv)).params
        except click.ClickException as err:
            raise AssertionError(f"README command does not parse ({err.format_message()}):\n  {line}") from err
        builder = BUILDERS.get((program, sub))
        if builder is not None:
            builder(params)  # the library config: refuses settings that do not go together
        parsed.append(ParsedLine(program, sub, params, line))
    return parsed


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[ParsedLine]]:
    """The section's commands, parsed, by table (the files they name made under a temporary folder)."""
    text = _section((REPO / "README.md").read_text(), SECTION)
    root = tmp_path_factory.mktemp("recipe")
    here = Path.cwd()
    os.chdir(root)
    try:
        return {table: _parse(_bash_lines(_section(text, f"### Table {table}", "### ")), root)
                for table in ("1", "2")}
    finally:
        os.chdir(here)


def _of(commands: list[ParsedLine], program: str, sub: str) -> list[ParsedLine]:
    return [c for c in commands if (c.program, c.sub) == (program, sub)]


# ------------------------------------------------------------------------------------------------
# the recipe is the report's


def test_every_command_of_the_recipe_parses_and_makes_its_config(recipe: dict[str, list[ParsedLine]]) -> None:
    for table, wanted in (("1", {("featstore", "finetune"): 10, ("featstore", "finetune-detector"): 1,
                                 ("featstore", "build"): 6, ("heads", "train"): 7, ("heads", "fuse"): 3,
                                 ("heads", "ablate"): 1}),
                          ("2", {("featstore", "finetune"): 10, ("featstore", "finetune-detector"): 1,
                                 ("featstore", "build"): 15, ("heads", "train"): 6, ("heads", "predict"): 12,
                                 ("heads", "fuse"): 6, ("heads", "submit"): 4})):
        counts = {key: len(_of(recipe[table], *key)) for key in wanted}
        assert counts == wanted, f"Table {table}"


@pytest.mark.parametrize(("table", "stage1", "split", "detector_recipe"), [
    ("1", "stage1/val", "epic55-lfb-train", "epic-train"), ("2", "stage1/full", "epic55-train", "epic-trainval")])
def test_builds_load_the_stage1_checkpoints_and_the_tables_detector(
        recipe: dict[str, list[ParsedLine]], table: str, stage1: str, split: str, detector_recipe: str) -> None:
    commands = recipe[table]
    finetuned = {}
    for run in _of(commands, "featstore", "finetune"):
        assert run.params["train_split"] == split, run.line
        assert run.params["val_split"] == ("epic55-lfb-val" if table == "1" else None), run.line
        name, init = run.params["backbone"].split(":", 1)
        assert init.startswith("data/checkpoints/"), f"stage 1 starts from a public file:\n  {run.line}"
        finetuned[f"{run.params['out']}/checkpoint.pt"] = (name, run.params["target"], run.params["modality"] or
                                                           ("flow" if run.params["recipe"].endswith("flow") else "rgb"))
    [detector] = _of(commands, "featstore", "finetune-detector")
    assert detector.params["recipe"] == detector_recipe and str(detector.params["out"]) == f"{stage1}/det"
    assert detector.params["val_where"] is None  # the recipe's: P26-P31 held out for epic-train only
    for build in _of(commands, "featstore", "build"):
        assert build.params["detector"] == f"detectron2:{stage1}/det/checkpoint.pt", build.line
        assert build.params["resample_fps"] == 60, build.line
        modality = build.params["modality"]
        for role in ("verb", "noun"):
            name, checkpoint = build.params[f"{role}_backbone"].split(":", 1)
            assert checkpoint.startswith(f"{stage1}/"), f"not a stage-1 checkpoint:\n  {build.line}"
            assert finetuned[checkpoint] == (name, role, modality), build.line
        r2plus1d = name == "r2plus1d_34"
        assert (build.params["resize"], build.params["size"]) == (("square", 128) if r2plus1d else (None, None))
    trained = {str(build.params["store"]) for build in _of(commands, "featstore", "build")}
    for run in _of(commands, "heads", "train"):
        assert str(run.params["store"]) in trained and run.params["train_split"] == split, run.line
        assert run.params["epochs"] == 15 and run.params["batch_size"] == 32
        assert (run.params["lr"], run.params["lr_steps"]) == (
            (1e-3, (11,)) if "i3d" in str(run.params["store"]) else (1e-4, ())), run.line


def test_table2_predicts_s1_and_s2_from_their_timestamps_and_submits_each_row(recipe: dict[str, list[ParsedLine]]) -> None:
    commands = recipe["2"]
    annotations = {str(b.params["store"]).split("/")[1]: {Path(x.params["annotations"]).name for x in
                   _of(commands, "featstore", "build") if str(x.params["store"]).split("/")[1] ==
                   str(b.params["store"]).split("/")[1]} for b in _of(commands, "featstore", "build")}
    assert annotations == {"full": {"EPIC_train_action_labels.csv"}, "s1": {"EPIC_test_s1_timestamps.csv"},
                           "s2": {"EPIC_test_s2_timestamps.csv"}}
    for predict in _of(commands, "heads", "predict"):
        test_set = str(predict.params["store"]).split("/")[1]
        assert predict.params["split"] == f"epic55-test-{test_set}" and str(predict.params["out"]).startswith(
            f"test/{test_set}/"), predict.line
    fused = {str(f.params["out"]): {Path(i).stem for i in f.params["inputs"]} for f in _of(commands, "heads", "fuse")}
    everything = {"sap_r50_rgb", "sap_r50_flow", "sap_r2p1d34_rgb", "saoa_r50_rgb", "saoa_i3d_rgb", "saoa_i3d_flow"}
    for test_set in ("s1", "s2"):
        assert fused[f"test/{test_set}/saoa_i3d_2stream"] == {"saoa_i3d_rgb", "saoa_i3d_flow"}
        assert fused[f"test/{test_set}/ensemble"] == everything
        assert fused[f"test/{test_set}/ensemble_without_ig"] == everything - {"sap_r2p1d34_rgb"}
    submitted = {Path(s.params["out"]).stem: (str(s.params["seen"]), str(s.params["unseen"]))
                 for s in _of(commands, "heads", "submit")}
    assert set(submitted) == {"sap_r50_rgb", "saoa_i3d_2stream", "ensemble_without_ig", "ensemble"}
    for row, (seen, unseen) in submitted.items():
        assert seen.startswith("test/s1/") and unseen.startswith("test/s2/") and Path(seen).stem == row


def test_the_flow_stem_line_makes_a_two_channel_stem(tmp_path: Path) -> None:
    text = _section((REPO / "README.md").read_text(), SECTION)
    [line] = [line for line in _bash_lines(text) if line.startswith(".venv/bin/python -c")]
    checkpoints = tmp_path / "data" / "checkpoints"
    checkpoints.mkdir(parents=True)
    stem = torch.randn(4, 3, 7, 7, 7)
    torch.save({"arch": "resnet-50", "state_dict": {"module.conv1.weight": stem, "module.fc.bias": torch.zeros(2)}},
               checkpoints / "r3d50_K_200ep.pth")
    argv = shlex.split(line)
    subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, check=True, timeout=120)
    made = torch.load(checkpoints / "r3d50_K_200ep_flow.pth")["state_dict"]
    assert made["module.conv1.weight"].shape == (4, 2, 7, 7, 7)
    torch.testing.assert_close(made["module.conv1.weight"][:, 1], stem.mean(1))


def test_the_readings_grid_sets_each_reading_both_ways() -> None:
    grid = load_grid(REPO / "docs" / "readings.toml")
    assert {run.config.train_split for run in grid.runs} == {"epic55-lfb-train"}
    settings = {(run.config.model, name, value) for run in grid.runs for name, value in run.config.switches.items()}
    assert {("saoa", "relation_norm", "unit"), ("saoa", "relation_norm", "keys"), ("saoa", "relation_norm", "none"),
            ("sap", "relation_norm", "none"),
            ("sap", "verb_objects", "local"), ("saoa", "normalize", True)} <= settings
    plain = {run.method for run in grid.runs if not run.config.switches}
    assert plain == {"saoa", "sap"}  # the defaults: rows normalised, SAP on the 6 s set, normalize from the store


# ------------------------------------------------------------------------------------------------
# the Table-1 chain at demo scale


@pytest.mark.timeout(600)
def test_the_table1_chain_runs_at_demo_scale(quick_demo: QuickDemo, tmp_path: Path) -> None:
    """Stage 1 (the quick demo's verb net, and a train/val detector: 2 iterations of the `epic-train`
    recipe) -> a build from those checkpoints -> SAP and SAOA -> their fusion, through the commands."""
    from cli.common import command_argv
    from cli.demo_recipe import DETECTOR_STAGE1, TRAINED_DETECTOR, VERBNET, build_params, detector_params
    from cli.featstore_build import build
    from cli.featstore_finetune_detector import finetune_detector
    from featstore.samples.kitchens import sample_paths

    out = quick_demo.out
    sample = sample_paths(out / "sample")
    verbnet = out / VERBNET / "checkpoint.pt"
    runner = CliRunner()

    def invoke(group: click.Group, argv: list[Any]) -> Any:
        with torch_threads(1):
            result = runner.invoke(group, [str(a) for a in argv], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    detector = tmp_path / "stage1" / "det"
    params = detector_params(sample, detector, quick=True, progress=False)
    params.update(recipe="epic-train", iterations=2, eval_every=2, lr_steps="2", min_size=96, max_size=128,
                  batch_size=2, warmup_iterations=1, roi_batch_size=16, rpn_proposals=50)
    assert DETECTOR_STAGE1["image_pattern"] == params["image_pattern"]
    invoke(featstore_main, ["finetune-detector", *command_argv(finetune_detector, params)])
    trained = json.loads((detector / "metrics.json").read_text())
    assert trained["complete"] and trained["n_val_images"] > 0  # P26-P31 held out, never trained on

    store = tmp_path / "stores" / "val" / "rgb"
    params = build_params(sample, store, verb_backbone=f"r3d_18:{verbnet}", trained_detector=detector / "checkpoint.pt",
                          progress=False, workers=0)
    params.update(det_min_size=96, det_max_size=128, resample_fps=8.0, det_feature="box-head")
    invoke(featstore_main, ["build", *command_argv(build, params)])
    provenance = json.loads((store / "manifest.json").read_text())["provenance"]
    assert provenance["verb_backbone"]["checkpoint"] == str(verbnet.resolve())  # stage 1, not a Kinetics file
    assert "finetune" in provenance["verb_backbone"]
    record = provenance["detector"]["finetune"]
    assert record["kind"] == "detector" and record["run"] == str(detector.resolve())
    assert "epic-train" in json.dumps(record["config"])
    assert provenance["detector"]["name"] == TRAINED_DETECTOR and provenance["detector"]["feature"] == "box-head"
    assert provenance["resample_fps"] == 8.0

    runs = tmp_path / "runs" / "val"
    common = ["--train", "epic55-lfb-train", "--val", "epic55-lfb-val", "--epochs", "2", "--batch-size", "8",
              "--lr", "0.03", "--no-progress"]
    for model in ("sap", "saoa"):
        invoke(heads_main, ["train", store, "--model", model, *common, "--out", runs / model])
        metrics = json.loads((runs / model / "metrics.json").read_text())
        assert metrics["normalize"]["value"] is False and metrics["normalize"]["source"] == "store"
        assert "participant_id <= 'P25'" in metrics["many_shot_actions"]["restricted_to"]
    config = json.loads((runs / "sap" / "config.json").read_text())
    assert config["switches"]["verb_objects"] == "global" and config["switches"]["relation_norm"] == "rows"
    invoke(heads_main, ["fuse", runs / "sap", runs / "saoa", "--out", runs / "fused"])
    fused = json.loads((runs / "fused" / "metrics.json").read_text())
    assert {"verb_top1", "noun_top1", "action_top1", "many_shot_actions"} <= set(fused)
    assert fused["many_shot_actions"] == json.loads((runs / "sap" / "metrics.json").read_text())["many_shot_actions"]
