"""The head registry: a name -> builder table that the CLI (`--model saoa`) and the tests read.

Modelled on timm's `_registry.py`: a dict and a decorator that refuses duplicate names. Each record
also says which STORE fields the head needs for given switches, so the data layer loads only those
and a store that lacks one is refused up front with a message that names the missing fields.

A need may be met in more than one way (`LOAD_TIME_SOURCES`): `verb.local`, the local-alignment
features, is read as stored when the store has it, and otherwise RoI-pooled at load time from
`verb.map` (or `verb.map_tmean`) at the `det.local.box` boxes. A store is refused only when it has
none of the ways, and the message lists them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from featstore.io.docstrings import documented_args
from featstore.store.local_pool import LOCAL_FIELD, LOCAL_SOURCES
from featstore.store.schema import BOX_SETS, DET_GLOBAL_FEAT, DET_LOCAL_FEAT, NOUN_GLOBAL, VERB_GLOBAL, det_field

__all__ = [
    "LOAD_TIME_SOURCES",
    "FeatureDims",
    "HeadRecord",
    "SwitchInfo",
    "MissingFieldsError",
    "register_head",
    "unregister_head",
    "list_heads",
    "get_head",
    "all_switches",
    "build_head",
    "check_fields",
    "field_available",
]

# A need -> the field sets the data layer can compute it from at load time, preferred first.
LOAD_TIME_SOURCES: dict[str, tuple[tuple[str, ...], ...]] = {LOCAL_FIELD: LOCAL_SOURCES}

# Arguments every builder takes that are not ablation switches.
_BUILD_ARGS = ("dims", "num_verbs", "num_nouns")


@dataclass(frozen=True)
class FeatureDims:
    """Feature sizes of one store; the backbone and detector records set them, nothing hard-codes 2048."""

    verb_dim: int  # Cv: VerbNet feature size (`verb.global`, channels of `verb.map`)
    noun_dim: int  # Cn: NounNet feature size (`noun.global`)
    det_dim: int  # Cd: detector RoI feature size (`det.*.feat`)
    n_global: int = 60  # detection slots of the noun window (12 frames x top 5)
    n_local: int = 40  # detection slots of the verb window (8 frames x top 5)
    # Every store field's shape, ((name, shape), ...), for heads that read fields by name (`vectors`).
    field_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        # config.json gives lists back: the same dims compare equal however they were made.
        object.__setattr__(self, "field_shapes", tuple((str(name), tuple(int(d) for d in shape))
                                                       for name, shape in self.field_shapes))

    def shape_of(self, field: str) -> tuple[int, ...] | None:
        """The shape of one segment's ``field``: the store's, else the canonical fields' from the sizes above."""
        shapes = dict(self.field_shapes)
        if field in shapes:
            return shapes[field]
        return {
            VERB_GLOBAL: (self.verb_dim,), NOUN_GLOBAL: (self.noun_dim,),
            DET_GLOBAL_FEAT: (self.n_global, self.det_dim), DET_LOCAL_FEAT: (self.n_local, self.det_dim),
            LOCAL_FIELD: (self.n_local, self.verb_dim),
        }.get(field)


@dataclass(frozen=True)
class HeadRecord:
    """One registered head.

    Attributes:
        name: the registry key (`--model NAME`).
        builder: `builder(*, dims, num_verbs, num_nouns, **switches) -> nn.Module`; its keyword-only
            arguments other than those three are the head's ablation switches.
        description: one line for `heads train --help` and `list_heads` listings.
        fields: `fields(**switches) -> tuple[str, ...]`, the STORE field names the head reads with
            those switches (switches not given take the builder's defaults). A name in
            `LOAD_TIME_SOURCES` is also met by any of its source field sets.
    """

    name: str
    builder: Callable[..., nn.Module]
    description: str
    fields: Callable[..., tuple[str, ...]] = lambda **_: ()

    def switches(self) -> dict[str, Any]:
        """The head's ablation switches and their defaults, read from the builder's signature."""
        params = inspect.signature(self.builder).parameters.values()
        return {
            p.name: p.default
            for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _BUILD_ARGS
        }

    def switch_help(self) -> dict[str, str]:
        """One line per switch, from the builder's ``Args:`` docstring (the CLI's ``--help`` text)."""
        documented = documented_args(self.builder)
        return {name: documented.get(name, "") for name in self.switches()}

    def check_switches(self, switches: dict[str, Any]) -> None:
        """Raise `TypeError` naming every switch this head does not have."""
        unknown = sorted(set(switches) - set(self.switches()))
        if unknown:
            known = ", ".join(sorted(self.switches())) or "none"
            raise TypeError(
                f"head {self.name!r} got unknown switch(es) {', '.join(unknown)}; its switches are: {known}"
            )

    def required_fields(self, **switches: Any) -> tuple[str, ...]:
        """STORE field names (e.g. `det.local.box`) the head needs when built with `switches`."""
        self.check_switches(switches)
        return tuple(self.fields(**{**self.switches(), **switches}))


class MissingFieldsError(ValueError):
    """A store lacks fields a head needs; the message names the head and every missing field."""

    def __init__(self, head: str, missing: Iterable[str], note: str = "") -> None:
        self.head = head
        self.missing = tuple(missing)
        described = []
        for field in self.missing:
            sources = LOAD_TIME_SOURCES.get(field)
            if sources:
                ways = ", or ".join(" + ".join(source) for source in sources)
                field = f"{field} (or {ways}, to RoI-pool it at load time)"
            described.append(field)
        super().__init__(
            f"head {head!r} needs store field(s) that are missing: {', '.join(described)}{note}"
        )


