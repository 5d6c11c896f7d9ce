"""`featstore derive` (a derived field added in place) and `featstore copy` (fields and segments of another store)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.featstore_cli import main
from featstore.store.importer import import_npz
from featstore.store.local_pool import LocalRecipeError, pool_local_verb_features
from featstore.samples.annotations import generate_segments, write_epic55_annotations
from featstore.samples.features import feature_shapes, write_feature_npzs
from featstore.store.reader import FeatureStore
from featstore.store.transform import DeriveError, copy_store, derive_field
from tests.corruption import flip_live_byte

SHAPES = feature_shapes(verb_dim=16, noun_dim=16, det_dim=8, n_global=6, n_local=4, map_size=(2, 5, 7))


def _invoke(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _store(root: Path, n: int = 24, *, shapes=SHAPES, shards: int = 1, seed: int = 0) -> Path:
    """An imported store of ``n`` random segments, spread over ``shards`` LMDB shards."""
    segments = generate_segments(n, num_verbs=4, num_nouns=5, seed=seed)
    annotations = write_epic55_annotations(root / "EPIC_train_action_labels.csv", segments)
    for shard in range(shards):
        part = segments[shard::shards]
        write_feature_npzs(root / f"npz{shard}", part, shapes=shapes, seed=seed + shard)
        import_npz(root / "store", annotations, root / f"npz{shard}", shard=f"s{shard}", progress=False)
    return root / "store"


def _file_digests(path: Path) -> dict[str, str]:
    """Every file's bytes, except LMDB's lock tables (lock.mdb: the reader slots every reader takes)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != "lock.mdb"}


