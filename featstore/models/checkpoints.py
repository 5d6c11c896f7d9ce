"""Local checkpoint loading shared by backbones and detectors.

featstore never downloads weights: every pretrained model comes from a file the user names. This
module reads such a file, unwraps the usual containers, and checks that its keys and shapes fit the
module before anything is copied, so a wrong file fails with a message that says what does not fit.
"""
from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

# How many key names an error message lists per category; the counts are always given in full.
_KEYS_SHOWN = 10
# Containers that training scripts wrap a state dict in (Lightning / mmaction: 'state_dict';
# detectron2 / many research repos: 'model').
_WRAPPER_KEYS = ("state_dict", "model")
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


def _require_local_file(path: Path) -> Path:
    if "://" in str(path):
        raise CheckpointError(
            f"checkpoint {str(path)!r} looks like a URL; featstore never downloads weights. "
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


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a local checkpoint into a flat ``{key: tensor}`` state dict on the CPU.

    Accepts a raw state dict or one stored under ``'state_dict'`` / ``'model'``, and strips the
    ``'module.'`` prefix that (Distributed)DataParallel adds to every key.

    Args:
        path: local checkpoint file (``torch.save`` output).

    Returns:
        The state dict; non-tensor entries of the container are dropped.

    Raises:
        CheckpointError: missing file, a file that is not a safe tensor checkpoint, or no tensors in it.
    """
    path = _require_local_file(Path(path))
    try:
        # weights_only: a checkpoint is data, never code to run.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} as a tensor checkpoint ({type(error).__name__}: "
            f"{reason[0] if reason else 'no details'}). If it holds Python objects besides "
            "tensors, re-save just its state dict: torch.save(torch.load(p, weights_only=False)"
            "['state_dict'], 'clean.pt') in an environment you trust."
        ) from error
    for wrapper in _WRAPPER_KEYS:
        if isinstance(payload, Mapping) and isinstance(payload.get(wrapper), Mapping):
            payload = payload[wrapper]
            break
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(payload).__name__}, not a state dict")
    state_dict = {key: value for key, value in payload.items() if isinstance(value, Tensor)}
    if not state_dict:
        raise CheckpointError(f"checkpoint {str(path)!r} contains no tensors")
    return _strip_prefix(state_dict, "module.")


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
    model_name: str | None = None,
) -> LoadReport:
    """Load a local checkpoint file into ``module`` (see `read_state_dict` and `apply_state_dict`).

    Args:
        module: the model to fill.
        path: local checkpoint file.
        ignore_prefixes: key prefixes to drop (unused classifier heads).
        model_name: the registry name, for messages.

    Returns:
        A `LoadReport`.

    Raises:
        CheckpointError: missing/unreadable file or keys that do not fit.
    """
    return apply_state_dict(
        module,
        read_state_dict(path),
        source=repr(str(path)),
        ignore_prefixes=ignore_prefixes,
        model_name=model_name,
    )


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
    try:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(error).__name__}: {error}") from error
    record = payload.get(FINETUNE_RECORD_KEY) if isinstance(payload, Mapping) else None
    return dict(record) if isinstance(record, Mapping) else None
