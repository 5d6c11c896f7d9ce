"""Late fusion: a run fused with itself is the run, weights behave as documented, bad inputs are refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from heads.actions import softmax
from heads.fusion import FusionError, comparison_table, fuse, fuse_predictions, parse_weights
from heads.metric_registry import metric_values
from heads.predictions import Predictions, read_predictions, write_predictions
from heads.trainer import TrainConfig, train
from tests.helpers.threads import torch_threads

TRAIN = "participant_id <= 'P25'"
VAL = "participant_id > 'P25'"


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def two_runs(planted_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fusion_runs")
    runs = []
    for model in ("saoa", "global"):
        config = TrainConfig(model=model, train_where=TRAIN, val_where=VAL, epochs=1, lr=0.05)
        with torch_threads(1):
            train(planted_store, root / model, config, progress=False, log=_quiet)
        runs.append(root / model)
    return runs[0], runs[1]


def _metrics(run: Path) -> dict[str, float]:
    """The metrics of a run's metrics.json (without its records: the head's `normalize`, the many-shot list)."""
    return metric_values(json.loads((run / "metrics.json").read_text()))


def test_a_run_fused_with_itself_is_the_run(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = two_runs
    original = read_predictions(run)
    by_logits = fuse([run, run], tmp_path / "logits", how="logits", log=_quiet)
    assert by_logits.predictions.uids == original.uids
    assert np.array_equal(by_logits.predictions.verb_logits, original.verb_logits)
    assert np.array_equal(by_logits.predictions.noun_logits, original.noun_logits)
    assert metric_values(by_logits.metrics) == _metrics(run)
    assert by_logits.metrics["many_shot_actions"] == json.loads((run / "metrics.json").read_text())["many_shot_actions"]
    by_probs = fuse([run, run], tmp_path / "probs", how="probs", log=_quiet)
    # Stored as log-probabilities: softmax gives back the run's probabilities, and every metric agrees.
    assert np.allclose(softmax(by_probs.predictions.verb_logits), softmax(original.verb_logits), atol=1e-6)
    assert np.allclose(np.exp(by_probs.predictions.noun_logits).sum(axis=1), 1.0, atol=1e-5)
    assert metric_values(by_probs.metrics) == pytest.approx(_metrics(run))
    for folder in (tmp_path / "logits", tmp_path / "probs"):
        assert (folder / "predictions.parquet").is_file() and (folder / "metrics.json").is_file()
        recorded = json.loads((folder / "fusion.json").read_text())
        assert recorded["weights"] == [0.5, 0.5] and recorded["label_source"]["kind"] == "run"


def test_the_inputs_are_scored_beside_the_fusion_on_the_same_segments(two_runs: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    saoa, baseline = two_runs
    result = fuse([saoa, baseline], tmp_path / "fused", log=_quiet)
    assert [name for name, _ in result.inputs] == [str(saoa), str(baseline)]
    # Both runs validated on the same segments: each input's metrics are its own run's.
    for run, (_, metrics) in zip(two_runs, result.inputs):
        assert metric_values(metrics) == pytest.approx(_metrics(run))
    recorded = json.loads((tmp_path / "fused" / "fusion.json").read_text())
    assert recorded["input_metrics"] == [m for _, m in result.inputs]
    table = comparison_table(result).splitlines()
    assert table[0].split()[:2] == ["Actions", "top-1"] and table[1].startswith(str(saoa))
    assert table[3].startswith("fused") and "240 fused segments" in table[4]


def test_weights_one_zero_give_the_first_input(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = (read_predictions(run) for run in two_runs)
    by_logits = fuse_predictions([first, second], weights="1,0", how="logits")
    assert np.array_equal(by_logits.verb_logits, first.verb_logits)
    assert np.array_equal(by_logits.noun_logits, first.noun_logits)
    by_probs = fuse(list(two_runs), tmp_path / "probs", weights=[3, 0], how="probs", log=_quiet)
    assert np.allclose(softmax(by_probs.predictions.noun_logits), softmax(first.noun_logits), atol=1e-6)
    assert metric_values(by_probs.metrics) == pytest.approx(_metrics(two_runs[0]))


@pytest.mark.parametrize("how", ["probs", "logits"])
def test_order_of_equally_weighted_inputs_does_not_matter(two_runs: tuple[Path, Path], how: str) -> None:
    first, second = (read_predictions(run) for run in two_runs)
    forward = fuse_predictions([first, second], how=how)
    backward = fuse_predictions([second, first], weights="2,2", how=how)  # normalised: the same weights
    assert np.array_equal(forward.verb_logits, backward.verb_logits)
    assert np.array_equal(forward.noun_logits, backward.noun_logits)
    # Fusion really mixes: the result is neither input.
    assert not np.array_equal(forward.verb_logits, first.verb_logits)


def test_fusion_keeps_the_shared_segments_in_the_first_inputs_order(two_runs: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    first, second = (read_predictions(run) for run in two_runs)
    part = second.subset(list(reversed(second.uids[10:])))
    write_predictions(tmp_path / "part.parquet", part)
    messages: list[str] = []
    result = fuse([two_runs[0], tmp_path / "part.parquet"], tmp_path / "fused", how="logits", log=messages.append)
    assert result.predictions.uids == first.uids[10:]
    assert any("10 of its 240 segments" in m for m in messages)
    expected = 0.5 * first.subset(first.uids[10:]).verb_logits.astype(np.float64) + \
        0.5 * second.subset(first.uids[10:]).verb_logits.astype(np.float64)
    assert np.array_equal(result.predictions.verb_logits, expected.astype(np.float32))
    # The predictions file has no labels, the run does; a fused folder is itself an input with labels.
    assert result.metrics is not None
    again = fuse([tmp_path / "fused", tmp_path / "fused"], tmp_path / "again", how="logits", log=_quiet)
    assert again.metrics == result.metrics


def test_annotations_give_labels_to_plain_predictions_files(planted_store: Path, two_runs: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    write_predictions(tmp_path / "a.parquet", read_predictions(two_runs[0]))
    unlabelled = fuse([tmp_path / "a.parquet"], tmp_path / "none", log=_quiet)
    assert unlabelled.metrics is None and not (tmp_path / "none" / "metrics.json").exists()
    annotations = planted_store.parent / "annotations" / "EPIC_train_action_labels.csv"
    scored = fuse([tmp_path / "a.parquet"], tmp_path / "scored", annotations=annotations, how="logits", log=_quiet)
    assert scored.metrics["verb_top1"] == _metrics(two_runs[0])["verb_top1"]
    # Many-shot actions: a plain file's training split is not known, unless given; a run brings its own.
    assert scored.metrics["many_shot_actions"]["restricted_to"] is None
    given = fuse([tmp_path / "a.parquet"], tmp_path / "given", annotations=annotations, train_where="participant_id <= 'P25'",
                 log=_quiet)
    assert "participant_id <= 'P25'" in given.metrics["many_shot_actions"]["restricted_to"]
    by_run = fuse([two_runs[0]], tmp_path / "run", annotations=annotations, log=_quiet)
    assert "training selection" in by_run.metrics["many_shot_actions"]["restricted_to"]


def test_inputs_that_cannot_be_fused_are_refused() -> None:
    rng = np.random.default_rng(0)

    def predictions(uids: list[str], verbs: int = 125) -> Predictions:
        return Predictions(tuple(uids), rng.normal(size=(len(uids), verbs)).astype(np.float32),
                           rng.normal(size=(len(uids), 352)).astype(np.float32))

    with pytest.raises(FusionError, match="share no segment"):
        fuse_predictions([predictions(["1", "2"]), predictions(["3"])])
    with pytest.raises(FusionError, match="different class counts"):
        fuse_predictions([predictions(["1"]), predictions(["1"], verbs=97)])
    with pytest.raises(FusionError, match="1 weight"):
        fuse_predictions([predictions(["1"]), predictions(["1"])], weights="1")
    with pytest.raises(FusionError, match="non-negative"):
        parse_weights("1,-1", 2)
    with pytest.raises(FusionError, match="sum to 0"):
        parse_weights([0, 0], 2)
    with pytest.raises(FusionError, match="unknown fusion"):
        fuse_predictions([predictions(["1"])], how="max")
    assert parse_weights("1,3", 2).tolist() == [0.25, 0.75]


def test_a_prior_file_never_counts_the_fused_segments(two_runs: tuple[Path, Path], planted_store: Path,
                                                      tmp_path: Path) -> None:
    run, _ = two_runs
    annotations = planted_store.parent / "annotations" / "EPIC_train_action_labels.csv"
    messages: list[str] = []
    result = fuse([run, run], tmp_path / "fused", how="logits", action_prior_from=annotations, log=messages.append)
    record = result.metrics.pop("action_prior")
    # The 240 fused (validation) segments are left out; the 240 rows left are the run's training selection,
    # so the prior is the run's own and so are the metrics.
    assert record == {"from": str(annotations.resolve()), "excluded_scored_segments": 240, "counted": 240}
    assert metric_values(result.metrics) == _metrics(run)
    assert json.loads((tmp_path / "fused" / "metrics.json").read_text())["action_prior"] == record
    assert any("240 scored segment(s) left out" in m for m in messages)