def test_derive_adds_verb_local_to_every_shard_in_place(tmp_path: Path) -> None:
    path = _store(tmp_path, shards=2)
    before = FeatureStore.open(path)
    boxes_before = before.boxes().to_pylist()
    uids = before.uids()
    result = _invoke("derive", path, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "derived 24, already there 0, failed 0" in result.output and "complete" in result.output

    store = FeatureStore.open(path)
    assert store.fields["verb.local"].shape == (4, 16) and store.fields["verb.local"].dtype == "float16"
    recipe = store.derived["verb.local"]
    assert recipe["complete"] is True and recipe["pool"] == "avg" and recipe["from"] == ["verb.map", "det.local.box"]
    assert recipe["source_shape"] == [16, 2, 5, 7]
    expected = pool_local_verb_features(torch.from_numpy(store.read_field(uids, "verb.map")),
                                        torch.from_numpy(store.read_field(uids, "det.local.box"))).half().numpy()
    assert np.array_equal(store.read_field(uids, "verb.local"), expected)
    assert store.verify() == []  # every checksum now covers verb.local
    assert store.uids() == uids and store.boxes().to_pylist() == boxes_before
    assert sorted({row["shard"] for row in store.segments().to_pylist()}) == ["s0", "s1"]

    again = _invoke("derive", path, "--no-progress")
    assert again.exit_code == 0 and "derived 0, already there 24" in again.output


def test_derive_refuses_what_it_cannot_make_or_would_change(tmp_path: Path) -> None:
    no_map = _store(tmp_path / "a", 4, shapes={k: v for k, v in SHAPES.items() if k != "verb.map"})
    with pytest.raises(DeriveError, match="needs verb.map"):
        derive_field(no_map, progress=False)
    with pytest.raises(DeriveError, match="cannot derive 'verb.global'"):
        derive_field(no_map, "verb.global", progress=False)

    path = _store(tmp_path / "b", 4)
    derive_field(path, pool="max", progress=False)
    with pytest.raises(LocalRecipeError, match="pooled with max"):
        derive_field(path, pool="avg", progress=False)
    result = _invoke("derive", path, "--local-pool", "avg", "--no-progress")
    assert result.exit_code == 1 and "pooled with max" in result.output and "Traceback" not in result.output

    imported = _store(tmp_path / "c", 4, shapes={**SHAPES, "verb.local": (4, 16)})
    with pytest.raises(DeriveError, match="not derived here"):
        derive_field(imported, progress=False)


def test_a_segment_whose_bytes_changed_is_not_given_a_fresh_checksum(tmp_path: Path) -> None:
    path = _store(tmp_path, 6)
    store = FeatureStore.open(path)
    payload = np.ascontiguousarray(store.read("3", ["verb.map"])["verb.map"]).tobytes()
    flip_live_byte(path / "lmdb" / "s0" / "data.mdb", payload, 11, lambda: bool(FeatureStore.open(path).verify()))
    report = derive_field(path, progress=False)
    assert [uid for uid, _ in report.failed] == ["3"] and not report.complete
    store = FeatureStore.open(path)
    assert store.incomplete_fields == {"verb.local"} and "verb.local" not in store.complete_fields
    assert store.verify() == [("3", "checksum mismatch")]  # the others verify, half-derived as they are


def test_copy_keeps_the_fields_and_segments_asked_and_never_touches_the_source(tmp_path: Path) -> None:
    path = _store(tmp_path, 24, shards=2)
    derive_field(path, progress=False)
    digests = _file_digests(path)
    target = tmp_path / "small"
    result = _invoke("copy", path, target, "--drop", "verb.map", "--where", "participant_id = 'P01'", "--no-progress")
    assert result.exit_code == 0, result.output
    assert _file_digests(path) == digests

    source, copy = FeatureStore.open(path), FeatureStore.open(target)
    assert set(copy.fields) == set(source.fields) - {"verb.map"}
    assert copy.uids() == source.uids("participant_id = 'P01'") and 0 < len(copy.uids()) < 24
    assert copy.verify() == []
    for uid in copy.uids():
        for field, value in copy.read(uid).items():
            assert np.array_equal(value, source.read(uid, [field])[field]), (uid, field)
    assert copy.boxes().to_pylist() == source.boxes(copy.uids()).to_pylist()
    assert copy.derived["verb.local"]["pool"] == "avg" and copy.derived["verb.local"]["complete"] is True
    provenance = copy.manifest["provenance"]
    assert provenance["copied_from"]["path"] == str(path.resolve())
    assert provenance["copied_from"]["where"] == "participant_id = 'P01'"
    assert provenance["verb_map_shape"] == [16, 2, 5, 7]

    again = _invoke("copy", path, target, "--drop", "verb.map", "--where", "participant_id = 'P01'", "--no-progress")
    assert again.exit_code == 0 and "copied 0, already copied" in again.output
    fields = _invoke("copy", path, tmp_path / "two", "--fields", "verb.global,noun.global", "--no-progress")
    assert fields.exit_code == 0 and set(FeatureStore.open(tmp_path / "two").fields) == {"verb.global", "noun.global"}


def test_copy_refusals_and_a_damaged_source_segment(tmp_path: Path) -> None:
    path = _store(tmp_path, 6)
    assert "cannot go inside its source" in _invoke("copy", path, path).output
    inner = _invoke("copy", path, path / "inner", "--no-progress")
    assert inner.exit_code == 1 and "cannot go inside its source" in inner.output
    assert not (path / "inner").exists()
    outer = _invoke("copy", path, tmp_path, "--no-progress")
    assert outer.exit_code == 1 and "into a folder that holds its source" in outer.output
    injected = _invoke("copy", path, tmp_path / "injected", "--where",
                       "true) union all select * from segments where (true", "--no-progress")
    assert injected.exit_code == 1 and "not one SQL expression" in injected.output
    assert not (tmp_path / "injected").exists()  # a bad selection leaves no empty store behind
    unknown = _invoke("copy", path, tmp_path / "unknown", "--where", "no_such = 1", "--no-progress")
    assert unknown.exit_code == 1 and "names no column no_such" in unknown.output
    assert not (tmp_path / "unknown").exists()
    assert "no field(s) verb.nope" in _invoke("copy", path, tmp_path / "x", "--fields", "verb.nope").output
    other = _store(tmp_path / "other", 2)
    refused = _invoke("copy", path, other, "--no-progress")
    assert refused.exit_code == 1 and "not this copy" in refused.output

    store = FeatureStore.open(path)
    payload = np.ascontiguousarray(store.read("2", ["verb.global"])["verb.global"]).tobytes()
    flip_live_byte(path / "lmdb" / "s0" / "data.mdb", payload, 3, lambda: bool(FeatureStore.open(path).verify()))
    result = _invoke("copy", path, tmp_path / "copy", "--fields", "verb.global", "--no-progress")
    assert result.exit_code == 1 and "not copied 2: checksum mismatch" in result.output
    assert "2" not in FeatureStore.open(tmp_path / "copy").uids()
    assert not derive_field(path, progress=False).complete  # "2" fails: verb.local stays incomplete
    listed = _invoke("query", path, "select field, complete from fields where field like 'verb.%' order by 1",
                     "--format", "csv")
    assert listed.output.split() == ["field,complete", "verb.global,True", "verb.local,False", "verb.map,True"]
    with pytest.raises(DeriveError, match="still being derived"):
        copy_store(path, tmp_path / "copy2", progress=False)


def test_info_prints_bytes_per_field_and_the_map_alternatives(tmp_path: Path) -> None:
    path = _store(tmp_path, 8)
    info = json.loads(_invoke("info", path, "--json").output)
    per_field = info["bytes_per_segment"]["fields"]
    assert per_field["verb.map"]["payload"] == 2 * 16 * 2 * 5 * 7
    assert per_field["det.local.box"]["payload"] == 4 * 4 * 4
    assert all(entry["lmdb"] >= entry["payload"] for entry in per_field.values())
    alternatives = info["map_alternatives"]
    full, tmean, none = (alternatives[mode]["bytes_per_segment"] for mode in ("full", "time-mean", "none"))
    assert none < tmean < full
    assert "verb.local" in alternatives["none"]["fields"] and "verb.map" not in alternatives["none"]["fields"]
    assert alternatives["full"]["bytes"] == 8 * full

    text = _invoke("info", path).output
    assert "bytes per segment" in text and "--map none" in text and "--map full" in text
    assert "verb.map" in text and "per segment (index and journal included)" in text
    no_boxes = _store(tmp_path / "nb", 2, shapes={k: v for k, v in SHAPES.items() if not k.startswith("det.local")})
    assert json.loads(_invoke("info", no_boxes, "--json").output)["map_alternatives"]["none"] is None
