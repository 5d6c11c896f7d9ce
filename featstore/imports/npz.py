"""``npz``: a folder of ``<uid>.npz`` files whose arrays are named by field (the default format).

Its files name their own fields (boxes included), one file per segment, so it has no reader of its
own here and no options: `featstore.store.importer.import_npz` imports it.
"""
from __future__ import annotations

from featstore.imports.registry import register_format

register_format("npz", description="one <uid>.npz per segment, arrays named by field (verb.global, det.global.feat, ...)",
                source="a folder of <uid>.npz files")(None)
