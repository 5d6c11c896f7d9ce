"""The demo's job: generate the sample, build a store from its frames, train heads, report.

Kept apart from ``featstore.demo`` (which paints the sample) so the job reads as the user's own
pipeline would: ``featstore build`` then ``heads train``, as library calls.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from featstore.demo import NOUNS, QUICK_SAMPLE, VERBS, SampleSpec, generate_sample, sample_paths
from featstore.extraction import BuildConfig, build_store
from featstore.sampling import SamplingConfig

HEADS = ("saoa", "global")
TRAIN_WHERE = "participant_id <= 'P25'"
VAL_WHERE = "participant_id > 'P25'"
MARKER = ".featstore-demo"
# 6 training and 2 validation participants, 2 videos each, 8 segments a video: 128 segments, sized
# so that building and training fit in a few minutes on a 2-core CPU.
DEMO_SAMPLE = SampleSpec(("P01", "P02", "P03", "P04", "P05", "P06"), ("P26", "P27"),
                         videos_per_participant=2, segments_per_video=8)  # marks a folder as demo output, so a rerun may replace it


class DemoError(Exception):
    """The demo cannot run as asked (e.g. its folder holds something else)."""


@dataclass
class DemoResult:
    """Where the demo put things and what the heads scored."""

    out: Path
    store: Path
    runs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """One row per head: verb / noun / action top-1 and top-5, and the chance level."""
        header = f"{'head':<8} {'verb@1':>7} {'verb@5':>7} {'noun@1':>7} {'noun@5':>7} {'act@1':>7} {'act@5':>7}"
        rows = [header, "-" * len(header)]
        for head, m in self.metrics.items():
            rows.append(f"{head:<8} " + " ".join(f"{m.get(k, float('nan')):7.1f}" for k in (
                "verb_top1", "verb_top5", "noun_top1", "noun_top5", "action_top1", "action_top5")))
        c = self.chance
        rows.append(f"{'chance':<8} {c['verb']:7.1f} {'':>7} {c['noun']:7.1f} {'':>7} {c['action']:7.1f}")
        return "\n".join(rows)


def _prepare_folder(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise DemoError(f"{out} is not empty and is not a featstore demo folder; give another DIR")
        shutil.rmtree(out)  # a previous demo: rebuild it from scratch, same seed, same result
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("featstore demo output; `featstore demo` may replace this folder\n")


def run_demo(out: str | os.PathLike = "demo-out", *, quick: bool = False, device: str = "cpu", seed: int = 0,
             epochs: int | None = None, log: Callable[[str], None] = print) -> DemoResult:
    """Generate the sample, build its store with real torchvision models, train ``saoa`` and ``global``.

    Args:
        out: the demo folder (sample/, store/, runs/).
        quick: a smaller sample and fewer epochs (for tests; seconds instead of minutes).
        device: where to run the models and heads.
        seed: the sample's and the training's seed.
        epochs: training epochs (default 30, or 15 with ``quick``).
        log: where progress lines go.
    Returns:
        The paths and metrics.
    """
    from heads.trainer import TrainConfig, train

    out = Path(out)
    _prepare_folder(out)
    result = DemoResult(out=out, store=out / "store")
    started = time.perf_counter()
    sample = generate_sample(out / "sample", QUICK_SAMPLE if quick else DEMO_SAMPLE, seed=seed)
    result.seconds["sample"] = time.perf_counter() - started
    log(f"sample: {len(sample.segments)} segments of EPIC-layout JPEG frames in {sample.frames}")

    started = time.perf_counter()
    config = BuildConfig(
        store=result.store, annotations=sample.annotations, frames_root=sample.frames, video_info=sample.video_info,
        verb_backbone="r3d_18", noun_backbone="r3d_18", detector="fasterrcnn_resnet50_fpn", boxes=sample.boxes,
        det_min_size=96, det_max_size=192,
        # Short clips, 1 detection frame a second and top 3 boxes: the sample's segments last 2 s.
        sampling=SamplingConfig(clip_frames=8, clip_stride=2, size=64, det_fps=1.0, det_global_seconds=3.0,
                                det_local_seconds=1.0, det_topk=3),
        device=device, batch_size=8, workers=1, seed=seed, progress=True, command="featstore demo",
    )
    report = build_store(config)
    result.seconds["build"] = time.perf_counter() - started
    log(report.summary())

    epochs = epochs if epochs is not None else (15 if quick else 30)
    for head in HEADS:
        started = time.perf_counter()
        run = out / "runs" / head
        train_config = TrainConfig(model=head, train_where=TRAIN_WHERE, val_where=VAL_WHERE, epochs=epochs,
                                   batch_size=16, lr=0.01, seed=seed, device=device)
        result.metrics[head] = train(result.store, run, train_config, progress=False, log=lambda _: None)
        result.runs[head] = run
        result.seconds[head] = time.perf_counter() - started
    result.chance = {"verb": 100 / len(VERBS), "noun": 100 / len(NOUNS), "action": 100 / (len(VERBS) * len(NOUNS))}
    (out / "results.json").write_text(json.dumps({"metrics": result.metrics, "chance": result.chance,
                                                  "seconds": result.seconds}, indent=2))
    return result


def demo_sample_paths(out: str | os.PathLike):
    """The sample's paths inside a demo folder."""
    return sample_paths(Path(out) / "sample")
