"""Published feature sets into stores: one reader per format, behind a registry (`featstore import`).

Importing this package registers every format (each reader module registers itself on import).
See docs/import.md for the layouts, the time mapping and the provenance each import records.
"""
from featstore.imports.registry import (
    FormatOption,
    ImportFormat,
    PublishedSource,
    all_options,
    get_format,
    list_formats,
    register_format,
)
from featstore.imports import lfb, narrations, npz, rulstm, series  # noqa: F401 - registers the formats
from featstore.imports.service import import_features

__all__ = [
    "FormatOption",
    "ImportFormat",
    "PublishedSource",
    "all_options",
    "get_format",
    "import_features",
    "list_formats",
    "register_format",
]
