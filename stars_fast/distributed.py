"""Multi-process training: `torchrun --nproc_per_node N -m stars_fast.train ...`.

torchrun starts N processes and sets RANK, LOCAL_RANK and WORLD_SIZE (and the rendezvous address);
`setup` joins them into one process group: NCCL with one GPU per process (cuda:LOCAL_RANK) on GPUs,
gloo on the CPU. How the driver splits the work:

- synthesis: each rank synthesizes its share of the synthesis batch (synthesis batch / N images)
  with its own random stream; the shares are all-gathered, so every rank's synthetic memory holds
  the same images;
- KD: the student is wrapped in DistributedDataParallel; each rank draws batch / N images from the
  memory per step and the gradients are averaged; rank 0's BatchNorm statistics are broadcast to
  the others before evaluating;
- evaluation: each rank scores its slice of the test split and the counts are summed;
- files: rank 0 alone writes the run folder; the per-rank state (random streams, synthesizer) is
  gathered into rank 0's checkpoint, and each rank takes its own back on resume.

Without torchrun (WORLD_SIZE unset or 1) the same calls run in the one process and do nothing.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

from .distill import evaluate


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among `world_size` processes and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    def share(self, total: int, what: str) -> int:
        """This rank's part of `total` (the same on every rank), or SystemExit when N does not divide it."""
        if total % self.world_size:
            raise SystemExit(f"{what} ({total}) must be a multiple of the number of processes ({self.world_size})")
        return total // self.world_size

    def gather(self, tensor: Tensor) -> Tensor:
        """Every rank's `tensor` (same shape on all ranks), concatenated along dim 0 in rank order."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_to_main(self, obj) -> Optional[List]:
        """[obj of rank 0, obj of rank 1, ...] on rank 0 and None elsewhere, its tensors on the CPU;
        `obj` holds tensors and plain Python types only (it is read back with weights_only=True)."""
        obj = _to_cpu(obj)
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0, weights_only=True)
        return gathered

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (plain Python types)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, weights_only=True)
        return box[0]

    def sum(self, value: float) -> float:
        """The sum of `value` over the ranks."""
        if not self.distributed:
            return value
        total = torch.tensor(float(value), dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. fills a cache), the other ranks after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` in DistributedDataParallel (gradients averaged over the ranks), or `model` itself."""
        if not self.distributed:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @torch.no_grad()
    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def evaluate(self, model: nn.Module, dataset: Dataset, **kwargs) -> float:
        """Top-1 accuracy on `dataset`, each rank scoring every N-th image (see distill.evaluate)."""
        if not self.distributed:
            return evaluate(model, dataset, device=self.device, **kwargs)
        part = Subset(dataset, range(self.rank, len(dataset), self.world_size))
        correct = round(evaluate(model, part, device=self.device, **kwargs) * len(part))
        return self.sum(correct) / len(dataset)


def _to_cpu(obj):
    """`obj` with every tensor in its dicts, lists and tuples moved to the CPU."""
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(value) for value in obj)
    return obj


@contextlib.contextmanager
def setup(device: torch.device, timeout_s: int = 300) -> Iterator[Context]:
    """The process group torchrun asked for (torn down on exit), or a one-process Context.

    `device` is the one the user chose; under torchrun a GPU without an index becomes cuda:LOCAL_RANK.
    A collective that waits longer than `timeout_s` for another process (stalled, or killed without
    torchrun noticing) ends this process with one line naming it, instead of gloo's 30-minute default.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield Context(device=device)
        return
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise SystemExit(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} not: start the processes with "
                         f"torchrun --nproc_per_node {world_size} -m stars_fast.train ..., or unset WORLD_SIZE")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index is not None:
            raise SystemExit(f"under torchrun pass --device cuda (or auto), not {device}: "
                             "each process takes the GPU of its LOCAL_RANK")
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"process {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
                             "start at most one process per GPU, or pass --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    try:
        yield Context(rank=rank, world_size=world_size, device=device)
    except RuntimeError as exc:  # gloo's DistBackendError, or a plain RuntimeError from older releases
        if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
            raise
        raise SystemExit(f"process {rank} of {world_size}: waited more than {timeout_s} s (--dist-timeout) for "
                         f"another process in a collective; one has stalled or died ({str(exc).splitlines()[0]})"
                         ) from None
    finally:
        dist.destroy_process_group()
