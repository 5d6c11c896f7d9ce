"""Which temporal view of each training segment a head run reads in each epoch (docs/views.md).

The report trains its heads with the backbones' temporal sampling: a clip centred at random in the
segment in training, the centre clip in testing. A store built with ``featstore build --views K``
holds K views of each training segment (view 0 the centre clip); a run with ``views="random"`` (the
default on such a store) reads one of them per segment per epoch, drawn by
`featstore.epic.views.draw_views` from (seed, epoch, uid) alone, so that preloaded and streamed
features, a resumed run and a run trained in a ``heads ablate`` group draw the same views.
``views="first"`` reads view 0 only: the store as if it had no views (the ablation). Validation and
test selections always read view 0.

metrics.json records what the run did under ``views`` (`TrainingViews.record`): the mode, the most
views any stored segment has, how many training segments had more than one, the draw's rule, and
per epoch how many segments read each view and how many read another view than the epoch before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from featstore.epic.views import VIEW_DRAW_RULE, draw_views, uid_word

__all__ = ["VIEW_MODES", "TrainingViews", "resolve_view_mode"]

VIEW_MODES = ("random", "first")  # one view drawn per segment per epoch | view 0 only


def resolve_view_mode(given: str | None, store_views: int) -> str:
    """The views a run trains on: as given, else ``random`` on a store with views and ``first`` without.

    Args:
        given: ``TrainConfig.views`` (None: by the store).
        store_views: the most views a stored segment has (``FeatureStore.max_views``).
    Raises:
        ValueError: an unknown mode.
    """
    if given is None:
        return "random" if store_views > 1 else "first"
    if given not in VIEW_MODES:
        raise ValueError(f"views must be one of {', '.join(VIEW_MODES)}, got {given!r}")
    return given


@dataclass(frozen=True)
class TrainingViews:
    """A run's draws: the training segments' uids and view counts, the seed and the mode.

    Attributes:
        mode: ``random`` or ``first``.
        seed: the run's seed.
        uid_words: (N,) uint64, `featstore.epic.views.uid_word` of each training segment, in the
            features' order.
        counts: (N,) views each holds in the run's features (all 1 with ``first``).
        store_views: the most views any segment of the store has.
        segments_with_views: training segments the store holds more than one view of.
    """

    mode: str
    seed: int
    uid_words: np.ndarray
    counts: np.ndarray
    store_views: int
    segments_with_views: int

    @classmethod
    def of(cls, uids: Sequence[str], counts: Sequence[int] | torch.Tensor, *, mode: str, seed: int,
           store_views: int, stored_counts: Sequence[int]) -> "TrainingViews":
        """Args: the training uids (features' order), the views the features hold of each, the mode,
        the run's seed, the store's most views and the views it holds of each training segment."""
        words = np.array([uid_word(uid) for uid in uids], dtype=np.uint64)
        counts = counts.numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
        return cls(mode, int(seed), words, counts.astype(np.int64), int(store_views),
                   int(sum(1 for count in stored_counts if count > 1)))

    def draw(self, epoch: int) -> torch.Tensor:
        """(N,) int64: the view each training segment reads in 0-based ``epoch`` (0 with ``first``)."""
        if self.mode == "first":
            return torch.zeros(len(self.counts), dtype=torch.long)
        return torch.from_numpy(draw_views(self.uid_words, self.counts, seed=self.seed, epoch=epoch))

    def record(self, epochs: int) -> dict[str, Any]:
        """metrics.json's ``views`` entry for a run of ``epochs`` epochs (recomputed: the draws are pure)."""
        record: dict[str, Any] = {
            "mode": self.mode,
            "store_views": self.store_views,
            "training_segments": int(len(self.counts)),
            "segments_with_views": self.segments_with_views,
            "views_held": int(self.counts.sum()),
            "evaluation": "view 0 (the centre clip)",
        }
        if self.mode == "first":
            record["draw"] = "view 0 of every segment, every epoch"
            return record
        record["draw"] = VIEW_DRAW_RULE
        per_epoch, previous = [], None
        width = int(self.counts.max(initial=1))
        for epoch in range(epochs):
            drawn = self.draw(epoch).numpy()
            per_epoch.append({
                "epoch": epoch + 1,
                "per_view": np.bincount(drawn, minlength=width).tolist(),
                "changed": None if previous is None else int((drawn != previous).sum()),
            })
            previous = drawn
        record["epochs"] = per_epoch
        return record
