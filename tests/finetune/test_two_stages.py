"""Issue 14's "Done when", first part: stage 1 lifts the verbs, and stage 2 on its features lifts SAOA.

On the demo's quick sample with its motions cut to a tenth of their travel (`SampleSpec.motion`):
at full motion even random-weight features separate the sample's four verbs (SAOA reaches 100 %
on them), so nothing would be left for fine-tuning to show. Measured with these settings, one
thread (2026-12-02): the verb net 87.5 % top-1 on the 16 held-out segments (chance 25 %); SAOA on
the store built with it 93.75 % against 81.25 % on the random-weight store.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from cli.demo import HEADS, build_command, build_params
from cli.featstore_build import make_build_config
from cli.heads_cli import make_train_config
from featstore.extraction import build_store
from featstore.samples.kitchens import QUICK_SAMPLE, VERBS, generate_sample
from finetune.backbone import finetune
from finetune.config import make_config
from heads.trainer import train

pytestmark = pytest.mark.slow  # about 5 min on a 2-core CPU

MOTION = 0.1
CHANCE = 100.0 / len(VERBS)


def saoa_verb_top1(sample, store: Path, out: Path, verb_backbone: str | None = None) -> float:
    """Build the demo's store (with ``verb_backbone`` instead of the random one), train the demo's SAOA."""
    params = build_params(sample, store, progress=False)
    if verb_backbone is not None:
        params["verb_backbone"] = verb_backbone
    build_store(make_build_config(params, command=build_command(params)))
    saoa = next(head for head in HEADS if head.name == "saoa")
    run = saoa.params(store, out, seed=0, device="cpu", progress=False)
    train(run["store"], run["out"], make_train_config(run), progress=False, log=lambda _: None)
    return json.loads((out / "metrics.json").read_text())["verb_top1"]


def test_a_fine_tuned_verb_net_lifts_saoa_above_the_random_weight_store(tmp_path: Path) -> None:
    sample = generate_sample(tmp_path / "sample", dataclasses.replace(QUICK_SAMPLE, motion=MOTION))
    net = tmp_path / "verbnet"
    # A short r50-3d recipe at the demo build's clip (8 frames at stride 2, 64 px), from random weights.
    finetune(make_config(out=net, annotations=sample.annotations, frames_root=sample.frames, backbone="r3d_18",
                         target="verb", recipe="r50-3d", train_split="epic55-lfb-train", val_split="epic55-lfb-val",
                         clip_frames=8, clip_stride=2, crop=64, scale_range=(64, 72), test_size=64, epochs=10,
                         lr=0.01, lr_steps=(9,), batch_size=8, workers=1, progress=False), log=lambda _: None)
    verb_net = json.loads((net / "metrics.json").read_text())["verb_top1"]
    assert verb_net >= CHANCE + 25, f"the verb net reached {verb_net} % (chance {CHANCE} %)"  # measured 87.5

    random = saoa_verb_top1(sample, tmp_path / "store-random", tmp_path / "saoa-random")
    tuned = saoa_verb_top1(sample, tmp_path / "store-tuned", tmp_path / "saoa-tuned",
                           verb_backbone=f"r3d_18:{net / 'checkpoint.pt'}")
    # Measured 93.75 against 81.25: two of the 16 segments; the margin is one.
    assert tuned >= random + 100 / 16, f"SAOA: {tuned} % on the fine-tuned store, {random} % on the random one"
