"""Launching one of our CLIs under torchrun, as a user would, for the data-parallel tests."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

import pytest


def torchrun_cli(module: str, args: Sequence[str], *, processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node N -m MODULE ARGS`` on one thread each.

    Skips the test when torchrun cannot rendezvous here (no usable local port); fails it, with the
    end of stderr, when the command fails.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
              "-m", module, *args]
    result = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0 and "rendezvous" in result.stderr.lower():
        pytest.skip(f"torchrun could not start here: {result.stderr[-500:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result
