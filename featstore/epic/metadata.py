"""The metadata files beside the EPIC-Kitchens annotations: class lists, evaluation subsets, frame rates.

The segment files themselves read in `featstore.epic.annotations`; this module reads what describes
them: the verb and noun class lists (``EPIC_verb_classes.csv``, ``EPIC_100_noun_classes.csv``, ...)
and the class counts they must have (:data:`NUM_CLASSES`), the evaluation subsets (EPIC-55's
many-shot classes, EPIC-100's tail classes and unseen participants) gathered in :class:`EpicMeta`,
and the frame rate of every video (``EPIC_video_info.csv``, ``EPIC_100_video_info.csv``). A malformed
file is an :class:`~featstore.epic.annotations.AnnotationError` naming its file, row and column.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from featstore.epic.annotations import AnnotationError, detect_dataset, parse_int_column, read_annotation_rows

__all__ = [
    "NUM_CLASSES",
    "EpicMeta",
    "find_video_info",
    "load_meta",
    "read_class_list",
    "read_class_names",
    "read_video_info",
]


# --------------------------------------------------------------------------------------------------
# class lists, many-shot / tail classes, unseen participants


@dataclass(frozen=True)
class EpicMeta:
    """Class names and evaluation subsets of one dataset.

    Attributes:
        dataset: ``'epic55'`` or ``'epic100'``.
        verb_classes: class index -> key, e.g. ``verb_classes[0] == 'take'``.
        noun_classes: class index -> key.
        many_shot_verbs: EPIC-55 many-shot verb classes (empty for EPIC-100).
        many_shot_nouns: EPIC-55 many-shot noun classes.
        many_shot_actions: EPIC-55 many-shot ``(verb, noun)`` pairs.
        tail_verbs: EPIC-100 tail verb classes (empty for EPIC-55).
        tail_nouns: EPIC-100 tail noun classes.
        unseen_participants: EPIC-100 participants unseen in training, validation and test together.
    """

    dataset: str
    verb_classes: tuple[str, ...]
    noun_classes: tuple[str, ...]
    many_shot_verbs: frozenset[int] = field(default_factory=frozenset)
    many_shot_nouns: frozenset[int] = field(default_factory=frozenset)
    many_shot_actions: frozenset[tuple[int, int]] = field(default_factory=frozenset)
    tail_verbs: frozenset[int] = field(default_factory=frozenset)
    tail_nouns: frozenset[int] = field(default_factory=frozenset)
    unseen_participants: frozenset[str] = field(default_factory=frozenset)

    @property
    def num_verbs(self) -> int:
        return len(self.verb_classes)

    @property
    def num_nouns(self) -> int:
        return len(self.noun_classes)


# (verb classes, noun classes) per dataset (DESIGN section 1): the classifier sizes, and what the
# class lists must hold.
NUM_CLASSES: dict[str, tuple[int, int]] = {"epic55": (125, 352), "epic100": (97, 300)}

# Class lists: (file, id column, key column, expected count). The counts catch a wrong file, such as
# EPIC_100_noun_classes_v2.csv (305 nouns) in place of the 300 the challenge and checkpoints use.
_CLASS_FILES = {
    "epic55": {
        "verb": ("EPIC_verb_classes.csv", "verb_id", "class_key", NUM_CLASSES["epic55"][0]),
        "noun": ("EPIC_noun_classes.csv", "noun_id", "class_key", NUM_CLASSES["epic55"][1]),
    },
    "epic100": {
        "verb": ("EPIC_100_verb_classes.csv", "id", "key", NUM_CLASSES["epic100"][0]),
        "noun": ("EPIC_100_noun_classes.csv", "id", "key", NUM_CLASSES["epic100"][1]),
    },
}
_SUBSET_FILES = {
    "epic55": ("EPIC_many_shot_verbs.csv", "EPIC_many_shot_nouns.csv", "EPIC_many_shot_actions.csv"),
    "epic100": (
        "EPIC_100_tail_verbs.csv",
        "EPIC_100_tail_nouns.csv",
        "EPIC_100_unseen_participant_ids_validation.csv",
        "EPIC_100_unseen_participant_ids_test.csv",
    ),
}


def _meta_file(meta_dir: Path, name: str, dataset: str) -> Path:
    path = meta_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{meta_dir}: {dataset} metadata file {name} not found")
    return path


def _meta_table(meta_dir: Path, name: str, dataset: str, columns: tuple[str, ...]) -> pd.DataFrame:
    path = _meta_file(meta_dir, name, dataset)
    frame = read_annotation_rows(path)
    for column in columns:
        if column not in frame.columns:
            raise AnnotationError(path, None, column, "required column missing")
    return frame


def _int_set(meta_dir: Path, name: str, dataset: str, column: str) -> frozenset[int]:
    frame = _meta_table(meta_dir, name, dataset, (column,))
    values, _ = parse_int_column(frame, column, meta_dir / name, nullable=False)
    return frozenset(values.tolist())


def _class_keys(meta_dir: Path, dataset: str, what: str) -> tuple[str, ...]:
    name = _CLASS_FILES[dataset][what][0]
    return read_class_list(_meta_file(meta_dir, name, dataset))


def read_class_list(path: str | os.PathLike) -> tuple[str, ...]:
    """A class table (``EPIC_noun_classes.csv``, ``EPIC_100_verb_classes.csv``, ...) as index -> key.

    The EPIC files are recognised by name and their class count is checked (e.g. 352 EPIC-55
    nouns); another file with the EPIC-55 columns (``noun_id`` / ``verb_id``, ``class_key``) or the
    EPIC-100 ones (``id``, ``key``) reads too, unchecked in size.

    Args:
        path: the CSV.
    Returns:
        ``keys[i]`` is the key of class ``i`` (e.g. ``read_class_list(EPIC_noun_classes.csv)[1] == 'pan'``).
    Raises:
        AnnotationError: no id / key columns, ids that are not 0..n-1 without gaps, or an EPIC file
            of the wrong size.
    """
    path = Path(path)
    known = [(dataset, what, entry) for dataset, entries in _CLASS_FILES.items()
             for what, entry in entries.items() if entry[0] == path.name]
    frame = read_annotation_rows(path)
    if known:
        dataset, what, (_, id_column, key_column, expected) = known[0]
    else:
        dataset, what, expected = None, "", None
        pairs = [("noun_id", "class_key"), ("verb_id", "class_key"), ("id", "key")]
        found = [pair for pair in pairs if set(pair) <= set(frame.columns)]
        if not found:
            raise AnnotationError(path, None, None, "a class table needs columns noun_id / verb_id and class_key, "
                                                    f"or id and key; found {', '.join(frame.columns)}")
        id_column, key_column = found[0]
    for column in (id_column, key_column):
        if column not in frame.columns:
            raise AnnotationError(path, None, column, "required column missing")
    ids, _ = parse_int_column(frame, id_column, path, nullable=False)
    if sorted(ids.tolist()) != list(range(len(ids))):
        raise AnnotationError(path, None, id_column, f"class ids are not 0..{len(ids) - 1} without gaps")
    if expected is not None and len(ids) != expected:
        raise AnnotationError(path, None, id_column, f"{len(ids)} {what} classes, expected {expected} for {dataset}")
    keys = frame[key_column].astype("string").to_numpy(dtype=object)
    return tuple(str(keys[i]) for i in np.argsort(ids))


def read_class_names(meta_dir: str | os.PathLike | None,
                     dataset: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The verb and noun class keys of ``dataset`` from ``meta_dir``'s class lists, for readable tables.

    Unlike `load_meta` it needs the two class lists only (not the evaluation subsets).

    Returns:
        (verb keys, noun keys), index -> key; None when ``meta_dir`` is None or lacks either list.
    Raises:
        AnnotationError: a malformed class list.
    """
    if meta_dir is None or dataset not in _CLASS_FILES:
        return None
    meta_dir = Path(meta_dir)
    paths = [meta_dir / _CLASS_FILES[dataset][what][0] for what in ("verb", "noun")]
    if not all(path.is_file() for path in paths):
        return None
    return read_class_list(paths[0]), read_class_list(paths[1])


