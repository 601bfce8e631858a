"""scm_mm.data: random views (a fresh view of a cached item at every draw, repeated by a resumed run) and
the cached training set."""

import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from scm_mm import DiffusionLoss, TrigFlowPrecond
from scm_mm.data import RandomViews, _join, encode_all, files_digest, training_set
from scm_mm.train.checkpoint import build_from_spec
from scm_mm.train.distributed import init_distributed
from scm_mm.train.loop import TrainOptions, train

NET = {
    "_target_": "scm_mm.nn.unet.UNet", "in_channels": 1, "model_channels": 8, "channel_mult": [1, 2],
    "num_blocks": 1, "num_classes": 3, "groups": 4, "dropout": 0.2,
}  # fmt: skip


def cut(x0: torch.Tensor, generator: torch.Generator, width: int = 8) -> torch.Tensor:
    """A view: `width` columns at a random offset (a module-level function, so workers can pickle it)."""
    offset = int(torch.randint(x0.shape[-1] - width + 1, (), generator=generator))
    return x0[..., offset : offset + width]


class Strips:
    """A raw dataset of (1, 8, L) "images" of lengths 8..31 whose items are random 8-column views, and
    whose `random_views` hands the core the whole strips and the cut. Counts the whole items read."""

    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(5)
        self.items = [(torch.randn(1, 8, 8 + i % 24, generator=g) * 0.5, i % 3) for i in range(n)]
        self.num_classes, self.fingerprint, self.read = 3, f"strips-{n}", 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return cut(self.items[i][0], torch.default_generator), self.items[i][1]

    def random_views(self, codec):
        return Whole(self), cut


class Whole:
    def __init__(self, strips: Strips) -> None:
        self.strips, self.fingerprint, self.num_classes = strips, f"{strips.fingerprint}-whole", 3

    def __len__(self) -> int:
        return len(self.strips)

    def __getitem__(self, i: int):
        self.strips.read += 1
        return self.strips.items[i]


class Scale:
    """A cacheable codec: x0 = 2 * media."""

    sigma_d, cacheable = 0.5, True

    def encode(self, media):
        return 2 * media

    def decode(self, x0):
        return x0 / 2

    def state(self):
        return {"type": "scale"}


def test_random_views_are_cut_afresh_from_one_cached_encoding(tmp_path):
    raw = Strips()
    data = training_set(raw, Scale(), tmp_path, batch_size=5)
    assert isinstance(data, RandomViews) and len(data) == 24 and data.num_classes == 3 and raw.read == 24
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["views"]
    again = training_set(raw, Scale(), tmp_path)  # from the cache: nothing read again
    assert raw.read == 24 and torch.equal(again.x0, data.x0) and again.lengths.tolist() == list(range(8, 32))
    draws = [data[23] for _ in range(10)]  # 31 columns to cut 8 from: 24 offsets
    assert all(x.shape == (1, 8, 8) and x.dtype == torch.float32 and int(y) == 2 for x, y in draws)
    assert len({tuple(x.flatten().tolist()) for x, _ in draws}) > 5  # a fresh view at every draw
    whole = 2 * raw.items[23][0].half().float()  # cached in fp16
    for x, _ in draws:  # each is a window of the item's encoding
        assert any(torch.equal(x, whole[..., k : k + 8]) for k in range(24))
    torch.manual_seed(1)
    first = [data[5][0] for _ in range(3)]
    torch.manual_seed(1)
    assert all(torch.equal(a, data[5][0]) for a in first)  # main process: torch's global generator


class Located(Scale):
    """A cacheable codec whose files lie at `path`, recorded at the top and inside a nested description
    (as the video codec records its autoencoder); `digest` names its weights."""

    def __init__(self, path: str, digest: str = "a") -> None:
        self.path, self.digest = path, digest

    def state(self):
        return {"type": "scale", "path": self.path, "autoencoder": {"path": self.path, "weights_digest": self.digest}}


class Counted:
    """A raw dataset of 6 fixed (1, 4, 4) items that counts the items read."""

    num_classes, fingerprint = 0, "counted-6"

    def __init__(self) -> None:
        self.read = 0

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):
        self.read += 1
        return torch.full((1, 4, 4), float(i)), -1


