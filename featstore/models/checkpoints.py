"""Local checkpoint loading shared by backbones and detectors, and the checkpoint converter.

featstore never downloads weights: every pretrained model comes from a file the user names. This
module reads such a file, unwraps the usual containers, and checks that its keys and shapes fit the
module before anything is copied, so a wrong file fails with a message that says what does not fit.

Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never code.
Some published checkpoints also pickle Python objects (the EPIC-55 action-models keep an
``argparse.Namespace`` under ``args``; Lightning files keep their hyper-parameter objects), which that
reader refuses. `convert_checkpoint` (``featstore convert-checkpoint IN OUT``) reads such a file with an
unpickler that resolves only an allow-list of classes and writes its state dict as a plain file.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import datetime
import hashlib
import pathlib
import pickle
import re
import types
import typing
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from featstore.io.atomic import atomic_write_torch

# How many key names an error message lists per category; the counts are always given in full.
_KEYS_SHOWN = 10
# Containers that training scripts wrap a state dict in (Lightning / mmaction: 'state_dict';
# detectron2 / many research repos: 'model'; PySlowFast, e.g. EPIC-100 SlowFast.pyth: 'model_state').
_WRAPPER_KEYS = ("state_dict", "model", "model_state")
CONVERT_COMMAND = "featstore convert-checkpoint IN OUT"
# Buffers that BatchNorm gained in PyTorch 0.4.1; checkpoints older than that (e.g. the widely shared
# I3D ones) or from FrozenBatchNorm2d models lack them, and BatchNorm fills them in on load.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the model it is loaded into."""


@dataclass(frozen=True)
class LoadReport:
    """What `load_checkpoint` / `apply_state_dict` did.

    Attributes:
        source: the file (or description) the tensors came from.
        loaded: number of tensors copied into the module.
        ignored: checkpoint keys deliberately dropped (a classifier head featstore does not use).
    """

    source: str
    loaded: int
    ignored: tuple[str, ...] = field(default=())


def parse_model_spec(spec: str) -> tuple[str, Path | None]:
    """Split a model spec ``"NAME"`` or ``"NAME:/local/path.pt"``.

    Args:
        spec: registry name, optionally followed by ``:`` and a local checkpoint path.

    Returns:
        ``(name, path)``; ``path`` is None when the spec names no checkpoint (random init).

    Raises:
        ValueError: the spec is empty or ends in a bare ``:``.
    """
    name, sep, path = spec.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"empty model name in spec {spec!r}; expected 'NAME' or 'NAME:/local/checkpoint.pt'")
    if sep and not path.strip():
        raise ValueError(f"spec {spec!r} has ':' but no checkpoint path; expected 'NAME:/local/checkpoint.pt'")
    return name, (Path(path.strip()).expanduser() if sep else None)


# A remote address, also after pathlib folded its "//" into "/" (Path("https://x") is "https:/x").
_URL = re.compile(r"^(?:https?|ftp|s3|gs|hdfs|hf|file):/", re.IGNORECASE)


def _require_local_file(path: Path) -> Path:
    if _URL.match(str(path)):
        typed = re.sub(r"^([A-Za-z0-9]+):/(?!/)", r"\1://", str(path))  # as the user typed it
        raise CheckpointError(
            f"checkpoint {typed!r} looks like a URL; featstore never downloads weights. "
            "Download the file yourself and pass its local path (NAME:/local/path.pt)."
        )
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file not found: {str(path)!r}. featstore never downloads weights; "
            "pass the local path of a checkpoint you already have (NAME:/local/path.pt), "
            "or the bare NAME for a randomly initialised model."
        )
    return path


def file_sha256(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed so multi-GB checkpoints do not have to fit in memory.

    Args:
        path: the file to hash.
        chunk_bytes: read size.

    Returns:
        The lowercase hex digest (64 characters), as recorded in the store manifest.
    """
    digest = hashlib.sha256()
    with open(_require_local_file(Path(path)), "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def strip_common_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Drop ``prefix`` from every key, only when every key has it (else return the keys unchanged).

    Args:
        state_dict: ``{key: tensor}``.
        prefix: e.g. ``"module."`` (DataParallel) or ``"model."`` (a Lightning module's attribute).

    Returns:
        A new dict.
    """
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _unwrap_state_dict(payload: Any, path: Path) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """The tensors of a loaded checkpoint and the container entries left out (e.g. 'args', 'epoch')."""
    dropped: list[str] = []
    for wrapper in _WRAPPER_KEYS:
        if isinstance(payload, Mapping) and isinstance(payload.get(wrapper), Mapping):
            dropped = [str(key) for key in payload if key != wrapper]
            payload = payload[wrapper]
            break
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(payload).__name__}, not a state dict")
    state_dict = {key: value for key, value in payload.items() if isinstance(value, Tensor)}
    if not state_dict and not dropped:
        # No wrapper and no tensors at the top: a container of named parts, each a state dict
        # (Omnivore's {'trunk': ..., 'heads': ...}). Their tensors keep the part's name as a prefix
        # ("trunk.norm.weight", "heads.1.bias"), as the model holding the parts as attributes names them.
        state_dict = {f"{part}.{key}": value for part, inner in payload.items() if isinstance(inner, Mapping)
                      for key, value in inner.items() if isinstance(value, Tensor)}
        parts = {str(key).split(".")[0] for key in state_dict}
        dropped += [str(key) for key in payload if str(key) not in parts]
    else:
        dropped += [str(key) for key, value in payload.items() if not isinstance(value, Tensor)]
    if not state_dict:
        raise CheckpointError(f"checkpoint {str(path)!r} contains no tensors")
    return state_dict, tuple(dropped)


