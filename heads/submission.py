"""`heads submit`: leaderboard zips for EPIC-Kitchens-55 and EPIC-Kitchens-100 action recognition.

Formats (DESIGN section 6; the official descriptions are the EPIC-55 submission guide, "JSON
Submission Format", and epic-kitchens/C1-Action-Recognition ``utils/challenge.py``):

- EPIC-55: a flat zip with ``seen.json`` (test S1) and ``unseen.json`` (test S2), each
  ``{"version": "0.1", "challenge": "action_recognition", "results": {uid: {"verb": {"0": s, ...
  all 125}, "noun": {... all 352}, "action": {"v,n": s, ... 100 entries}}}}``. Verb and noun scores
  are the softmax of the logits (``scores="logits"`` writes the logits instead); the 100 action
  scores are ``heads.actions.action_scores`` (softmax over the top-100 verbs and nouns, outer product,
  times the LFB prior when one is given), so the server ranks actions exactly as our metrics do.
- EPIC-100: a zip with ``test.json``, ``{"version": "0.2", "challenge": "action_recognition",
  "sls_pt": int, "sls_tl": int, "sls_td": int, "results": {narration_id: {"verb": {...97},
  "noun": {...300}}}}``. There is no action entry: the server computes action scores itself with a
  softmax over the top-100 submitted scores, so by default the *logits* are written (as the official
  ``create_submission.py`` writes model outputs); then the server's action ranking equals ours.
  ``scores="probs"`` writes softmax probabilities instead.

Keys are strings (uids, class ids, ``"v,n"``), scores are JSON numbers that always read back as
floats (``%#.9g``: nine significant digits, enough to round-trip float32, and always a decimal
point). SLS levels are ints (0-5); the defaults are the official script's (pt 2, tl 3, td 4).

Every segment of the test timestamp files (``EPIC_test_s1_timestamps``, ``EPIC_test_s2_timestamps``,
``EPIC_100_test_timestamps``, ``.csv`` or ``.pkl``, in ``meta_dir``) must be predicted exactly once
and no other segment may be; otherwise ``SubmissionError`` lists the first few missing / extra uids.
Results are written in the timestamp file's order.

The JSON text is built with one ``%`` format per segment over pre-built templates instead of
``json.dumps`` over nested dicts: the 8,047 S1 segments (4.6 M numbers) take about three seconds,
zip included (about a second each for the action scores, the text and the deflate).
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from featstore.epic.metadata import NUM_CLASSES
from featstore.io.atomic import atomic_write
from heads.actions import action_scores, lfb_action_prior, softmax
from heads.evaluation import ScoringError, labels_from_file
from heads.predictions import Predictions, read_predictions

__all__ = [
    "SubmissionError",
    "SubmissionSummary",
    "TIMESTAMP_FILES",
    "timestamp_uids",
    "align_to_test_set",
    "results_json",
    "epic55_json",
    "epic100_json",
    "epic55_submission",
    "epic100_submission",
]

# Test set -> timestamp file stem in the annotation folder.
TIMESTAMP_FILES = {
    "epic55-s1": "EPIC_test_s1_timestamps",
    "epic55-s2": "EPIC_test_s2_timestamps",
    "epic100-test": "EPIC_100_test_timestamps",
}
SCORE_FORMAT = "%#.9g"  # '#': always a decimal point, so every score reads back as a float
TOP_ACTIONS = 100  # the EPIC-55 format takes exactly 100 action scores per segment
SLS_DEFAULTS = {"sls_pt": 2, "sls_tl": 3, "sls_td": 4}  # C1-Action-Recognition create_submission.py


class SubmissionError(ValueError):
    """Predictions that do not make a valid submission (missing / extra segments, wrong class counts)."""


@dataclass(frozen=True)
class SubmissionSummary:
    """What was written.

    Attributes:
        out: the zip file.
        segments: JSON member name -> number of segments in it.
        action_prior: where the action prior was counted (``from``, ``excluded_scored_segments``,
            ``counted``), or None without one.
    """

    out: Path
    segments: dict[str, int]
    action_prior: dict | None = None


def _timestamp_file(meta_dir: Path, stem: str) -> Path:
    for suffix in (".csv", ".pkl"):
        path = meta_dir / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise SubmissionError(f"{meta_dir} has no {stem}.csv or {stem}.pkl; --meta-dir must be the folder of the "
                          f"test timestamp files")


def timestamp_uids(meta_dir: str | os.PathLike, test_set: str) -> tuple[str, ...]:
    """The segment ids of a test set, in file order.

    Args:
        meta_dir: folder with the test timestamp files.
        test_set: ``epic55-s1``, ``epic55-s2`` or ``epic100-test``.
    Returns:
        uids (EPIC-55) or narration ids (EPIC-100) as strings.
    """
    from featstore.epic.annotations import read_segments

    if test_set not in TIMESTAMP_FILES:
        raise SubmissionError(f"unknown test set {test_set!r}; use one of {', '.join(TIMESTAMP_FILES)}")
    path = _timestamp_file(Path(meta_dir), TIMESTAMP_FILES[test_set])
    return tuple(str(u) for u in read_segments(path).column("uid").to_pylist())


def _listed(uids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(uids[:limit])
    return shown + (f", ... ({len(uids) - limit} more)" if len(uids) > limit else "")


def align_to_test_set(predictions: Predictions, expected: Sequence[str], what: str) -> Predictions:
    """The predictions of exactly the ``expected`` segments, in that order.

    Args:
        predictions: predictions of a test set.
        expected: the test set's uids (``timestamp_uids``).
        what: the name used in messages, e.g. ``"seen (S1)"``.
    Returns:
        The predictions reordered to ``expected``.
    Raises:
        SubmissionError: listing the first few missing, extra or repeated uids.
    """
    predicted = list(predictions.uids)
    problems = []
    if len(set(predicted)) != len(predicted):
        seen: set[str] = set()
        repeated = [u for u in predicted if u in seen or seen.add(u)]
        problems.append(f"{len(repeated)} repeated: {_listed(repeated)}")
    have, want = set(predicted), set(expected)
    missing = [u for u in expected if u not in have]
    extra = [u for u in predicted if u not in want]
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} test segments missing: {_listed(missing)}")
    if extra:
        problems.append(f"{len(extra)} not in the test set: {_listed(extra)}")
    if problems:
        raise SubmissionError(f"{what} predictions do not match the test set: " + "; ".join(problems))
    return predictions if tuple(predicted) == tuple(expected) else predictions.subset(list(expected))


def _check_classes(predictions: Predictions, dataset: str, what: str) -> None:
    num_verbs, num_nouns = NUM_CLASSES[dataset]
    got = (predictions.verb_logits.shape[1], predictions.noun_logits.shape[1])
    if got != (num_verbs, num_nouns):
        raise SubmissionError(f"{what} predictions have {got[0]} verb and {got[1]} noun classes; {dataset} "
                              f"submissions need {num_verbs} and {num_nouns}")
    if not (np.isfinite(predictions.verb_logits).all() and np.isfinite(predictions.noun_logits).all()):
        raise SubmissionError(f"{what} predictions hold NaN or infinite logits")


def _class_template(num_classes: int) -> str:
    """``{"0":%#.9g,"1":%#.9g,...}`` for one row of class scores."""
    return "{" + ",".join(f'"{i}":{SCORE_FORMAT}' for i in range(num_classes)) + "}"


def results_json(uids: Sequence[str], verb_scores: np.ndarray, noun_scores: np.ndarray, *,
                 action_pairs: np.ndarray | None = None, action_values: np.ndarray | None = None) -> str:
    """The JSON text of a ``results`` object.

    Args:
        uids: (N,) segment ids.
        verb_scores: (N, V) scores to write.
        noun_scores: (N, Nn).
        action_pairs: (N, A, 2) (verb, noun) pairs, best first, or None for no ``action`` entry.
        action_values: (N, A) their scores.
    Returns:
        ``{"uid": {"verb": {...}, "noun": {...}[, "action": {"v,n": s, ...}]}, ...}`` as text.
    """
    verb_template = _class_template(verb_scores.shape[1])
    noun_template = _class_template(noun_scores.shape[1])
    verb_text = [verb_template % tuple(row) for row in np.asarray(verb_scores, dtype=np.float64).tolist()]
    noun_text = [noun_template % tuple(row) for row in np.asarray(noun_scores, dtype=np.float64).tolist()]
    action_text: list[str] | None = None
    if action_pairs is not None:
        num_nouns = noun_scores.shape[1]
        keys = np.array([f'"{v},{n}"' for v in range(verb_scores.shape[1]) for n in range(num_nouns)], dtype=object)
        pair_keys = keys[action_pairs[..., 0] * num_nouns + action_pairs[..., 1]]  # (N, A) key text
        actions = action_pairs.shape[1]
        interleaved = np.empty((len(uids), 2 * actions), dtype=object)
        interleaved[:, 0::2] = pair_keys
        interleaved[:, 1::2] = np.asarray(action_values, dtype=np.float64)
        template = "{" + ",".join([f"%s:{SCORE_FORMAT}"] * actions) + "}"
        action_text = [template % tuple(row) for row in interleaved.tolist()]
    parts = []
    for i, uid in enumerate(uids):
        body = f'"verb":{verb_text[i]},"noun":{noun_text[i]}'
        if action_text is not None:
            body += f',"action":{action_text[i]}'
        parts.append(f"{json.dumps(str(uid))}:{{{body}}}")
    return "{" + ",".join(parts) + "}"


def _class_scores(logits: np.ndarray, scores: str) -> np.ndarray:
    if scores == "probs":
        return softmax(logits.astype(np.float64), axis=1)
    if scores == "logits":
        return logits.astype(np.float64)
    raise SubmissionError(f"unknown scores {scores!r}; use probs or logits")


def _header(version: str, extra: dict[str, object] | None = None) -> str:
    fields = {"version": version, "challenge": "action_recognition", **(extra or {})}
    return "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in fields.items())


def epic55_json(predictions: Predictions, *, prior: np.ndarray | None = None, scores: str = "probs") -> str:
    """``seen.json`` / ``unseen.json`` text of predictions already aligned to a test set.

    Args:
        predictions: (N, 125) / (N, 352) logits.
        prior: (125, 352) LFB action prior, or None.
        scores: ``probs`` (softmax, the default) or ``logits`` for the verb / noun entries.
    Returns:
        The JSON text.
    """
    pairs, values = action_scores(predictions.verb_logits, predictions.noun_logits, prior=prior,
                                  top_actions=TOP_ACTIONS)
    results = results_json(predictions.uids, _class_scores(predictions.verb_logits, scores),
                           _class_scores(predictions.noun_logits, scores), action_pairs=pairs, action_values=values)
    return _header("0.1") + f',"results":{results}}}'


def epic100_json(predictions: Predictions, *, sls_pt: int = 2, sls_tl: int = 3, sls_td: int = 4,
                 scores: str = "logits") -> str:
    """``test.json`` text of predictions already aligned to the EPIC-100 test set.

    Args:
        predictions: (N, 97) / (N, 300) logits.
        sls_pt, sls_tl, sls_td: supervision levels (0-5), see epic-kitchens/SLS.
        scores: ``logits`` (the default, see the module docstring) or ``probs``.
    Returns:
        The JSON text.
    """
    levels = {"sls_pt": sls_pt, "sls_tl": sls_tl, "sls_td": sls_td}
    for name, level in levels.items():
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= int(level) <= 5:
            raise SubmissionError(f"{name} must be an integer from 0 to 5, got {level!r}")
    results = results_json(predictions.uids, _class_scores(predictions.verb_logits, scores),
                           _class_scores(predictions.noun_logits, scores))
    return _header("0.2", {k: int(v) for k, v in levels.items()}) + f',"results":{results}}}'


def _load(predictions: str | os.PathLike | Predictions) -> Predictions:
    return predictions if isinstance(predictions, Predictions) else read_predictions(predictions)


def _write_zip(out: Path, members: dict[str, str]) -> None:
    """A flat zip (members at the root, as the servers require), written atomically.

    Deflate level 1: level 5 (the official script's) makes an S1 file 10% smaller but takes 3 s instead of 0.8.
    """
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            for name, text in members.items():
                archive.writestr(name, text)

    atomic_write(out, write)


def _prior_from(annotations: str | os.PathLike | None, dataset: str,
                scored: Sequence[str]) -> tuple[np.ndarray | None, dict | None]:
    """The LFB prior counted on ``annotations`` without the ``scored`` segments, and its record."""
    if annotations is None:
        return None, None
    try:
        training = labels_from_file(annotations, scored=scored)
    except ScoringError as err:
        raise SubmissionError(str(err)) from err
    return lfb_action_prior(training.verbs, training.nouns, *NUM_CLASSES[dataset]), training.record()


def epic55_submission(
    seen: str | os.PathLike | Predictions,
    unseen: str | os.PathLike | Predictions,
    meta_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    action_prior_from: str | os.PathLike | None = None,
    scores: str = "probs",
) -> SubmissionSummary:
    """Write the EPIC-55 zip (``seen.json``, ``unseen.json``).

    Args:
        seen: predictions (file, run directory or loaded) of test S1.
        unseen: predictions of test S2.
        meta_dir: folder with ``EPIC_test_s{1,2}_timestamps.{csv,pkl}``.
        out: the zip to write.
        action_prior_from: training annotations (e.g. EPIC_train_action_labels.csv) for the LFB prior;
            rows of the submitted segments are left out (``heads.evaluation.labels_from_file``).
        scores: verb / noun entries as ``probs`` (softmax) or ``logits``.
    Returns:
        The zip and the number of segments in each JSON file.
    """
    aligned: dict[str, Predictions] = {}
    # Both test sets are checked before either is serialised: a mistake is reported in a blink.
    for name, predictions, test_set, what in (("seen.json", seen, "epic55-s1", "seen (S1)"),
                                              ("unseen.json", unseen, "epic55-s2", "unseen (S2)")):
        loaded = _load(predictions)
        _check_classes(loaded, "epic55", what)
        aligned[name] = align_to_test_set(loaded, timestamp_uids(meta_dir, test_set), what)
    if scores not in ("probs", "logits"):
        raise SubmissionError(f"unknown scores {scores!r}; use probs or logits")
    # Test segments carry no labels, so they cannot be counted; left out all the same, as everywhere.
    prior, prior_record = _prior_from(action_prior_from, "epic55",
                                      [u for predictions in aligned.values() for u in predictions.uids])
    members = {name: epic55_json(predictions, prior=prior, scores=scores) for name, predictions in aligned.items()}
    out = Path(out)
    _write_zip(out, members)
    return SubmissionSummary(out, {name: len(predictions.uids) for name, predictions in aligned.items()},
                             prior_record)


def epic100_submission(
    test: str | os.PathLike | Predictions,
    meta_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    sls_pt: int = SLS_DEFAULTS["sls_pt"],
    sls_tl: int = SLS_DEFAULTS["sls_tl"],
    sls_td: int = SLS_DEFAULTS["sls_td"],
    scores: str = "logits",
) -> SubmissionSummary:
    """Write the EPIC-100 zip (``test.json``).

    Args:
        test: predictions (file, run directory or loaded) of the EPIC-100 test set.
        meta_dir: folder with ``EPIC_100_test_timestamps.{csv,pkl}``.
        out: the zip to write.
        sls_pt, sls_tl, sls_td: supervision levels, 0-5 (epic-kitchens/SLS).
        scores: verb / noun entries as ``logits`` (default) or ``probs``.
    Returns:
        The zip and the number of segments in ``test.json``.
    """
    if scores not in ("probs", "logits"):
        raise SubmissionError(f"unknown scores {scores!r}; use probs or logits")
    loaded = _load(test)
    _check_classes(loaded, "epic100", "test")
    aligned = align_to_test_set(loaded, timestamp_uids(meta_dir, "epic100-test"), "test")
    text = epic100_json(aligned, sls_pt=sls_pt, sls_tl=sls_tl, sls_td=sls_td, scores=scores)
    out = Path(out)
    _write_zip(out, {"test.json": text})
    return SubmissionSummary(out, {"test.json": len(aligned.uids)})
