"""The screen-sized summary `featstore info` prints of a store (``--json`` prints everything).

A pure function of :meth:`FeatureStore.info`'s object, so the demo, the CLI and the tests read the
same lines. It picks what a person checks before training on a store: how many segments, which
fields at what size, which models made them (checkpoint and shortened sha256, or random weights),
how the clips and boxes were sampled, and the build's warnings. Anything a store lacks (an imported
or copied store records less) is left out rather than guessed.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

SHA_SHOWN = 12  # hex digits of a sha256 shown; --json has them all
MODEL_ROLES = (("verb", "verb_backbone"), ("noun", "noun_backbone"), ("detector", "detector"))


def kib(nbytes: int) -> str:
    return f"{nbytes / 1024:,.1f} KiB"


def short_sha(sha256: str | None) -> str:
    return f"sha256 {sha256[:SHA_SHOWN]}" if sha256 else ""


def describe_model(record: Mapping[str, Any]) -> str:
    """One line for a model of the build: name, then its checkpoint (or RANDOM WEIGHTS)."""
    name = record.get("name", "?")
    checkpoint = record.get("checkpoint")
    if not checkpoint:
        weights = record.get("weights") or "no checkpoint"
        return f"{name}  {weights}"
    line = f"{name}  {checkpoint} ({short_sha(record.get('checkpoint_sha256'))})"
    finetune = record.get("finetune")
    if isinstance(finetune, Mapping) and finetune.get("run"):
        metrics = finetune.get("metrics") or {}
        shown = ", ".join(f"{k} {v:.1f}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)))
        line += f"\n{'':12}fine-tuned by featstore finetune: {finetune['run']}" + \
            (f" (epoch {finetune['epoch']}{', ' + shown if shown else ''})" if "epoch" in finetune else "")
    return line


def describe_sampling(provenance: Mapping[str, Any]) -> list[str]:
    """The clip and the detection windows, in words."""
    sampling = provenance.get("sampling")
    if not isinstance(sampling, Mapping):
        return []
    lines = []
    clip = f"{sampling.get('clip_frames')} frames at stride {sampling.get('clip_stride')}"
    size = provenance.get("input_size")
    shape = f", input {size[0]}x{size[1]}" if isinstance(size, list) and len(size) == 2 else ""
    views = provenance.get("views")
    count = views.get("count", 1) if isinstance(views, Mapping) else 1
    lines.append(f"  clip      {provenance.get('modality', 'rgb')}, {clip}, short side {sampling.get('size')}{shape}, "
                 f"{sampling.get('clip_sampling', '?')}; "
                 + ("one view per segment" if count == 1 else
                    f"{count} views per training segment (view 0 centred, the others at random centres)"))
    if "det_fps" in sampling:
        lines.append(f"  boxes     {sampling['det_fps']} fps, top {sampling.get('det_topk')} per frame: "
                     f"{provenance.get('det_global_slots', '?')} slots over {sampling.get('det_global_seconds')} s (global), "
                     f"{provenance.get('det_local_slots', '?')} over {sampling.get('det_local_seconds')} s (local)")
    boxes_file = provenance.get("boxes_file")
    if isinstance(boxes_file, Mapping):
        lines.append(f"  box file  {boxes_file.get('path')} ({boxes_file.get('rows')} rows, "
                     f"{short_sha(boxes_file.get('sha256'))}), not the detector's own")
    return lines


def describe_views(info: Mapping[str, Any]) -> list[str]:
    """The temporal views (docs/views.md): how many of each, bytes per view and in all; none without views."""
    views = info.get("views") or {}
    per_view = views.get("per_view") or {}
    if views.get("max", 1) <= 1:
        return []
    payload = sum(sizes["lmdb"] for sizes in info["bytes_per_segment"]["fields"].values())
    recorded = views.get("recorded") or {}
    counts = ", ".join(f"view {view}: {n}" for view, n in sorted(per_view.items(), key=lambda kv: int(kv[0])))
    lines = [f"views       {views['total']} views of {info['segments']['ok']} segments ({counts})"]
    if recorded.get("where"):
        lines.append(f"            {recorded.get('count')} views where {recorded['where']}; 1 elsewhere")
    measured = views.get("bytes_per_view")
    lines.append(f"            {kib(payload)} per view in LMDB"
                 + (f", {kib(measured)} measured (index and journal included)" if measured else "")
                 + f"; {views['total'] * payload / 2**20:.1f} MiB of views in all")
    return lines


def describe_store(info: Mapping[str, Any]) -> list[str]:
    """The lines of `featstore info` for :meth:`FeatureStore.info`'s object ``info``."""
    manifest = info.get("manifest") or {}
    provenance = manifest.get("provenance") or {}
    segments = info["segments"]
    measured = info["bytes_per_segment"]["measured"]
    made = ", ".join(x for x in (f"featstore {manifest.get('featstore_version', '?')}",
                                 f"created {manifest['created_at']}" if manifest.get("created_at") else "",
                                 f"by {provenance['source']}" if provenance.get("source") else "") if x)
    lines = [
        f"store       {info['path']} ({made})",
        f"segments    {segments['ok']} ok, {segments['failed']} failed",
        f"size        {info['bytes'] / 2**20:.1f} MiB on disk"
        + (f", {kib(measured)} per segment (index and journal included)" if measured else ""),
    ]
    models = [(role, provenance[key]) for role, key in MODEL_ROLES if isinstance(provenance.get(key), Mapping)]
    if models:
        lines.append("models")
        for role, record in models:
            lines += f"  {role:<9} {describe_model(record)}".split("\n")
    sampling = describe_sampling(provenance)
    if sampling:
        lines.append("sampling")
        lines += sampling
    lines += describe_views(info)
    lines.append(f"{'fields (' + str(len(info['fields'])) + ')':<23}{'dtype':<9}{'shape':<15}bytes per segment (payload / in LMDB)")
    per_segment = info["bytes_per_segment"]["fields"]
    for name, spec in info["fields"].items():
        sizes = per_segment[name]
        derived = info.get("derived", {}).get(name)
        note = " (being derived: incomplete)" if spec.get("complete") is False else \
            f" derived from {' + '.join(derived['from'])}" if derived and derived.get("from") else ""
        lines.append(f"  {name:<20} {spec['dtype']:<8} {json.dumps(spec['shape']):<14} "
                     f"{kib(sizes['payload']):>10} / {kib(sizes['lmdb']):>10}{note}")
    alternatives = [f"--map {mode} {kib(estimate['bytes_per_segment'])}" for mode, estimate in info["map_alternatives"].items()
                    if estimate is not None and mode != provenance.get("map")]
    stored = [f"stored with --map {provenance['map']}"] if "map" in provenance else []
    if stored or alternatives:
        lines.append("verb map    " + "; ".join(stored + ([f"per segment with {', '.join(alternatives)}"] if alternatives else [])))
    warnings = provenance.get("warnings") or []
    if warnings:
        lines.append("warnings")
        lines += [f"  {warning}" for warning in warnings]
    lines.append("(featstore info --json prints everything: the manifest, every run, full checksums)")
    return lines
