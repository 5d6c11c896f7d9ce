"""The format registry: every format's options come from its opener's signature and docstring (the
CLI's options and help), names are unique, and what a format does not take is refused by name."""
from __future__ import annotations

from pathlib import Path

import pytest

from featstore.imports import all_options, get_format, list_formats, register_format
from featstore.imports.registry import PublishedSource
from featstore.store.importer import ImportFailure


@pytest.mark.parametrize("name", list_formats())
def test_every_format_describes_itself_and_documents_each_option(name: str) -> None:
    record = get_format(name)
    assert record.description and record.source
    assert all(text for text in record.option_help().values())
    assert set(record.option_types()) == set(record.options())


def test_options_shared_by_formats_are_offered_once_with_each_formats_help() -> None:
    options = all_options()
    assert set(options["pool"].formats) == {"rulstm-lmdb", "per-video-series", "narration-pickle"}
    assert options["pool"].kind is str and options["check_dims"].kind is bool
    assert options["window"].kind is int and options["fps"].kind is float
    assert "rulstm-lmdb (default 'mean'): how a segment's frames become one vector" in options["pool"].help
    assert "per-video-series (default 'overlap')" in options["pool"].help


def test_a_name_is_registered_once_and_options_need_a_docstring_line() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_format("npz", description="again", source="a folder")(None)

    def opener(source: Path, *, depth: int = 1) -> PublishedSource:
        """Args:
            source: the file.
        """
        raise NotImplementedError

    with pytest.raises(ValueError, match="option\\(s\\) depth have no line"):
        register_format("undocumented", description="x", source="y")(opener)
    assert "undocumented" not in list_formats()


def test_unknown_options_are_named_with_the_formats_own() -> None:
    with pytest.raises(ImportFailure, match=r"--format per-video-series does not take --modalities, --videos; "
                                            r"its options are: --dim, --ext, --field, --fps, --key, --pool, --preset, "
                                            r"--stride, --window"):
        get_format("per-video-series").check_options({"videos": "x", "modalities": "rgb", "pool": "nearest"})
