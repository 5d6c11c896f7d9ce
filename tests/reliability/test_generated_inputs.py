"""Generated hostile inputs through the real commands, in-process: every one a clear refusal.

Hypothesis generates what a user (or a damaged disk) can hand a command -- option values, annotation
files, manifests, WHERE texts -- and each example runs the real click command. Whatever the input,
the command either does its job or refuses it: exit status 1 (a domain error) or 2 (a usage error),
one ``Error:`` line naming the bad input, no traceback, no "failed unexpectedly" (the entry point's
net for errors nobody anticipated), and no folder left behind by a refused command.

The default profile keeps this under a minute; ``pytest --hypothesis-profile=long`` tries many more.
"""
from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import assume, event, given, note, settings
from hypothesis import strategies as st

from cli.featstore_cli import main as featstore_main
from cli.heads_cli import main as heads_main
from featstore.epic.annotations import read_segments
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import write_feature_npzs
from featstore.store.importer import import_npz
from featstore.store.reader import FeatureStore
from tests.reliability.workloads import IMPORT_SHAPES

PROGRAMS = {"featstore": featstore_main, "heads": heads_main}
N_SOURCE = 12


def _invoke(program: str, *args: object):
    return CliRunner().invoke(PROGRAMS[program], [str(a) for a in args])


def _assert_refused(result, *, names: tuple[str, ...], codes: tuple[int, ...] = (1, 2)) -> None:
    """A clean refusal: the exit status, one message naming the input, nothing unanticipated."""
    note(result.output)
    assert result.exit_code in codes, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "failed unexpectedly" not in result.output, result.output
    assert "Error" in result.output, result.output
    assert any(name in result.output for name in names), (names, result.output)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generated")
    segments = generate_segments(N_SOURCE, num_verbs=5, num_nouns=7)
    annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", segments)
    npz = write_feature_npzs(root / "npz", segments, shapes=IMPORT_SHAPES)
    import_npz(root / "store", annotations, npz, progress=False)
    return {"root": root, "store": root / "store", "annotations": annotations, "npz": npz,
            "manifest": json.loads((root / "store" / "manifest.json").read_text())}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scratch")


