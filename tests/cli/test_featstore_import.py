"""`featstore import` on the command line: each published layout, an option its format does not take,
a pickle that would run code; `featstore query` over an imported store answers as over a built one;
`heads train` and `heads ablate` run on stores imported from RULSTM's and ActionFormer's layouts."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from cli.featstore_cli import main as featstore
from cli.heads_cli import main as heads
from featstore.epic.annotations import read_segments
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.published import write_lfb_frame_list, write_python2_pickle, write_ta3n_pickle
from featstore.store.reader import FeatureStore
from tests.helpers.published_sets import (
    video_seconds,
    write_actionformer_source,
    write_epic100_pickle,
    write_rulstm_source,
)
from tests.helpers.tiny_build import make_epic_dataset, tiny_build

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN, VAL = "participant_id <= 'P25'", "participant_id > 'P25'"


def _invoke(program, *args: object) -> Result:
    return CliRunner().invoke(program, [str(a) for a in args])


def _annotations(root: Path, n: int = 16) -> Path:
    return write_epic55_annotations(root / "EPIC_train_action_labels.csv",
                                    generate_segments(n, num_verbs=3, num_nouns=4, frames_per_segment=90))


def _rulstm_store(root: Path) -> Path:
    annotations = _annotations(root)
    write_rulstm_source(root / "rulstm", annotations)
    result = _invoke(featstore, "import", root / "store", "--annotations", annotations, "--from", root / "rulstm",
                     "--format", "rulstm-lmdb", "--no-progress")
    assert result.exit_code == 0 and "imported 16, already stored 0, failed 0" in result.output, result.output
    return root / "store"


def test_each_published_layout_imports_from_the_command_line(tmp_path: Path) -> None:
    store = _rulstm_store(tmp_path / "rulstm")
    assert FeatureStore.open(store).manifest["provenance"]["import_format"] == "rulstm-lmdb"

    annotations = _annotations(tmp_path)
    write_actionformer_source(tmp_path / "af", annotations)
    result = _invoke(featstore, "import", tmp_path / "af-store", "--annotations", annotations, "--from",
                     tmp_path / "af", "--format", "per-video-series", "--preset", "actionformer-epic-slowfast",
                     "--pool", "nearest", "--no-progress")
    assert result.exit_code == 0 and "imported 16" in result.output, result.output
    publisher = FeatureStore.open(tmp_path / "af-store").manifest["provenance"]["publisher"]
    assert (publisher["preset"], publisher["pool"]) == ("actionformer-epic-slowfast", "nearest")

    epic100 = write_epic100_pickle(tmp_path / "EPIC_100_train.pkl", 4)
    uids = [str(u) for u in read_segments(epic100).column("uid").to_pylist()]
    source = write_ta3n_pickle(tmp_path / "source_train.pkl", {"RGB": np.ones((4, 25, 16), np.float32)}, uids)
    result = _invoke(featstore, "import", tmp_path / "ta3n-store", "--annotations", epic100, "--from", source,
                     "--format", "narration-pickle", "--pool", "mean", "--no-progress")
    assert result.exit_code == 0 and "imported 4" in result.output, result.output

    frames = {video: list(range(0, int(seconds) * 30, 30)) for video, seconds in video_seconds(annotations).items()}
    rng = np.random.default_rng(0)
    bank = [{f: rng.standard_normal((3, 2048)).astype(np.float32) for f in fs} for fs in frames.values()]
    frame_list = write_lfb_frame_list(tmp_path / "train.csv", frames)
    write_python2_pickle(tmp_path / "train_lfb.pkl", bank)
    result = _invoke(featstore, "import", tmp_path / "lfb-store", "--annotations", annotations, "--from",
                     tmp_path / "train_lfb.pkl", "--format", "lfb-noun-bank", "--videos", frame_list, "--no-progress")
    assert result.exit_code == 0 and "imported 16" in result.output, result.output


def test_heads_train_on_the_lfb_bank_alone_and_heads_that_need_boxes_say_so(tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, 8)
    frames = {video: list(range(0, int(seconds) * 30, 30)) for video, seconds in video_seconds(annotations).items()}
    rng = np.random.default_rng(0)
    write_python2_pickle(tmp_path / "train_lfb.pkl",
                         [{f: rng.standard_normal((3, 2048)).astype(np.float32) for f in fs} for fs in frames.values()])
    frame_list = write_lfb_frame_list(tmp_path / "train.csv", frames)
    assert _invoke(featstore, "import", tmp_path / "store", "--annotations", annotations, "--from",
                   tmp_path / "train_lfb.pkl", "--format", "lfb-noun-bank", "--videos", frame_list,
                   "--no-progress").exit_code == 0
    trained = _invoke(heads, "train", tmp_path / "store", "--model", "vectors", "--verb-fields", "det.global.feat",
                      "--noun-fields", "det.global.feat", "--train-where", TRAIN, "--val-where", VAL, "--epochs", 1,
                      "--out", tmp_path / "run", "--no-progress")
    assert trained.exit_code == 0, trained.output
    refused = _invoke(heads, "train", tmp_path / "store", "--model", "saoa", "--out", tmp_path / "saoa",
                      "--no-progress")
    errors = [line for line in refused.output.splitlines() if line.startswith("Error:")]
    assert refused.exit_code == 1 and len(errors) == 1 and "Traceback" not in refused.output, refused.output
    assert "come without boxes" in errors[0] and "det.local.feat" in errors[0]


def test_an_option_the_format_does_not_take_and_a_wrong_preset_are_one_line(tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, 2)
    write_rulstm_source(tmp_path / "rulstm", annotations, modalities={"rgb": 1024})
    result = _invoke(featstore, "import", tmp_path / "s", "--annotations", annotations, "--from", tmp_path / "rulstm",
                     "--format", "rulstm-lmdb", "--preset", "actionformer-epic-slowfast")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "Error: --format rulstm-lmdb does not take --preset; its options are: --check-dims, --fps, --modalities, "
        "--pool, --prefix"]
    write_actionformer_source(tmp_path / "af", annotations, dim=1024)
    result = _invoke(featstore, "import", tmp_path / "s", "--annotations", annotations, "--from", tmp_path / "af",
                     "--format", "per-video-series", "--preset", "actionformer-epic-slowfast")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "features are 1024-d; --preset actionformer-epic-slowfast expects 2304-d" in result.output
    assert not (tmp_path / "s").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo ran > ran.txt",))


def test_a_pickle_that_would_run_code_is_refused_in_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    annotations = _annotations(tmp_path, 2)
    (tmp_path / "bank.pkl").write_bytes(pickle.dumps([{0: _Payload()}], protocol=2))
    result = _invoke(featstore, "import", tmp_path / "s", "--annotations", annotations, "--from",
                     tmp_path / "bank.pkl", "--format", "lfb-noun-bank", "--videos", annotations)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "refused: it names posix.system" in result.output and not (tmp_path / "ran.txt").exists()


@pytest.mark.slow  # ~10 s: a real (tiny) `featstore build` to compare with
def test_query_over_an_imported_store_answers_as_over_a_built_one(tmp_path: Path) -> None:
    frames, annotations = make_epic_dataset(tmp_path, n_segments=6)
    assert tiny_build(tmp_path / "built", annotations, frames).exit_code == 0
    write_rulstm_source(tmp_path / "rulstm", annotations, modalities={"flow": 1024})
    assert _invoke(featstore, "import", tmp_path / "imported", "--annotations", annotations, "--from",
                   tmp_path / "rulstm", "--format", "rulstm-lmdb", "--no-progress").exit_code == 0
    for sql in ("select uid, participant_id, video_id, start_frame, stop_frame, start_timestamp, verb_class, "
                "noun_class, status, error from segments order by uid",
                "select verb_class, count(*) n from segments where status = 'ok' group by 1 order by 1",
                "select count(*) from boxes where uid = 's9'"):
        built = _invoke(featstore, "query", tmp_path / "built", sql, "--format", "json")
        imported = _invoke(featstore, "query", tmp_path / "imported", sql, "--format", "json")
        assert built.exit_code == imported.exit_code == 0, imported.output
        assert json.loads(imported.output) == json.loads(built.output)
    fields = _invoke(featstore, "query", tmp_path / "imported", "select field from fields order by field", "--format",
                     "csv")
    assert fields.output.split() == ["field", "rulstm.flow", "rulstm.flow.frames"]


def test_heads_train_runs_on_stores_imported_from_rulstm_and_actionformer(tmp_path: Path) -> None:
    store = _rulstm_store(tmp_path / "rulstm")
    result = _invoke(heads, "train", store, "--model", "vectors", "--verb-fields", "rulstm.flow",
                     "--noun-fields", "rulstm.rgb,rulstm.obj", "--train-where", TRAIN, "--val-where", VAL,
                     "--epochs", 1, "--out", tmp_path / "run-rulstm", "--no-progress")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run-rulstm" / "config.json").read_text())
    assert config["switches"]["noun_fields"] == "rulstm.rgb,rulstm.obj"
    assert (tmp_path / "run-rulstm" / "metrics.json").is_file()

    annotations = _annotations(tmp_path)
    write_actionformer_source(tmp_path / "af", annotations)
    assert _invoke(featstore, "import", tmp_path / "af-store", "--annotations", annotations, "--from",
                   tmp_path / "af", "--format", "per-video-series", "--preset", "actionformer-epic-slowfast",
                   "--no-progress").exit_code == 0
    result = _invoke(heads, "train", tmp_path / "af-store", "--model", "vectors", "--verb-fields",
                     "actionformer.slowfast", "--noun-fields", "actionformer.slowfast", "--train-where", TRAIN,
                     "--val-where", VAL, "--epochs", 1, "--out", tmp_path / "run-af", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run-af" / "metrics.json").is_file()

    refused = _invoke(heads, "train", store, "--model", "vectors", "--verb-fields", "rulstm.depth",
                      "--out", tmp_path / "run-bad", "--no-progress")
    assert refused.exit_code == 1 and "rulstm.depth" in refused.output and "Traceback" not in refused.output


def test_heads_ablate_runs_on_an_imported_store(tmp_path: Path) -> None:
    store = _rulstm_store(tmp_path)
    grid = tmp_path / "grid.toml"
    grid.write_text(f"""\
[base]
train_where = "{TRAIN}"
val_where = "{VAL}"
epochs = 1
model = "vectors"

[[run]]
name = "flow-verbs"
verb_fields = "rulstm.flow"
noun_fields = "rulstm.rgb,rulstm.obj"

[[run]]
name = "rgb-verbs"
verb_fields = "rulstm.rgb"
noun_fields = "rulstm.obj"
""")
    result = _invoke(heads, "ablate", store, "--grid", grid, "--out", tmp_path / "ablation")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "ablation").iterdir()} >= {"flow-verbs", "rgb-verbs", "results.parquet"}
