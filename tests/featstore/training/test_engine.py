"""The training engine and its hooks on toy runs fed by DataLoaders: hook order, resume, divergence, groups;
the world's collectives over two processes."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from featstore.training.engine import Engine, Hook, RunState, TrainingError
from featstore.training.hooks import (
    Checkpointer,
    non_finite_tensors,
    refuse_non_finite,
    EpochCallback,
    HistoryFile,
    LearningRate,
    LossCheck,
    StepCallback,
    Validation,
)
from featstore.training.run_folder import HISTORY_NAME, RESUME_STATE_NAME
from featstore.training.world import World


# One thread, one reduction order: grouped and solo runs compare bit for bit.
pytestmark = pytest.mark.usefixtures("one_thread")


class NoisyPoints(Dataset):
    """48 fixed points of 3 linearly separable classes; each read adds fresh noise (an augmentation
    drawn from torch's RNG)."""

    def __init__(self, n: int = 48):
        generator = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = (self.x @ torch.randn(4, 3, generator=generator)).argmax(1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.1 * torch.randn(4), self.y[i]


class ToyRun:
    """A trainable the way a fine-tuning run is one: a DataLoader per epoch (shuffled, workers
    optional), dropout, SGD; nothing preloaded, no index chunks."""

    def __init__(self, seed: int, *, batch_size: int = 8, workers: int = 0, nan_at: tuple[int, int] | None = None):
        torch.manual_seed(seed)
        self.device = torch.device("cpu")
        self.model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.data, self.batch_size, self.workers, self.nan_at = NoisyPoints(), batch_size, workers, nan_at
        self.epoch, self.step = 0, 0

    def epoch_batches(self, epoch: int, world: World | None) -> DataLoader:
        self.epoch, self.step = epoch, 0
        for group in self.optimizer.param_groups:
            group["lr"] = 0.1 * (0.5 ** epoch)
        self.model.train()
        # shuffle=True draws the order (and the workers' seeds) from torch's generator: the run's stream.
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True, num_workers=self.workers)

    def train_step(self, batch: Any, world: World | None) -> torch.Tensor:
        x, y = batch
        self.step += 1
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        if self.nan_at == (self.epoch + 1, self.step):
            loss = loss * float("nan")
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    @torch.no_grad()
    def accuracy(self) -> dict[str, float]:
        self.model.eval()
        hits = (self.model(self.data.x).argmax(1) == self.data.y).float().mean().item()
        self.model.train()
        return {"top1": 100.0 * hits}


class Recorder(Hook):
    """Writes down every call, and what the record held when its after_epoch ran."""

    def __init__(self, events: list, tag: str):
        self.events, self.tag = events, tag

    def before_train(self, run: RunState) -> None:
        self.events.append((self.tag, "before_train", run.epoch))

    def before_epoch(self, run: RunState) -> None:
        self.events.append((self.tag, "before_epoch", run.epoch, run.steps_in_epoch))

    def after_step(self, run: RunState) -> None:
        assert isinstance(run.loss, torch.Tensor) and run.loss.dim() == 0
        self.events.append((self.tag, "after_step", run.epoch, run.step))

    def after_epoch(self, run: RunState) -> None:
        self.events.append((self.tag, "after_epoch", run.epoch, sorted(run.record)))

    def after_train(self, run: RunState) -> None:
        self.events.append((self.tag, "after_train", run.epoch, run.error is None))


def _hooks(run: ToyRun, out: Path, **checkpoint: Any) -> list[Hook]:
    return [LossCheck(), LearningRate(run.optimizer), Validation(run.accuracy),
            Checkpointer(out / RESUME_STATE_NAME, **checkpoint), HistoryFile(out / HISTORY_NAME)]


def _train(seed: int, out: Path, epochs: int = 3, **kwargs: Any) -> tuple[ToyRun, RunState]:
    toy = ToyRun(seed, **kwargs)
    engine = Engine()
    state = engine.add(toy, name=f"toy{seed}", epochs=epochs, hooks=_hooks(toy, out))
    engine.train()
    return toy, state


def _without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_hooks_are_called_in_order_and_see_what_earlier_hooks_recorded(tmp_path: Path) -> None:
    events: list = []
    toy = ToyRun(0, batch_size=16)  # 48 points: 3 steps an epoch
    engine = Engine()
    engine.add(toy, name="toy", epochs=2, hooks=[Recorder(events, "first"), LossCheck(), Recorder(events, "second")])
    engine.train()
    expected = [("first", "before_train", 0), ("second", "before_train", 0)]
    for epoch in range(2):
        expected += [("first", "before_epoch", epoch, 3), ("second", "before_epoch", epoch, 3)]
        for step in (1, 2, 3):
            expected += [("first", "after_step", epoch, step), ("second", "after_step", epoch, step)]
        # The engine's own fields come first; the loss check's 'loss' is there only for the hook after it.
        expected += [("first", "after_epoch", epoch, ["epoch", "seconds"]),
                     ("second", "after_epoch", epoch, ["epoch", "loss", "seconds"])]
    expected += [("first", "after_train", 2, True), ("second", "after_train", 2, True)]
    assert events == expected


@pytest.mark.parametrize("workers", [0, 1])
def test_a_dataloader_run_resumed_after_an_interruption_reaches_the_uninterrupted_result(
        tmp_path: Path, workers: int) -> None:
    straight, straight_state = _train(5, tmp_path / "straight", workers=workers)

    class Interrupted(Exception):
        pass

    def stop(finished: int) -> None:
        if finished == 1:
            raise Interrupted

    first = ToyRun(5, workers=workers)
    engine = Engine()
    engine.add(first, name="toy", epochs=3, hooks=[*_hooks(first, tmp_path / "resumed"), EpochCallback(stop)])
    with pytest.raises(Interrupted):
        engine.train()
    assert torch.load(tmp_path / "resumed" / RESUME_STATE_NAME, weights_only=False)["epoch"] == 1

    # A fresh process would rebuild the run (same seed) and resume: the checkpoint restores weights,
    # optimiser, history and the run's random stream (the shuffles, the noise, the dropout masks).
    resumed_messages: list[str] = []
    again = ToyRun(5, workers=workers)
    engine = Engine()
    state = engine.add(again, name="toy", epochs=3, hooks=_hooks(
        again, tmp_path / "resumed", on_resume=lambda run: resumed_messages.append(f"after epoch {run.epoch}")))
    engine.train()
    assert resumed_messages == ["after epoch 1"]
    assert [h["epoch"] for h in state.history] == [1, 2, 3]
    assert _without_seconds(state.history) == _without_seconds(straight_state.history)
    assert _same_weights(again.model, straight.model)
    assert [h["lr"] for h in state.history] == [0.1, 0.05, 0.025]
    assert straight_state.history[-1]["val_top1"] > 60  # it learned something (chance: about 33)


def test_resume_without_the_random_stream_would_not_be_identical(tmp_path: Path) -> None:
    """The check above can fail: dropping the saved stream changes the continued run."""
    straight, _ = _train(5, tmp_path / "straight")
    first = ToyRun(5)
    engine = Engine()
    engine.add(first, name="toy", epochs=1, hooks=_hooks(first, tmp_path / "resumed"))
    engine.train()
    checkpoint = torch.load(tmp_path / "resumed" / RESUME_STATE_NAME, weights_only=False)
    del checkpoint["rng"]
    torch.save(checkpoint, tmp_path / "resumed" / RESUME_STATE_NAME)
    again, _ = _train(5, tmp_path / "resumed")
    assert not _same_weights(again.model, straight.model)


def test_a_non_finite_loss_names_its_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"^loss is nan at epoch 2, step 4; check$"):
        toy = ToyRun(0, nan_at=(2, 4))
        engine = Engine()
        engine.add(toy, name="toy", epochs=3, hooks=[LossCheck(hint="; check"),
                                                     Checkpointer(tmp_path / RESUME_STATE_NAME)])
        engine.train()
    assert torch.load(tmp_path / RESUME_STATE_NAME, weights_only=False)["epoch"] == 1


