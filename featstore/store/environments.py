"""The LMDB environments this process has open: one per shard directory, shared by every store object.

LMDB (and py-lmdb's guard) forbid opening one environment twice in a process, so every
`FeatureStore` and `StoreWriter` takes its environments from the one `ENVIRONMENTS` cache; a
writer's environment serves reads of its shard too. Readers open lazily, read-only; a forked child
(DataLoader workers fork) starts with an empty cache and opens its own (`EnvironmentCache.forget_after_fork`).

Readers map the shards for random access (readahead off); `read_around` gives the maps the kernel's
normal read-around for a bulk pass (Linux ``madvise``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import lmdb

from featstore.store.schema import StoreError

__all__ = ["ENVIRONMENTS", "EnvironmentCache", "read_around"]

_MADV_NORMAL, _MADV_RANDOM = 0, 1  # asm-generic/mman-common.h
_MAX_READERS = 2048


class EnvironmentCache:
    """The open LMDB environments of this process, by resolved shard path, and its writers' lock files.

    Thread-safe for readers: reader threads (streaming) may all find an environment closed at once;
    one opens it, the others take that one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._envs: dict[str, lmdb.Environment] = {}
        self._writer_keys: set[str] = set()  # keys of _envs that a writer of this process opened
        self._inherited_writers: list[lmdb.Environment] = []  # a parent's writers, kept unused after a fork
        self._writer_locks: set[IO[Any]] = set()  # lock-file handles of this process's writers

    @staticmethod
    def _key(shard_dir: Path) -> str:
        return os.path.realpath(shard_dir)

    # ---------------------------------------------------------------- readers
    def reader(self, shard_dir: Path) -> lmdb.Environment:
        """The environment of ``shard_dir`` for reading: this process's open one, else opened read-only.

        Raises:
            StoreError: the shard cannot be opened, or its file is truncated.
        """
        key = self._key(shard_dir)
        env = self._envs.get(key)
        if env is not None:
            return env
        with self._lock:  # LMDB refuses a second open in a process: one thread opens it
            env = self._envs.get(key)
            if env is None:
                env = self._envs[key] = _open_reader(shard_dir)
            return env

    def close_reader(self, shard_dir: Path) -> None:
        """Close this process's read-only environment of ``shard_dir`` (a writer's stays open)."""
        key = self._key(shard_dir)
        if key in self._envs and key not in self._writer_keys:
            self._envs.pop(key).close()

    # ---------------------------------------------------------------- writers
    def writer(self, shard_dir: Path, map_size: int) -> lmdb.Environment:
        """Open ``shard_dir`` for writing (replacing this process's reader of it).

        The caller holds the shard's writer lock (`hold_lock`).

        Raises:
            StoreError: the shard cannot be opened for writing, or its file is truncated.
        """
        self.close_reader(shard_dir)
        # No fsync per commit: a killed process loses nothing committed (the pages are the kernel's), and
        # StoreWriter.flush syncs before it exports rows to Parquet, so an OS crash can never leave an
        # index row pointing at tensors that did not reach the disk.
        try:
            env = lmdb.open(str(shard_dir), map_size=map_size, subdir=True, max_readers=_MAX_READERS,
                            meminit=False, sync=False, metasync=False)
        except lmdb.Error as err:
            raise StoreError(f"LMDB shard {shard_dir} cannot be opened for writing: {err}") from err
        try:
            _check_not_truncated(env, shard_dir)
            # Reader slots of processes that died mid-read would pin old pages forever: clear them.
            env.reader_check()
        except BaseException:
            env.close()
            raise
        key = self._key(shard_dir)
        self._envs[key] = env
        self._writer_keys.add(key)
        return env

    def close_writer(self, shard_dir: Path) -> None:
        """Close this process's writer environment of ``shard_dir`` (nothing when none is open)."""
        key = self._key(shard_dir)
        self._writer_keys.discard(key)
        env = self._envs.pop(key, None)
        if env is not None:
            env.close()

    def hold_lock(self, handle: IO[Any]) -> None:
        """Record a writer's lock-file handle, so that a forked child closes its copy of it."""
        self._writer_locks.add(handle)

    def drop_lock(self, handle: IO[Any]) -> None:
        """Forget a writer's lock-file handle (its writer is releasing it)."""
        self._writer_locks.discard(handle)

    # ---------------------------------------------------------------- fork
    def forget_after_fork(self) -> None:
        """In a forked child: drop the parent's environments and lock files (registered with ``os``).

        A child must not use its parent's LMDB handles: the inherited read-only ones are closed so the
        child reopens its own (closing a lock-free reader touches only this process's mapping and
        descriptor); writer handles are dropped unused. A child's copy of a writer's lock descriptor
        would keep the shard locked after the writer dies (flock belongs to the open file, which the
        child shares), so the child's copies are closed.
        """
        for handle in list(self._writer_locks):
            try:
                os.close(handle.fileno())
            except OSError:
                pass
        self._writer_locks.clear()
        self._lock = threading.Lock()  # another thread of the parent may have held it at the fork
        for key in list(self._envs):
            env = self._envs.pop(key)
            if key in self._writer_keys:
                self._inherited_writers.append(env)  # kept alive: garbage collection would close it
            else:
                env.close()
        self._writer_keys.clear()


