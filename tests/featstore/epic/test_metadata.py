"""The files that describe the segments: class lists (EpicMeta), video info (fps, size)."""
from __future__ import annotations

import pytest

from featstore.epic.annotations import AnnotationError, read_segments
from featstore.epic.metadata import EpicMeta, find_video_info, load_meta, read_video_info


def test_load_meta_epic55(epic55_dir):
    meta = load_meta(epic55_dir)
    assert isinstance(meta, EpicMeta) and meta.dataset == "epic55"
    assert (meta.num_verbs, meta.num_nouns) == (125, 352)
    assert meta.verb_classes[0] == "take" and meta.noun_classes[1] == "pan"
    assert (len(meta.many_shot_verbs), len(meta.many_shot_nouns), len(meta.many_shot_actions)) == (26, 71, 819)
    assert (12, 78) in meta.many_shot_actions
    assert not meta.tail_verbs and not meta.unseen_participants


def test_load_meta_epic100(epic100_dir):
    meta = load_meta(epic100_dir, "epic100")
    assert (meta.num_verbs, meta.num_nouns) == (97, 300)  # EPIC_100_noun_classes.csv, not _v2 (305)
    assert (len(meta.tail_verbs), len(meta.tail_nouns)) == (86, 228)
    assert meta.unseen_participants == {"P18", "P32", "P33", "P34", "P36"}
    assert not meta.many_shot_verbs


def test_load_meta_names_a_missing_file(epic55_dir, tmp_path):
    for name in ("EPIC_verb_classes.csv", "EPIC_noun_classes.csv", "EPIC_many_shot_verbs.csv"):
        (tmp_path / name).write_bytes((epic55_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="EPIC_many_shot_nouns.csv.*EPIC_many_shot_actions.csv"):
        load_meta(tmp_path)
    with pytest.raises(FileNotFoundError, match="EPIC_100_verb_classes.csv"):
        load_meta(tmp_path, "epic100")
    with pytest.raises(FileNotFoundError, match="cannot tell the dataset"):
        load_meta(tmp_path / "nowhere")


def test_load_meta_refuses_the_v2_noun_list(epic100_dir, tmp_path):
    for path in epic100_dir.glob("EPIC_100_*.csv"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "EPIC_100_noun_classes.csv").write_bytes((epic100_dir / "EPIC_100_noun_classes_v2.csv").read_bytes())
    with pytest.raises(AnnotationError, match="305 noun classes, expected 300"):
        load_meta(tmp_path)


def test_video_info(epic55_dir, epic100_dir):
    fps55 = read_video_info(epic55_dir / "EPIC_video_info.csv")
    fps100 = read_video_info(epic100_dir / "EPIC_100_video_info.csv")
    assert len(fps55) == 432 and len(fps100) == 700
    assert fps55["P01_01"] == pytest.approx(59.94, abs=0.01)
    assert all(isinstance(v, float) and v > 0 for v in fps100.values())
    assert find_video_info(epic55_dir / "EPIC_train_action_labels.csv") == epic55_dir / "EPIC_video_info.csv"
    # The derived train file sits one folder down; its video info is the parent's.
    derived = epic100_dir / "derived/EPIC_100_train_segments_derived.csv"
    assert find_video_info(derived) == epic100_dir / "EPIC_100_video_info.csv"
    every_video = set(read_segments(derived).column("video_id").to_pylist())
    assert every_video <= set(fps100)


def test_find_video_info_none_when_absent(tmp_path):
    path = tmp_path / "EPIC_test_s1_timestamps.csv"
    path.write_text("uid,participant_id,video_id,start_frame,stop_frame\n1,P01,P01_01,1,2\n")
    assert find_video_info(path) is None