def _looks_like_torch_file(path: Path) -> bool:
    """Whether ``path`` starts as torch.save's output does: a zip archive, or (before torch 1.6) a pickle."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a local checkpoint into a flat ``{key: tensor}`` state dict on the CPU.

    Accepts a raw state dict, one stored under ``'state_dict'`` / ``'model'`` / ``'model_state'``, or
    a container of named state dicts (Omnivore's ``{'trunk': ..., 'heads': ...}``: keys ``trunk.*``,
    ``heads.*``), and strips the ``'module.'`` prefix that (Distributed)DataParallel adds to every key.

    Args:
        path: local checkpoint file (``torch.save`` output).

    Returns:
        The state dict; non-tensor entries of the container are dropped.

    Raises:
        CheckpointError: missing file, a file that is not a safe tensor checkpoint (the message names
            the conversion command for files that pickle Python objects), or no tensors in it.
    """
    path = _require_local_file(Path(path))
    try:
        # weights_only: a checkpoint is data, never code to run.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
        if not _looks_like_torch_file(path):
            raise CheckpointError(
                f"{str(path)!r} is not a PyTorch checkpoint: it starts as neither the zip archive nor the "
                "pickle that torch.save writes; check that the file is the checkpoint you meant and that "
                "its download completed"
            ) from error
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} as a tensor checkpoint ({type(error).__name__}: "
            f"{reason[0] if reason else 'no details'}). featstore does not unpickle arbitrary Python "
            "objects. If the file keeps objects besides its tensors (an argparse.Namespace under "
            "'args', as the EPIC-55 action-models do, or Lightning hyper-parameters), convert it "
            f"once: `featstore convert-checkpoint {path} {path.with_suffix('')}.state_dict.pt`, "
            "then pass the converted file."
        ) from error
    state_dict, _ = _unwrap_state_dict(payload, path)
    return strip_common_prefix(state_dict, "module.")


