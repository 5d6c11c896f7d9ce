"""Fault injection for the crash-consistency and resource tests, without test hooks in product code.

Two halves:

* **The shim** (this file run as a script). It wraps a console script (`featstore`, `heads`),
  patches a few I/O entry points, then runs the command exactly as the installed script would::

      FEATSTORE_FAULT="lmdb.commit:7:kill-during" python tests/reliability/faults.py featstore import ...

  ``FEATSTORE_FAULT`` is ``POINT:N:ACTION[:ARG]`` (several joined by ``,``): on the N-th call of
  ``POINT`` in the process that started (not in forked DataLoader workers), do ``ACTION``.

  ========================  =================================================================
  point                     what is wrapped
  ========================  =================================================================
  ``lmdb.commit``           commit of a write transaction (every environment ``lmdb.open`` makes)
  ``parquet.write``         ``pyarrow.parquet.write_table``
  ``os.replace``            ``os.replace`` (the rename that publishes an atomic write)
  ``torch.save``            ``torch.save`` (checkpoints)
  ========================  =================================================================

  ========================  =================================================================
  action                    effect
  ========================  =================================================================
  ``kill``                  SIGKILL before the call (the commit / write / rename never happens)
  ``kill-after``            the call completes, then SIGKILL
  ``kill-during``           lmdb.commit: a thread SIGKILLs the process a seeded 0-400 us into the
                            real commit (py-lmdb releases the GIL while LMDB writes its pages);
                            file writers: the file is written, cut to a seeded fraction of its
                            bytes (what a crash mid-write leaves), then SIGKILL
  ``enospc``                file writers: a seeded fraction of the bytes is written, then
                            ``OSError(ENOSPC)``; lmdb.commit: ``lmdb.Error`` naming ENOSPC
  ``pause:FLAG``            write ``FLAG.waiting``, then wait (up to 120 s) until ``FLAG`` exists
  ========================  =================================================================

  ``FEATSTORE_FAULT_SEED`` seeds the delays and fractions. ``FEATSTORE_FSIZE_LIMIT=BYTES`` sets
  ``RLIMIT_FSIZE`` (SIGXFSZ ignored), so that every write past BYTES fails with EFBIG in the kernel,
  for LMDB, Parquet and torch alike: the closest thing to a full disk that needs no privileges.

* **The harness** (functions imported by the tests): run a command under the shim, or kill it from
  the outside after a seeded delay, and the checks every crash test makes afterwards. Commands
  are forked from a warm interpreter that has torch and co. imported (`forkserver`: seconds saved
  per command); ``FEATSTORE_TEST_FRESH_PROCESSES=1`` starts each one fresh instead.
"""
from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tests.reliability import forkserver

REPO = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).resolve()
FAULT_ENV = "FEATSTORE_FAULT"
SEED_ENV = "FEATSTORE_FAULT_SEED"
FSIZE_ENV = "FEATSTORE_FSIZE_LIMIT"
POINTS = ("lmdb.commit", "parquet.write", "os.replace", "torch.save")
# Read when a command runs, not when a library is imported: a command forked from the warm server
# may set them (`forkserver`).
RUN_TIME_ENV = (FAULT_ENV, SEED_ENV, FSIZE_ENV, "PYTEST_CURRENT_TEST")


# ------------------------------------------------------------------------------------------------
# the shim (runs inside the process under test)


@dataclass
class _Fault:
    point: str
    nth: int
    action: str
    arg: str | None = None


def parse_faults(spec: str) -> list[_Fault]:
    """``"lmdb.commit:7:kill-during,os.replace:2:kill"`` -> faults."""
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        pieces = part.split(":", 3)
        if len(pieces) < 3 or pieces[0] not in POINTS:
            raise ValueError(f"bad fault {part!r}: POINT:N:ACTION[:ARG] with POINT in {POINTS}")
        faults.append(_Fault(pieces[0], int(pieces[1]), pieces[2], pieces[3] if len(pieces) > 3 else None))
    return faults


