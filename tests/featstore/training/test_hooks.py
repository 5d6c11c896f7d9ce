"""The hooks people watch a run through: the history as a CSV table, TensorBoard scalars (an optional
package, imported only when asked for), on a tiny engine run."""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from featstore.training.engine import Engine, TrainingError
from featstore.training.hooks import (
    TENSORBOARD_MISSING,
    Checkpointer,
    HistoryCSV,
    LearningRate,
    LossCheck,
    TensorBoard,
    Validation,
    history_rows,
    require_tensorboard,
)
from featstore.training.run_folder import HISTORY_CSV_NAME, RESUME_STATE_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


class Line:
    """A one-weight regression: four steps an epoch."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.device = torch.device("cpu")
        self.model = nn.Linear(1, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)

    def epoch_batches(self, epoch: int, world: Any) -> list[torch.Tensor]:
        return [torch.full((2, 1), float(i)) for i in range(4)]

    def train_step(self, batch: torch.Tensor, world: Any) -> torch.Tensor:
        self.optimizer.zero_grad()
        loss = ((self.model(batch) - 2 * batch) ** 2).mean()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class FakeWriter:
    """Stands in for torch's SummaryWriter: records what the hook writes."""

    made: list[tuple[str, int | None]] = []

    def __init__(self, log_dir: str, purge_step: int | None) -> None:
        FakeWriter.made.append((log_dir, purge_step))
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _train(out: Path, epochs: int, *extra) -> Any:
    line = Line()
    engine = Engine()
    run = engine.add(line, name="line", epochs=epochs, hooks=[
        LossCheck(), LearningRate(line.optimizer), Validation(lambda: {"verb_top1": 50.0}),
        Checkpointer(out / RESUME_STATE_NAME), HistoryCSV(out / HISTORY_CSV_NAME), *extra])
    engine.train()
    return run


def test_the_history_csv_has_a_row_per_epoch_and_a_column_per_key(tmp_path: Path) -> None:
    run = _train(tmp_path, 2)
    with open(tmp_path / HISTORY_CSV_NAME, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "seconds", "loss", "lr", "val_verb_top1"}
    assert float(rows[1]["loss"]) == pytest.approx(run.history[1]["loss"])


def test_history_rows_join_every_key_and_write_lists_as_json() -> None:
    columns, rows = history_rows([{"epoch": 1, "loss": 2.0}, {"epoch": 2, "map_50": None, "ids": [1, 2]}])
    assert columns == ["epoch", "loss", "map_50", "ids"]
    assert rows == [[1, 2.0, "", ""], [2, "", "", "[1, 2]"]]


def test_tensorboard_gets_every_number_of_each_epoch_and_a_resumed_run_purges_what_follows(tmp_path: Path) -> None:
    FakeWriter.made = []
    hook = TensorBoard(tmp_path / "tb", writer=FakeWriter)
    _train(tmp_path / "run", 2, hook)
    assert FakeWriter.made == [(str(tmp_path / "tb"), None)]  # a fresh run purges nothing
    assert hook.writer is None  # closed after training
    # Resumed for a third epoch: steps from 3 on that a killed run wrote are purged.
    resumed = TensorBoard(tmp_path / "tb", writer=FakeWriter)
    _train(tmp_path / "run", 3, resumed)
    assert FakeWriter.made[-1] == (str(tmp_path / "tb"), 3)


def test_tensorboard_scalars_are_tagged_by_key_at_the_epoch(tmp_path: Path) -> None:
    writers: list[FakeWriter] = []

    def make(log_dir: str, purge_step: int | None) -> FakeWriter:
        writers.append(FakeWriter(log_dir, purge_step))
        return writers[-1]

    _train(tmp_path, 2, TensorBoard(tmp_path / "tb", writer=make))
    tags = {(tag, step) for tag, _, step in writers[0].scalars}
    assert {("loss", 1), ("lr", 2), ("val/verb_top1", 2), ("seconds", 1)} <= tags
    assert not any(tag == "epoch" for tag, _ in tags) and writers[0].closed


def test_a_missing_tensorboard_package_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(TrainingError, match=r"pip install 'featstore\[tensorboard\]'"):
        require_tensorboard()
    with pytest.raises(ValueError) as caught:
        TensorBoard("tb", error=ValueError)
    assert str(caught.value) == TENSORBOARD_MISSING


def test_the_real_summary_writer_writes_event_files(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    _train(tmp_path / "run", 1, TensorBoard(tmp_path / "tb"))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
