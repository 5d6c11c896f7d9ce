"""Per-class and per-participant results of one set of predictions: the tables a paper shows besides Table 1.

`heads eval --per-class DIR` and `heads score --per-class DIR` write (`write_class_report`)::

    DIR/per_class_verb.csv      class, name, segments, top1, top5 (%), most_confused_with
    DIR/per_class_noun.csv
    DIR/confusion_verb.csv      true, true_name, predicted, predicted_name, segments (the non-zero cells)
    DIR/confusion_noun.csv
    DIR/confusion_verb.png      the most frequent classes' rows, each normalised to 1
    DIR/confusion_noun.png
    DIR/per_participant.csv     participant, segments, verb / noun / action top-1 (%)
    DIR/summary.json            mean class accuracy (top-1, top-5) per task, and where the names came from

Class names come from the dataset's class lists (``EPIC_verb_classes.csv``, ...) in the meta folder,
else from the annotation file's ``verb`` / ``noun`` columns (the most frequent key of each class),
else they are the class ids. The numbers are `heads.metrics`' pure functions.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from featstore.epic.metadata import read_class_names
from featstore.io.atomic import atomic_write_csv, atomic_write_json
from featstore.io.figures import pyplot, save_figure
from heads.actions import action_scores, rank_classes
from heads.metrics import confusion_matrix, group_top1, mean_class_accuracy, per_class_accuracy
from heads.predictions import Predictions

__all__ = ["CONFUSION_CLASSES", "ClassNames", "ClassReport", "class_names", "write_class_report"]

CONFUSION_CLASSES = 20  # rows of the confusion picture: the classes with the most evaluated segments
TASKS = ("verb", "noun")


@dataclass(frozen=True)
class ClassNames:
    """Readable class names: index -> key per task, and where they came from.

    Attributes:
        verbs: verb class -> key (``take``); classes it lacks print as their id.
        nouns: noun class -> key.
        source: ``class lists in DIR``, ``annotations FILE`` or ``class ids``.
    """

    verbs: Mapping[int, str] = field(default_factory=dict)
    nouns: Mapping[int, str] = field(default_factory=dict)
    source: str = "class ids"

    def name(self, task: str, class_id: int) -> str:
        names = self.verbs if task == "verb" else self.nouns
        return names.get(int(class_id), f"{task} {int(class_id)}")


def _names_from_annotations(path: Path) -> tuple[dict[int, str], dict[int, str]] | None:
    from featstore.epic.annotations import AnnotationError, read_annotation_rows

    try:
        frame = read_annotation_rows(path)
    except AnnotationError:
        return None
    out = []
    for task in TASKS:
        if task not in frame.columns or f"{task}_class" not in frame.columns:
            return None
        counts: dict[int, Counter] = {}
        for key, class_id in zip(frame[task].astype(str), frame[f"{task}_class"].astype(str)):
            if class_id.strip().lstrip("-").isdigit() and key:
                counts.setdefault(int(class_id), Counter())[key] += 1
        out.append({class_id: counter.most_common(1)[0][0] for class_id, counter in counts.items()})
    return out[0], out[1]


def class_names(dataset: str, *, meta_dir: str | os.PathLike | None = None,
                annotations: str | os.PathLike | None = None) -> ClassNames:
    """The names to print for ``dataset``'s classes.

    Args:
        dataset: ``epic55`` or ``epic100``.
        meta_dir: a folder with the dataset's class lists (``--meta-dir``), or None.
        annotations: an annotation file with ``verb`` / ``noun`` key columns, or None.
    Returns:
        Names from the class lists, else the annotation file, else none (ids).
    """
    for folder in (meta_dir, None if annotations is None else Path(annotations).parent):
        lists = read_class_names(folder, dataset) if folder is not None else None
        if lists is not None:
            return ClassNames(dict(enumerate(lists[0])), dict(enumerate(lists[1])), f"class lists in {folder}")
    if annotations is not None and Path(annotations).is_file():
        found = _names_from_annotations(Path(annotations))
        if found is not None:
            return ClassNames(found[0], found[1], f"annotations {annotations}")
    return ClassNames()


@dataclass(frozen=True)
class ClassReport:
    """What `write_class_report` wrote.

    Attributes:
        out: the folder.
        summary: mean class accuracy per task and k (``verb_mean_class_top1``, ...; percent).
        files: the files written.
    """

    out: Path
    summary: dict[str, Any]
    files: tuple[Path, ...]


def _plot_confusion(path: Path, matrix: np.ndarray, labels: np.ndarray, task: str, names: ClassNames) -> Path:
    """The rows of the most frequent true classes, normalised, against the same classes and 'other'."""
    plt = pyplot()
    counts = np.bincount(labels, minlength=matrix.shape[0])
    shown = [int(c) for c in np.argsort(-counts, kind="stable")[:CONFUSION_CLASSES] if counts[c] > 0]
    rows = matrix[shown][:, shown].astype(np.float64)  # (S, S)
    other = matrix[shown].sum(axis=1) - rows.sum(axis=1)  # (S,) predicted outside the shown classes
    table = np.concatenate([rows, other[:, None]], axis=1)
    table /= np.maximum(table.sum(axis=1, keepdims=True), 1)
    tick = [names.name(task, c)[:18] for c in shown]
    size = 2.5 + 0.32 * len(shown)
    fig, ax = plt.subplots(figsize=(size + 0.4, size))
    image = ax.imshow(table, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(shown) + 1), tick + ["(other)"], rotation=90, fontsize=7)
    ax.set_yticks(range(len(shown)), tick, fontsize=7)
    ax.set(xlabel=f"predicted {task}", ylabel=f"true {task}",
           title=f"{task} confusion: the {len(shown)} most frequent classes (rows sum to 1)")
    ax.title.set_fontsize(9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def write_class_report(out: str | os.PathLike, predictions: Predictions, verb_labels: np.ndarray,
                       noun_labels: np.ndarray, *, participants: Sequence[str] | None = None,
                       names: ClassNames | None = None, prior: np.ndarray | None = None) -> ClassReport:
    """Write the per-class, confusion and per-participant tables of labelled predictions into ``out``.

    Args:
        out: the folder (made).
        predictions: (N, V) and (N, Nn) logits.
        verb_labels: (N,) verb classes.
        noun_labels: (N,) noun classes.
        participants: (N,) participant ids, or None (no per-participant table).
        names: readable class names (`class_names`); None: ids.
        prior: the action prior the action top-1 uses, or None.
    Returns:
        The report: its files and the mean class accuracies.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = names or ClassNames()
    labels = {"verb": np.asarray(verb_labels, dtype=np.int64), "noun": np.asarray(noun_labels, dtype=np.int64)}
    logits = {"verb": predictions.verb_logits, "noun": predictions.noun_logits}
    summary: dict[str, Any] = {"segments": len(predictions.uids), "names": names.source}
    files: list[Path] = []
    for task in TASKS:
        num_classes = logits[task].shape[1]
        top1 = rank_classes(logits[task])[:, 0]
        matrix = confusion_matrix(top1, labels[task], num_classes)  # (K, K)
        rows = []
        for class_id, (n, hits1, hits5) in per_class_accuracy(logits[task], labels[task], (1, 5)).items():
            wrong = matrix[class_id].copy()
            wrong[class_id] = 0
            confused = names.name(task, int(wrong.argmax())) if wrong.any() else ""
            rows.append((class_id, names.name(task, class_id), n, f"{100 * hits1 / n:.2f}", f"{100 * hits5 / n:.2f}",
                         confused))
        files.append(atomic_write_csv(out / f"per_class_{task}.csv",
                                      ("class", "name", "segments", "top1", "top5", "most_confused_with"), rows))
        true_ids, predicted_ids = np.nonzero(matrix)
        files.append(atomic_write_csv(out / f"confusion_{task}.csv",
                                      ("true", "true_name", "predicted", "predicted_name", "segments"),
                                      ((int(t), names.name(task, t), int(p), names.name(task, p), int(matrix[t, p]))
                                       for t, p in zip(true_ids, predicted_ids))))
        files.append(_plot_confusion(out / f"confusion_{task}.png", matrix, labels[task], task, names))
        for k in (1, 5):
            summary[f"{task}_mean_class_top{k}"] = mean_class_accuracy(logits[task], labels[task], k)
    if participants is not None:
        pairs, _ = action_scores(predictions.verb_logits, predictions.noun_logits, prior=prior)  # (N, A, 2)
        num_nouns = predictions.noun_logits.shape[1]
        per_task = {
            "verb": group_top1(rank_classes(logits["verb"])[:, 0], labels["verb"], participants),
            "noun": group_top1(rank_classes(logits["noun"])[:, 0], labels["noun"], participants),
            "action": group_top1(pairs[:, 0, 0] * num_nouns + pairs[:, 0, 1],
                                 labels["verb"] * num_nouns + labels["noun"], participants),
        }
        files.append(atomic_write_csv(out / "per_participant.csv",
                                      ("participant", "segments", "verb_top1", "noun_top1", "action_top1"),
                                      ((person, n, *(f"{per_task[t][person][1]:.2f}" for t in per_task))
                                       for person, (n, _) in per_task["verb"].items())))
    files.append(atomic_write_json(out / "summary.json", summary))
    return ClassReport(out, summary, tuple(files))