class _Injector:
    def __init__(self, faults: Sequence[_Fault], seed: int):
        self.faults = list(faults)
        self.counts = {point: 0 for point in POINTS}
        self.rng = random.Random(seed)
        self.pid = os.getpid()  # forked workers inherit the patches but never fire

    def due(self, point: str) -> _Fault | None:
        if os.getpid() != self.pid:
            return None
        self.counts[point] += 1
        for fault in self.faults:
            if fault.point == point and fault.nth == self.counts[point]:
                return fault
        return None

    @staticmethod
    def die() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # never reached: SIGKILL cannot be caught

    def pause(self, flag: str) -> None:
        Path(flag + ".waiting").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not Path(flag).exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    def file_write(self, point: str, real: Callable[..., Any], target: Callable[..., str | None]):
        """Wrap a function that writes one file whose path ``target(*args, **kwargs)`` names."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            fault = self.due(point)
            if fault is None:
                return real(*args, **kwargs)
            path = target(*args, **kwargs)
            if fault.action == "kill":
                self.die()
            if fault.action.startswith("pause"):
                self.pause(fault.arg or "")
                return real(*args, **kwargs)
            if fault.action == "kill-after":
                result = real(*args, **kwargs)
                self.die()
                return result
            if fault.action in ("kill-during", "enospc") and path is not None:
                real(*args, **kwargs)
                size = os.path.getsize(path)
                keep = int(size * self.rng.uniform(0.05, 0.95))
                os.truncate(path, keep)
                if fault.action == "kill-during":
                    self.die()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            raise ValueError(f"unknown action {fault.action!r} for {point}")

        return wrapped


class _TxnProxy:
    """A write transaction whose commit goes through the injector (py-lmdb's types are immutable)."""

    def __init__(self, txn: Any, injector: _Injector):
        self._txn = txn
        self._injector = injector

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)

    def __enter__(self) -> "_TxnProxy":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._txn.abort()

    def commit(self) -> None:
        import lmdb

        fault = self._injector.due("lmdb.commit")
        if fault is None:
            self._txn.commit()
            return
        if fault.action == "kill":
            self._injector.die()
        elif fault.action == "kill-after":
            self._txn.commit()
            self._injector.die()
        elif fault.action == "kill-during":
            delay = self._injector.rng.uniform(0.0, 400e-6)
            killer = threading.Thread(target=lambda: (time.sleep(delay), self._injector.die()), daemon=True)
            killer.start()
            self._txn.commit()
            killer.join()  # the commit finished first: die right after it
        elif fault.action == "enospc":
            self._txn.abort()
            raise lmdb.Error(f"mdb_txn_commit: {os.strerror(errno.ENOSPC)}")
        elif fault.action.startswith("pause"):
            self._injector.pause(fault.arg or "")
            self._txn.commit()
        else:
            raise ValueError(f"unknown action {fault.action!r} for lmdb.commit")


class _EnvProxy:
    def __init__(self, env: Any, injector: _Injector):
        self._env = env
        self._injector = injector

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    def begin(self, *args: Any, **kwargs: Any) -> Any:
        txn = self._env.begin(*args, **kwargs)
        return _TxnProxy(txn, self._injector) if kwargs.get("write") else txn


