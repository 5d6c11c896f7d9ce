"""Runs `featstore build` in a subprocess for the extraction tests.

    python tests/featstore/extract/torchrun_build.py [--kill-after N] -- BUILD_ARGS...
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/featstore/extract/torchrun_build.py -- BUILD_ARGS...

Without ``--kill-after`` it is exactly the `featstore build` command (each torchrun rank runs it).
With ``--kill-after N`` the same options drive `build_store` directly, and the process SIGKILLs
itself right after its N-th segment is committed: a crash part-way, for the resume test.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str]) -> int:
    import torch

    torch.set_num_threads(1)  # several of these share the test machine's cores
    kill_after = None
    if argv and argv[0] == "--kill-after":
        kill_after, argv = int(argv[1]), argv[2:]
    if argv and argv[0] == "--":
        argv = argv[1:]

    from cli.featstore_build import build, make_build_config
    from cli.featstore_cli import main as featstore_main

    if kill_after is None:
        featstore_main(["build", *argv], prog_name="featstore")  # exits with the command's status
        return 0

    from featstore.extract.service import build_store

    committed = 0

    def crash_after_n(uid: str) -> None:
        nonlocal committed
        committed += 1
        if committed >= kill_after:
            print(f"killing myself after {committed} segments (last {uid})", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    context = build.make_context("build", list(argv))
    report = build_store(make_build_config(context.params, command="torchrun_build.py"), on_segment=crash_after_n)
    print(report.summary())
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
