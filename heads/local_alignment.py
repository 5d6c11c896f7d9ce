"""Local alignment's pooling step: the verb map RoI-pooled at each local detection box.

SAOA's verb branch combines each detection feature `fo_i` with `fv_i = pool(RoIAlign(fv, l_i))`,
the VerbNet map read at that box. The map and boxes never change during head training, so this
is computed once when a store is loaded (`verb.map` + `det.local.box` -> batch key `verb_local`)
rather than in every forward pass.

Ours (DESIGN section 5): average the map over time first, RoIAlign to 7x7 with `aligned=True`,
then average-pool the bins (SlowFast / LFB do the same with max pooling, `pool="max"`).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["pool_local_verb_features"]


def pool_local_verb_features(
    verb_map: Tensor,
    boxes: Tensor,
    *,
    output_size: int = 7,
    pool: str = "avg",
    chunk: int = 256,
) -> Tensor:
    """RoI-pool the time-averaged verb map at every box.

    Args:
        verb_map: `(N, C, T, H, W)` VerbNet last-stage maps (any float dtype; computed in float32).
        boxes: `(N, K, 4)` boxes as normalised `x1, y1, x2, y2` in [0, 1] of the frame, which is
            the extent of the map (the map covers the whole, uncropped frame).
        output_size: RoIAlign output bins per side.
        pool: `"avg"` (ours) or `"max"` (SlowFast/LFB) over the bins.
        chunk: segments per RoIAlign call; peak memory is about
            `chunk * K * C * output_size**2 * 4` bytes (256 x 40 x 2048 x 49 x 4 B = 4 GiB), so
            lower it on a CPU or a small GPU.

    Returns:
        `(N, K, C)` float32 on the map's device. Padded boxes give finite (meaningless) values;
        the heads mask them with the detection validity.
    """
    if verb_map.dim() != 5:
        raise ValueError(f"verb_map must be (N, C, T, H, W), got shape {tuple(verb_map.shape)}")
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != verb_map.shape[0]:
        raise ValueError(f"boxes must be (N, K, 4) with N = {verb_map.shape[0]}, got {tuple(boxes.shape)}")
    if pool not in ("avg", "max"):
        raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    num_segments, channels, _, height, width = verb_map.shape
    num_boxes = boxes.shape[1]
    device = verb_map.device
    # Normalised -> map pixel coordinates; then spatial_scale=1. Pixel (i, j) has its centre at
    # (j + 0.5, i + 0.5) in these units, which is the convention aligned=True expects.
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=device)
    out = torch.empty(num_segments, num_boxes, channels, dtype=torch.float32, device=device)

    for start in range(0, num_segments, chunk):
        stop = min(start + chunk, num_segments)
        # float32: torchvision's roi_align has no half kernel on CPU, and the time mean of a
        # float16 store field is more accurate accumulated in float32.
        frames = verb_map[start:stop].to(torch.float32).mean(dim=2)  # (n, C, H, W)
        n = stop - start
        chunk_boxes = boxes[start:stop].to(device=device, dtype=torch.float32) * scale  # (n, K, 4)
        if pool == "avg":
            # RoIAlign followed by a mean over its bins is linear in the map: each box reads a
            # fixed weighting of the H*W pixels. RoIAlign of an identity "map" (one channel per
            # pixel) gives those weights at H*W channels instead of C, then one batched matmul
            # applies them to all C channels: the same numbers, an order of magnitude faster.
            weights = _avg_roi_weights(chunk_boxes.reshape(-1, 4), height, width, output_size)  # (n*K, H*W)
            pixels = frames.reshape(n, channels, height * width).transpose(1, 2)  # (n, H*W, C)
            out[start:stop] = torch.bmm(weights.reshape(n, num_boxes, height * width), pixels)
        else:
            segment_index = torch.arange(n, device=device, dtype=torch.float32).repeat_interleave(num_boxes)
            rois = torch.cat([segment_index[:, None], chunk_boxes.reshape(-1, 4)], dim=1)  # (n*K, 5)
            bins = roi_align(frames, rois, output_size=output_size, spatial_scale=1.0, aligned=True)
            # bins: (n*K, C, S, S)
            out[start:stop] = bins.amax(dim=(2, 3)).reshape(n, num_boxes, channels)
    return out


def _avg_roi_weights(boxes: Tensor, height: int, width: int, output_size: int) -> Tensor:
    """(B, H*W) weights: RoIAlign-then-average at each of ``boxes`` (B, 4) in map pixels, per pixel."""
    identity = torch.eye(height * width, dtype=torch.float32, device=boxes.device).reshape(1, height * width,
                                                                                          height, width)
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1)
    bins = roi_align(identity, rois, output_size=output_size, spatial_scale=1.0, aligned=True)
    return bins.mean(dim=(2, 3))