def install(spec: str | None = None, seed: int | None = None) -> _Injector | None:
    """Patch the I/O entry points for the faults in ``spec`` (default: the environment)."""
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    seed = int(os.environ.get(SEED_ENV, "0")) if seed is None else seed
    limit = os.environ.get(FSIZE_ENV)
    if limit:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a core dump
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    if not spec:
        return None
    injector = _Injector(parse_faults(spec), seed)
    import lmdb
    import pyarrow.parquet as pq

    real_open = lmdb.open
    lmdb.open = lambda *a, **k: _EnvProxy(real_open(*a, **k), injector)
    pq.write_table = injector.file_write("parquet.write", pq.write_table,
                                         lambda table, where, *a, **k: os.fspath(where))
    real_replace = os.replace

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        fault = injector.due("os.replace")
        if fault is None:
            return real_replace(src, dst, *args, **kwargs)
        if fault.action == "kill":
            injector.die()
        if fault.action == "kill-after":
            real_replace(src, dst, *args, **kwargs)
            injector.die()
        if fault.action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
        raise ValueError(f"unknown action {fault.action!r} for os.replace")

    os.replace = replace
    if any(f.point == "torch.save" for f in injector.faults):
        import torch

        torch.save = injector.file_write("torch.save", torch.save, lambda obj, where, *a, **k: os.fspath(where))
    return injector


def _run_console_script(name: str, args: list[str]) -> None:
    from importlib.metadata import entry_points

    # The first one on sys.path, as the shell would run it (a venv may see a system install too).
    entry = next(e for e in entry_points(group="console_scripts") if e.name == name)
    main = entry.load()
    sys.argv = [name, *args]
    sys.exit(main())


# ------------------------------------------------------------------------------------------------
# the harness (used by the tests)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a command under test: one thread per library (two shared cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONHASHSEED="0", MPLBACKEND="Agg")
    for key in (FAULT_ENV, SEED_ENV, FSIZE_ENV):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def command(script: str, *args: Any) -> list[str]:
    """argv that runs console script ``script`` under the shim."""
    return [sys.executable, str(SHIM), script, *(str(a) for a in args)]


def _launch(argv: Sequence[str], extra: dict[str, str], *, new_session: bool = False) -> Any:
    """Start ``argv``: forked from the warm server (`forkserver`) when it is one of `command`'s."""
    return forkserver.launch(argv, subprocess_env(**extra), shim=SHIM, base_env=subprocess_env(),
                             variable=RUN_TIME_ENV, cwd=REPO, new_session=new_session)


def warm_up() -> None:
    """Start the fork server now (if commands are forked), so that timing a command leaves its start out."""
    if os.environ.get(forkserver.FRESH_ENV) != "1":
        forkserver.server(SHIM, subprocess_env(), REPO, RUN_TIME_ENV)


def run(argv: Sequence[str], *, fault: str | None = None, seed: int = 0, fsize_limit: int | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``argv`` (from `command`) to completion, with an optional fault."""
    extra = {SEED_ENV: str(seed)}
    if fault:
        extra[FAULT_ENV] = fault
    if fsize_limit is not None:
        extra[FSIZE_ENV] = str(fsize_limit)
    process = _launch(argv, extra)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def start(argv: Sequence[str], *, fault: str | None = None, seed: int = 0) -> Any:
    """Start ``argv`` (from `command`) in the background, with an optional fault (e.g. a pause);
    returns a `subprocess.Popen` or its look-alike `forkserver.ForkedProcess`."""
    extra = {SEED_ENV: str(seed)}
    if fault:
        extra[FAULT_ENV] = fault
    return _launch(argv, extra)


def run_killed_after(argv: Sequence[str], delay_s: float, *, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start ``argv`` and SIGKILL it from the outside after ``delay_s`` (if it is still running)."""
    process = _launch(argv, {}, new_session=True)
    try:
        process.wait(timeout=delay_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the command and any decode workers it forked
        except ProcessLookupError:  # it ended in between
            pass
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def killed(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == -signal.SIGKILL


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


def wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)


if __name__ == "__main__":
    if sys.argv[1:] == [forkserver.SERVE_FLAG]:
        # Returns only in a forked child, set up as the fresh process it stands for: run its command.
        script, *args = forkserver.serve()["argv"]
        install()
        forkserver.run_as_script(lambda: _run_console_script(script, args))
    install()
    _run_console_script(sys.argv[1], sys.argv[2:])
