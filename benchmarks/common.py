"""What every benchmark shares: the result row, timing by medians, sizes, a scratch folder, the machine."""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

GiB = 2**30
MiB = 2**20


@dataclass
class Result:
    """One row of the table / one object of the JSON list.

    ``ratio`` is ``ours / reference`` (both in ``unit``); ``goal`` says which direction is good
    (``">= 10"``: ours must be at least ten times the reference; ``"<= 2"``: at most twice).
    ``meets`` is None where there is no goal on this machine, or the row was skipped.
    """

    name: str
    ours: float | None
    reference: float | None
    unit: str
    ratio: float | None
    goal: str
    meets: bool | None
    notes: str = ""
    status: str = "ok"  # 'ok' | 'skipped' | 'error'

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare(name: str, ours: float, reference: float, *, unit: str, goal: str, notes: str = "") -> Result:
    """A measured row: ratio = ours / reference, checked against ``goal`` ('>= x', '<= x' or 'report ...')."""
    ratio = ours / reference if reference else float("nan")
    return Result(name, ours, reference, unit, ratio, goal, meets_goal(ratio, goal), notes)


def meets_goal(ratio: float, goal: str) -> bool | None:
    parts = goal.split()
    if len(parts) < 2 or parts[0] not in (">=", "<="):
        return None
    threshold = float(parts[1])
    return bool(ratio >= threshold) if parts[0] == ">=" else bool(ratio <= threshold)


def skipped(name: str, reason: str, *, unit: str = "", goal: str = "") -> Result:
    return Result(name, None, None, unit, None, goal, None, f"skipped: {reason}", status="skipped")


def failed(name: str, error: BaseException, *, unit: str = "", goal: str = "") -> Result:
    return Result(name, None, None, unit, None, goal, None, f"error: {type(error).__name__}: {error}",
                  status="error")


def median_time(fn: Callable[[], Any], *, warmup: int, repeats: int, before: Callable[[], Any] | None = None,
                sync: Callable[[], Any] | None = None) -> tuple[float, list[float]]:
    """Median wall seconds of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones.

    Args:
        before: run untimed before every call (e.g. closing a store so each call reopens it).
        sync: run inside the timed region after ``fn`` (e.g. ``torch.cuda.synchronize``).
    Returns:
        (median, all timed samples).
    """
    samples = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        elapsed = time.perf_counter() - started
        if i >= warmup:
            samples.append(elapsed)
    return statistics.median(samples), samples


def interleaved(fns: dict[str, Callable[[int], Any]], *, warmup: int, repeats: int,
                before: Callable[[], Any] | None = None,
                sync: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """Wall seconds of several functions timed in turns: round r calls every ``fn(r)`` once.

    Taking turns spreads any drift of a shared machine (other users' jobs, page-cache pressure)
    over ours and the reference alike, rather than over whichever ran during it.

    Returns:
        name -> the ``repeats`` timed samples (the first ``warmup`` rounds are not kept).
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            if before is not None:
                before()
            started = time.perf_counter()
            fn(round_)
            if sync is not None:
                sync()
            if round_ >= warmup:
                samples[name].append(time.perf_counter() - started)
    return samples


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"{one:.1f}/{five:.1f}"
    except OSError:
        return "n/a"


def spread(samples: list[float]) -> str:
    """'min-max' of timed samples, for the notes."""
    return f"{min(samples):.3g}-{max(samples):.3g}"


@dataclass(frozen=True)
class Sizes:
    """Input sizes of one run (``--quick`` or full); each benchmark says which it used."""

    quick: bool
    segments: int  # segments of the shared store (store_preload / store_bytes / data path)
    verb_dim: int  # C
    det_dim: int  # Cd
    map_size: tuple[int, int, int]  # verb.map (T, H, W)
    n_global: int = 60
    n_local: int = 40
    data_path_segments: int = 2000  # rows the data-path benchmarks batch over
    batch_size: int = 32
    repeats: int = 5
    warmup: int = 1
    # extraction
    extract_segments: int = 12
    extract_batch: int = 4
    extract_workers: int = 2
    clip_frames: int = 8
    clip_size: int = 112
    frame_hw: tuple[int, int] = (256, 456)  # EPIC's released frame size
    detector: str = "fasterrcnn_mobilenet_v3_large_320_fpn"
    det_min_size: int | None = None
    det_max_size: int | None = None
    extract_repeats: int = 3
    # parallel heads
    heads_segments: int = 512
    heads_dim: int = 512
    heads_det_dim: int = 256
    heads_map: tuple[int, int, int] = (1, 7, 7)
    heads_epochs: int = 2
    heads_runs: int = 8
    heads_repeats: int = 2

    def payload_per_segment(self, map_size: tuple[int, int, int] | None = None) -> int:
        """Bytes of one segment's tensors as stored (float16 features, float32 boxes and scores)."""
        t, h, w = map_size or self.map_size
        c, cd = self.verb_dim, self.det_dim
        slots = self.n_global + self.n_local
        return 2 * (2 * c + c * t * h * w + slots * cd) + 4 * (slots * 4 + slots)

    def describe(self) -> str:
        t, h, w = self.map_size
        return (f"{self.segments} segments, C={self.verb_dim}, Cd={self.det_dim}, {self.n_global}/{self.n_local} slots, "
                f"verb.map {self.verb_dim}x{t}x{h}x{w} fp16")


QUICK = Sizes(
    quick=True, segments=256, verb_dim=256, det_dim=128, map_size=(2, 7, 7), data_path_segments=256,
    repeats=3, extract_segments=4, extract_batch=2, extract_workers=1, clip_size=32, frame_hw=(90, 160),
    det_min_size=64, det_max_size=128, extract_repeats=1, heads_segments=128, heads_dim=32, heads_det_dim=16,
    heads_map=(1, 4, 4), heads_epochs=1, heads_repeats=1,
)
FULL = Sizes(quick=False, segments=5000, verb_dim=2048, det_dim=1024, map_size=(4, 7, 7), repeats=9)


class Workspace:
    """A scratch folder for one run: every benchmark writes under it, and all of it is deleted at the end."""

    def __init__(self, parent: str | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="featstore-bench-", dir=parent))
        self._cache: dict[str, Any] = {}

    def path(self, name: str) -> Path:
        return self.root / name

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """Build something once per run (e.g. the shared store) and hand it to every benchmark that needs it."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def forget(self, key: str) -> None:
        self._cache.pop(key, None)

    def remove(self, name: str | Path) -> None:
        target = self.root / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink()

    def close(self) -> None:
        self._cache.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); a large number where it cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def machine() -> str:
    """One line about the machine the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as handle:
            total = int(handle.readline().split()[1]) * 1024
            memory = f", {total / GiB:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return (f"{os.cpu_count()} CPU cores ({cpu}){memory}{gpu}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); Python {platform.python_version()}")


def synchronize(device: torch.device | str) -> Callable[[], None] | None:
    """A sync callable for timing on CUDA, None on CPU (where every op is synchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


@dataclass
class Context:
    """What every benchmark function gets."""

    sizes: Sizes
    workspace: Workspace
    log: Callable[[str], None]
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)
