"""Data parallelism under torchrun: the one way a trainer starts it (`World.from_environment`).

Every trainer (`heads train`, `featstore finetune`, `featstore finetune-detector` with torchvision or
detectron2) asks ``World.from_environment(device)`` for its world: it reads the variables torchrun
sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), selects the process's GPU,
and starts the process group (gloo on the CPU, nccl on GPUs), or answers None for one process. A
trainable shards its batches by ``rank`` and sums its gradients through the world; the engine waits
for every rank after each round.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import torch

__all__ = ["World"]


class World:
    """The processes of one data-parallel run; gradients summed by all-reduce.

    Made by `from_environment`; the constructor only records what the process group already is.

    Args:
        rank: this process's rank.
        size: the number of processes.
        local_rank: its rank on this machine (its GPU).
        local_size: processes on this machine (detectron2's local group needs it); default ``size``.
        owns_group: this world started the process group (`close` ends it).
    """

    def __init__(self, *, rank: int, size: int, local_rank: int = 0, local_size: int | None = None,
                 owns_group: bool = False):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.local_size = size if local_size is None else local_size
        self.owns_group = owns_group

    @classmethod
    def from_environment(cls, device: str | torch.device, *, size: int | None = None,
                         environ: Mapping[str, str] | None = None) -> World | None:
        """The world torchrun launched this process into, its process group started; None for one process.

        A process group started already (detectron2's ``launch``, a test) is taken as it is.

        Args:
            device: ``cpu``, ``cuda`` or ``cuda:N``: on CUDA the process uses GPU ``LOCAL_RANK`` and nccl.
            size: the process count the caller's settings were made for (a config's ``world_size``);
                None: whatever the environment says.
            environ: the environment (default ``os.environ``).
        Returns:
            The world, or None when one process trains.
        Raises:
            ValueError: a torchrun environment that is incomplete, or another size than ``size``.
        """
        import torch.distributed as dist

        environ = os.environ if environ is None else environ
        cuda = str(device).startswith("cuda")
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
            local_rank = int(environ.get("LOCAL_RANK", rank))
            world = cls(rank=rank, size=world_size, local_rank=local_rank,
                        local_size=int(environ.get("LOCAL_WORLD_SIZE", world_size)))
        else:
            try:
                world_size = int(environ.get("WORLD_SIZE", "1"))
                rank = int(environ["RANK"]) if world_size > 1 else 0
                local_rank = int(environ.get("LOCAL_RANK", rank))
                local_size = int(environ.get("LOCAL_WORLD_SIZE", world_size))
            except KeyError as err:
                raise ValueError(f"WORLD_SIZE is set but {err.args[0]} is not (run under torchrun)") from None
            except ValueError as err:
                raise ValueError(f"bad torchrun environment: {err}") from None
            world = None
            if world_size > 1:
                if cuda:
                    torch.cuda.set_device(local_rank)  # before nccl starts: each process on its own GPU
                dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world_size)
                world = cls(rank=rank, size=world_size, local_rank=local_rank, local_size=local_size,
                            owns_group=True)
        if size is not None and (1 if world is None else world.size) != size:
            found = 1 if world is None else world.size
            if world is not None:
                world.close()
            raise ValueError(f"the process group has {found} process(es), the settings say {size} (world_size)")
        return world

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates and writes files."""
        return self.rank == 0

    def local_device(self, device: str) -> str:
        """``device`` for this process: ``cuda`` becomes this process's GPU (``cuda:LOCAL_RANK``)."""
        return f"cuda:{self.local_rank}" if str(device).startswith("cuda") else str(device)

    def close(self) -> None:
        """End the process group if this world started it."""
        if self.owns_group and self.dist.is_initialized():
            self.dist.destroy_process_group()
        self.owns_group = False

    def shard(self, rows: Any) -> Any:
        """This rank's share of ``rows`` (every ``size``-th item from ``rank``)."""
        return rows[self.rank::self.size]

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Sum every parameter's gradient and ``loss`` over the ranks, in one all-reduce.

        Args:
            parameters: parameters whose ``.grad`` are all set (zero where unused).
            loss: this rank's 0-d loss share.
        Returns:
            The summed loss (0-d, on the device).
        """
        grads = [p.grad for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0].dtype)])
        self.dist.all_reduce(flat)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        return flat[-1]

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Average every parameter's gradient and ``loss`` over the ranks, as DistributedDataParallel does.

        A parameter without a gradient (unused, or a rank with nothing to train on this step) counts
        as zero, so every rank joins the same all-reduce.

        Returns:
            The mean loss over the ranks (0-d, on the device).
        """
        parameters = list(parameters)
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        mean = self.sum_gradients(parameters, loss) / self.size
        for parameter in parameters:
            parameter.grad.div_(self.size)
        return mean

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        gathered: list[Any] = [None] * self.size
        self.dist.all_gather_object(gathered, value)
        return gathered

    def sum_counts(self, counts: Sequence[float]) -> list[float]:
        """The element-wise sum of ``counts`` over the ranks (one all-reduce of float64)."""
        totals = torch.tensor([float(c) for c in counts], dtype=torch.float64)
        if self.dist.get_backend() == "nccl":
            totals = totals.cuda()
        self.dist.all_reduce(totals)
        return totals.cpu().tolist()

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Average the floating-point buffers (BatchNorm running statistics) of ``module`` over the ranks.

        Each rank's BatchNorm layers update their running statistics from that rank's batches only;
        averaged after an epoch, the model every rank validates and saves is the same.
        """
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.reshape(-1).float() for b in buffers])
        self.dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for buffer in buffers:
            buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()

    def barrier(self) -> None:
        self.dist.barrier()
