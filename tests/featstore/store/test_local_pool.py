"""`featstore.store.local_pool.pool_local_verb_features` against hand-computed cases.

With `aligned=True` and a map whose side is a multiple of 7, RoIAlign's adaptive sampling puts its
samples exactly on pixel centres of the covered cells, so box averages are exact cell averages.
"""
from __future__ import annotations

import pytest
import torch

from featstore.store.local_pool import pool_local_verb_features

pytestmark = pytest.mark.usefixtures("one_thread")

WHOLE = [0.0, 0.0, 1.0, 1.0]
TOP_LEFT = [0.0, 0.0, 0.5, 0.5]
TOP_RIGHT = [0.5, 0.0, 1.0, 0.5]
BOTTOM_LEFT = [0.0, 0.5, 0.5, 1.0]
BOTTOM_RIGHT = [0.5, 0.5, 1.0, 1.0]


def _boxes(n: int, *boxes: list[float]) -> torch.Tensor:
    return torch.tensor([list(boxes)] * n, dtype=torch.float32)  # (n, K, 4)


@pytest.mark.parametrize(("height", "width"), [(7, 7), (14, 14), (14, 7)])
def test_whole_box_is_the_map_mean(height: int, width: int) -> None:
    g = torch.Generator().manual_seed(0)
    verb_map = torch.randn(3, 5, 4, height, width, generator=g)
    pooled = pool_local_verb_features(verb_map, _boxes(3, WHOLE))
    assert pooled.shape == (3, 1, 5)
    torch.testing.assert_close(pooled[:, 0], verb_map.mean(dim=(2, 3, 4)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_constant_map_gives_the_constant_anywhere(pool: str) -> None:
    values = torch.tensor([1.5, -2.0, 7.0])
    verb_map = values[None, :, None, None, None].expand(2, 3, 4, 8, 10).contiguous()  # (2, 3, 4, 8, 10)
    boxes = _boxes(2, WHOLE, [0.1, 0.2, 0.35, 0.9], [0.6, 0.6, 0.65, 0.61])
    pooled = pool_local_verb_features(verb_map, boxes, pool=pool)
    torch.testing.assert_close(pooled, values.expand(2, 3, 3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_quadrant_boxes_read_their_quadrant(pool: str) -> None:
    # A 14 x 14 map whose quadrants are constants 1, 2, 3, 4 (channel c adds 10 c); varying over
    # time, so the time average matters: frames hold q and q + 2, mean q + 1.
    quadrants = torch.zeros(14, 14)
    quadrants[:7, :7], quadrants[:7, 7:], quadrants[7:, :7], quadrants[7:, 7:] = 1, 2, 3, 4
    channels = torch.tensor([0.0, 10.0])[:, None, None]
    frames = torch.stack([quadrants, quadrants + 2])  # (T=2, 14, 14)
    verb_map = (frames[None] + channels[:, None]).unsqueeze(0)  # (1, 2, 2, 14, 14)
    boxes = _boxes(1, TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT)
    pooled = pool_local_verb_features(verb_map, boxes, pool=pool)  # (1, 4, 2)
    expected = torch.tensor([[2.0, 12.0], [3.0, 13.0], [4.0, 14.0], [5.0, 15.0]])
    torch.testing.assert_close(pooled[0], expected, atol=1e-5, rtol=1e-5)
    # The whole box averages the quadrants (avg) or sees the largest (max).
    whole = pool_local_verb_features(verb_map, _boxes(1, WHOLE), pool=pool)[0, 0]
    torch.testing.assert_close(whole, torch.tensor([3.5, 13.5]) if pool == "avg" else torch.tensor([5.0, 15.0]))


def test_chunking_changes_nothing_and_dtype_is_float32() -> None:
    g = torch.Generator().manual_seed(1)
    verb_map = torch.randn(7, 4, 3, 7, 7, generator=g).half()
    boxes = torch.rand(7, 5, 2, generator=g)
    boxes = torch.cat([boxes * 0.5, boxes * 0.5 + 0.5], dim=-1)  # x1 < x2, y1 < y2
    full = pool_local_verb_features(verb_map, boxes, chunk=100)
    assert full.dtype == torch.float32 and full.shape == (7, 5, 4)
    torch.testing.assert_close(pool_local_verb_features(verb_map, boxes, chunk=3), full)
    torch.testing.assert_close(pool_local_verb_features(verb_map, boxes, chunk=1), full)


def test_padded_boxes_are_finite_and_bad_input_is_refused() -> None:
    verb_map = torch.randn(2, 3, 2, 7, 7)
    pooled = pool_local_verb_features(verb_map, torch.zeros(2, 4, 4))  # padded slots: zero boxes
    assert torch.isfinite(pooled).all()
    with pytest.raises(ValueError, match="pool"):
        pool_local_verb_features(verb_map, torch.zeros(2, 4, 4), pool="median")
    with pytest.raises(ValueError, match="boxes"):
        pool_local_verb_features(verb_map, torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="verb_map"):
        pool_local_verb_features(verb_map[:, :, 0, 0], torch.zeros(2, 4, 4))


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_a_time_mean_map_pools_as_the_full_map(pool: str) -> None:
    # verb.map_tmean stores the time mean the pooling takes first: (N, C, H, W) in, the same out.
    generator = torch.Generator().manual_seed(5)
    verb_map = torch.randn(3, 6, 4, 8, 10, generator=generator)
    corners = torch.rand(3, 5, 2, 2, generator=generator)
    boxes = torch.cat([corners.amin(dim=2), corners.amax(dim=2)], dim=-1)
    torch.testing.assert_close(pool_local_verb_features(verb_map.mean(dim=2), boxes, pool=pool),
                               pool_local_verb_features(verb_map, boxes, pool=pool), atol=1e-6, rtol=1e-6)


def test_average_equals_roi_align_then_mean_of_its_bins() -> None:
    # The avg path applies per-box pixel weights with a matmul instead of RoI-aligning all C
    # channels; it must give what RoIAlign followed by the bin mean gives.
    from torchvision.ops import roi_align

    generator = torch.Generator().manual_seed(3)
    verb_map = torch.randn(5, 16, 3, 6, 9, generator=generator)
    corners = torch.rand(5, 7, 2, 2, generator=generator)
    boxes = torch.cat([corners.amin(dim=2), corners.amax(dim=2)], dim=-1)  # (5, 7, 4) x1 y1 x2 y2
    pooled = pool_local_verb_features(verb_map, boxes, output_size=7, pool="avg")

    frames = verb_map.mean(dim=2)
    scale = torch.tensor([9.0, 6.0, 9.0, 6.0])
    rois = torch.cat([torch.arange(5.0).repeat_interleave(7)[:, None], (boxes * scale).reshape(-1, 4)], dim=1)
    expected = roi_align(frames, rois, output_size=7, spatial_scale=1.0, aligned=True).mean(dim=(2, 3))
    torch.testing.assert_close(pooled, expected.reshape(5, 7, 16), atol=1e-5, rtol=1e-5)
