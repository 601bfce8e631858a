"""sCM under DDP (gloo, 2 CPU processes): the JVP runs on the unwrapped module, gradients still sync."""

import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from torch.nn.parallel import DistributedDataParallel as DDP

from scm_mm import SCMLoss, TrigFlowPrecond
from scm_mm.nn.dit import DiT
from scm_mm.train.distributed import DistInfo, Shards, barrier, from_main, init_distributed

B = 4  # per rank


def make_student() -> TrigFlowPrecond:
    torch.manual_seed(0)
    net = DiT(2, patch_size=(2, 2), hidden=32, depth=1, heads=2)
    student = TrigFlowPrecond(net, sigma_d=0.5, logvar_channels=8).double()
    with torch.no_grad():  # non-zero output layer and weight head, so every gradient is non-trivial
        net.proj_out.weight.normal_(std=0.1)
        student.logvar.linear.weight.normal_()
    return student


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x0": torch.randn(2 * B, 2, 4, 4, generator=g, dtype=torch.float64) * 0.5,
        "z": torch.randn(2 * B, 2, 4, 4, generator=g, dtype=torch.float64) * 0.5,
        "t": torch.rand(2 * B, generator=g, dtype=torch.float64) * 1.4 + 0.1,
    }


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    student = DDP(make_student())
    part = {k: v[rank * B : (rank + 1) * B] for k, v in batch().items()}
    loss, _ = SCMLoss(loss_dtype=torch.float64)(student, part["x0"], t=part["t"], z=part["z"])
    loss.backward()
    out[rank] = flat_grads(student.module)
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_gradients():
    port = free_port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = mp.Manager().dict()
    mp.spawn(worker, args=(port, out), nprocs=2, join=True)

    student = make_student()
    full = batch()
    loss, _ = SCMLoss(loss_dtype=torch.float64)(student, full["x0"], t=full["t"], z=full["z"])
    loss.backward()
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    torch.testing.assert_close(out[0], flat_grads(student), rtol=1e-10, atol=1e-12)


def _waiting_worker(rank: int, port: int, out: dict) -> None:
    """The default group times out after 2 s (as NCCL's does after 10 minutes); rank 0 works alone for 4 s."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=2))
    info = init_distributed("cpu")  # joins nothing more; adds the host group
    if rank == 0:
        time.sleep(4)
    barrier(info)
    out["host", rank] = "passed"
    out["view", rank] = from_main(lambda: rank, info)  # every rank gets rank 0's answer
    out["no host group", rank] = init_distributed("cpu", wait_timeout=None).host_group is None  # host_wait_hours=null
    if rank == 0:
        time.sleep(4)
    try:  # the control: the same wait on the default group
        dist.barrier()
        out["default", rank] = "passed"
    except RuntimeError:
        out["default", rank] = "timed out"


def test_barrier_waits_past_the_default_groups_timeout():
    """Ranks waiting while rank 0 works alone (encoding, a checkpoint, an evaluation) wait on the host group,
    whose timeout is hours, not on the default group, whose collectives NCCL aborts after 10 minutes."""
    port = free_port()
    out = mp.Manager().dict()
    mp.spawn(_waiting_worker, args=(port, out), nprocs=2, join=True)
    assert out["host", 0] == out["host", 1] == "passed"
    assert out["view", 0] == out["view", 1] == 0
    assert out["no host group", 0] and out["no host group", 1]
    assert out["default", 1] == "timed out"


def _sharding_worker(rank: int, port: int, folder: str, out: dict) -> None:
    """11 samples in batches of 3: rank 0 draws batches 0 and 2 (samples 0-2, 6-8), rank 1 batches 1 and 3
    (3-5, 9-10)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    info = init_distributed("cpu")
    shards = Shards(11, 3, info)
    mine = torch.tensor([[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10]][rank])
    out["sizes", rank] = shards.batch_sizes(rank)
    out["rows", rank] = shards.gather(mine).tolist()
    out["share", rank] = shards.share(torch.arange(11)).tolist()
    out["features", rank] = shards.gather(mine[:, None] * torch.ones(1, 3, dtype=torch.float64)).shape
    without = Shards(11, 3, init_distributed("cpu", wait_timeout=None))  # on the default group
    out["default group", rank] = without.gather(mine).tolist()
    cached = Path(folder) / "cached"
    with shards.main_first():  # rank 0 computes and caches; rank 1 finds the cache
        if rank == 0:
            time.sleep(1)
        out["found", rank] = cached.exists()
        cached.touch()
    try:
        with shards.main_first():
            if rank == 0:
                raise RuntimeError("no weights")
            out["after a failure", rank] = "ran"
    except RuntimeError:
        out["after a failure", rank] = "raised"


def test_shards_gather_every_ranks_rows_in_sample_order(tmp_path):
    port = free_port()
    out = mp.Manager().dict()
    mp.spawn(_sharding_worker, args=(port, str(tmp_path), out), nprocs=2, join=True)
    assert out["sizes", 0] == [3, 3] and out["sizes", 1] == [3, 2]
    for rank in (0, 1):
        assert out["rows", rank] == out["default group", rank] == list(range(11))
        assert out["share", rank] == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10]][rank]  # what gather undoes
        assert out["features", rank] == (11, 3)
    assert (out["found", 0], out["found", 1]) == (False, True)
    assert (out["after a failure", 0], out["after a failure", 1]) == ("raised", "ran")


def test_shards_refuse_a_rank_without_a_batch_and_gather_nothing_on_one_process():
    with pytest.raises(ValueError, match="without a batch; lower the batch size"):
        Shards(8, 8, DistInfo(rank=0, world_size=2))
    rows = torch.arange(5)
    assert Shards().gather(rows) is rows and Shards().shard == (0, 1)
