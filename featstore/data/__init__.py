"""The store from PyTorch: `StoreDataset`, a ``torch.utils.data.Dataset`` over a store's segments.

    from featstore.data import StoreDataset
    train = StoreDataset("st", ["verb.global"], split="epic55-lfb-train", preload=True)

README.md "From Python" trains a linear probe with it in ten lines.
"""
from featstore.data.dataset import DEFAULT_LABELS, StoreDataset

__all__ = ["DEFAULT_LABELS", "StoreDataset"]