def _fresh(folder: Path) -> Path:
    """An empty folder (Hypothesis runs many examples in one test call)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


# ------------------------------------------------------------------------------------------------
# WHERE texts: one boolean expression, or a refusal; never SQL pasted into a statement

COLUMNS = ["uid", "participant_id", "video_id", "verb_class", "noun_class", "start_frame", "status", "shard"]
FRAGMENTS = [*COLUMNS, "nope", "segments", "boxes", "fields", "select", "*", "from", "where", "union", "all",
             "except", "intersect", "(", ")", ";", "--", "/*", "*/", "'", "'P01'", "''", "1", "0", "-1", "1e308",
             "true", "false", "null", "and", "or", "not", "=", "<", ">=", "<>", "in", "like", "'%'", "is",
             "exists", "read_csv('/etc/passwd')", "glob('/*')", "current_setting('enable_external_access')",
             "copy", "attach", "pragma", "create", "table", ",", "::", "varchar", "\\", "\n", "\x00"]

where_texts = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=12).map(" ".join),
    st.text(max_size=40),
    st.sampled_from(["true) union all select * from segments where (true",
                     "uid in (select uid from segments)", "1=1; drop table segments", "verb_class = 1 -- )",
                     "status = 'ok') or (true", "(select count(*) from boxes) > 0"]),
)


@settings(deadline=None)
@given(where=where_texts)
def test_copy_takes_a_where_as_one_expression_or_refuses_it(source, scratch, where: str) -> None:
    target = _fresh(scratch) / "copy"
    result = _invoke("featstore", "copy", source["store"], target, "--where", where, "--no-progress")
    if result.exit_code == 0:
        event("a valid selection")
        copied = FeatureStore.open(target).uids()
        assert len(copied) == len(set(copied)) and set(copied) <= set(FeatureStore.open(source["store"]).uids())
        return
    event("refused")
    _assert_refused(result, names=("selection",), codes=(1, 2))
    assert not target.exists()  # a refused selection leaves no store behind


@settings(deadline=None)
@given(where=where_texts)
def test_heads_train_takes_its_wheres_as_expressions_or_refuses_them(source, scratch, where: str) -> None:
    # The selection is refused before training starts: a valid one would train (not this test's
    # business), so only refusals are checked, with the run folder never made.
    from featstore.epic.selection import SelectionError, parse_selection

    assume(where.strip())  # blank: no selection, everything
    try:
        parse_selection(where, FeatureStore.open(source["store"]).segments().column_names)
        assume(False)
    except SelectionError:
        pass
    out = _fresh(scratch) / "run"
    result = _invoke("heads", "train", source["store"], "--model", "global", "--train-where", where,
                     "--epochs", "1", "--out", out, "--no-progress")
    _assert_refused(result, names=("selection",), codes=(1,))
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# manifests: any JSON in place of the store's, or in place of one of its parts

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@settings(deadline=None)
@given(whole=st.booleans(), value=json_values,
       key=st.sampled_from(["fields", "format_version", "provenance", "derived", "format"]),
       command=st.sampled_from(["info", "verify", "query"]))
def test_any_json_manifest_is_read_or_refused_naming_the_manifest(source, scratch, whole: bool, value, key: str,
                                                                  command: str) -> None:
    store = _fresh(scratch) / "store"
    shutil.copytree(source["store"], store)
    manifest = value if whole else {**source["manifest"], key: value}
    (store / "manifest.json").write_text(json.dumps(manifest))
    args = {"info": ["info", store], "verify": ["verify", store, "--no-progress"],
            "query": ["query", store, "select count(*) from segments"]}[command]
    result = _invoke("featstore", *args)
    try:
        FeatureStore.open(store)
        readable = True
    except Exception:  # noqa: BLE001 - what the command must refuse
        readable = False
    if readable and result.exit_code == 0:
        event("a readable manifest")
        return
    event("refused")
    _assert_refused(result, names=("manifest.json",), codes=(1,))


# ------------------------------------------------------------------------------------------------
# annotation files: missing / extra columns, wrong types, stop before start, huge numbers,
# non-UTF-8 bytes, duplicates

ANNOTATION_COLUMNS = ["uid", "participant_id", "video_id", "start_frame", "stop_frame", "verb_class", "noun_class"]
cells = st.one_of(
    st.integers(min_value=-5, max_value=40).map(str),
    st.sampled_from(["", "P01", "P01_01", "P26_02", "two", "1.5", "nan", "inf", str(2 ** 70), "-0", " 3 ",
                     "\"quoted, with comma\"", "P1", "Kitchen1_01"]),
    st.text(alphabet=string.printable, max_size=6),
)


@st.composite
def annotation_files(draw) -> bytes:
    columns = list(ANNOTATION_COLUMNS)
    if draw(st.booleans()):
        columns.remove(draw(st.sampled_from(columns)))  # a missing column
    if draw(st.booleans()):
        columns.insert(draw(st.integers(0, len(columns))), draw(st.sampled_from(["extra", "narration", "uid"])))
    good = lambda i: {"uid": str(i), "participant_id": "P01", "video_id": "P01_01",  # noqa: E731
                      "start_frame": str(10 * i + 1), "stop_frame": str(10 * i + 9), "verb_class": "1",
                      "noun_class": "2"}
    rows = []
    for i in range(draw(st.integers(0, 4))):
        row = good(i)
        for column in draw(st.lists(st.sampled_from(ANNOTATION_COLUMNS), max_size=2)):
            row[column] = draw(cells)
        if draw(st.integers(0, 5)) == 0:
            row["start_frame"], row["stop_frame"] = row["stop_frame"], row["start_frame"]  # stop before start
        rows.append([row.get(c, draw(cells)) for c in columns])
    if rows and draw(st.integers(0, 4)) == 0:
        rows.append(list(rows[0]))  # a duplicate
    text = "\n".join(",".join(r) for r in [columns, *rows]) + "\n"
    data = text.encode()
    if draw(st.integers(0, 5)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\xff\xfe\x80" + data[at:]  # not UTF-8
    return data


@settings(deadline=None)
@given(content=annotation_files())
def test_a_bad_annotation_file_is_refused_naming_it_before_any_store_exists(source, scratch, content: bytes) -> None:
    folder = _fresh(scratch)
    annotations = folder / "EPIC_train_action_labels.csv"
    annotations.write_bytes(content)
    try:
        read_segments(annotations)
        valid = True
    except Exception:  # noqa: BLE001 - what the command must refuse
        valid = False
    assume(not valid)  # a valid file would import (the importer's own tests cover that)
    result = _invoke("featstore", "import", folder / "store", "--annotations", annotations, "--from",
                     source["npz"], "--no-progress")
    _assert_refused(result, names=(str(annotations),), codes=(1,))
    assert not (folder / "store").exists()


# ------------------------------------------------------------------------------------------------
# option values: every numeric option of every command, any text


def _numeric_options() -> list[tuple[str, str, str]]:
    found = []
    for program, group in PROGRAMS.items():
        for name in sorted(group.commands):
            command = group.commands[name]
            for param in command.get_params(click.Context(command, info_name=name)):
                if isinstance(param, click.Option) and isinstance(
                        param.type, (click.types.IntParamType, click.types.FloatParamType)):
                    found.append((program, name, param.opts[0]))
    return found


NUMERIC_OPTIONS = _numeric_options()
option_texts = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(2 ** 80), max_value=2 ** 80).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "-0", "0", "", " ", "1,2", "0x10", "1_000", "١"]),
    st.text(max_size=8),
)


def _arguments(command: click.Command, folder: Path, tested: str) -> list[str]:
    """Positional arguments and required options that exist (a file or a folder, as each wants), so
    that only the option under test is bad."""
    file = folder / "input.csv"
    file.write_text("x\n")
    (folder / "dir").mkdir(exist_ok=True)

    def value(param: click.Parameter) -> str:
        if isinstance(param.type, click.Choice):
            return str(param.type.choices[0])
        if isinstance(param.type, click.Path):
            return str(file if not param.type.dir_okay else folder / "dir")
        return "1"

    argv = []
    for param in command.get_params(click.Context(command, info_name=command.name)):
        if isinstance(param, click.Argument):
            argv += [value(param)] * max(param.nargs, 1)
        elif isinstance(param, click.Option) and param.required and param.opts[0] != tested:
            argv += [param.opts[0], value(param)]
    return argv


@settings(deadline=None)
@given(which=st.sampled_from(NUMERIC_OPTIONS), text=option_texts)
def test_a_number_out_of_range_is_a_usage_error_naming_the_option(scratch, which, text: str) -> None:
    program, name, flag = which
    command = PROGRAMS[program].commands[name]
    param = next(p for p in command.get_params(click.Context(command, info_name=name))
                 if isinstance(p, click.Option) and p.opts[0] == flag)
    try:
        param.type.convert(text, param, None)
        assume(False)  # in range (ranged types refuse nan and inf): the command would run
    except click.BadParameter:
        pass
    folder = _fresh(scratch)
    argv = [*_arguments(command, folder, flag), f"{flag}={text}"]
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    event(f"{program} {name}")
    result = _invoke(program, name, *argv)
    _assert_refused(result, names=(flag,), codes=(2,))
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # nothing made
