"""`heads eval / score --per-class`: per-class accuracy, confusion matrices, per-participant table, names."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from featstore.samples.annotations import SegmentLabel, write_epic55_annotations
from heads.class_report import ClassNames, class_names, write_class_report
from heads.predictions import Predictions


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _predictions() -> tuple[Predictions, np.ndarray, np.ndarray, list[str]]:
    """Six segments: verbs right for P01, always verb 2 for P02; nouns right everywhere."""
    verbs, nouns = np.array([0, 1, 2, 0, 1, 2]), np.array([3, 4, 5, 3, 4, 5])
    verb_logits = np.zeros((6, 125), np.float32)
    verb_logits[np.arange(3), verbs[:3]] = 5
    verb_logits[3:, 2] = 5
    noun_logits = np.zeros((6, 352), np.float32)
    noun_logits[np.arange(6), nouns] = 5
    uids = tuple(f"s{i}" for i in range(6))
    return Predictions(uids, verb_logits, noun_logits), verbs, nouns, ["P01"] * 3 + ["P02"] * 3


def test_the_report_holds_per_class_confusion_and_per_participant_tables(tmp_path: Path) -> None:
    predictions, verbs, nouns, participants = _predictions()
    names = ClassNames({0: "take", 1: "put", 2: "open"}, {}, "test")
    report = write_class_report(tmp_path / "report", predictions, verbs, nouns, participants=participants, names=names)
    assert {p.name for p in report.files} == {
        "per_class_verb.csv", "per_class_noun.csv", "confusion_verb.csv", "confusion_noun.csv", "confusion_verb.png",
        "confusion_noun.png", "per_participant.csv", "summary.json"}
    per_verb = {row["name"]: row for row in _rows(tmp_path / "report" / "per_class_verb.csv")}
    assert per_verb["take"]["top1"] == "50.00" and per_verb["take"]["most_confused_with"] == "open"
    assert per_verb["open"]["top1"] == "100.00" and per_verb["open"]["segments"] == "2"
    confusion = {(r["true_name"], r["predicted_name"]): int(r["segments"])
                 for r in _rows(tmp_path / "report" / "confusion_verb.csv")}
    assert confusion == {("take", "take"): 1, ("take", "open"): 1, ("put", "put"): 1, ("put", "open"): 1,
                         ("open", "open"): 2}
    people = {r["participant"]: r for r in _rows(tmp_path / "report" / "per_participant.csv")}
    assert people["P01"]["verb_top1"] == "100.00" and people["P02"]["verb_top1"] == "33.33"
    assert people["P02"]["noun_top1"] == "100.00" and people["P01"]["segments"] == "3"
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["verb_mean_class_top1"] == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)
    assert summary["noun_mean_class_top1"] == 100.0 and summary == report.summary
    assert (tmp_path / "report" / "confusion_verb.png").read_bytes()[:4] == b"\x89PNG"


def test_names_come_from_the_class_lists_else_the_annotations_else_ids(tmp_path: Path) -> None:
    segments = [SegmentLabel("1", "P01", "P01_01", 1, 60, 0, 3), SegmentLabel("2", "P01", "P01_01", 61, 120, 1, 3)]
    annotations = write_epic55_annotations(tmp_path / "ann" / "train.csv", segments, verb_names={0: "take"},
                                           noun_names={3: "pan"})
    found = class_names("epic55", annotations=annotations)
    assert found.name("verb", 0) == "take" and found.name("verb", 1) == "verb1" and found.name("noun", 3) == "pan"
    assert found.name("noun", 9) == "noun 9" and found.source.startswith("annotations")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "EPIC_verb_classes.csv").write_text("verb_id,class_key\n" + "".join(f"{i},v{i}\n" for i in range(125)))
    (lists / "EPIC_noun_classes.csv").write_text("noun_id,class_key\n" + "".join(f"{i},n{i}\n" for i in range(352)))
    listed = class_names("epic55", meta_dir=lists, annotations=annotations)
    assert listed.name("verb", 0) == "v0" and listed.source == f"class lists in {lists}"
    assert class_names("epic55").name("verb", 4) == "verb 4"
