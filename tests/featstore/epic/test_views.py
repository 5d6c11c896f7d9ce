"""Temporal views: where each view's clip and windows are centred, and the trainer's draws (pure functions)."""
from __future__ import annotations

import numpy as np
import pytest

from featstore.epic.sampling import SamplingConfig, plan_segment
from featstore.epic.views import draw_views, mix64, plan_views, uid_word, view_centres

CONFIG = SamplingConfig(clip_frames=8, clip_stride=2, size=32)


def test_view_zero_is_the_segment_centre_and_the_others_lie_inside_the_segment() -> None:
    centres = view_centres(100, 161, count=8, seed=0, uid="P01_01_3")
    assert centres[0] == (100 + 161 + 1) // 2
    assert all(100 <= c <= 161 for c in centres)
    assert len(set(centres[1:])) > 1  # drawn, not all the same frame
    assert view_centres(100, 161, count=1, seed=0, uid="x") == (centres[0],)


def test_centres_depend_on_seed_uid_and_view_only() -> None:
    first = view_centres(1, 10_000, count=5, seed=3, uid="a")
    assert view_centres(1, 10_000, count=5, seed=3, uid="a") == first
    assert view_centres(1, 10_000, count=8, seed=3, uid="a")[:5] == first  # adding views keeps the others
    assert view_centres(1, 10_000, count=5, seed=4, uid="a") != first
    assert view_centres(1, 10_000, count=5, seed=3, uid="b") != first


def test_centres_are_uniform_over_the_segment() -> None:
    centres = np.array([view_centres(1, 4, count=2, seed=0, uid=f"u{i}")[1] for i in range(4000)])
    counts = np.bincount(centres, minlength=5)[1:]
    assert counts.min() > 900 and counts.max() < 1100  # 1000 each expected


def test_mix64_is_pure_and_takes_words_mod_two_to_the_64() -> None:
    assert mix64(1, 2).tolist() == mix64(1, 2).tolist()
    assert mix64(-1).tolist() == mix64((1 << 64) - 1).tolist()
    assert mix64(1, np.arange(3, dtype=np.uint64)).shape == (3,)
    assert uid_word("P01_01_0") == uid_word("P01_01_0") != uid_word("P01_01_1")


def test_plan_views_view_zero_is_plan_segment_and_windows_stay_on_its_grid() -> None:
    fps = 59.94
    plans = plan_views(1000, 1300, fps=fps, n_frames=5000, config=CONFIG, count=6, seed=1, uid="s")
    assert plans[0] == plan_segment(1000, 1300, fps=fps, n_frames=5000, config=CONFIG)
    step = fps / CONFIG.det_fps
    for plan in plans[1:]:
        assert 1000 <= plan.clip_center <= 1300
        # The windows follow the clip within half a detection step, on view 0's detection grid.
        assert abs(plan.windows_center - plan.clip_center) <= step / 2 + 1
        shared = set(plan.global_frames) & set(plans[0].global_frames)
        moved = round(abs(plan.windows_center - plans[0].clip_center) / step)
        assert len(shared) == max(0, len(plans[0].global_frames) - moved)
        assert set(plan.local_frames) <= set(plan.global_frames)


def test_plan_views_of_one_view_is_plan_segment_and_segment_sampling_has_no_views() -> None:
    assert plan_views(10, 50, fps=30, n_frames=None, config=CONFIG, count=1, seed=0, uid="x") == [
        plan_segment(10, 50, fps=30, n_frames=None, config=CONFIG)]
    tsn = SamplingConfig(clip_frames=8, clip_stride=1, size=32, clip_sampling="segments")
    with pytest.raises(ValueError, match="centred clip"):
        plan_views(10, 50, fps=30, n_frames=None, config=tsn, count=2, seed=0, uid="x")


def test_draw_views_is_seeded_by_seed_epoch_and_uid_and_stays_in_range() -> None:
    words = np.array([uid_word(f"u{i}") for i in range(500)], dtype=np.uint64)
    counts = np.array([1, 4, 8] * 166 + [4, 4])
    epoch0 = draw_views(words, counts, seed=0, epoch=0)
    assert ((epoch0 >= 0) & (epoch0 < counts)).all() and (epoch0[counts == 1] == 0).all()
    assert (draw_views(words, counts, seed=0, epoch=0) == epoch0).all()
    assert (draw_views(words, counts, seed=0, epoch=1) != epoch0).mean() > 0.5
    assert (draw_views(words, counts, seed=1, epoch=0) != epoch0).mean() > 0.5
    # A segment's draw does not depend on the others (order, selection).
    assert (draw_views(words[::-1], counts[::-1], seed=0, epoch=0) == epoch0[::-1]).all()
    with pytest.raises(ValueError):
        draw_views(words, np.zeros(500, dtype=int), seed=0, epoch=0)
