"""The metric registry: every metric a run reports, described once.

Each record says what a ``metrics.json`` key is (task and measure), which datasets define it, how a
value prints, and where it is shown: a column of the report's Table 1 (``heads ablate``'s
results.md / results.png, the demo's table), a field of the per-epoch log line of ``heads train``,
a line of a run's ``curves.png``. Tables, plots and log lines read this registry, so adding a
metric is one ``register_metric`` call here next to the pure function in ``heads.metrics`` that
computes it (``tests/heads/test_metric_registry.py`` checks the two agree).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

__all__ = [
    "MetricRecord",
    "register_metric",
    "unregister_metric",
    "get_metric",
    "list_metrics",
    "table_metrics",
    "metric_values",
    "epoch_line",
]

BOTH = frozenset({"epic55", "epic100"})
EPIC55 = frozenset({"epic55"})
EPIC100 = frozenset({"epic100"})


@dataclass(frozen=True)
class MetricRecord:
    """One metric.

    Attributes:
        key: its ``metrics.json`` key, e.g. ``verb_top1`` (percent, 0-100).
        task: ``verb``, ``noun`` or ``action``.
        measure: what is measured, as tables print it: ``top-1``, ``top-5``, ``precision``, ...
        datasets: the datasets whose evaluation defines it.
        fmt: format spec of a value in log lines and text tables.
        table_column: its position among Table 1's metric columns (1 = first), None when not in it.
        log: shown in the per-epoch log line of ``heads train`` / ``heads ablate``.
        curve: a line of the validation panel of ``curves.png``.
    """

    key: str
    task: str
    measure: str
    datasets: frozenset[str] = BOTH
    fmt: str = ".2f"
    table_column: int | None = None
    log: bool = False
    curve: bool = False

    @property
    def label(self) -> str:
        """Column text, e.g. ``Actions top-1``."""
        return f"{self.task.capitalize()}s {self.measure}"

    def format(self, value: float) -> str:
        return format(value, self.fmt)


_METRICS: dict[str, MetricRecord] = {}


def register_metric(record: MetricRecord) -> MetricRecord:
    """Add ``record``; a second metric with the same key is an error.

    Returns:
        ``record``.
    """
    if record.key in _METRICS:
        raise ValueError(f"a metric named {record.key!r} is already registered")
    if record.table_column is not None and any(m.table_column == record.table_column for m in _METRICS.values()):
        raise ValueError(f"{record.key}: Table 1 column {record.table_column} is taken")
    _METRICS[record.key] = record
    return record


def unregister_metric(key: str) -> MetricRecord:
    """Remove metric ``key`` (a plugin's or a test's); returns its record. ``KeyError`` if unknown."""
    record = get_metric(key)
    del _METRICS[key]
    return record


def get_metric(key: str) -> MetricRecord:
    """The record of ``key``; ``KeyError`` listing the known keys otherwise."""
    try:
        return _METRICS[key]
    except KeyError:
        raise KeyError(f"unknown metric {key!r}; registered: {', '.join(_METRICS)}") from None


def list_metrics(*, dataset: str | None = None, table: bool | None = None, log: bool | None = None,
                 curve: bool | None = None) -> tuple[MetricRecord, ...]:
    """Registered metrics in registration order (verb, noun, action), filtered.

    Args:
        dataset: only those the dataset defines.
        table: only those in (True) / not in (False) Table 1.
        log: only those in / not in the epoch log line.
        curve: only those in / not in the training curves.
    Returns:
        The records.
    """
    out = []
    for record in _METRICS.values():
        if dataset is not None and dataset not in record.datasets:
            continue
        if table is not None and (record.table_column is not None) != table:
            continue
        if log is not None and record.log != log:
            continue
        if curve is not None and record.curve != curve:
            continue
        out.append(record)
    return tuple(out)


def table_metrics() -> tuple[MetricRecord, ...]:
    """Table 1's metric columns in the report's order (actions, verbs, nouns; top-1, top-5)."""
    return tuple(sorted(list_metrics(table=True), key=lambda m: m.table_column))


def metric_values(values: Mapping[str, Any]) -> dict[str, float]:
    """The registered metrics of a metrics.json object, in registry order (other entries left out)."""
    return {m.key: float(values[m.key]) for m in _METRICS.values()
            if isinstance(values.get(m.key), (int, float)) and not isinstance(values.get(m.key), bool)}


def epoch_line(record: Mapping[str, Any], *, prefix: str = "val_") -> str:
    """The per-epoch log line: ``epoch 3  loss 1.2345  verb_top1 40.00  noun_top1 ...``.

    Args:
        record: an epoch's history entry (``epoch``, ``loss`` and validation metrics under ``prefix``).
        prefix: how the validation metrics are keyed in ``record``.
    Returns:
        The line.
    """
    parts = [f"epoch {record['epoch']}", f"loss {record['loss']:.4f}"]
    for metric in list_metrics(log=True):
        value = record.get(prefix + metric.key)
        if value is not None:
            parts.append(f"{metric.key} {metric.format(value)}")
    return "  ".join(parts)


# Registration order is the order of metrics.json and of the demo's table: verb, noun, action.
for _record in (
    MetricRecord("verb_top1", "verb", "top-1", table_column=3, log=True, curve=True),
    MetricRecord("verb_top5", "verb", "top-5", table_column=4),
    MetricRecord("noun_top1", "noun", "top-1", table_column=5, log=True, curve=True),
    MetricRecord("noun_top5", "noun", "top-5", table_column=6),
    MetricRecord("action_top1", "action", "top-1", table_column=1, log=True, curve=True),
    MetricRecord("action_top5", "action", "top-5", table_column=2),
    # EPIC-55: mean class precision / recall over the many-shot classes.
    MetricRecord("verb_precision", "verb", "precision", EPIC55),
    MetricRecord("verb_recall", "verb", "recall", EPIC55),
    MetricRecord("noun_precision", "noun", "precision", EPIC55),
    MetricRecord("noun_recall", "noun", "recall", EPIC55),
    MetricRecord("action_precision", "action", "precision", EPIC55),
    MetricRecord("action_recall", "action", "recall", EPIC55),
    # EPIC-100: top-1 on the tail classes and on unseen participants.
    MetricRecord("tail_verb_top1", "verb", "tail top-1", EPIC100),
    MetricRecord("tail_noun_top1", "noun", "tail top-1", EPIC100),
    MetricRecord("tail_action_top1", "action", "tail top-1", EPIC100),
    MetricRecord("unseen_verb_top1", "verb", "unseen top-1", EPIC100),
    MetricRecord("unseen_noun_top1", "noun", "unseen top-1", EPIC100),
    MetricRecord("unseen_action_top1", "action", "unseen top-1", EPIC100),
):
    register_metric(_record)
del _record
