"""One rank of a detectron2 stage-1 run under torchrun (the two-rank test in test_detectron2_training.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/finetune/torchrun_detectron2.py \\
        OUT BOXES IMAGES CONFIG_YAML
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from finetune.detector_config import make_detector_config
from finetune.detectron2_training import finetune_detectron2


def main(out: str, boxes: str, images: str, config_yaml: str) -> None:
    torch.set_num_threads(1)
    config = make_detector_config(
        out=Path(out), objects=Path(boxes), images=Path(images), detector=f"detectron2:{config_yaml}",
        image_pattern="rgb-frames", iterations=2, eval_every=1, lr=0.01, lr_steps=(2,), batch_size=2,
        warmup_iterations=1, min_size=48, max_size=64, workers=0, progress=False, score_threshold=0.3,
        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), local_rank=int(os.environ["LOCAL_RANK"]))
    finetune_detectron2(config, log=lambda line: None)


if __name__ == "__main__":
    main(*sys.argv[1:5])
