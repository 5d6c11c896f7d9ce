"""The demo's synthetic kitchens: the motion knob a harder sample is made with."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from featstore.samples.kitchens import (
    ACTION_FRAMES,
    QUICK_SAMPLE,
    REST_FRAMES,
    SHOT_FRAMES,
    VERBS,
    active_state,
    generate_sample,
    sample_shot,
)


def travel(verb: int, motion: float) -> float:
    """How far the active object goes (position for take / put / move, scale for open) in its shot."""
    shot = sample_shot(verb, 1, 0, np.random.default_rng(0), motion=motion)
    first, last = active_state(shot, 0), active_state(shot, SHOT_FRAMES - 1)
    return float(np.abs(np.subtract(last, first)).sum())


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_motion_scales_the_travel_of_every_verb(verb: int) -> None:
    full, half = travel(verb, 1.0), travel(verb, 0.5)
    assert full > 0 and half == pytest.approx(full / 2, rel=0.02)
    assert travel(verb, 0.0) == 0.0  # no motion: the shot no longer shows its verb


def test_a_sample_with_less_motion_differs_only_in_its_frames(tmp_path) -> None:
    spec = dataclasses.replace(QUICK_SAMPLE, train_participants=("P01",), val_participants=(), segments_per_video=2)
    full = generate_sample(tmp_path / "full", spec)
    less = generate_sample(tmp_path / "less", dataclasses.replace(spec, motion=0.3))
    assert full.segments == less.segments and full.annotations.read_bytes() == less.annotations.read_bytes()
    frame = full.frames / "P01" / "rgb_frames" / "P01_01" / f"frame_{REST_FRAMES + ACTION_FRAMES:010d}.jpg"
    still = full.frames / "P01" / "rgb_frames" / "P01_01" / f"frame_{1:010d}.jpg"
    assert frame.read_bytes() != (less.frames / frame.relative_to(full.frames)).read_bytes()  # moved less
    assert still.read_bytes() == (less.frames / still.relative_to(full.frames)).read_bytes()  # at rest: the same
