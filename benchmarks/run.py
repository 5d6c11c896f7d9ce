"""Run the benchmarks: ``python benchmarks/run.py [--quick] [--only NAME] [--json FILE] [--gpu]``.

Prints a table and (``--json``) writes a list of ``{"name", "ours", "reference", "unit", "ratio",
"goal", "meets", "notes", "status"}`` objects, ``ratio`` = ours / reference. Every benchmark builds
its own inputs under one scratch folder, which is deleted at the end. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    FULL,
    QUICK,
    Context,
    Result,
    Workspace,
    failed,
    load_average,
    machine,
    skipped,
)


@dataclass(frozen=True)
class Benchmark:
    """A group function computes one or more named rows (they share inputs)."""

    names: tuple[str, ...]
    run: Callable[[Context, set[str]], list[Result]]
    units: tuple[str, ...]
    goals: tuple[str, ...]
    gpu: bool = False
    explicit: bool = False  # runs only when named in --only (too long for the default set)
    alias: str | None = None  # a name that selects every row of the group in --only


def _data(name: str) -> Callable[[Context, set[str]], list[Result]]:
    def run(ctx: Context, wanted: set[str]) -> list[Result]:
        from benchmarks import data_benchmarks

        return getattr(data_benchmarks, name)(ctx, wanted)

    return run


def _extract(name: str) -> Callable[[Context, set[str]], list[Result]]:
    def run(ctx: Context, wanted: set[str]) -> list[Result]:
        try:  # `featstore build` is being written by others: report a skip until it imports
            importlib.import_module("featstore.extract.service").build_store
        except (ImportError, AttributeError) as err:
            return [skipped(n, f"featstore.extract.service.build_store is not importable yet ({err})",
                            unit="segments/s") for n in wanted]
        from benchmarks import extract_benchmarks

        return getattr(extract_benchmarks, name)(ctx, wanted)

    return run


def _heads(name: str) -> Callable[[Context, set[str]], list[Result]]:
    def run(ctx: Context, wanted: set[str]) -> list[Result]:
        from benchmarks import heads_benchmarks

        return getattr(heads_benchmarks, name)(ctx, wanted)

    return run


def _scale(name: str) -> Callable[[Context, set[str]], list[Result]]:
    def run(ctx: Context, wanted: set[str]) -> list[Result]:
        from benchmarks import scale_benchmarks

        return getattr(scale_benchmarks, name)(ctx, wanted)

    return run


def _finetune(name: str) -> Callable[[Context, set[str]], list[Result]]:
    def run(ctx: Context, wanted: set[str]) -> list[Result]:
        from benchmarks import finetune_benchmarks

        return getattr(finetune_benchmarks, name)(ctx, wanted)

    return run


def _views(name: str) -> Callable[[Context, set[str]], list[Result]]:
    def run(ctx: Context, wanted: set[str]) -> list[Result]:
        from benchmarks import views_benchmarks

        return getattr(views_benchmarks, name)(ctx, wanted)

    return run


def _import(name: str) -> Callable[[Context, set[str]], list[Result]]:
    def run(ctx: Context, wanted: set[str]) -> list[Result]:
        from benchmarks import import_benchmarks

        return getattr(import_benchmarks, name)(ctx, wanted)

    return run


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(("train_data_path_vs_npy", "train_data_path_vs_memory"), _data("train_data_path"),
              ("batches/s", "batches/s"), (">= 10", ">= 0.8")),
    Benchmark(("store_preload_vs_npy",), _data("store_preload"), ("s",), ("<= 2",)),
    Benchmark(("store_bytes_vs_payload",), _data("store_bytes"), ("bytes",), ("<= 1.15",)),
    Benchmark(("extract_pipeline_vs_forward",), _extract("extract_pipeline"), ("segments/s",), (">= 0.85",)),
    Benchmark(("parallel_heads_vs_sequential",), _heads("parallel_heads"), ("s",), ("report (GPU: <= 0.35)",)),
    Benchmark(("store_bytes_saoa_ready_vs_full_map",), _scale("store_bytes_saoa_ready"), ("bytes",), ("<= 0.2",)),
    Benchmark(("heads_cost_growth_epoch", "heads_cost_growth_preload"), _scale("heads_cost_growth"),
              ("exponent", "exponent"), ("<= 1.1", "<= 1.1"), alias="heads_cost_growth"),
    Benchmark(("train_streaming_vs_preload", "train_streaming_vs_preload_cold"), _scale("train_streaming"),
              ("batches/s", "batches/s"), (">= 0.5", "report")),
    Benchmark(("query_boxes_vs_pandas",), _scale("query_boxes"), ("s",), ("<= 0.5",)),
    Benchmark(("finetune_loop_vs_step",), _finetune("finetune_loop"), ("clips/s",), (">= 0.85",)),
    Benchmark(("import_rulstm_vs_lmdb_scan", "import_rulstm_peak_rss"), _import("import_rulstm"),
              ("bytes/s", "bytes"), (">= 0.5", "<= 1"), alias="import_rulstm"),
    Benchmark(("extract_transformers_vs_forward",), _extract("extract_transformers"), ("clips/s",), (">= 0.95",)),
    Benchmark(("build_views_vs_single", "build_views_bytes_per_view"), _views("build_views"), ("s", "bytes"),
              ("<= 2.5", "<= 1.05"), alias="build_views"),
    Benchmark(("heads_epoch_views_vs_single",), _views("heads_epoch_views"), ("s",), ("<= 1.1",)),
    Benchmark(("epic55_full_size",), _scale("epic55_full_size"), ("bytes",), ("report",), explicit=True),
    Benchmark(("gpu_saoa_15_epochs_epic55",), _heads("gpu_saoa"), ("s",), ("<= 1",), gpu=True),
    Benchmark(("gpu_extract_r3d50_frcnn",), _extract("gpu_extract"), ("segments/s",), ("report",), gpu=True),
    Benchmark(("gpu_parallel_heads_vs_sequential",), _heads("gpu_parallel_heads"), ("s",), ("<= 0.35",), gpu=True),
    Benchmark(("gpu_finetune_r3d50_loop_vs_step",), _finetune("gpu_finetune"), ("clips/s",), (">= 0.85",), gpu=True),
    Benchmark(("gpu_extract_omnivore_swinb",), _extract("gpu_extract_omnivore"), ("clips/s",), (">= 0.95",),
              gpu=True),
    Benchmark(("gpu_extract_avion_vitl",), _extract("gpu_extract_avion"), ("clips/s",), (">= 0.95",), gpu=True),
)
ALL_NAMES = tuple(n for b in BENCHMARKS for n in b.names)
GPU_NAMES = tuple(n for b in BENCHMARKS if b.gpu for n in b.names)
EXPLICIT_NAMES = tuple(n for b in BENCHMARKS if b.explicit for n in b.names)  # only when named
ALIASES = {b.alias: b.names for b in BENCHMARKS if b.alias}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute (CI smoke test)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only these benchmarks (repeat or comma-separate; 'gpu' = every gpu_* one; "
                             + ", ".join(f"'{a}' = {' + '.join(n)}" for a, n in ALIASES.items())
                             + "). Names: " + ", ".join(ALL_NAMES)
                             + f"; {', '.join(EXPLICIT_NAMES)} run only when named")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as a JSON list")
    parser.add_argument("--gpu", action="store_true", help="also run the gpu_* benchmarks (needs CUDA)")
    parser.add_argument("--gpu-smoke", action="store_true",
                        help="run the gpu_* benchmarks' code on the CPU at --quick sizes (checks the GPU script "
                             "on a machine without one; its numbers mean nothing)")
    parser.add_argument("--tmpdir", default=None, help="parent of the scratch folder (default: the system's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return parser.parse_args(argv)


def selected_names(args: argparse.Namespace) -> list[str]:
    wanted: list[str] = []
    for item in args.only:
        for name in filter(None, (part.strip() for part in item.split(","))):
            if name == "gpu":
                wanted.extend(GPU_NAMES)
            elif name in ALIASES:
                wanted.extend(ALIASES[name])
            elif name in ALL_NAMES:
                wanted.append(name)
            else:
                raise SystemExit(f"unknown benchmark {name!r}; known: {', '.join(ALL_NAMES)} "
                                 f"(or 'gpu', {', '.join(repr(a) for a in ALIASES)})")
    if not wanted:
        wanted = [n for n in ALL_NAMES if (n not in GPU_NAMES or args.gpu or args.gpu_smoke) and n not in EXPLICIT_NAMES]
    return [n for n in ALL_NAMES if n in set(wanted)]


def format_value(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


def table(results: list[Result]) -> str:
    rows = [("name", "ours", "reference", "ratio", "goal", "meets")]
    for r in results:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3g}"
        meets = {True: "yes", False: "NO", None: "-"}[r.meets] if r.status == "ok" else r.status
        rows.append((r.name, format_value(r.ours, r.unit), format_value(r.reference, r.unit), ratio, r.goal, meets))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    names = selected_names(args)
    sizes = QUICK if (args.quick or args.gpu_smoke) else FULL
    cuda = torch.cuda.is_available()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    workspace = Workspace(args.tmpdir)
    started = time.perf_counter()
    results: list[Result] = []
    log(f"machine: {machine()}; load average {load_average()}")
    log(f"sizes: {'quick' if sizes.quick else 'full'}; scratch folder {workspace.root}")
    try:
        for bench in BENCHMARKS:
            wanted = {n for n in bench.names if n in names}
            if not wanted:
                continue
            units, goals = dict(zip(bench.names, bench.units)), dict(zip(bench.names, bench.goals))
            if bench.gpu and not args.gpu_smoke and not cuda:
                reason = "CUDA is not available on this machine (run with --gpu on a GPU machine)"
                log(f"{', '.join(sorted(wanted))}: skipped: {reason}")
                results.extend(skipped(n, reason, unit=units[n], goal=goals[n]) for n in bench.names if n in wanted)
                continue
            device = ("cuda" if cuda and not args.gpu_smoke else "cpu") if bench.gpu else "cpu"
            ctx = Context(sizes=sizes, workspace=workspace, log=log, device=device)
            log(f"== {', '.join(n for n in bench.names if n in wanted)} (device {device})")
            bench_started = time.perf_counter()
            try:
                rows = bench.run(ctx, wanted)
            except Exception as err:  # noqa: BLE001 - one broken benchmark must not hide the others
                traceback.print_exc()
                rows = [failed(n, err, unit=units[n], goal=goals[n]) for n in bench.names if n in wanted]
            got = {r.name for r in rows}
            rows += [failed(n, RuntimeError("benchmark returned no row"), unit=units[n], goal=goals[n])
                     for n in bench.names if n in wanted and n not in got]
            for row in rows:
                log(f"   {row.name}: {format_value(row.ours, row.unit)} vs {format_value(row.reference, row.unit)}"
                    f" ({row.notes})")
            log(f"   ({time.perf_counter() - bench_started:.1f} s)")
            results.extend(rows)
    finally:
        workspace.close()
    results.sort(key=lambda r: ALL_NAMES.index(r.name))
    elapsed = time.perf_counter() - started
    print(f"\nmachine: {machine()}; load average (1/5 min) at the end {load_average()}")
    print(f"sizes: {'quick' if sizes.quick else 'full'}; total {elapsed:.0f} s\n")
    print(table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = [
            {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.to_json().items()}
            for r in results
        ]
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if any(r.status == "error" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
