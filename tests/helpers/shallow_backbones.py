"""The registered transformer backbones made shallow, for tests that run them through `featstore build`
or `featstore finetune` (which build registered models by name).

Full-size Swin-B and ViT-L are too large for the test machines' shared cores (0.5 and 1.2 GB of
weights). `make_transformers_shallow` keeps every registered builder and record (widths, patches,
windows, embeddings, normalisation, sampling: what the pipeline sees) and cuts the number of blocks,
so the same code runs in a fraction of a second.
"""
from __future__ import annotations

from typing import Any

import pytest

from featstore.models import spacetime_vit, swin3d

# One block per Swin stage (the widths, hence the 1024-channel map, stay); one ViT block.
SHALLOW_SWIN = dict(depths=(1, 1, 1, 1), heads=(1, 2, 4, 8))
SHALLOW_VIT = dict(layers=1)


def make_transformers_shallow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the test ends, the Swin and ViT backbone classes the registered builders call take
    `SHALLOW_SWIN` / `SHALLOW_VIT` over what the builder passes."""
    swin_class, vit_class = swin3d.Swin3DBackbone, spacetime_vit.SpaceTimeViTBackbone

    def shallow_swin(**kwargs: Any) -> swin3d.Swin3DBackbone:
        return swin_class(**{**kwargs, **SHALLOW_SWIN})

    def shallow_vit(**kwargs: Any) -> spacetime_vit.SpaceTimeViTBackbone:
        return vit_class(**{**kwargs, **SHALLOW_VIT})

    monkeypatch.setattr(swin3d, "Swin3DBackbone", shallow_swin)
    monkeypatch.setattr(spacetime_vit, "SpaceTimeViTBackbone", shallow_vit)
