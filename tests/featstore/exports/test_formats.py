"""The export formats' registry and their field rules."""
from __future__ import annotations

import pytest

from featstore.exports import ExportError, get_export_format, list_export_formats, register_export_format
from featstore.exports.formats import lmdb_folders
from featstore.store.schema import FieldSpec

FIELDS = {
    "verb.global": FieldSpec("float16", (8,)),
    "det.global.score": FieldSpec("float32", (6,)),
    "det.global.feat": FieldSpec("float16", (6, 4)),
    "rulstm.rgb.frames": FieldSpec("int32", (1,)),
}


def test_the_registry_refuses_a_taken_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_export_format("npz", description="again", read_back=None)(object)
    assert list_export_formats()[0] == "npz"


@pytest.mark.parametrize("name", list_export_formats())
def test_every_format_has_a_description_and_takes_its_options(name: str) -> None:
    record = get_export_format(name)
    assert record.description
    record.check_options({option: None for option in record.options})


def test_default_fields_are_all_or_the_feature_vectors() -> None:
    assert list(get_export_format("npz").select_fields(FIELDS, None)) == sorted(FIELDS)
    # Scores are 1-d floats but not features; frame counts are not floats.
    assert list(get_export_format("rulstm-lmdb").select_fields(FIELDS, None)) == ["verb.global"]
    assert list(get_export_format("rulstm-lmdb").select_fields(FIELDS, ["det.global.score"])) == ["det.global.score"]
    with pytest.raises(ExportError, match="rulstm.rgb.frames"):
        get_export_format("rulstm-lmdb").select_fields(FIELDS, ["rulstm.rgb.frames"])


def test_lmdb_folders_take_rulstm_names_unless_two_fields_share_one() -> None:
    assert lmdb_folders(["rulstm.rgb", "rulstm.flow", "rulstm.obj"]) == {
        "rulstm.rgb": "rgb", "rulstm.flow": "flow", "rulstm.obj": "obj"}
    assert lmdb_folders(["verb.global", "noun.global", "tbn.rgb", "plain"]) == {
        "verb.global": "verb.global", "noun.global": "noun.global", "tbn.rgb": "rgb", "plain": "plain"}
