"""Commands under test forked from one warm interpreter instead of started fresh: the reliability
tests run some hundred `featstore` and `heads` commands, and a fresh one spends 2-3 s of its 4
importing torch, torchvision, pandas and matplotlib before it does anything.

The server (``python tests/reliability/faults.py --serve``, started once per test session) imports
only those third-party libraries, never our own code, then forks a child per request. The child
takes the request's environment, working directory and output files, reseeds NumPy's global
generator from the OS (as a fresh interpreter would; Python's `random` reseeds itself at fork),
and returns into the shim, which installs the faults and runs the console script exactly as in a
fresh process: our modules are imported, and faults patched, in the child. It is a real process,
killed by real signals, its exit status the kernel's.

What a fork cannot give is a different import-time environment, so the client forks only
commands whose environment equals the server's but for the variables read at run time (the
faults'); anything else, and every command when ``FEATSTORE_TEST_FRESH_PROCESSES=1``, runs as a
fresh subprocess. A child ends as a script does (atexit handlers, streams flushed) but skips the
teardown of every module (`run_as_script`).

The protocol is JSON lines: requests ``{"id", "argv", "env", "cwd", "stdout", "stderr",
"new_session"}`` on the server's stdin; on its stdout, ``{"ready"}`` once the libraries are
loaded, ``{"id", "pid"}`` when a child started and ``{"pid", "code"}`` when it ended (``code`` as
`subprocess` reports it: -N for signal N). Both sides are single-threaded: no lock is ever held
across a fork.
"""
from __future__ import annotations

import atexit
import gc
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

SERVE_FLAG = "--serve"
FRESH_ENV = "FEATSTORE_TEST_FRESH_PROCESSES"

# What every torch command imports anyway; our own packages stay out (they must load in the child,
# after the faults are installed, as in a fresh process).
PRELOAD = ("numpy", "torch", "torchvision", "torchvision.ops", "torchvision.models.detection", "lmdb",
           "pyarrow.parquet", "duckdb", "pandas", "matplotlib.pyplot", "PIL.Image", "click")

# ------------------------------------------------------------------------------------------------
# the server


def _send(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())  # no buffered object: nothing to inherit half-full


def _become_command(request: dict) -> None:
    """In the forked child: the request's session, environment, directory and standard streams."""
    import io

    if request["new_session"]:
        os.setsid()
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                            (2, request["stderr"], os.O_WRONLY)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    # New stream objects over the new descriptors, buffered as a fresh non-interactive interpreter's.
    sys.stdin = sys.__stdin__ = open(0, closefd=False)
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(open(1, "wb", closefd=False), write_through=False)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(open(2, "wb", closefd=False), errors="backslashreplace",
                                                   line_buffering=True)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # from the OS, as at a fresh import


def serve() -> dict:
    """Run the server until its stdin closes; returns only in a forked child, with that child's request."""
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    gc.freeze()  # the children's collections never walk (so never copy) the preloaded objects
    _send({"ready": True})
    children: set[int] = set()
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.01)
        while children:  # reap whoever ended, and say so
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            _send({"pid": pid, "code": os.waitstatus_to_exitcode(status)})
        if not readable:
            continue
        chunk = os.read(0, 1 << 16)
        if not chunk:  # the tests are done (or gone): nothing may outlive them
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            os._exit(0)  # nothing to flush; tearing down torch and co. would only take time
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _become_command(request)
                return request
            children.add(pid)
            _send({"id": request["id"], "pid": pid})


def run_as_script(main: Callable[[], Any]) -> NoReturn:
    """In a forked child: run ``main`` and end the process as the interpreter ends a script (exit
    status, traceback, non-daemon threads joined, atexit handlers, streams flushed), less the teardown
    of every module: in a child of the server that touches, so copies, every preloaded page (over
    a second a command)."""
    import threading

    try:
        main()
        code = 0
    except SystemExit as exit:  # sys.exit(None | int | message), as the interpreter reads it
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: its traceback, exit status 1
        sys.excepthook(*sys.exc_info())
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


# ------------------------------------------------------------------------------------------------
# the client (in the test process)


