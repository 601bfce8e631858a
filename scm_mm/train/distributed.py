"""Process groups and model wrapping with PyTorch's own machinery: torchrun, DDP and FSDP2.

`init_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), or
under SLURM without torchrun, derives it from the SLURM variables through submitit's helper (the
Hydra submitit launcher starts one task per GPU). A single process needs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    host_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)  # see init_distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _export_slurm_environment() -> None:
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError as e:  # pragma: no cover - only on SLURM without submitit
        raise RuntimeError("a multi-task SLURM job needs submitit (pip install 'scm-mm[slurm]') or torchrun") from e
    TorchDistributedEnvironment().export()


def init_distributed(
    device: str = "auto",                       # "auto" (CUDA if available), "cpu" or "cuda"
    backend: str | None = None,                 # None: nccl on CUDA, gloo on CPU
    wait_timeout: timedelta | None = timedelta(hours=6),  # of the host group; None: no host group
) -> DistInfo:
    """Join the process group if the environment describes one; pick this rank's device.

    Beside the default group, a gloo group with a long timeout (`DistInfo.host_group`) carries `barrier`
    and `from_main`: the ranks wait there while some do work of their own (encoding their share of a
    dataset, rank 0 writing a checkpoint or computing what an evaluation caches), which can outlast
    NCCL's 10-minute collective timeout. A rank that dies closes its connections, so the others fail at
    once (1.6-2 s in two checks, on one machine), not at the timeout; a rank that hangs holds the others
    for up to `wait_timeout`. Across nodes gloo needs a network interface the nodes reach each other on
    (GLOO_SOCKET_IFNAME where the default one does not); wait_timeout=None waits on the default group.
    """
    _export_slurm_environment()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), rank=rank, world_size=world_size)
    host_group = None
    if world_size > 1 and wait_timeout is not None:
        host_group = cast(dist.ProcessGroup, dist.new_group(backend="gloo", timeout=wait_timeout))  # all ranks
    return DistInfo(rank, world_size, local_rank, dev, host_group)


def leave_distributed() -> None:
    """Destroy the process groups at the end of a torchrun job: a gloo group left to the interpreter's exit
    can abort the process ("terminate called without an active exception") after its work is done."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _wait_device(info: DistInfo) -> torch.device:
    """Where the tensors of a collective on the host group lie: the CPU (gloo), or the rank's device when
    there is no host group and the default one is NCCL."""
    gloo = info.host_group is not None or dist.get_backend() == "gloo"
    return torch.device("cpu") if gloo else info.device


def barrier(info: DistInfo) -> None:
    """Wait for every rank, on the host group (the default group for a DistInfo built without one)."""
    if info.enabled:
        dist.barrier(group=info.host_group)


def from_main(compute: Callable[[], T], info: DistInfo) -> T:
    """compute() on the main rank, its result (or the exception it raised) on every rank, so that all
    act on one view (of the file system, say) and none waits for a broadcast that never comes."""
    if not info.enabled:
        return compute()
    box: list[Any] = [None]
    if info.is_main:
        try:
            box[0] = compute()
        except Exception as e:  # raised on every rank
            box[0] = e
    dist.broadcast_object_list(box, src=0, group=info.host_group)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