def test_a_moved_codec_keeps_its_cached_encoding_and_another_codec_does_not(tmp_path):
    raw = Counted()
    first = training_set(raw, Located("/disk1/vae"), tmp_path)
    assert raw.read == 6 and torch.equal(first.x0[:, 0, 0, 0], 2 * torch.arange(6.0).half())
    training_set(raw, Located("/disk2/copy-of-vae"), tmp_path)  # the same VAE elsewhere: the cache
    assert raw.read == 6 and len(list(tmp_path.iterdir())) == 1
    training_set(raw, Located("/disk1/vae", digest="b"), tmp_path)  # other weights at the same path: encoded
    assert raw.read == 12 and len(list(tmp_path.iterdir())) == 2


def test_files_digest_changes_with_any_file_and_not_otherwise(tmp_path):
    """The folder datasets' fingerprint part: names, sizes and mtimes (an edit of the same size included)."""
    for name in ("a.bin", "b.bin"):
        (tmp_path / name).write_bytes(b"1234")
    files = sorted(tmp_path.iterdir())
    first = files_digest(files, tmp_path)
    assert files_digest(files, tmp_path) == first and len(first) == 64
    (tmp_path / "a.bin").write_bytes(b"5678")  # edited in place: the same size, a later mtime
    mtime = (tmp_path / "a.bin").stat().st_mtime_ns + 10**9
    os.utime(tmp_path / "a.bin", ns=(mtime, mtime))
    edited = files_digest(files, tmp_path)
    assert edited != first
    (tmp_path / "b.bin").rename(tmp_path / "c.bin")
    assert files_digest(sorted(tmp_path.iterdir()), tmp_path) != edited


def test_items_of_unequal_shapes_are_refused_with_a_clear_error():
    class Ragged:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(1, 4 + i), 0

    with pytest.raises(ValueError, match=r"Ragged's items differ in shape .*fixed length"):
        encode_all(Ragged(), Scale())


