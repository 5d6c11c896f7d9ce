"""Local alignment's pooling step, and the derived field that stores it: ``verb.local``.

SAOA's verb branch combines each local detection feature ``fo_i`` with ``fv_i = pool(RoIAlign(fv,
l_i))``, the VerbNet map read at that box (DESIGN section 5). The map and the boxes never change
while heads train, so the pooled ``[N, C]`` (N = the ``det.local`` slot count, 40 by default) can
be computed once: by ``featstore build`` and ``featstore derive`` into the store field
``verb.local``, or by the heads' data layer at load time from ``verb.map`` (or its time mean
``verb.map_tmean``) when the store has no ``verb.local``. Both call ``pool_local_verb_features``
below, so the two paths give the same numbers (up to the float16 rounding of the stored result).

Ours (DESIGN section 5): average the map over time first, RoIAlign to 7x7 with ``aligned=True``,
then average-pool the bins (SlowFast / LFB do the same with max pooling, ``pool="max"``). A store
records how its ``verb.local`` was pooled (``local_recipe``), and a reader asking for another
pooling is told so (``check_local_recipe``) rather than silently given the other numbers.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor
from torchvision.ops import roi_align

from featstore.store.schema import DET_LOCAL_BOX, VERB_LOCAL, VERB_MAP, VERB_MAP_TMEAN

__all__ = [
    "LOCAL_FIELD",
    "LOCAL_BOXES",
    "LOCAL_POOLS",
    "LOCAL_OUTPUT_SIZE",
    "LOCAL_SOURCES",
    "MAP_FIELD",
    "MAP_TMEAN_FIELD",
    "LocalRecipeError",
    "check_local_recipe",
    "local_recipe",
    "local_source",
    "pool_local_verb_features",
    "avg_roi_weights",
]

# The fields pooling reads and writes (featstore.store.schema), by the names this module uses for them.
LOCAL_FIELD = VERB_LOCAL  # [N, C]: the verb map pooled at the det.local boxes
MAP_FIELD = VERB_MAP  # [C, T, H, W]
MAP_TMEAN_FIELD = VERB_MAP_TMEAN  # [C, H, W]: verb.map averaged over time (float32 accumulation)
LOCAL_BOXES = DET_LOCAL_BOX  # [N, 4] normalised x1, y1, x2, y2
LOCAL_POOLS = ("avg", "max")
LOCAL_OUTPUT_SIZE = 7
# What verb.local can be pooled from, preferred first: the full map, or its time mean (pooling
# averages over time first, so the two give the same numbers up to float16 rounding).
LOCAL_SOURCES: tuple[tuple[str, str], ...] = ((MAP_FIELD, LOCAL_BOXES), (MAP_TMEAN_FIELD, LOCAL_BOXES))


class LocalRecipeError(ValueError):
    """A stored ``verb.local`` was pooled otherwise than a reader asks for, or cannot be made."""


def local_recipe(*, pool: str = "avg", output_size: int = LOCAL_OUTPUT_SIZE, source: str = MAP_FIELD,
                 source_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
    """How a store's ``verb.local`` was made: the manifest's ``derived["verb.local"]`` entry.

    Args:
        pool: ``"avg"`` or ``"max"`` over the RoIAlign bins.
        output_size: RoIAlign bins per side.
        source: the field it was pooled from (``verb.map`` or ``verb.map_tmean``).
        source_shape: that field's shape, kept so that a store which no longer holds the map can
            still say how big it was (``featstore info`` sizes the ``--map`` alternatives from it).
    Returns:
        A JSON-ready dict.
    """
    if pool not in LOCAL_POOLS:
        raise LocalRecipeError(f"local pooling must be one of {', '.join(LOCAL_POOLS)}, got {pool!r}")
    return {
        "from": [source, LOCAL_BOXES],
        "pool": pool,
        "output_size": int(output_size),
        "aligned": True,
        "time": "mean over T first",
        "source_shape": None if source_shape is None else [int(d) for d in source_shape],
    }


def check_local_recipe(recipe: Mapping[str, Any] | None, *, pool: str, output_size: int = LOCAL_OUTPUT_SIZE,
                       where: str = "the store") -> None:
    """Refuse a stored ``verb.local`` whose pooling is not the one asked for.

    Args:
        recipe: the manifest's ``derived["verb.local"]`` entry, or None when the field came from
            elsewhere (imported features), whose pooling nobody recorded: accepted as it is.
        pool: the pooling the reader asks for.
        output_size: the RoIAlign bins per side the reader asks for.
        where: names the store in the message.
    Raises:
        LocalRecipeError: naming both poolings.
    """
    if recipe is None:
        return
    stored = (recipe.get("pool"), int(recipe.get("output_size", LOCAL_OUTPUT_SIZE)))
    if stored != (pool, int(output_size)):
        raise LocalRecipeError(
            f"{where}'s verb.local was pooled with {stored[0]} over {stored[1]}x{stored[1]} RoIAlign bins "
            f"(manifest derived['verb.local']); this run asks for {pool} over {output_size}x{output_size}. "
            f"Run with the store's pooling, or make a store of the other one: `featstore copy` it without "
            f"verb.local, then `featstore derive COPY --field verb.local --local-pool {pool}` "
            f"(needs verb.map or verb.map_tmean)")


def local_source(fields: Mapping[str, Any] | set[str] | list[str]) -> tuple[str, str] | None:
    """The fields ``verb.local`` can be pooled from in a store holding ``fields``, or None."""
    have = set(fields)
    for source in LOCAL_SOURCES:
        if set(source) <= have:
            return source
    return None


def pool_local_verb_features(
    verb_map: Tensor,
    boxes: Tensor,
    *,
    output_size: int = LOCAL_OUTPUT_SIZE,
    pool: str = "avg",
    chunk: int = 256,
) -> Tensor:
    """RoI-pool the time-averaged verb map at every box.

    Args:
        verb_map: ``(N, C, T, H, W)`` VerbNet last-stage maps, or ``(N, C, H, W)`` maps already
            averaged over time (``verb.map_tmean``); any float dtype, computed in float32.
        boxes: ``(N, K, 4)`` boxes as normalised ``x1, y1, x2, y2`` in [0, 1] of the frame, which is
            the extent of the map (the map covers the whole, uncropped frame).
        output_size: RoIAlign output bins per side.
        pool: ``"avg"`` (ours) or ``"max"`` (SlowFast/LFB) over the bins.
        chunk: segments per RoIAlign call; peak memory of ``max`` is about
            ``chunk * K * C * output_size**2 * 4`` bytes (256 x 40 x 2048 x 49 x 4 B = 4 GiB), so
            lower it on a CPU or a small GPU.

    Returns:
        ``(N, K, C)`` float32 on the map's device. Padded boxes give finite (meaningless) values;
        the heads mask them with the detection validity.
    """
    if verb_map.dim() not in (4, 5):
        raise ValueError(f"verb_map must be (N, C, T, H, W) or (N, C, H, W), got shape {tuple(verb_map.shape)}")
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != verb_map.shape[0]:
        raise ValueError(f"boxes must be (N, K, 4) with N = {verb_map.shape[0]}, got {tuple(boxes.shape)}")
    if pool not in LOCAL_POOLS:
        raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    num_segments, channels = verb_map.shape[:2]
    height, width = verb_map.shape[-2:]
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
        frames = verb_map[start:stop].to(torch.float32)
        if frames.dim() == 5:
            frames = frames.mean(dim=2)  # (n, C, H, W)
        n = stop - start
        chunk_boxes = boxes[start:stop].to(device=device, dtype=torch.float32) * scale  # (n, K, 4)
        if pool == "avg":
            # RoIAlign followed by a mean over its bins is linear in the map: each box reads a
            # fixed weighting of the H*W pixels. RoIAlign of an identity "map" (one channel per
            # pixel) gives those weights at H*W channels instead of C, then one batched matmul
            # applies them to all C channels: the same numbers, an order of magnitude faster.
            weights = avg_roi_weights(chunk_boxes.reshape(-1, 4), height, width, output_size)  # (n*K, H*W)
            pixels = frames.reshape(n, channels, height * width).transpose(1, 2)  # (n, H*W, C)
            out[start:stop] = torch.bmm(weights.reshape(n, num_boxes, height * width), pixels)
        else:
            segment_index = torch.arange(n, device=device, dtype=torch.float32).repeat_interleave(num_boxes)
            rois = torch.cat([segment_index[:, None], chunk_boxes.reshape(-1, 4)], dim=1)  # (n*K, 5)
            bins = roi_align(frames, rois, output_size=output_size, spatial_scale=1.0, aligned=True)
            # bins: (n*K, C, S, S)
            out[start:stop] = bins.amax(dim=(2, 3)).reshape(n, num_boxes, channels)
    return out


def avg_roi_weights(boxes: Tensor, height: int, width: int, output_size: int = LOCAL_OUTPUT_SIZE) -> Tensor:
    """RoIAlign-then-average as pixel weights.

    Args:
        boxes: ``(B, 4)`` x1, y1, x2, y2 in map pixels (float32).
        height, width: the map's size.
        output_size: RoIAlign bins per side.
    Returns:
        ``(B, H*W)`` float32: box b's average-pooled RoIAlign of any map ``m`` is ``weights[b] @ m.flatten()``.
    """
    identity = torch.eye(height * width, dtype=torch.float32, device=boxes.device).reshape(1, height * width,
                                                                                          height, width)
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1)
    bins = roi_align(identity, rois, output_size=output_size, spatial_scale=1.0, aligned=True)
    return bins.mean(dim=(2, 3))