@dataclass(frozen=True)
class Shards:
    """n samples drawn `batch_size` at a time, split over the ranks for a distributed evaluation: rank r
    draws batches r, r + world, r + 2 world, ... (`SCMPipeline.latent_batches(shard=...)`, where each batch
    has a seed of its own, so the samples do not depend on the world size). A modality's `evaluate` scores
    its own share, `gather`s per-sample rows (features, or the media themselves) into sample order on every
    rank, and computes what it caches (a classifier, reference features) on the main rank first. The
    default, one process, gathers nothing.
    """

    n: int = 0
    batch_size: int = 1
    info: DistInfo = field(default_factory=DistInfo)

    def __post_init__(self) -> None:
        if self.info.enabled and -(-self.n // self.batch_size) < self.info.world_size:
            raise ValueError(f"{self.n} samples in batches of {self.batch_size} leave some of the "
                             f"{self.info.world_size} ranks without a batch; lower the batch size")  # fmt: skip

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world size): which batches this rank draws, as `latent_batches` takes it."""
        return self.info.rank, self.info.world_size

    def batch_sizes(self, rank: int) -> list[int]:
        """The sizes of the batches `rank` draws, in its order."""
        return [min(self.batch_size, self.n - start) for start in self._starts(rank)]

    def _starts(self, rank: int) -> range:
        """Where the batches `rank` draws begin, in sample order."""
        return range(rank * self.batch_size, self.n, self.info.world_size * self.batch_size)

    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-sample rows of all n samples, in sample order (their labels, say) -> this rank's, in its order:
        what `gather` undoes."""
        if not self.info.enabled:
            return rows
        if rows.shape[0] != self.n:
            raise ValueError(f"expected rows for all {self.n} samples, got {rows.shape[0]}")
        return torch.cat([rows[start : start + self.batch_size] for start in self._starts(self.info.rank)])

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's per-sample rows (its samples, in its order) -> every rank's, in sample order, on every
        rank. The rows travel on the host group (gloo, CPU) when there is one."""
        if not self.info.enabled:
            return rows
        rank, world = self.shard
        sizes = [self.batch_sizes(r) for r in range(world)]
        if rows.shape[0] != sum(sizes[rank]):
            raise ValueError(f"rank {rank} holds {sum(sizes[rank])} samples of {self.n}, got {rows.shape[0]} rows")
        padded = rows.new_zeros((max(map(sum, sizes)), *rows.shape[1:]), device=_wait_device(self.info))
        padded[: rows.shape[0]] = rows  # all_gather takes equal shapes
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=self.info.host_group)
        batches = [list(part[: sum(size)].split(size)) for part, size in zip(parts, sizes, strict=True)]
        in_order = [batches[k % world][k // world] for k in range(sum(map(len, sizes)))]
        return torch.cat(in_order).to(rows.device)

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The block on the main rank, then on the others: what the main rank computes and caches there (a
        classifier trained on the data, the reference's features) the others read from the cache. A failure
        on the main rank still lets the others go on (they meet it themselves, or do the work)."""
        if not self.info.is_main:
            barrier(self.info)
        try:
            yield
        finally:
            if self.info.is_main:
                barrier(self.info)


def slowest(seconds: float, info: DistInfo) -> float:
    """The largest of the ranks' `seconds` (the wall-clock time of work they did side by side)."""
    if not info.enabled:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=_wait_device(info))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=info.host_group)
    return float(value.item())


def per_rank_batch(global_batch: int, accum_steps: int, world_size: int) -> int:
    """The micro-batch of one rank, so that the global batch is the same for any world size."""
    per_step = world_size * accum_steps
    if global_batch % per_step:
        raise ValueError(
            f"batch_size={global_batch} does not split into {world_size} rank(s) x {accum_steps} accumulation "
            f"step(s); choose a multiple of {per_step}"
        )
    return global_batch // per_step


Strategy = Literal["ddp", "fsdp"]


def wrap_model(model: nn.Module, info: DistInfo, strategy: Strategy = "ddp") -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` on each block that has parameters of its own, then the root).

    The sCM tangent is computed on the unwrapped module under no_grad (scm_mm.jvp.unwrap): for DDP
    that skips its hooks; FSDP2 modifies the module in place and its forward hooks gather the
    parameters, which works under torch.func.jvp because no post-backward hooks are installed
    without grad (checked by tests/test_training.py against a single process).
    """
    if not info.enabled:
        return model
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _shardable_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def _shardable_blocks(model: nn.Module) -> list[nn.Module]:
    """Entries of the network's ModuleLists (U-Net stages, DiT blocks), the usual FSDP unit; innermost
    first, since fully_shard must see nested units before the units that hold them."""
    blocks = [block for lst in model.modules() if isinstance(lst, nn.ModuleList) for block in lst]
    return blocks[::-1]