class ForkedProcess:
    """The part of `subprocess.Popen` the reliability tests use, for a child of the fork server."""

    def __init__(self, server: "ForkServer", args: list[str], pid: int, stdout: Path, stderr: Path):
        self.args, self.pid, self._server = args, pid, server
        self._stdout, self._stderr = stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._server.pump(0.0)
            self.returncode = self._server.exits.pop(self.pid, None)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._server.pump(0.05 if left is None else min(left, 0.05))
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        texts = tuple(p.read_text(errors="replace") for p in (self._stdout, self._stderr))
        for path in (self._stdout, self._stderr):
            path.unlink(missing_ok=True)
        return texts


class ForkServer:
    """The test process's end of one server: starts it, waits until it is ready, forks commands."""

    def __init__(self, shim: Path, env: dict[str, str], cwd: Path):
        self.env, self.cwd = env, cwd
        self.outputs = Path(tempfile.mkdtemp(prefix="featstore-forkserver-"))
        self.process = subprocess.Popen([sys.executable, str(shim), SERVE_FLAG], cwd=cwd, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.exits: dict[int, int] = {}
        self._started: dict[int, int] = {}
        self._pending = b""
        self._next_id = 0
        self.ready = False
        atexit.register(self.close)
        while not self.ready:  # so that no command's timing includes the server's start
            self.pump(1.0)

    def pump(self, timeout: float) -> None:
        """Read whatever the server said within ``timeout`` seconds."""
        fd = self.process.stdout.fileno()
        readable, _, _ = select.select([fd], [], [], timeout)
        if not readable:
            return
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            raise RuntimeError(f"the fork server ended (exit {self.process.wait()})")
        self._pending += chunk
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            message = json.loads(line)
            if "id" in message:
                self._started[message["id"]] = message["pid"]
            elif "pid" in message:
                self.exits[message["pid"]] = message["code"]
            else:
                self.ready = True

    def start(self, argv: Sequence[str], env: dict[str, str], *, new_session: bool) -> ForkedProcess:
        """Fork the shim's ``argv[2:]`` (``argv`` is ``[python, shim, script, *args]``)."""
        self._next_id += 1
        request_id = self._next_id
        stdout, stderr = (self.outputs / f"{request_id}.{name}" for name in ("out", "err"))
        for path in (stdout, stderr):
            path.touch()
        request = {"id": request_id, "argv": list(argv[2:]), "env": env, "cwd": str(self.cwd),
                   "stdout": str(stdout), "stderr": str(stderr), "new_session": new_session}
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()
        while request_id not in self._started:
            self.pump(1.0)
        return ForkedProcess(self, list(argv), self._started.pop(request_id), stdout, stderr)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for path in self.outputs.glob("*"):
            path.unlink()
        self.outputs.rmdir()


_server: ForkServer | None = None


def _same(env: dict[str, str], other: dict[str, str], variable: Sequence[str]) -> bool:
    return {k: v for k, v in env.items() if k not in variable} == {k: v for k, v in other.items() if k not in variable}


def server(shim: Path, base_env: dict[str, str], cwd: Path, variable: Sequence[str]) -> ForkServer:
    """The running server for ``base_env`` (up to the ``variable`` ones), started (and waited for)
    if there is none."""
    global _server
    if _server is None or _server.process.poll() is not None or not _same(_server.env, base_env, variable):
        _server = ForkServer(shim, base_env, cwd)
    return _server


def launch(argv: Sequence[str], env: dict[str, str], *, shim: Path, base_env: dict[str, str],
           variable: Sequence[str], cwd: Path, new_session: bool = False) -> Any:
    """Start ``argv`` forked from the server when it can be, else as a fresh subprocess.

    Args:
        argv: ``[python, shim, script, *args]`` (from `faults.command`) or any other command.
        env: the command's environment.
        shim, base_env, cwd: how to start the server (its environment is ``base_env``).
        variable: the environment variables read at run time only (a command's faults, pytest's
            ``PYTEST_CURRENT_TEST``): they may differ from the server's.
    Returns:
        a `ForkedProcess` or a `subprocess.Popen` (text mode, stdout and stderr piped).
    """
    forkable = (list(argv[:2]) == [sys.executable, str(shim)] and len(argv) > 2 and _same(env, base_env, variable)
                and os.environ.get(FRESH_ENV) != "1" and hasattr(os, "fork"))
    if forkable:
        return server(shim, base_env, cwd, variable).start(argv, env, new_session=new_session)
    return subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=new_session)
