"""Stores out to the layouts other tools read (`featstore export --format NAME`): the imports' inverses.

``npz`` and ``rulstm-lmdb`` are read back by `featstore import` (the same vectors, within the store's
dtype); ``pt`` is one file for ``torch.load``. See `featstore.exports.formats` for each layout.
"""
from featstore.exports.formats import (
    PT_FILE,
    ExportError,
    ExportFormat,
    get_export_format,
    list_export_formats,
    register_export_format,
)
from featstore.exports.service import ExportReport, export_store

__all__ = [
    "PT_FILE",
    "ExportError",
    "ExportFormat",
    "ExportReport",
    "export_store",
    "get_export_format",
    "list_export_formats",
    "register_export_format",
]