def _listing(what: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    more = f", ... ({len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else ""
    return f"{len(keys)} {what} key(s): {shown}{more}"


def _is_optional(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _OPTIONAL_SUFFIXES


def apply_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str,
    ignore_prefixes: Iterable[str] = (),
    model_name: str | None = None,
) -> LoadReport:
    """Copy a state dict into ``module`` after checking that every key and shape fits.

    Nothing is copied unless the whole checkpoint fits, so a failed load leaves the module as it was.

    Args:
        module: the model to fill.
        state_dict: ``{key: tensor}`` as from `read_state_dict`.
        source: where the tensors came from, for messages.
        ignore_prefixes: key prefixes dropped before checking (a classification head the module
            deliberately lacks, e.g. ``"fc."``).
        model_name: the registry name, for messages.

    Returns:
        A `LoadReport`.

    Raises:
        CheckpointError: missing keys, unexpected keys or shape mismatches; lists the first
            ten of each with their counts.
    """
    prefixes = tuple(ignore_prefixes)
    ignored = tuple(key for key in state_dict if prefixes and key.startswith(prefixes))
    ignored_set = set(ignored)
    incoming = {key: value for key, value in state_dict.items() if key not in ignored_set}
    expected = module.state_dict()

    missing = [key for key in expected if key not in incoming and not _is_optional(key)]
    unexpected = [key for key in incoming if key not in expected and not _is_optional(key)]
    mismatched = [
        f"{key} {tuple(incoming[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in incoming
        if key in expected and incoming[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        target = f"model {model_name!r}" if model_name else type(module).__name__
        problems = [
            _listing(what, keys)
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
            if keys
        ]
        raise CheckpointError(f"checkpoint {source} does not fit {target}: " + "; ".join(problems))

    # strict=False only because optional BatchNorm counters may be absent; everything else was
    # checked above, so the remaining report can only name those counters.
    result = module.load_state_dict({k: v for k, v in incoming.items() if k in expected}, strict=False)
    leftover = [key for key in (*result.missing_keys, *result.unexpected_keys) if not _is_optional(key)]
    if leftover:  # pragma: no cover - guarded by the checks above
        raise CheckpointError(f"checkpoint {source}: unexpected load result for keys {leftover[:_KEYS_SHOWN]}")
    return LoadReport(source=source, loaded=sum(1 for k in incoming if k in expected), ignored=ignored)


def load_checkpoint(
    module: nn.Module,
    path: str | Path,
    *,
    ignore_prefixes: Iterable[str] = (),
    strip_prefixes: Iterable[str] = (),
    model_name: str | None = None,
) -> LoadReport:
    """Load a local checkpoint file into ``module`` (see `read_state_dict` and `apply_state_dict`).

    Args:
        module: the model to fill.
        path: local checkpoint file.
        ignore_prefixes: key prefixes to drop (unused classifier heads), after ``strip_prefixes``.
        strip_prefixes: wrapper prefixes removed, in order, each when every key has it (a Lightning
            module's ``"model."``).
        model_name: the registry name, for messages.

    Returns:
        A `LoadReport`.

    Raises:
        CheckpointError: missing/unreadable file or keys that do not fit.
    """
    state_dict = read_state_dict(path)
    for prefix in strip_prefixes:
        state_dict = strip_common_prefix(state_dict, prefix)
    return apply_state_dict(
        module,
        state_dict,
        source=repr(str(path)),
        ignore_prefixes=ignore_prefixes,
        model_name=model_name,
    )


# ------------------------------------------------------------------------------------------------
# conversion of checkpoints that pickle Python objects


class _InertRecord(dict):
    """Stand-in for an allow-listed data class (omegaconf / Lightning containers): keeps whatever the
    pickle gives it as plain data and runs none of the original class's code (it is never imported)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_InertRecord":
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:  # list subclasses (APPENDS opcode)
        self.__dict__.setdefault("items", []).append(item)

    def extend(self, items: Iterable[Any]) -> None:
        self.__dict__.setdefault("items", []).extend(items)


def _numpy_global(name: str) -> Any:
    import numpy

    multiarray = getattr(numpy, "_core", None) or numpy.core  # numpy 2 moved numpy.core to numpy._core
    return {"_reconstruct": multiarray.multiarray._reconstruct, "scalar": multiarray.multiarray.scalar,
            "ndarray": numpy.ndarray, "dtype": numpy.dtype}[name]


# Classes and functions a checkpoint may be rebuilt from: tensors and their storages (storages are
# resolved by torch.load itself), plain containers and values, argparse.Namespace (EPIC-55
# action-models, TSN / TSM training scripts), numpy scalars and arrays (a best_prec1 saved as
# numpy.float64). Each is data-only: calling it cannot run code named by the file.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "str"): str,
    ("builtins", "bool"): bool,
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "object"): object,
    ("_codecs", "encode"): __import__("_codecs").encode,  # protocol-2 pickles spell bytes this way
    ("copyreg", "_reconstructor"): __import__("copyreg")._reconstructor,
    ("typing", "Any"): typing.Any,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "PureWindowsPath"): pathlib.PureWindowsPath,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "date"): datetime.date,
    ("datetime", "timedelta"): datetime.timedelta,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch", "Tensor"): torch.Tensor,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
}
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy")
_NUMPY_NAMES = ("_reconstruct", "scalar", "ndarray", "dtype")
# Packages whose classes a training framework pickles as plain configuration (Lightning's
# hyper-parameters are omegaconf containers; its callback states are keyed by their class; AVION's
# EK-100 scripts keep a pandas DataFrame of the action classes in the argparse.Namespace they save;
# pandas 3 keeps its strings in pyarrow arrays). They are read as `_InertRecord`s: the package is
# never imported, so nothing of it runs.
_INERT_PACKAGES = ("omegaconf", "pytorch_lightning", "lightning", "lightning_fabric", "pandas", "pyarrow")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `_ALLOWED_GLOBALS` (and inert stand-ins for `_INERT_PACKAGES`).

    Every global a pickle names (a class to build, a function to call) goes through `find_class`
    (the restriction the Python documentation describes under "Restricting Globals"), so a file
    naming anything else (``os.system``, a class of its author's script) is refused, never run.
    """

    # The inert classes met, for the report (a fresh set per conversion: `_restricted_pickle_module`).
    inert_seen: set[str]

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles (torch.save's default) name Python 2's modules for some builtins
        # (``__builtin__.slice``, ``copy_reg._reconstructor``); the default find_class maps them back.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[key]
        if module in _NUMPY_MODULES and name in _NUMPY_NAMES:
            return _numpy_global(name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in _INERT_PACKAGES:
            self.inert_seen.add(f"{module}.{name}")
            return type(name, (_InertRecord,), {"__module__": f"featstore.inert.{module}"})
        raise pickle.UnpicklingError(
            f"refused to rebuild {module}.{name}: it is not on the allow-list of what checkpoints hold "
            "(tensors, plain containers, argparse.Namespace, numpy scalars, omegaconf/Lightning "
            "configuration, pandas tables)"
        )


def _restricted_pickle_module(inert_seen: set[str]) -> types.ModuleType:
    """A module object torch.load accepts as ``pickle_module``, built around `_RestrictedUnpickler`.

    torch.load subclasses ``pickle_module.Unpickler`` (to resolve storages) and calls
    ``pickle_module.load`` for the legacy format's headers, so both go through `find_class`.
    """
    unpickler = type("Unpickler", (_RestrictedUnpickler,), {"inert_seen": inert_seen})
    module = types.ModuleType("featstore_restricted_pickle")
    module.Unpickler = unpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    module.__version__ = "1"  # type: ignore[attr-defined]
    return module


@dataclass(frozen=True)
class ConvertReport:
    """What `convert_checkpoint` did.

    Attributes:
        source: the file read.
        target: the file written (a plain ``{key: tensor}`` state dict).
        tensors: number of tensors written.
        dropped: container entries left out (e.g. ``args``, ``epoch``, ``optimizer``).
        inert: classes read as plain data without importing them (omegaconf / Lightning).
        sha256: SHA-256 of the written file.
    """

    source: Path
    target: Path
    tensors: int
    dropped: tuple[str, ...]
    inert: tuple[str, ...]
    sha256: str

    def summary(self) -> str:
        """One line for the terminal."""
        dropped = f"; left out: {', '.join(self.dropped)}" if self.dropped else ""
        return f"wrote {self.tensors} tensors of {self.source} to {self.target}{dropped}"


def convert_checkpoint(source: str | Path, target: str | Path) -> ConvertReport:
    """Extract the state dict of a checkpoint that also pickles Python objects, into a plain file.

    The file is read with an allow-listed unpickler (`_RestrictedUnpickler`): tensors, plain
    containers, ``argparse.Namespace`` and numpy scalars are rebuilt; omegaconf / Lightning
    configuration objects become inert records; anything else (a custom class, ``os.system``) is
    refused. The state dict is found as `read_state_dict` finds it (``state_dict`` / ``model`` /
    ``model_state`` or the top level) and written with ``torch.save`` (keys unchanged), atomically (``featstore.io.atomic``).

    Args:
        source: the published checkpoint.
        target: where to write the state dict (must differ from ``source``).

    Returns:
        A `ConvertReport`.

    Raises:
        CheckpointError: missing file, a class outside the allow-list (named), no tensors.
    """
    source, target = Path(source), Path(target)
    _require_local_file(source)
    if target.resolve() == source.resolve():
        raise CheckpointError(f"convert-checkpoint writes a new file; {str(target)!r} is the input itself")
    inert_seen: set[str] = set()
    try:
        payload = torch.load(source, map_location="cpu", weights_only=False,
                             pickle_module=_restricted_pickle_module(inert_seen))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(f"cannot convert {str(source)!r}: {error}") from error
    state_dict, dropped = _unwrap_state_dict(payload, source)
    inert = tuple(sorted(inert_seen))
    atomic_write_torch(target, state_dict)
    return ConvertReport(source=source, target=target, tensors=len(state_dict), dropped=dropped,
                         inert=inert, sha256=file_sha256(target))


# ------------------------------------------------------------------------------------------------
# stage-1 (fine-tune) checkpoints

# A stage-1 run (``featstore finetune``) writes its backbone under "state_dict" (what `read_state_dict`
# loads), its classifier under its own key, and a record of the run under this one; `featstore build`
# copies the record into the store's provenance beside the checkpoint's sha256.
FINETUNE_RECORD_KEY = "finetune"


def read_finetune_record(path: str | Path) -> dict | None:
    """The stage-1 run record a checkpoint carries (``FINETUNE_RECORD_KEY``), or None when it has none.

    Memory-mapped, so the tensors of a large checkpoint are not read to get at its small record.

    Args:
        path: local checkpoint file.
    Returns:
        The record (JSON types), or None for any other checkpoint (a raw or wrapped state dict).
    Raises:
        CheckpointError: a missing or unreadable file.
    """
    path = _require_local_file(Path(path))
    if not zipfile.is_zipfile(path):
        return None  # stage-1 runs write torch's zip format; a model-zoo .pkl or a legacy file is not one
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(error).__name__}: {error}") from error
    record = payload.get(FINETUNE_RECORD_KEY) if isinstance(payload, Mapping) else None
    return dict(record) if isinstance(record, Mapping) else None
