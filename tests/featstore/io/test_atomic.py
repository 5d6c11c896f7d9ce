"""The one writer: whole files or none, and a failed write that names its file."""
from __future__ import annotations

import errno
from pathlib import Path

import pytest

from featstore.io.atomic import atomic_write, atomic_write_text


def test_a_write_lands_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("raised", [OSError(errno.ENOSPC, "No space left on device"), OSError("disk quota hit")])
def test_a_full_disk_without_a_file_name_is_reported_with_the_file(tmp_path: Path, raised: OSError) -> None:
    # What a library's writer raises on a full disk (torch.save, pyarrow): the errno, no file.
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise raised

    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "checkpoint.pt", write)
    assert str(tmp_path / "checkpoint.pt") in str(caught.value)
    assert caught.value.errno == raised.errno
    assert list(tmp_path.iterdir()) == []  # the temporary is gone, no target was made


def test_an_error_that_names_its_file_is_left_as_it_is(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        atomic_write_text(tmp_path / "absent" / "a.txt", "x")
    assert caught.value.filename is not None and "absent" in caught.value.filename