ENVIRONMENTS = EnvironmentCache()
os.register_at_fork(after_in_child=ENVIRONMENTS.forget_after_fork)


def _open_reader(shard_dir: Path) -> lmdb.Environment:
    # Readers register in LMDB's lock table (lock=True) whenever they may: an unregistered
    # reader's snapshot is invisible to a writer in another process, which then recycles the
    # pages that snapshot is still walking, and keys the index lists as stored read back as
    # missing. Where the lock file cannot be opened (read-only copy of a store, no write
    # permission) the store is not being written either, and a lock-free reader is safe.
    # Not fork-safe either way: `forget_after_fork` makes each process open its own.
    try:
        env = lmdb.open(str(shard_dir), readonly=True, lock=True, readahead=False, max_readers=_MAX_READERS,
                        subdir=True)
    except lmdb.Error:
        try:
            env = lmdb.open(str(shard_dir), readonly=True, lock=False, readahead=False, max_readers=_MAX_READERS,
                            subdir=True)
        except lmdb.Error as err:
            raise StoreError(f"LMDB shard {shard_dir} cannot be opened: {err}") from err
    try:
        _check_not_truncated(env, shard_dir)
    except StoreError:
        env.close()
        raise
    return env


def _check_not_truncated(env: lmdb.Environment, shard_dir: Path) -> None:
    """Refuse an LMDB file shorter than its own last page: touching the missing pages would kill the
    process with SIGBUS (LMDB maps the file) instead of raising an error anyone could read."""
    data_file = shard_dir / "data.mdb"
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(data_file)
    if size < needed:
        raise StoreError(
            f"LMDB shard {shard_dir} is truncated: {data_file} holds {size:,} bytes, its pages end at "
            f"{needed:,}. Restore the file, or delete the shard's folder and its segments/boxes parts "
            f"(part-{shard_dir.name}-*.parquet) and rebuild them"
        )


# ------------------------------------------------------------------------------------------------
# readahead


@contextlib.contextmanager
def read_around(shard_dirs: Iterable[Path]) -> Iterator[None]:
    """The kernel's normal read-around on the shards' memory maps inside the context, random access after.

    Shards that cannot be opened are passed over (the read itself reports them). Linux only:
    elsewhere nothing changes.
    """
    regions = []
    for shard_dir in shard_dirs:
        try:
            ENVIRONMENTS.reader(shard_dir)  # mapped now, so that the mapping can be found
        except (StoreError, lmdb.Error):
            continue
        region = _mapped_region(shard_dir / "data.mdb")
        if region is not None and _madvise(*region, _MADV_NORMAL):
            regions.append(region)
    try:
        yield
    finally:
        for region in regions:
            _madvise(*region, _MADV_RANDOM)


@functools.cache
def _libc() -> Any:
    """This process's C library with ``madvise`` typed, or None where there is none to call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    except (OSError, AttributeError):
        return None
    return libc


def _madvise(address: int, length: int, advice: int) -> bool:
    """``madvise`` on a mapped region; False where it is not available or fails."""
    libc = _libc()
    return libc is not None and libc.madvise(address, length, advice) == 0


def _mapped_region(data_file: Path) -> tuple[int, int] | None:
    """(start address, length) of this process's mapping of ``data_file`` (LMDB maps it once), or None."""
    real = os.path.realpath(data_file)
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == real and int(parts[2], 16) == 0:
                    start, stop = (int(x, 16) for x in parts[0].split("-"))
                    return start, stop - start
    except (OSError, ValueError):
        return None
    return None
