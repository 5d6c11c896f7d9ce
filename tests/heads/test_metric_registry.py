"""The metric registry: it agrees with the metric functions, and tables, plots and log lines read it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from heads.grid import parse_grid
from heads.metric_registry import (
    MetricRecord,
    epoch_line,
    get_metric,
    list_metrics,
    metric_values,
    register_metric,
    table_metrics,
    unregister_metric,
)
from heads.metrics import epic55_metrics, epic100_metrics
from heads.results import plot_grid_results, results_table, write_results_markdown


class _NoClasses:
    many_shot_verbs = many_shot_nouns = many_shot_actions = frozenset()


def test_the_registry_holds_exactly_what_the_metric_functions_compute() -> None:
    rng = np.random.default_rng(0)
    verb_logits, noun_logits = rng.normal(size=(20, 8)), rng.normal(size=(20, 9))
    verbs, nouns = rng.integers(0, 8, 20), rng.integers(0, 9, 20)
    epic55 = epic55_metrics(verb_logits, noun_logits, verbs, nouns, meta=_NoClasses())
    epic100 = epic100_metrics(verb_logits, noun_logits, verbs, nouns, tail_verbs=(), tail_nouns=(),
                              unseen_mask=np.zeros(20, bool))
    assert [m.key for m in list_metrics(dataset="epic55")] == list(epic55)
    assert [m.key for m in list_metrics(dataset="epic100")] == list(epic100)


def test_table_1_columns_log_line_and_curves() -> None:
    assert [m.label for m in table_metrics()] == ["Actions top-1", "Actions top-5", "Verbs top-1", "Verbs top-5",
                                                 "Nouns top-1", "Nouns top-5"]
    assert [m.key for m in list_metrics(log=True)] == ["verb_top1", "noun_top1", "action_top1"]
    assert [m.key for m in list_metrics(curve=True)] == ["verb_top1", "noun_top1", "action_top1"]
    record = {"epoch": 3, "loss": 1.234567, "lr": 0.1, "val_verb_top1": 40.0, "val_action_top1": 12.345,
              "val_verb_top5": 80.0}
    assert epoch_line(record) == "epoch 3  loss 1.2346  verb_top1 40.00  action_top1 12.35"
    assert metric_values({"verb_top1": 4, "action_prior": {"from": "x"}, "unknown": 1.0, "noun_top1": True}) == {
        "verb_top1": 4.0}
    assert get_metric("tail_noun_top1").label == "Nouns tail top-1"
    with pytest.raises(KeyError, match="unknown metric 'verb_top2'"):
        get_metric("verb_top2")


def test_duplicates_and_taken_columns_are_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_metric(MetricRecord("verb_top1", "verb", "top-1"))
    with pytest.raises(ValueError, match="column 1 is taken"):
        register_metric(MetricRecord("verb_top3", "verb", "top-3", table_column=1))


def test_a_metric_registered_once_reaches_the_table_the_chart_and_the_log_line(tmp_path: Path) -> None:
    grid = parse_grid({"run": [{"name": "a"}, {"name": "b", "model": "global"}]})
    for name, value in (("a", 30.0), ("b", 50.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"verb_top1": 10.0, "verb_top3": value}))
    register_metric(MetricRecord("verb_top3", "verb", "top-3", table_column=7, log=True))
    try:
        table = results_table(grid, tmp_path)
        assert table.column_names.index("verb_top3") == table.column_names.index("verb_top1") + 1
        assert table.column("verb_top3").to_pylist() == [30.0, 50.0]
        markdown = write_results_markdown(table, tmp_path / "results.md").read_text()
        assert "| Nouns top-5 | Verbs top-3 |" in markdown and "| a | saoa | - | 1 |" in markdown
        assert markdown.splitlines()[6].rstrip("|").endswith("30.0 ")
        assert plot_grid_results(table, tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
        assert epoch_line({"epoch": 1, "loss": 0.5, "val_verb_top3": 30.0}).endswith("verb_top3 30.00")
    finally:
        unregister_metric("verb_top3")
    assert "verb_top3" not in results_table(grid, tmp_path).column_names
