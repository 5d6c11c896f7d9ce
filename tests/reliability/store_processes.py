"""What the reliability tests run in spawned processes: a writer appending, readers reading a store
while it is written. Kept out of the test modules, which import torch: a spawned interpreter imports
the module of its target, and this one needs the store alone (a second to start instead of four).
"""
from __future__ import annotations

import time

import numpy as np

from featstore.store.reader import FeatureStore
from featstore.store.schema import FieldSpec
from featstore.store.writer import segment_checksum


# ------------------------------------------------------------------------------------------------
# a writer appending while readers in other processes read
# (test_concurrency.py::test_readers_in_other_processes_see_only_complete_segments_while_a_writer_appends)

APPEND_FIELDS = {"verb.global": FieldSpec("float16", (64,)), "verb.map": FieldSpec("float16", (16, 64))}
# 240 segments in 80 commits: enough states to overlap and map doublings to cross; each reader round
# reads the whole store, so more segments only make the rounds (and the pauses) longer.
N_APPENDED = 240
PAUSES = (40, 120, 200)  # the writer waits here until every reader has read the store as it is


def appended_row(i: int) -> dict:
    return {"uid": f"u{i:05d}", "participant_id": "P01", "video_id": "P01_01", "start_frame": i + 1,
            "stop_frame": i + 2, "verb_class": i % 5, "noun_class": i % 7}


def appended_tensors(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {name: rng.standard_normal(spec.shape).astype(np.float16) for name, spec in APPEND_FIELDS.items()}


def append_with_pauses(path: str, everyone_ready, n: int, rounds) -> None:
    """Append ``n`` segments, waiting at each of `PAUSES` for every reader to finish a round."""
    store = FeatureStore.open(path)
    # A 32 KiB map: it doubles about six times while the readers read (three before the second pause).
    with store.writer(flush_every=3, map_size=1 << 15) as writer:
        everyone_ready.wait()
        for i in range(n):
            if i in PAUSES:
                wait_for_reads(rounds)
            writer.put(appended_row(i), appended_tensors(i))


def wait_for_reads(rounds, timeout: float = 60.0) -> None:
    """Wait until every reader has finished a round that started after now, so that the reads overlap
    the writes however loaded the machine is (on a busy one the writer can otherwise finish first)."""
    wanted = [count + 2 for count in rounds[:]]  # the round under way may have started before the pause
    deadline = time.monotonic() + timeout
    while any(count < want for count, want in zip(rounds[:], wanted)) and time.monotonic() < deadline:
        time.sleep(0.01)


def read_until(path: str, everyone_ready, done, results, shared_rounds, slot: int) -> None:
    """Read everything the index lists as stored, over and over, until the writer is done
    (``shared_rounds[slot]`` counts the finished rounds)."""
    store = FeatureStore.open(path)
    store.uids()
    everyone_ready.wait()
    rounds, seen, problems = 0, [], []
    while True:
        finished = done.is_set()
        try:
            uids = store.uids()
            seen.append(len(uids))
            problems += store.verify(uids)  # one read transaction over all listed segments
            for uid in uids[-5:]:  # the newest ones, each in its own transaction
                i = int(uid[1:])
                arrays = store.read(uid)
                if segment_checksum(arrays) != segment_checksum(appended_tensors(i)):
                    problems.append((uid, "bytes differ from what was written"))
        except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
            problems.append(("?", repr(err)))
        rounds += 1
        shared_rounds[slot] = rounds
        if finished:
            break
    results.put({"rounds": rounds, "seen": seen, "problems": problems[:10], "n_problems": len(problems)})


# ------------------------------------------------------------------------------------------------
# a reader holding a store open while its map grows
# (test_resources.py::test_a_store_outgrows_its_lmdb_map_hundreds_of_times_while_a_reader_holds_it_open)

MAP_FIELDS = {"verb.map": FieldSpec("float16", (64, 32, 32))}  # 128 KiB a segment
N_BIG = 160  # 20 MiB of tensors into a 64 KiB map: 320 times its size


def map_row(i: int) -> dict:
    return {"uid": f"{i:04d}", "participant_id": "P01", "video_id": "P01_01", "start_frame": 1, "stop_frame": 2}


def read_all_after_growth(path: str, opened, grown, results) -> None:
    store = FeatureStore.open(path)
    store.read("0000")  # its environment is mapped at the map's first size
    opened.set()
    grown.wait(300)
    uids = store.uids()
    values = store.read_field(uids, "verb.map")
    results.put((len(uids), [float(v[0, 0, 0]) for v in values], store.verify()))
