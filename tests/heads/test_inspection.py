"""`heads inspect RUN UID`: a segment's narration, label and the run's top-5 verbs, nouns and actions."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from featstore.training.run_folder import PREDICTIONS_NAME
from heads.inspection import inspect_segment
from heads.trainer import TrainConfig, TrainingError, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(planted_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inspect") / "run"
    train(planted_store, out, TrainConfig(model="global", train_where="participant_id <= 'P25'",
                                          val_where="participant_id > 'P25'", epochs=1, lr=0.05),
          progress=False, log=lambda _: None)
    return out


def test_a_validation_segment_is_read_from_the_run_s_predictions(run: Path) -> None:
    table = pq.read_table(run / PREDICTIONS_NAME).slice(0, 1).to_pylist()[0]
    seen = inspect_segment(run, table["uid"])
    assert seen.source == str(run / PREDICTIONS_NAME)
    assert [r.classes[0] for r in seen.top["verb"]] == table["verb_top5"]
    assert [r.classes for r in seen.top["action"]] == [(a["verb"], a["noun"]) for a in table["action_top5"]]
    assert seen.label["verb"][0] == table["verb_class"] and seen.segment["narration"]
    assert all(r.correct == (r.classes[0] == table["verb_class"]) for r in seen.top["verb"])
    probabilities = [r.score for r in seen.top["noun"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1
    text = seen.format()
    assert f"segment    {table['uid']}" in text and "narration  " in text and "verb top-5:" in text
    assert "action top-5:" in text and "names from annotations" in text  # the sample's verb / noun columns


def test_a_training_segment_is_predicted_from_the_weights_and_an_unknown_one_is_refused(run: Path,
                                                                                        planted_store: Path) -> None:
    from featstore.store.reader import FeatureStore

    uid = FeatureStore.open(planted_store).segments("participant_id <= 'P25'").column("uid")[0].as_py()
    seen = inspect_segment(run, uid)
    assert seen.source.startswith("the run's weights")
    assert len(seen.top["verb"]) == 5 and len(set(r.classes for r in seen.top["action"])) == 5
    with pytest.raises(TrainingError, match="'nope' is not in"):
        inspect_segment(run, "nope")
