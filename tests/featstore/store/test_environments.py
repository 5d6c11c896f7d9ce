"""The process's LMDB environments: forked DataLoader workers open their own, reader threads share one."""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
from pathlib import Path

import pytest

from featstore.store.reader import FeatureStore
from tests.featstore.store.small_store import fill_store


class _FieldDataset:
    def __init__(self, store: FeatureStore, uids: list[str]):
        self.store, self.uids = store, uids

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, i: int):
        arrays = self.store.read(self.uids[i], ["verb.global", "det.global.box"])
        return self.uids[i], arrays["verb.global"].tobytes() + arrays["det.global.box"].tobytes(), os.getpid()


# spawn starts a fresh interpreter per worker: seconds each.
@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_workers_read_the_same_bytes_as_one_process(tmp_path: Path, context: str) -> None:
    import torch.utils.data

    fill_store(tmp_path / "s", 24)
    store = FeatureStore.open(tmp_path / "s")
    uids = store.uids()
    store.read(uids[0])  # open the environment in the parent first: children must not reuse it
    expected = {uid: store.read(uid, ["verb.global", "det.global.box"]) for uid in uids}
    loader = torch.utils.data.DataLoader(
        _FieldDataset(store, uids), batch_size=None, num_workers=2,
        multiprocessing_context=mp.get_context(context),
    )
    pids = set()
    seen = {}
    for uid, raw, pid in loader:
        seen[uid] = raw
        pids.add(pid)
    assert len(pids) == 2 and os.getpid() not in pids
    assert seen == {u: a["verb.global"].tobytes() + a["det.global.box"].tobytes() for u, a in expected.items()}


def test_reader_threads_open_a_closed_shard_once(tmp_path: Path) -> None:
    written = fill_store(tmp_path / "s", 8)
    store = FeatureStore.open(tmp_path / "s")
    errors: list[Exception] = []
    for _ in range(20):
        store.close()  # e.g. between epochs: every reader thread then finds the shard closed at once
        barrier = threading.Barrier(16)

        def read() -> None:
            barrier.wait()
            try:
                store.read_fields(sorted(written), ["verb.global"])
            except Exception as err:  # noqa: BLE001 - collected for the assertion
                errors.append(err)

        threads = [threading.Thread(target=read) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
