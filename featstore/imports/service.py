"""`featstore import`: a published feature set into a store, one segment at a time, resumably.

The loop is the same for every format: read the annotation rows, put each on the seconds clock
(`TimeMap`), ask the format's reader for the segment's fields, and commit them with the segment's
index row through the store's writer (`StoreWriter.put`: tensors and journal entry in one LMDB
transaction). A killed import loses at most the segment in flight; a rerun skips what is stored and
retries what failed. Segments are visited video by video, in time order, so the readers walk their
sources front to back and hold one video's worth of data at most. With ``workers > 1`` the videos
are shared out among forked processes, each with its own reader and its own shard's writer.

A segment the source has nothing of (no frames or windows in its span, a video the source lacks) is
recorded as failed with the reason, and the import goes on; a source that disagrees with the
format (other dims, another key scheme, a wrong preset) stops it before anything is written, with
one line saying what differs.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from featstore.epic.annotations import read_segments
from featstore.imports.registry import PublishedSource, get_format
from featstore.imports.timing import SegmentSkipped, TimeMap, make_time_map
from featstore.io.progress import progress_bar
from featstore.store.importer import ImportFailure, ImportReport, import_npz, value_problem
from featstore.store.reader import FeatureStore
from featstore.store.schema import STATUS_OK, StoreLockedError

__all__ = ["PROVENANCE_KEYS", "import_features"]

# The manifest entries a rerun into the same store must find unchanged (what the stored values mean).
PROVENANCE_KEYS = ("import_format", "time_map", "publisher")


def import_features(
    store_path: str | os.PathLike,
    annotations: str | os.PathLike,
    source: str | os.PathLike,
    *,
    format: str = "npz",
    options: Mapping[str, Any] | None = None,
    time_map: str = "auto",
    video_info: str | os.PathLike | None = None,
    shard: str = "0",
    flush_every: int = 256,
    workers: int = 1,
    progress: bool = True,
    command: str | None = None,
    on_segment: Callable[[str], None] | None = None,
) -> ImportReport:
    """Import a published feature set into a store (created when absent), resumably.

    Args:
        store_path: the store.
        annotations: an EPIC annotation file: the segments, their labels and times.
        source: what the format reads (``--from``): a folder or a file.
        format: a registered format (`featstore.imports.list_formats`).
        options: the format's options (`ImportFormat.options`); unknown ones are refused.
        time_map: ``auto``, ``timestamps`` or ``frames`` (`featstore.imports.timing.make_time_map`).
        video_info: frame rates for ``frames`` (default: the dataset's file beside the annotations).
        shard: the LMDB shard to write (``<shard>-<i>`` for worker ``i`` when ``workers > 1``).
        flush_every: segments between Parquet exports.
        workers: processes importing at once, each a share of the videos into a shard of its own
            (forked; ``on_segment`` then runs in them).
        progress: show a progress bar on stderr.
        command: the command line, recorded in the manifest.
        on_segment: called with each uid after it is committed (tests inject crashes with it).
    Returns:
        The report; failed segments are also in the store with their reason.
    Raises:
        ImportFailure: an unknown format or option, a source that does not match its format, or a
            store that was imported with other settings.
    """
    record = get_format(format)
    options = dict(options or {})
    record.check_options(options)
    if record.opener is None:
        if time_map != "auto" or video_info is not None:
            raise ImportFailure(f"--format {format} reads one file per segment: --time-map and --video-info "
                                f"do not apply to it")
        return import_npz(store_path, annotations, source, shard=shard, flush_every=flush_every,
                          progress=progress, command=command, on_segment=on_segment)
    source = Path(source)
    if not source.exists():
        raise ImportFailure(f"--from {source}: no such file or folder")
    rows = read_segments(annotations).to_pylist()
    clock = make_time_map(rows, annotations, time_map=time_map, video_info=video_info)
    published = record.opener(source, **options)
    try:
        provenance = {
            "source": "import",
            "import_format": format,
            "import_from": str(source.resolve()),
            "annotations": str(Path(annotations).resolve()),
            "command": command,
            "time_map": clock.describe(),
            "publisher": published.describe(),
        }
        store = _open_store(Path(store_path), published, provenance)
        todo, spans, skipped = _plan(store, rows, clock)
        bar = progress_bar(total=len(todo), desc="import", unit="seg", enabled=progress)
        try:
            if workers <= 1 or len(todo) < 2:
                report = _import_rows(store, todo, spans, published, shard=shard, flush_every=flush_every,
                                      on_segment=on_segment, advance=bar.update)
            else:
                published.close()  # each worker opens the source itself, after the fork
                report = _import_in_workers(store, todo, spans, format, source, options, workers=workers,
                                            shard=shard, flush_every=flush_every, on_segment=on_segment,
                                            advance=bar.update)
        finally:
            bar.close()
        report.skipped = skipped
        return report
    finally:
        published.close()


def _open_store(path: Path, published: PublishedSource, provenance: dict[str, Any]) -> FeatureStore:
    store = FeatureStore.create(path, fields=published.fields, provenance=provenance)
    recorded = store.manifest.get("provenance", {})
    differ = [key for key in PROVENANCE_KEYS if recorded.get(key) != provenance[key]]
    if differ:
        key = differ[0]
        raise ImportFailure(f"{path} was imported with {key} {recorded.get(key)!r}; this run would use "
                            f"{provenance[key]!r}. Use a new store directory.")
    return store


def _plan(store: FeatureStore, rows: list[dict[str, Any]],
          clock: TimeMap) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    """The rows not yet stored, video by video in time order (each reader then walks its source front
    to back), each with its span on the clock or why it has none; and how many are stored already.

    Each shard's writer is opened once first: it exports what a killed import committed to its
    journal but had not yet exported, so those segments count as stored (a shard another process is
    writing is left to it)."""
    for shard in store.shards():
        try:
            with store.writer(shard):
                pass
        except StoreLockedError:
            continue
    done = set(store.uids(status=STATUS_OK))
    todo = [row for row in rows if row["uid"] not in done]
    spans: dict[str, Any] = {}
    for row in todo:
        try:
            spans[row["uid"]] = clock.span(row)
        except SegmentSkipped as err:
            spans[row["uid"]] = err
    todo.sort(key=lambda row: (str(row["video_id"]), _start_of(spans[row["uid"]]), str(row["uid"])))
    return todo, spans, len(rows) - len(todo)


def _import_rows(store: FeatureStore, todo: list[dict[str, Any]], spans: Mapping[str, Any],
                 published: PublishedSource, *, shard: str, flush_every: int,
                 on_segment: Callable[[str], None] | None, advance: Callable[[int], Any]) -> ImportReport:
    """Read and commit ``todo`` in order through one writer of ``shard``."""
    report = ImportReport()
    with store.writer(shard, flush_every=flush_every) as writer:
        for row in todo:
            uid = row["uid"]
            span = spans[uid]
            try:
                if isinstance(span, SegmentSkipped):
                    raise span
                arrays = published.read(span)
            except SegmentSkipped as err:
                writer.fail(row, str(err))
                report.failed.append((uid, str(err)))
            else:
                problem = value_problem(arrays, store.fields)
                if problem is not None:
                    writer.fail(row, problem)
                    report.failed.append((uid, problem))
                else:
                    writer.put(row, arrays)
                    report.imported += 1
            if on_segment is not None:
                on_segment(uid)
            advance(1)
    return report


def _shares(todo: list[dict[str, Any]], spans: Mapping[str, Any], workers: int) -> list[list[dict[str, Any]]]:
    """``todo`` cut into ``workers`` shares of whole videos, about equal in seconds of segments."""
    videos: dict[str, list[dict[str, Any]]] = {}
    for row in todo:
        videos.setdefault(str(row["video_id"]), []).append(row)

    def seconds(rows: list[dict[str, Any]]) -> float:
        return sum(max(span.stop - span.start, 0.1) if not isinstance(span, SegmentSkipped) else 0.1
                   for span in (spans[row["uid"]] for row in rows))

    shares: list[list[dict[str, Any]]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for video in sorted(videos, key=lambda v: -seconds(videos[v])):  # largest first, to the lightest share
        lightest = loads.index(min(loads))
        shares[lightest].extend(videos[video])
        loads[lightest] += seconds(videos[video])
    order = {str(row["uid"]): i for i, row in enumerate(todo)}
    return [sorted(share, key=lambda row: order[str(row["uid"])]) for share in shares if share]


def _import_in_workers(store: FeatureStore, todo: list[dict[str, Any]], spans: Mapping[str, Any], format: str,
                       source: Path, options: Mapping[str, Any], *, workers: int, shard: str, flush_every: int,
                       on_segment: Callable[[str], None] | None, advance: Callable[[int], Any]) -> ImportReport:
    """`_import_rows` in forked processes, one shard and one share of the videos each."""
    context = multiprocessing.get_context("fork")
    counted = context.Value("q", 0)
    results = context.SimpleQueue()
    shares = _shares(todo, spans, workers)
    processes = [context.Process(target=_worker, name=f"featstore-import-{i}", daemon=True,
                                 args=(i, store.path, share, spans, format, source, dict(options), f"{shard}-{i}",
                                       flush_every, on_segment, counted, results))
                 for i, share in enumerate(shares)]
    for process in processes:
        process.start()
    shown, outcomes = 0, {}
    while True:
        alive = any(process.is_alive() for process in processes)
        while not results.empty():  # drained while they run: a large report must not block its sender
            index, outcome = results.get()
            outcomes[index] = outcome
        advance(counted.value - shown)
        shown = counted.value
        if not alive:
            break
        time.sleep(0.2)
    for process in processes:
        process.join()
    report = ImportReport()
    for index, process in enumerate(processes):
        outcome = outcomes.get(index)
        if isinstance(outcome, str):
            raise ImportFailure(outcome)
        if outcome is None:
            raise ImportFailure(f"import worker {index} ended with exit status {process.exitcode} before it "
                                f"finished; what it committed is kept: rerun to go on")
        report.imported += outcome.imported
        report.failed += outcome.failed
    return report


def _worker(index: int, store_path: Path, todo: list[dict[str, Any]], spans: Mapping[str, Any], format: str,
            source: Path, options: dict[str, Any], shard: str, flush_every: int,
            on_segment: Callable[[str], None] | None, counted: Any, results: Any) -> None:
    """One import process: its own source reader and its own shard's writer."""

    def advance(n: int) -> None:
        with counted.get_lock():
            counted.value += n

    try:
        published = get_format(format).opener(source, **options)
        try:
            report = _import_rows(FeatureStore.open(store_path), todo, spans, published, shard=shard,
                                  flush_every=flush_every, on_segment=on_segment, advance=advance)
        finally:
            published.close()
        results.put((index, report))
    except Exception as err:  # noqa: BLE001 - the parent raises it, as one line
        results.put((index, str(err) if isinstance(err, ImportFailure) else f"{type(err).__name__}: {err}"))


def _start_of(span: Any) -> float:
    return span.start if not isinstance(span, SegmentSkipped) else -1.0
