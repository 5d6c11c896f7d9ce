"""How big a store is, and how big it would be with another ``--map`` choice, before building it.

A segment's bytes are its fields' bytes as LMDB lays them out: a value larger than about half a
page goes to whole overflow pages of its own (a 16-byte header, then the bytes), a small one lives
in a leaf page beside its key. Per-field figures are those; the index (Parquet) and the journal add
a few KiB per segment, which ``featstore info`` shows as the measured total.

The ``--map`` choices of ``featstore build`` (and what ``featstore derive`` / ``copy`` can turn a
store into):

- ``none``: ``verb.local`` [N, C] only, the smallest store SAOA trains from (the default);
- ``time-mean``: ``verb.local`` and ``verb.map_tmean`` [C, H, W];
- ``full``: ``verb.local`` and ``verb.map`` [C, T, H, W].

Without ``det.local`` boxes there is no ``verb.local``: ``full`` and ``time-mean`` keep their map
alone and ``none`` is not possible.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from featstore.store.local_pool import LOCAL_BOXES, LOCAL_FIELD, MAP_FIELD, MAP_TMEAN_FIELD
from featstore.store.schema import FieldSpec, default_dtype

__all__ = ["MAP_MODES", "lmdb_value_bytes", "map_mode_fields", "segment_bytes", "map_alternatives",
           "verb_map_shape"]

MAP_MODES = ("none", "time-mean", "full")
LMDB_PAGE = 4096
_PAGE_HEADER = 16
_NODE_HEADER = 8
KEY_BYTES = 24  # a typical "{uid}/{field}" key (EPIC-100 narration ids are ~14 characters)


def _node_max(page_size: int) -> int:
    # LMDB's largest node kept on a leaf page (mdb.c: me_nodemax): two nodes must fit in a page.
    return (((page_size - _PAGE_HEADER) // 2) & ~1) - 2


def lmdb_value_bytes(nbytes: int, *, key_bytes: int = KEY_BYTES, page_size: int = LMDB_PAGE) -> int:
    """Bytes one value of ``nbytes`` takes in an LMDB file.

    Args:
        nbytes: the value's size.
        key_bytes: its key's size.
        page_size: the environment's page size.
    Returns:
        Whole overflow pages for a large value (its leaf node besides is a few bytes, not counted);
        node header + key + value + its 2-byte slot for a small one (the page's free space not counted).
    """
    if _NODE_HEADER + key_bytes + nbytes > _node_max(page_size):
        return -(-(_PAGE_HEADER + nbytes) // page_size) * page_size
    return _NODE_HEADER + key_bytes + nbytes + 2


def segment_bytes(fields: Mapping[str, FieldSpec], *, page_size: int = LMDB_PAGE) -> dict[str, dict[str, int]]:
    """Per field: ``payload`` (dtype x shape) and ``lmdb`` (as laid out, ``lmdb_value_bytes``) bytes of one segment."""
    return {name: {"payload": spec.nbytes, "lmdb": lmdb_value_bytes(spec.nbytes, page_size=page_size)}
            for name, spec in sorted(fields.items())}


def verb_map_shape(fields: Mapping[str, FieldSpec], manifest: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The ``[C, T, H, W]`` of the store's verb map, whether or not the store keeps it.

    From the schema when it holds ``verb.map``, else from what the build recorded
    (``provenance.verb_map_shape``) or what ``verb.local`` was pooled from (``derived``).
    """
    if MAP_FIELD in fields:
        return tuple(fields[MAP_FIELD].shape)
    recorded = manifest.get("provenance", {}).get("verb_map_shape")
    if recorded:
        return tuple(int(d) for d in recorded)
    recipe = manifest.get("derived", {}).get(LOCAL_FIELD, {})
    if recipe.get("from", [None])[0] == MAP_FIELD and recipe.get("source_shape"):
        return tuple(int(d) for d in recipe["source_shape"])
    return None


def map_mode_fields(fields: Mapping[str, FieldSpec], mode: str, *, map_shape: Sequence[int] | None,
                    ) -> dict[str, FieldSpec] | None:
    """The schema a store of ``fields`` would have with ``--map mode``.

    Args:
        fields: a store's schema (any map choice).
        mode: ``none``, ``time-mean`` or ``full``.
        map_shape: ``[C, T, H, W]`` of the verb map (``verb_map_shape``); None when unknown.
    Returns:
        The schema, or None when it cannot be made from what is known (no map shape; ``none``
        without ``det.local`` boxes).
    """
    if mode not in MAP_MODES:
        raise ValueError(f"--map must be one of {', '.join(MAP_MODES)}, got {mode!r}")
    out = {name: spec for name, spec in fields.items() if name not in (MAP_FIELD, MAP_TMEAN_FIELD, LOCAL_FIELD)}
    has_boxes = LOCAL_BOXES in fields
    if mode == "none" and not has_boxes:
        return None
    if map_shape is None:
        if mode == "none" and LOCAL_FIELD in fields:
            return {**out, LOCAL_FIELD: fields[LOCAL_FIELD]}
        if mode == "time-mean" and MAP_TMEAN_FIELD in fields and (LOCAL_FIELD in fields or not has_boxes):
            return {**out, **{f: fields[f] for f in (MAP_TMEAN_FIELD, LOCAL_FIELD) if f in fields}}
        return None
    channels, _, height, width = (int(d) for d in map_shape)
    if has_boxes:
        out[LOCAL_FIELD] = FieldSpec(default_dtype(LOCAL_FIELD), (int(fields[LOCAL_BOXES].shape[0]), channels))
    if mode == "full":
        out[MAP_FIELD] = FieldSpec(default_dtype(MAP_FIELD), tuple(int(d) for d in map_shape))
    elif mode == "time-mean":
        out[MAP_TMEAN_FIELD] = FieldSpec(default_dtype(MAP_TMEAN_FIELD), (channels, height, width))
    return out


def map_alternatives(fields: Mapping[str, FieldSpec], manifest: Mapping[str, Any], segments: int,
                     ) -> dict[str, dict[str, Any] | None]:
    """Bytes per segment and in all of each ``--map`` choice for a store's segments.

    Returns:
        mode -> ``{"fields": [...], "bytes_per_segment": int, "bytes": int}`` (LMDB layout of the
        tensors; the index adds its few KiB per segment), or None where it cannot be made.
    """
    shape = verb_map_shape(fields, manifest)
    out: dict[str, dict[str, Any] | None] = {}
    for mode in MAP_MODES:
        schema = map_mode_fields(fields, mode, map_shape=shape)
        if schema is None:
            out[mode] = None
            continue
        per_segment = sum(entry["lmdb"] for entry in segment_bytes(schema).values())
        out[mode] = {"fields": sorted(schema), "bytes_per_segment": per_segment, "bytes": per_segment * segments}
    return out
