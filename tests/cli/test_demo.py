"""`featstore demo`: the whole job on the generated sample, run through the CLI (`--quick`).

The quick demo is built once per test session (the `quick_demo` fixture of tests/conftest.py) and
shared with `tests/test_readme.py`, which runs the README's commands against the same folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import demo, demo_recipe, demo_results
from cli.featstore_build import build, make_build_config
from cli.featstore_cli import main
from cli.featstore_finetune import finetune, make_finetune_config
from cli.heads_cli import make_train_config, train
from featstore.samples import kitchens
from featstore.store.reader import FeatureStore
from heads.trainer import TrainConfig
from tests.conftest import QuickDemo
from tests.helpers.threads import torch_threads


def _recorded(out: Path) -> dict:
    return json.loads((out / demo.MARKER).read_text())


def test_quick_demo_writes_sample_store_runs_and_plots(quick_demo: QuickDemo) -> None:
    out = quick_demo.out
    sample = kitchens.sample_paths(out / "sample")
    for path in (sample.annotations, sample.video_info, sample.boxes, out / "grid.toml"):
        assert path.is_file(), path
    assert len(list((sample.frames / "P01" / "rgb_frames" / "P01_01").glob("frame_*.jpg"))) == \
        kitchens.QUICK_SAMPLE.segments_per_video * kitchens.SHOT_FRAMES

    # Stage 1: the verb net's run, complete, with the checkpoint the store below was built from.
    verbnet = out / demo_recipe.VERBNET
    recorded = json.loads((verbnet / "metrics.json").read_text())
    assert recorded["complete"] and recorded["epochs_done"] == demo_recipe.VERBNET_EPOCHS[True]
    assert (verbnet / "curves.png").stat().st_size > 0

    for folder, stage1 in (("store", True), ("store-random", False)):
        store = FeatureStore.open(out / folder)
        info = store.info()
        assert info["segments"] == {"ok": kitchens.QUICK_SAMPLE.n_segments, "failed": 0}
        assert {"verb.global", "verb.local", "noun.global", "det.global.feat", "det.local.box"} <= set(info["fields"])
        assert store.verify() == []
        provenance = info["manifest"]["provenance"]
        assert provenance["detector"]["name"] == demo_recipe.DETECTOR
        assert provenance["command"].startswith("featstore build ")
        verb = provenance["verb_backbone"]
        if stage1:  # the manifest records the fine-tune run beside the checkpoint's digest
            assert verb["checkpoint"] == str(verbnet / "checkpoint.pt")
            assert verb["checkpoint_sha256"] == hashlib.sha256((verbnet / "checkpoint.pt").read_bytes()).hexdigest()
            assert verb["finetune"]["config"]["settings"]["target"] == "verb"
        else:
            assert verb.get("checkpoint") is None

    for head in ("saoa", "global", "saoa-random", "global-random"):
        run = out / "runs" / head
        metrics = json.loads((run / "metrics.json").read_text())
        assert set(demo_recipe.METRICS) <= set(metrics)
        assert (run / "predictions.parquet").is_file()
        assert (run / "curves.png").stat().st_size > 0
    for plot in ("sample.png", "results.png"):
        assert (out / "plots" / plot).stat().st_size > 0


def test_quick_demo_prints_results_info_and_locations(quick_demo: QuickDemo) -> None:
    output = quick_demo.output
    lines = output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("features "))
    assert "head" in lines[header] and "verb top-1" in lines[header] and "action top-5" in lines[header]
    rows = [line[:18].split() for line in lines[header + 1:header + 7]]
    assert rows == [["random", "saoa"], ["random", "global"], ["stage", "1", "saoa"], ["stage", "1", "global"],
                    ["stage", "1", "r3d_18"], ["chance"]]
    # The verb net's own row has the verb columns only; chance has them all.
    assert lines[header + 5].split()[5:] == ["-"] * 4
    chance_row = [float(v) for v in lines[header + 6].split()[1:]]
    assert chance_row == pytest.approx([25.0, 100.0, 16.7, 83.3, 4.2, 20.8], abs=0.05)
    # The store's `featstore info`, as that command prints it.
    assert f"segments    {kitchens.QUICK_SAMPLE.n_segments} ok, 0 failed" in output
    assert "det.global.feat" in output
    # Where everything went.
    for name in ("sample", "verbnet", "store", "store-random", "runs/saoa", "runs/global", "runs/saoa-random",
                 "runs/global-random", "plots/sample.png", "plots/results.png", "grid.toml"):
        assert str(quick_demo.out / name) in output, name
    assert "heads train " in output and "featstore build " in output and "featstore finetune " in output
    # The table closes the output (after the info dump), followed only by its caption, the runs'
    # warnings (if any) and the timing.
    assert header > max(i for i, line in enumerate(lines) if line.startswith("fields"))
    assert lines[-1].startswith("done in ")
    warned = [w for run in (quick_demo.out / "verbnet", *(quick_demo.out / "runs").iterdir())
              for w in json.loads((run / "metrics.json").read_text())["warnings"]]
    for warning in warned:
        assert warning in output.split("WARNING (")[-1], warning  # beside the table


def test_quick_demo_is_above_chance(quick_demo: QuickDemo) -> None:
    # The quick sample scores 16 validation segments, too few for a margin on each head and task
    # alone; the seed is fixed, so these numbers are deterministic on one platform. What must hold
    # anywhere: each head on each store reads the verbs from motion, and the nouns come through the
    # pipeline for at least one head, well above a uniform guess (25% verbs, 16.7% nouns, 4.2%
    # actions). The quick schedule of stage 1 is too short to promise a lift over the random store:
    # tests/finetune/test_two_stages.py holds that on the full demo.
    recorded = _recorded(quick_demo.out)
    metrics, chance = recorded["metrics"], recorded["chance"]
    assert metrics[demo_recipe.VERBNET]["verb_top1"] >= chance["verb_top1"] + 25, metrics[demo_recipe.VERBNET]
    for head in ("saoa", "global", "saoa-random", "global-random"):
        assert metrics[head]["verb_top1"] >= chance["verb_top1"] + 25, (head, metrics[head])
    heads = [m for name, m in metrics.items() if name != demo_recipe.VERBNET]
    assert max(m["noun_top1"] for m in heads) >= chance["noun_top1"] + 25, metrics
    assert max(m["action_top1"] for m in heads) >= chance["action_top1"] + 15, metrics


def test_rerun_into_its_own_folder_reuses_everything(quick_demo: QuickDemo) -> None:
    before = _recorded(quick_demo.out)["metrics"]
    result = CliRunner().invoke(main, ["demo", str(quick_demo.out), "--quick", "--no-progress"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "reusing" in result.output
    assert ("reused sample, verbnet, store-random, store, runs/saoa-random, runs/global-random, runs/saoa, "
            "runs/global") in result.output
    assert _recorded(quick_demo.out)["metrics"] == before


def test_refuses_a_non_empty_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["demo", str(tmp_path), "--quick"])
    assert result.exit_code == 1
    assert "is not empty and is not a featstore demo output" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_demo_of_other_settings_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "manifest.json").write_text("{}")
    (tmp_path / "mine.txt").write_text("kept")
    (tmp_path / demo.MARKER).write_text(json.dumps({"key": {"version": demo.DEMO_VERSION, "quick": True, "seed": 7}}))
    messages: list[str] = []
    state = demo.prepare_out(demo.DemoConfig(out=tmp_path, quick=True, seed=0), messages.append)
    assert state["done"] == [] and "replacing it" in messages[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.MARKER, "mine.txt"]


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_the_sample_is_reproducible_and_balanced(tmp_path: Path) -> None:
    spec = kitchens.SampleSpec(("P01",), ("P26",), videos_per_participant=1, segments_per_video=4)
    first = kitchens.generate_sample(tmp_path / "a", spec, seed=3)
    kitchens.generate_sample(tmp_path / "b", spec, seed=3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert len(first.segments) == 8
    assert {s.participant_id for s in first.segments} == {"P01", "P26"}
    assert {s.verb_class for s in first.segments} <= set(kitchens.VERBS)
    # Every frame of every shot has a box per object, the active object's labelled with its noun.
    rows = (tmp_path / "a" / "boxes.csv").read_text().splitlines()
    assert rows[0] == "video_id,frame,x1,y1,x2,y2,score,label"
    assert len(rows) - 1 == 2 * 4 * kitchens.SHOT_FRAMES * 3


def test_chance_is_a_uniform_guess_among_the_classes() -> None:
    chance = demo_results.chance_metrics(4, 6, 24)
    assert chance["verb_top1"] == 25.0 and chance["verb_top5"] == 100.0
    assert chance["noun_top5"] == pytest.approx(500 / 6)
    assert chance["action_top5"] == pytest.approx(500 / 24)


def _printed(output: str, prog: str) -> list[list[str]]:
    """The argv of every ``prog ...`` command line the demo printed (after its ``[n/5] stage:`` prefix)."""
    stages = [line.split(": ", 1)[1] for line in output.splitlines() if re.match(r"\[\d/5\] [\w ]+: ", line)]
    return [shlex.split(line)[len(prog.split()):] for line in stages if line.startswith(prog + " ")]


def test_printed_commands_are_the_real_commands_of_the_params_the_demo_ran(quick_demo: QuickDemo) -> None:
    out = quick_demo.out
    sample = kitchens.sample_paths(out / "sample")
    # Parsing each printed line with the real command (an unknown flag would be refused) gives the
    # very parameters, and so the very config, the demo ran with.
    [printed_finetune] = _printed(quick_demo.output, "featstore finetune")
    finetune_params = demo_recipe.verbnet_params(sample, out / demo_recipe.VERBNET, quick=True, progress=False)
    parsed = finetune.make_context("finetune", list(printed_finetune)).params
    assert parsed == finetune_params
    assert make_finetune_config(dict(parsed)) == make_finetune_config(dict(finetune_params))
    config = json.loads((out / demo_recipe.VERBNET / "config.json").read_text())
    assert shlex.split(config["settings"]["command"])[2:] == printed_finetune

    printed_builds = _printed(quick_demo.output, "featstore build")
    assert len(printed_builds) == len(demo_recipe.STORES)
    for store, printed_build in zip(demo_recipe.STORES, printed_builds):
        verb = demo_recipe.VERB_BACKBONE
        if store.stage1:
            verb = f"{verb}:{out / demo_recipe.VERBNET / 'checkpoint.pt'}"
        build_params = demo_recipe.build_params(sample, out / store.folder, verb_backbone=verb, progress=False)
        parsed = build.make_context("build", list(printed_build)).params
        assert parsed == build_params
        assert make_build_config(parsed, command="c") == make_build_config(build_params, command="c")
        manifest = json.loads((out / store.folder / "manifest.json").read_text())
        assert shlex.split(manifest["provenance"]["command"])[2:] == printed_build

    printed_train = _printed(quick_demo.output, "heads train")
    runs = [(store, head) for store in demo_recipe.STORES for head in demo_recipe.HEADS]
    assert len(printed_train) == len(runs)
    for (store, head), argv in zip(runs, printed_train):
        run = out / "runs" / (head.name + store.key)
        params = head.params(out / store.folder, run, seed=0, device="cpu", progress=False, quick=True)
        parsed = train.make_context("train", list(argv)).params
        assert parsed == params
        assert make_train_config(parsed) == make_train_config(params)
        # What the run recorded is that config (with the dataset it found in the store).
        raw = json.loads((run / "config.json").read_text())
        recorded = TrainConfig.from_json(raw)
        config = make_train_config(params)
        # config.json holds every switch with its effective value; the given ones as given.
        assert {k: v for k, v in recorded.switches.items() if raw["switch_sources"][k] == "given"} == config.switches
        assert recorded == dataclasses.replace(config, dataset="epic55", switches=recorded.switches)


# The wiring of `--train-detector` only: that the detector learns the demo's objects is
# tests/finetune/test_detector.py's "Done when". Here its stage 1 runs 2 iterations at the frames' own
# 96 px (and the builds detect at that size), and the sample and the verb net come from the quick demo,
# as a rerun of an interrupted `--quick --train-detector` demo would find them: that stage does not
# depend on --train-detector.
@pytest.mark.timeout(600)
def test_train_detector_runs_stage_1_and_builds_without_the_boxes(quick_demo: QuickDemo, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from cli.featstore_finetune_detector import finetune_detector, make_detector_finetune_config

    monkeypatch.setitem(demo_recipe.DETECTOR_ITERATIONS, True, 2)
    monkeypatch.setattr(demo_recipe, "TRAINED_DETECTOR_SIZE", (96, 128))
    for name, value in dict(min_size=96, max_size=128, batch_size=2, warmup_iterations=1, roi_batch_size=16,
                            rpn_proposals=50).items():
        monkeypatch.setitem(demo_recipe.DETECTOR_STAGE1, name, value)
    out = tmp_path / "demo"
    for stage in ("sample", demo_recipe.VERBNET):
        shutil.copytree(quick_demo.out / stage, out / stage)
    key = demo.DemoConfig(out=out, quick=True, train_detector=True).key()
    (out / demo.MARKER).write_text(json.dumps({"key": key, "done": ["sample", demo_recipe.VERBNET]}))

    with torch_threads(1):  # as the quick demo: the test machines' cores are shared
        result = CliRunner().invoke(main, ["demo", str(out), "--quick", "--train-detector", "--no-progress"],
                                    catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "reused sample, verbnet" in result.output
    run = out / "detector"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["complete"] and metrics["iterations_done"] == 2
    [printed] = _printed(result.output, "featstore finetune-detector")
    sample = kitchens.sample_paths(out / "sample")
    params = demo_recipe.detector_params(sample, run, quick=True, progress=False)
    parsed = finetune_detector.make_context("finetune-detector", list(printed)).params
    assert parsed == params
    assert make_detector_finetune_config(dict(parsed)) == make_detector_finetune_config(dict(params))
    printed_builds = _printed(result.output, "featstore build")
    assert len(printed_builds) == len(demo_recipe.STORES)
    for printed_build in printed_builds:  # both stores take the stage-1 detector
        assert "--boxes" not in printed_build
        assert f"{demo_recipe.TRAINED_DETECTOR}:{run / 'checkpoint.pt'}" in printed_build
    if metrics["map_50"] is not None and metrics["map_50"] < 1:  # two iterations: it finds nothing, and says so
        assert "detector: mAP@0.5 is" in result.output.split("WARNING (")[-1]
    detector = json.loads((out / "store" / "manifest.json").read_text())["provenance"]["detector"]
    assert detector["finetune"]["kind"] == "detector" and detector["classes"]["num_classes"] >= 24
    assert FeatureStore.open(out / "store").boxes().num_rows > 0
