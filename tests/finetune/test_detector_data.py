"""The detector's training data: seeded passes shared by ranks, flips with their boxes, failure markers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from featstore.epic.objects import ImageLayout, ObjectImage
from finetune.detector_data import IterationBatchSampler, ObjectImageDataset
from tests.helpers.detection import OBJECT_IMAGE_PATTERN as PATTERN


def test_sampler_takes_seeded_passes_and_ranks_share_each_batch() -> None:
    sampler = IterationBatchSampler(5, 2, seed=3)
    first_pass = sampler.global_batch(0) + sampler.global_batch(1) + sampler.global_batch(2)[:1]
    assert sorted(first_pass) == [0, 1, 2, 3, 4]  # 5 images: iterations 0-2 start with one whole pass
    assert IterationBatchSampler(5, 2, seed=3).global_batch(7) == sampler.global_batch(7)
    assert IterationBatchSampler(5, 2, seed=4).global_batch(0) != sampler.global_batch(0) or \
        IterationBatchSampler(5, 2, seed=4).global_batch(1) != sampler.global_batch(1)
    halves = [IterationBatchSampler(5, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for half in halves:
        half.set_range(4, 6)
    assert len(halves[0]) == 2
    shares = [list(half) for half in halves]
    for it in range(2):
        assert sorted(k for share in shares for k in share[it]) == sorted((4 + it, i) for i in sampler.global_batch(4 + it))


def test_training_images_flip_with_their_boxes_seeded_by_iteration(images: Path) -> None:
    record = ObjectImage("P01", "P01_01", 3, np.array([[13, 6, 33, 26]], np.float32), np.array([0]))
    layout = ImageLayout(images, PATTERN)
    plain = ObjectImageDataset([record], layout=layout, train=False)[(0, 0)][1]
    assert plain.image.shape == (3, 64, 80) and plain.labels.tolist() == [1]  # 0 is background
    train = ObjectImageDataset([record], layout=layout, train=True, seed=0)
    flips = 0
    for iteration in range(12):
        sample = train[(iteration, 0)][1]
        assert torch.equal(sample.image, train[(iteration, 0)][1].image)  # a function of the key
        if torch.equal(sample.image, plain.image):
            assert sample.boxes.tolist() == [[13, 6, 33, 26]]
        else:
            flips += 1
            assert torch.equal(sample.image, plain.image.flip(-1))
            assert sample.boxes.tolist() == [[80 - 33, 6, 80 - 13, 26]]
    assert 0 < flips < 12


def test_an_unreadable_image_is_a_failure_marker(tmp_path: Path) -> None:
    (tmp_path / "P01_01").mkdir()
    (tmp_path / "P01_01" / "0001.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    record = ObjectImage("P01", "P01_01", 1, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    sample = ObjectImageDataset([record], layout=ImageLayout(tmp_path, PATTERN), train=True)[(0, 0)][1]
    assert sample.image is None and "0001.jpg" in sample.error
