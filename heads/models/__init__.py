"""Heads trained on stored features: SAOA, SAP, the `global` baseline and `vectors`, behind a registry.

Importing this package registers every head (the builder modules register themselves on import).
"""
from heads.models.registry import (
    FeatureDims,
    HeadRecord,
    MissingFieldsError,
    SwitchInfo,
    all_switches,
    build_head,
    check_fields,
    field_available,
    get_head,
    list_heads,
    register_head,
    unregister_head,
)
from heads.models.layers import head_loss
from heads.models.symbiotic import SymbioticBranch, SymbioticHead, saoa, sap
from heads.models.baseline import GlobalHead, global_head
from heads.models.vectors import VectorHead, vectors

__all__ = [
    "FeatureDims",
    "HeadRecord",
    "MissingFieldsError",
    "SwitchInfo",
    "all_switches",
    "build_head",
    "check_fields",
    "field_available",
    "get_head",
    "list_heads",
    "register_head",
    "unregister_head",
    "head_loss",
    "SymbioticBranch",
    "SymbioticHead",
    "saoa",
    "sap",
    "GlobalHead",
    "global_head",
    "VectorHead",
    "vectors",
]