def test_encode_all_fills_one_tensor_batch_by_batch():
    data = encode_all(Counted(), Scale(), batch_size=4)  # batches of 4 and 2
    assert data.x0.dtype == torch.float16 and data.x0.shape == (6, 1, 4, 4) and data.labels.tolist() == [-1] * 6
    assert torch.equal(data.x0[:, 0, 0, 0], 2 * torch.arange(6.0).half())

    class Ragged:  # items of one shape within a batch of 2, another in the next
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(1, 4 + i // 2), 0

    with pytest.raises(ValueError, match=r"Ragged's items encode to different shapes \(\(1, 4\)"):
        encode_all(Ragged(), Scale(), batch_size=2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_killed_and_resumed_run_draws_the_same_views(tmp_path, num_workers):
    data = training_set(Strips(), Scale())
    options = TrainOptions(iters=6, batch_size=8, accum_steps=2, lr=1e-3, ckpt_every=2, log_every=1,
                           progress=False, num_workers=num_workers)  # fmt: skip

    def run(run_dir, **kw):
        torch.manual_seed(0)
        model = TrigFlowPrecond(build_from_spec(NET), sigma_d=0.5)
        return train(model, DiffusionLoss(label_dropout=0.2), data, options, run_dir, meta={"net": NET}, **kw)

    full = run(tmp_path / "full")  # 6 iterations: two epochs of 24 items in micro-batches of 4
    run(tmp_path / "killed", stop_at=3)  # dies mid-epoch, after its checkpoint at iteration 2
    resumed = run(tmp_path / "killed")
    assert resumed.losses == full.losses[2:]  # the same views: exactly the same losses


def test_in_workers_a_view_follows_the_loaders_seed_and_the_index_not_the_worker():
    data = training_set(Strips(), Scale())

    def views(seed: int, order: list[int]) -> dict[int, torch.Tensor]:
        loader = DataLoader(data, batch_size=1, sampler=order, num_workers=2,  # type: ignore[arg-type]
                            generator=torch.Generator().manual_seed(seed))  # fmt: skip
        return {i: x for i, (x, _) in zip(order, loader)}

    epoch, resumed, other = views(0, [20, 21, 22, 23]), views(0, [21, 22, 23]), views(1, [20, 21, 22, 23])
    assert all(torch.equal(epoch[i], resumed[i]) for i in resumed)  # item 21 now lands on the other worker
    assert not all(torch.equal(epoch[i], other[i]) for i in epoch)  # another epoch's loader: other views


# --- encoding shared by the ranks of a torchrun job (2 gloo processes) --------------------------------


class Fragile(Counted):
    """Counted with 7 items; item `broken` raises, once rank 0's part is in `cache` (so that the failure comes
    after rank 0 has finished its share, whichever process runs first)."""

    fingerprint = "fragile-7"

    def __init__(self, broken: int = -1, cache: Path | None = None) -> None:
        super().__init__()
        self.broken, self.cache = broken, cache

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int):
        if i == self.broken:
            deadline = time.monotonic() + 60
            while not list(self.cache.glob("encoded-*.part0-of-2.safetensors")) and time.monotonic() < deadline:
                time.sleep(0.05)
            raise OSError(f"item {i} is unreadable")
        return super().__getitem__(i)


def _encode_worker(rank: int, port: int, cache: str, broken: int, out: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)  # as torchrun sets them
    info = init_distributed("cpu")
    raw, strips = Fragile(broken, Path(cache)), Strips(10)
    items = training_set(raw, Scale(), cache, batch_size=2, info=info)
    views = training_set(strips, Scale(), cache, batch_size=3, info=info)
    out[rank] = raw.read, items.x0.clone(), items.labels.clone(), strips.read, views.x0.clone(), views.lengths.clone()
    torch.distributed.destroy_process_group()


def _spawn_encoders(cache, broken: int = -1) -> dict:
    out = mp.Manager().dict()
    mp.spawn(_encode_worker, args=(free_port(), str(cache), broken, out), nprocs=2, join=True)
    return dict(out)


def test_ranks_encode_their_shares_into_the_cache_one_process_writes(tmp_path):
    """Under torchrun each rank encodes a contiguous share and rank 0 joins them: the same cache as one process
    (both kinds: items, and random views' whole sources), each item read once; a killed run's finished part is
    kept and only the rest encoded again."""
    single = training_set(Fragile(), Scale(), tmp_path / "single")
    single_views = training_set(Strips(10), Scale(), tmp_path / "single")

    with pytest.raises(mp.ProcessRaisedException, match="item 5 is unreadable"):  # rank 1's share is 3..6
        _spawn_encoders(tmp_path / "shared", broken=5)
    assert [p.name.split(".")[1] for p in (tmp_path / "shared").glob("*.part*")] == ["part0-of-2"]
    out = _spawn_encoders(tmp_path / "shared")
    assert out[0][0] == 0 and out[1][0] == 4  # rank 0's part kept; rank 1 read 3..6 again
    assert out[0][3] == 5 and out[1][3] == 5  # the views' sources: 10 strips split evenly
    for rank in (0, 1):
        _, x0, labels, _, views, lengths = out[rank]
        assert torch.equal(x0, single.x0) and torch.equal(labels, single.labels)
        assert torch.equal(views, single_views.x0) and torch.equal(lengths, single_views.lengths)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "shared").iterdir()) == ["encoded", "views"]  # no parts


def test_a_join_whose_parts_another_job_took_reads_that_jobs_cache(tmp_path):
    """Two jobs encoding the same data into one folder share part names: the first to join writes the cache and
    removes the parts, and the other, finding a part gone, keeps the cache it finds (or fails without one)."""
    parts = [tmp_path / f"encoded-key.part{r}-of-2.safetensors" for r in range(2)]
    for r, part in enumerate(parts):
        save_file({"x0": torch.full((2, 3), float(r)), "labels": torch.tensor([r, r])}, str(part))
    _join(parts, tmp_path / "encoded-key.safetensors", "encoded", {})
    assert load_file(str(tmp_path / "encoded-key.safetensors"))["labels"].tolist() == [0, 0, 1, 1]
    assert not any(part.exists() for part in parts)
    _join(parts, tmp_path / "encoded-key.safetensors", "encoded", {})  # the second job: its parts are gone
    with pytest.raises(FileNotFoundError):
        _join(parts, tmp_path / "encoded-other.safetensors", "encoded", {})