def load_meta(meta_dir: str | os.PathLike, dataset: str | None = None) -> EpicMeta:
    """Load class lists and evaluation subsets from an EPIC annotation folder.

    Args:
        meta_dir: the folder holding the dataset's class CSVs (e.g. ``epic55/`` or ``epic100/``).
        dataset: ``'epic55'`` or ``'epic100'``; None infers it from which class files are present.
    Returns:
        The :class:`EpicMeta` (125 verbs / 352 nouns for EPIC-55, 97 / 300 for EPIC-100).
    Raises:
        FileNotFoundError: a required file is absent (named in the message).
        ValueError: an unknown dataset, or a folder holding both datasets' files with dataset=None.
        AnnotationError: a malformed metadata file.
    """
    meta_dir = Path(meta_dir)
    if dataset is None:
        present = [d for d, files in _CLASS_FILES.items() if (meta_dir / files["verb"][0]).is_file()]
        if not present:
            names = " or ".join(files["verb"][0] for files in _CLASS_FILES.values())
            raise FileNotFoundError(f"{meta_dir}: no {names} found; cannot tell the dataset")
        if len(present) > 1:
            raise ValueError(f"{meta_dir}: holds files of both {present}; pass dataset=")
        dataset = present[0]
    if dataset not in _CLASS_FILES:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(_CLASS_FILES)}")
    # Check every file is there before parsing any, so one run names all that are missing.
    names = [files[0] for files in _CLASS_FILES[dataset].values()] + list(_SUBSET_FILES[dataset])
    missing = [name for name in names if not (meta_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{meta_dir}: {dataset} metadata file(s) not found: {', '.join(missing)}")

    verbs = _class_keys(meta_dir, dataset, "verb")
    nouns = _class_keys(meta_dir, dataset, "noun")
    if dataset == "epic55":
        verbs_file, nouns_file, actions_file = _SUBSET_FILES[dataset]
        actions = _meta_table(meta_dir, actions_file, dataset, ("verb_class", "noun_class"))
        action_verbs, _ = parse_int_column(actions, "verb_class", meta_dir / actions_file, nullable=False)
        action_nouns, _ = parse_int_column(actions, "noun_class", meta_dir / actions_file, nullable=False)
        return EpicMeta(
            dataset=dataset,
            verb_classes=verbs,
            noun_classes=nouns,
            many_shot_verbs=_int_set(meta_dir, verbs_file, dataset, "verb_class"),
            many_shot_nouns=_int_set(meta_dir, nouns_file, dataset, "noun_class"),
            many_shot_actions=frozenset(zip(action_verbs.tolist(), action_nouns.tolist())),
        )
    tail_verbs_file, tail_nouns_file, *unseen_files = _SUBSET_FILES[dataset]
    unseen: set[str] = set()
    for name in unseen_files:
        frame = _meta_table(meta_dir, name, dataset, ("participant_id",))
        unseen |= set(frame["participant_id"].astype("string").str.strip().dropna().tolist())
    return EpicMeta(
        dataset=dataset,
        verb_classes=verbs,
        noun_classes=nouns,
        tail_verbs=_int_set(meta_dir, tail_verbs_file, dataset, "verb"),
        tail_nouns=_int_set(meta_dir, tail_nouns_file, dataset, "noun"),
        unseen_participants=frozenset(unseen),
    )


# --------------------------------------------------------------------------------------------------
# video info


_VIDEO_INFO_FILES = {"epic55": "EPIC_video_info.csv", "epic100": "EPIC_100_video_info.csv"}


def read_video_info(path: str | os.PathLike) -> dict[str, float]:
    """Frame rate per video from ``EPIC_video_info.csv`` or ``EPIC_100_video_info.csv``.

    Args:
        path: the video-info CSV (video column ``video`` in EPIC-55, ``video_id`` in EPIC-100).
    Returns:
        ``{video_id: fps}``.
    Raises:
        AnnotationError: a missing column or a non-numeric / non-positive fps, with its row.
    """
    path = Path(path)
    frame = read_annotation_rows(path)
    video_column = "video_id" if "video_id" in frame.columns else "video"
    for column in (video_column, "fps"):
        if column not in frame.columns:
            raise AnnotationError(path, None, column, "required column missing")
    fps = pd.to_numeric(frame["fps"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~(fps > 0)  # also catches NaN from unparsable cells
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AnnotationError(path, i + 1, "fps", f"expected a positive number, got {frame['fps'].iloc[i]!r}")
    videos = frame[video_column].astype("string").str.strip().to_numpy(dtype=object)
    return dict(zip(videos.tolist(), fps.tolist()))


def find_video_info(annotation_path: str | os.PathLike) -> Path | None:
    """The video-info file of an annotation file's dataset, beside it or one folder up.

    One folder up covers ``epic100/derived/`` beside ``epic100/EPIC_100_video_info.csv``.

    Args:
        annotation_path: an annotation file.
    Returns:
        The path of the matching video-info CSV, or None when there is none.
    """
    annotation_path = Path(annotation_path)
    name = _VIDEO_INFO_FILES[detect_dataset(annotation_path)]
    for folder in (annotation_path.parent, annotation_path.parent.parent):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None