class HugeStepRun(ToyRun):
    """Epoch 2's last step runs at an infinite learning rate: its loss was finite, its update is not."""

    def train_step(self, batch: Any, world: World | None) -> torch.Tensor:
        if self.epoch == 1 and self.step == len(self.data) // self.batch_size - 1:
            for group in self.optimizer.param_groups:
                group["lr"] = float("inf")
        return super().train_step(batch, world)


def test_weights_that_are_no_longer_finite_are_never_checkpointed(tmp_path: Path) -> None:
    # The loss of every step is finite (the check on losses passes); the last update is not.
    toy = HugeStepRun(0)
    engine = Engine()
    engine.add(toy, name="toy", epochs=3, hooks=[LossCheck(), Checkpointer(tmp_path / RESUME_STATE_NAME)])
    with pytest.raises(TrainingError, match=r"the weights are not finite after epoch 2 \(\d+ tensor\(s\): model\."):
        engine.train()
    saved = torch.load(tmp_path / RESUME_STATE_NAME, weights_only=False)
    assert saved["epoch"] == 1 and non_finite_tensors(saved) == []


def test_non_finite_tensors_names_each_bad_tensor_in_a_nested_payload() -> None:
    payload = {"model": {"a": torch.zeros(2), "b": torch.tensor([1.0, float("inf")])},
               "optimizer": [torch.tensor(float("nan")), torch.arange(3)], "epoch": 3}
    assert non_finite_tensors(payload) == ["model.b", "optimizer.0"]
    with pytest.raises(ValueError, match=r"2 tensor\(s\): model.b, optimizer.0\); nothing was written"):
        refuse_non_finite(payload, what="now", error=ValueError)


