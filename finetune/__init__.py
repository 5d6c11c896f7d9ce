"""Stage 1 (DESIGN 4.5): fine-tune the VerbNet / NounNet backbones on the target data.

Above both `featstore` (frame sources, sampling plans, backbone registry, splits) and `heads` (metric
functions); `featstore` never imports this package. The checkpoint a run writes is what
``featstore build --verb-backbone NAME:RUN/checkpoint.pt`` loads.

- `finetune.recipes`: the report's recipes (section 3.1) as frozen records;
- `finetune.config`: `FinetuneConfig`, made at the CLI edge from a recipe and flags;
- `finetune.clips`: training / validation clips (seeded augmentation on uint8, failure markers);
- `finetune.model`: a registered backbone with a linear classifier on its pooled feature;
- `finetune.outputs`: what a backbone run writes (the checkpoint `featstore build` loads, the resume
  state, curves); the folder's names are `featstore.training.run_folder`'s;
- `finetune.backbone`: the run on the shared engine (`BackboneTrainable`, its hooks) and `finetune(config)`;
- `finetune.detector`, `finetune.detectron2_training`: the detector's stage 1 (torchvision on the
  engine, or detectron2's own trainer), into a run folder of the same names.
"""