@dataclass(frozen=True)
class SwitchInfo:
    """A switch as the CLIs offer it: its name over every head that has it.

    Attributes:
        name: the builder argument, e.g. ``gating`` (flag ``--gating/--no-gating``).
        default: its default in the first head (sorted by name) that has it; its type sets the flag's.
        help: that head's docstring line for it.
        heads: the heads that have it.
    """

    name: str
    default: Any
    help: str
    heads: tuple[str, ...]


_HEADS: dict[str, HeadRecord] = {}


def register_head(
    name: str, *, description: str, fields: Callable[..., tuple[str, ...]]
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a builder under `name`; a second head of the same name is an error.

    Args:
        name: registry key.
        description: one-line description.
        fields: `fields(**switches)` -> STORE field names needed (see `HeadRecord.fields`).
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _HEADS:
            raise ValueError(f"a head named {name!r} is already registered")
        record = HeadRecord(name=name, builder=builder, description=description, fields=fields)
        undocumented = [switch for switch, text in record.switch_help().items() if not text]
        if undocumented:
            # The docstring line is the switch's --help text in `heads train`.
            raise ValueError(f"head {name!r}: switch(es) {', '.join(undocumented)} have no entry in the "
                             f"builder's Args: docstring")
        _HEADS[name] = record
        return builder

    return decorate


def unregister_head(name: str) -> HeadRecord:
    """Remove head ``name`` (a plugin's or a test's); returns its record. ``KeyError`` if unknown."""
    record = get_head(name)
    del _HEADS[name]
    return record


def list_heads() -> list[str]:
    """Names of all registered heads, sorted."""
    return sorted(_HEADS)


def get_head(name: str) -> HeadRecord:
    """The record of head `name`; `KeyError` listing the known names otherwise."""
    try:
        return _HEADS[name]
    except KeyError:
        raise KeyError(f"unknown head {name!r}; registered heads: {', '.join(list_heads())}") from None


def all_switches() -> dict[str, SwitchInfo]:
    """Every switch any registered head has, by name (sorted), for the CLIs and grid files."""
    found: dict[str, SwitchInfo] = {}
    for head in list_heads():
        record = _HEADS[head]
        helps = record.switch_help()
        for switch, default in record.switches().items():
            if switch in found:
                known = found[switch]
                found[switch] = SwitchInfo(switch, known.default, known.help, known.heads + (head,))
            else:
                found[switch] = SwitchInfo(switch, default, helps[switch], (head,))
    return dict(sorted(found.items()))


def build_head(
    name: str, *, dims: FeatureDims, num_verbs: int, num_nouns: int, **switches: Any
) -> nn.Module:
    """Build head `name` as a plain CPU module (device, DDP and AMP are the trainer's business).

    Args:
        name: a registered head name (`list_heads()`).
        dims: feature sizes of the store the head will read.
        num_verbs: V, verb classes.
        num_nouns: N, noun classes.
        **switches: ablation switches of that head; an unknown one is a `TypeError` naming it.

    Returns:
        The head; `forward(batch) -> dict` with at least `verb_logits (B, V)`, `noun_logits (B, N)`.
    """
    record = get_head(name)
    record.check_switches(switches)
    return record.builder(dims=dims, num_verbs=num_verbs, num_nouns=num_nouns, **switches)


def check_fields(name: str | HeadRecord, available: Iterable[str], **switches: Any) -> None:
    """Refuse a store that lacks any field head `name` needs with these switches.

    Args:
        name: a head name or its record.
        available: field names the store holds (e.g. from its manifest).
        **switches: the switches the head will be built with.

    Raises:
        MissingFieldsError: naming the head and every missing field.
        TypeError: an unknown switch.
    """
    record = name if isinstance(name, HeadRecord) else get_head(name)
    have = set(available)
    missing = [f for f in record.required_fields(**switches) if not field_available(f, have)]
    if missing:
        raise MissingFieldsError(record.name, missing, _boxless_note(missing, have))


def _boxless_note(missing: Sequence[str], have: set[str]) -> str:
    """Why a store of detection features without boxes cannot serve a head that needs detections or
    boxes (LFB's noun bank, imported): said once, so the refusal reads as what it is."""
    boxless = [det_field(s, "feat") for s in BOX_SETS if det_field(s, "feat") in have and det_field(s, "box") not in have]
    needs_boxes = any(f.startswith("det.") or f in LOAD_TIME_SOURCES for f in missing)
    if not boxless or not needs_boxes:
        return ""
    return (f"; this store's detection features ({', '.join(boxless)}) come without boxes (e.g. imported from "
            f"LFB's noun bank), so heads that need boxes or other detections cannot train on it "
            f"(`--model vectors --noun-fields {boxless[0]}` reads the features alone)")


def field_available(need: str, available: Iterable[str]) -> bool:
    """Whether a store holding `available` meets `need`: the field itself, or a set it is computed from."""
    have = set(available)
    return need in have or any(set(source) <= have for source in LOAD_TIME_SOURCES.get(need, ()))