def test_a_group_of_two_runs_equals_the_two_runs_trained_alone(tmp_path: Path) -> None:
    solo = {seed: _train(seed, tmp_path / f"solo{seed}", epochs=epochs, batch_size=batch_size)
            for seed, epochs, batch_size in ((1, 3, 8), (2, 2, 12))}
    engine = Engine()
    toys = {}
    for seed, epochs, batch_size in ((1, 3, 8), (2, 2, 12)):  # different step counts and epochs
        toys[seed] = ToyRun(seed, batch_size=batch_size)
        engine.add(toys[seed], name=f"toy{seed}", epochs=epochs, hooks=_hooks(toys[seed], tmp_path / f"group{seed}"))
    states = engine.train()
    for state, (seed, toy) in zip(states, toys.items()):
        alone, alone_state = solo[seed]
        assert _same_weights(toy.model, alone.model), seed
        assert _without_seconds(state.history) == _without_seconds(alone_state.history), seed


def test_in_a_group_a_failed_run_leaves_and_the_others_go_on(tmp_path: Path) -> None:
    messages: list[str] = []
    engine = Engine(keep_going=True, log=messages.append)
    # Each run is added right after it is built: its random stream starts there.
    good = ToyRun(1)
    engine.add(good, name="good", epochs=2, hooks=[LossCheck()])
    bad = ToyRun(2, nan_at=(1, 2))
    engine.add(bad, name="bad", epochs=2, hooks=[LossCheck()])
    good_state, bad_state = engine.train()
    assert good_state.error is None and good_state.epoch == 2
    assert isinstance(bad_state.error, TrainingError) and bad_state.epoch == 0
    assert messages == ["bad: failed: TrainingError: loss is nan at epoch 1, step 2"]
    alone, _ = _train(1, tmp_path / "alone", epochs=2)
    assert _same_weights(good.model, alone.model)


def test_keep_going_is_refused_under_data_parallelism() -> None:
    world = World(rank=0, size=2)  # no process group needed: the engine refuses before using it
    with pytest.raises(ValueError, match="data parallelism"):
        Engine(world=world, keep_going=True)


def test_a_periodic_loss_check_stops_the_epoch_soon_after_the_loss_diverges() -> None:
    steps: list[tuple[int, int]] = []
    toy = ToyRun(0, nan_at=(1, 2))  # 48 points in batches of 8: 6 steps an epoch
    engine = Engine()
    engine.add(toy, name="toy", epochs=1, hooks=[LossCheck(every=3), StepCallback(lambda e, s: steps.append((e, s)))])
    with pytest.raises(TrainingError, match=r"^loss is nan at epoch 1, step 2$"):
        engine.train()
    # The check at step 3 read steps 1-3 and stopped: steps 4-6 never ran.
    assert steps == [(0, 1), (0, 2)] and toy.step == 3


def test_a_periodic_loss_check_records_the_same_mean_as_the_check_after_the_epoch() -> None:
    records = []
    for every in (None, 4):
        toy = ToyRun(3)
        engine = Engine()
        state = engine.add(toy, name="toy", epochs=2, hooks=[LossCheck(every=every)])
        engine.train()
        records.append([entry["loss"] for entry in state.history])
    assert records[0] == records[1]


def _world_collectives(rank: int, size: int, port: int, results: Any) -> None:
    import os

    # What torchrun sets: the world starts the one way every trainer starts it.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    world = World.from_environment("cpu", size=size)
    try:
        assert world is not None and world.owns_group and (world.rank, world.size) == (rank, size)
        norm = nn.BatchNorm1d(2)
        norm.running_mean.fill_(float(rank))  # rank 0: 0, rank 1: 1
        world.average_buffers(norm)
        results.put((rank, world.gather({"rank": rank}), world.sum_counts([rank + 1, 10]),
                     norm.running_mean.tolist(), int(norm.num_batches_tracked)))
    finally:
        world.close()


def test_world_gathers_sums_and_averages_buffers_over_two_processes() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_world_collectives, args=(rank, 2, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    got = sorted(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    for rank, gathered, counts, running_mean, tracked in got:
        assert gathered == [{"rank": 0}, {"rank": 1}]
        assert counts == [3.0, 20.0]
        assert running_mean == [0.5, 0.5] and tracked == 0  # integer buffers are left alone


def test_one_process_has_no_world_and_a_broken_torchrun_environment_is_named() -> None:
    assert World.from_environment("cpu", environ={}) is None
    assert World.from_environment("cpu", environ={"WORLD_SIZE": "1"}) is None
    with pytest.raises(ValueError, match="WORLD_SIZE is set but RANK is not"):
        World.from_environment("cpu", environ={"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="the settings say 2"):
        World.from_environment("cpu", size=2, environ={})
