"""The switches a run trains with: the user's, else what the store says, else the head's defaults.

One switch follows the store: ``normalize``, the report's L2 scheme for I3D features (section 3.1:
"the features from the I3D backbone need to be normalized before concatenation with detection
features [...] However, the feature from the R-50 backbone can be directly fed to the SAOA module
without normalization"). Its default is read from the backbones the store's manifest records: on
for the I3D (Inception) family, off for every other backbone (the ResNets the report names, and
anything else); a store that names no backbone (imported features) gets off. ``--normalize`` /
``--no-normalize`` override it.

A run's config.json records every switch with its effective value and, in ``switch_sources``, where
each came from (``given``, ``store``, ``default``). Runs recorded before that (no
``switch_sources``) were built with the defaults of their time; ``recorded_switches`` rebuilds them
with those (`BEFORE_ISSUE_23`), not with today's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from heads.models.registry import HeadRecord, get_head

__all__ = ["BEFORE_ISSUE_23", "ResolvedSwitches", "inception_backbones", "normalize_from_store",
           "recorded_switches", "resolve_switches"]

# The defaults of switches whose default changed in issue 23 (for runs recorded before it).
BEFORE_ISSUE_23: dict[str, Any] = {"relation_norm": "none", "verb_objects": "local", "normalize": False}

GIVEN, STORE, DEFAULT = "given", "store", "default"


@dataclass(frozen=True)
class ResolvedSwitches:
    """Every switch of a head with its effective value.

    Attributes:
        values: switch -> value (all of the head's switches).
        sources: switch -> ``given`` (by the user), ``store`` (from its manifest) or ``default`` (the head's).
        notes: switch -> why the store set it (one line each; the run prints them).
    """

    values: dict[str, Any]
    sources: dict[str, str]
    notes: dict[str, str] = field(default_factory=dict)

    def record(self, name: str) -> dict[str, Any] | None:
        """``{"value", "source", "why"}`` of switch ``name`` for metrics.json, or None if the head lacks it."""
        if name not in self.values:
            return None
        return {"value": self.values[name], "source": self.sources[name], "why": self.notes.get(name)}


def inception_backbones() -> frozenset[str]:
    """Names of the Inception-based backbones (I3D and its separable variant S3D), from their records."""
    # Imported here: the model registries are heavy, and only a run that resolves `normalize` needs them.
    from featstore.models.i3d import I3D, S3D

    return frozenset({I3D.name, S3D.name})


def normalize_from_store(manifest: Mapping[str, Any]) -> tuple[bool, str]:
    """The ``normalize`` default of a store, and why.

    Args:
        manifest: the store's manifest (its ``provenance`` names the verb and noun backbones).
    Returns:
        (on, one line saying which backbones decided it).
    """
    provenance = manifest.get("provenance") or {}
    names = {role: (provenance.get(f"{role}_backbone") or {}).get("name") for role in ("verb", "noun")}
    named = ", ".join(f"{role} {name}" for role, name in names.items() if name)
    if not named:
        return False, "normalize off: the store's manifest names no backbone (imported features?)"
    if any(name in inception_backbones() for name in names.values()):
        return True, (f"normalize on: the store's backbones ({named}) are of the I3D family (report 3.1: "
                      "I3D and detection features are l2-normalised before concatenation)")
    return False, f"normalize off: the store's backbones ({named}) are not of the I3D family (report 3.1: R-50 is not)"


def resolve_switches(head: str | HeadRecord, given: Mapping[str, Any], manifest: Mapping[str, Any]) -> ResolvedSwitches:
    """Every switch of ``head`` as a run on a store of ``manifest`` uses it.

    Args:
        head: a head name or record.
        given: the switches the user set (they win).
        manifest: the store's manifest.
    Returns:
        The effective values, their sources and the store's reasons.
    Raises:
        TypeError: a switch the head does not have.
    """
    record = head if isinstance(head, HeadRecord) else get_head(head)
    record.check_switches(dict(given))
    values, sources, notes = {}, {}, {}
    for name, default in record.switches().items():
        if name in given:
            values[name], sources[name] = given[name], GIVEN
        elif name == "normalize":
            values[name], notes[name] = normalize_from_store(manifest)
            sources[name] = STORE
        else:
            values[name], sources[name] = default, DEFAULT
    return ResolvedSwitches(values, sources, notes)


def recorded_switches(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """The switches to rebuild a recorded run's head with (its config.json).

    A config.json with ``switch_sources`` holds every switch; an older one only those the user gave,
    the others taking the defaults before issue 23 (`BEFORE_ISSUE_23`).
    """
    switches = dict(recorded.get("switches") or {})
    if "switch_sources" in recorded:
        return switches
    try:
        has = get_head(str(recorded.get("model"))).switches()
    except KeyError:
        return switches
    return {**{k: v for k, v in BEFORE_ISSUE_23.items() if k in has}, **switches}
