"""From a modality's raw dataset to the tensors the core trains on: encoded lazily, or once and cached.

A raw dataset yields `(media, label)` (see scm_mm.modality). Cheap codecs (pixels) encode each item
as it is loaded; expensive ones (a VAE) encode the whole dataset once, in batches, into a safetensors
file named after the dataset's fingerprint and the codec's settings, which later runs reuse (EDM2
encodes ImageNet to latents once in the same spirit). Items are `(x0, label)` with x0 float32
(C, *dims) and label an int64 scalar tensor (-1 = none).

Random views. A raw dataset whose items are random views of longer ones (audio's random crops) must not
be encoded once: the cache would freeze one view per item for good. Such a dataset has a method
`random_views(codec) -> (source, view) | None` (None: its items are deterministic after all). `source` is
a deterministic raw dataset of the whole items, with its own fingerprint, whose items may differ in
length along the last axis; it is encoded once and cached like any other. `view(x0, generator) -> x0`
cuts one view from an encoded item; `RandomViews` calls it afresh every time it yields the item, with a
generator that a resumed run reproduces (`draw_generator`).

Unreadable items. A raw dataset checks its files when it is built, but some faults show only when an item
is read (a video cut short behind an intact index). Its `__getitem__` then raises `UnreadableItem`, naming
the file; encoding skips the item with a warning, and the cache holds the others.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from .modality import Codec, without_location
from .train.checkpoint import fsync
from .train.distributed import DistInfo, barrier, from_main


class UnreadableItem(ValueError):
    """A raw item whose file fails when read (the message names it): encoding skips it (module docstring)."""


class _Readable(Dataset):
    """A raw dataset whose unreadable items come out as None, with a warning naming them."""

    def __init__(self, raw: Dataset) -> None:
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any] | None:
        try:
            return self.raw[index]
        except UnreadableItem as e:
            warnings.warn(f"skipping an unreadable item: {e}", stacklevel=2)
            return None


def _as_item(media: Any, label: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(media), torch.as_tensor(-1 if label is None else label, dtype=torch.long)


class EncodedDataset(Dataset):
    """Encode each raw item on the fly (for codecs with `cacheable = False`, e.g. pixels)."""

    def __init__(self, raw: Dataset, codec: Codec) -> None:
        self.raw, self.codec = raw, codec
        self.num_classes = int(getattr(raw, "num_classes", 0))

    def __len__(self) -> int:
        return len(self.raw)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        media, label = _as_item(*self.raw[index])
        return self.codec.encode(media[None])[0].float(), label


class TensorPairs(Dataset):
    """(x0, labels) held in memory, e.g. a latent cache."""

    def __init__(self, x0: torch.Tensor, labels: torch.Tensor, num_classes: int = 0) -> None:
        if labels.shape != (x0.shape[0],):
            raise ValueError(f"labels {tuple(labels.shape)} do not match x0 {tuple(x0.shape)}")
        self.x0, self.labels, self.num_classes = x0, labels, num_classes

    def __len__(self) -> int:
        return self.x0.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = self.x0[index]
        return (x0.float() if x0.dtype in (torch.float16, torch.bfloat16) else x0), self.labels[index]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"x0": self.x0, "labels": self.labels}


View = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (encoded item, generator) -> one view of it


def draw_generator(index: int) -> torch.Generator:
    """The generator of one draw of item `index`, which a killed and resumed run draws again.

    In a DataLoader worker: seeded by (the loader's base seed, index). scm_mm.train.loop seeds each
    epoch's loader by (seed, epoch, rank), so every epoch draws afresh, and a run resumed mid-epoch draws
    what the uninterrupted run drew, whichever worker the item lands on. In the main process: one draw
    from torch's global generator, which the loop's checkpoints save and restore on each rank."""
    info = get_worker_info()
    if info is None:
        seed = int(torch.randint(0, 2**62, ()))
    else:
        base = info.seed - info.id  # torch seeds worker w with the loader's base seed + w
        seed = int.from_bytes(hashlib.sha256(f"{base}:{index}".encode()).digest()[:8], "little") >> 2
    return torch.Generator().manual_seed(seed)


class RandomViews(Dataset):
    """Encoded items of any length along the last axis, stored end to end in x0 (*lead, total), each
    yielded as a fresh random view: `view(item, draw_generator(index))` (see the module docstring)."""

    def __init__(
        self, x0: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor, view: View, num_classes: int = 0
    ) -> None:
        if lengths.shape != labels.shape or lengths.ndim != 1 or int(lengths.sum()) != x0.shape[-1]:
            raise ValueError(f"lengths {tuple(lengths.shape)} summing to {int(lengths.sum())} and labels "
                             f"{tuple(labels.shape)} do not match x0 {tuple(x0.shape)}")  # fmt: skip
        self.x0, self.lengths, self.labels, self.view, self.num_classes = x0, lengths, labels, view, num_classes
        self.starts = (torch.cumsum(lengths, 0) - lengths).tolist()

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[index]
        item = self.x0[..., start : start + int(self.lengths[index])]
        return self.view(item, draw_generator(index)).float(), self.labels[index]


def user_cache() -> Path:
    """The user's cache folder: $SCM_MM_CACHE, else ~/.cache/scm-mm (the examples' runs, audio folder scans)."""
    return Path(os.environ.get("SCM_MM_CACHE", Path.home() / ".cache" / "scm-mm"))


def files_digest(paths: Iterable[Path], root: Path) -> str:
    """sha256 (hex) of each file's path relative to `root`, byte size and modification time (ns), in the
    order given: the part of a folder dataset's fingerprint that changes when a file is added, removed,
    renamed, replaced or edited in place, for one stat per file and no reads (ImageNet's 1.28M files in
    seconds). tar and `rsync -a` keep modification times; a copy that does not gets a new fingerprint,
    so its data are encoded again: the safe side."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(raw: Dataset, codec: Codec) -> str:
    """A short hash of the dataset's fingerprint and the codec's settings, less where its files lie (a VAE
    moved to another folder keeps its cache; another VAE, with another weights digest, does not), and
    with its run-time encoding settings (another compute dtype is encoded again; see scm_mm.modality)."""
    fingerprint = getattr(raw, "fingerprint", None)
    if not fingerprint:
        raise ValueError(f"{type(raw).__name__} has no `fingerprint`, so its encoding cannot be cached safely")
    key = {"data": fingerprint, "codec": without_location(codec.state()), **_encoding(codec)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _encoding(codec: Codec) -> dict[str, Any]:
    """{"encoding": the codec's run-time encoding settings}, or {} for a codec without them."""
    settings = codec.encoding() if hasattr(codec, "encoding") else {}
    return {"encoding": settings} if settings else {}


@torch.no_grad()
def encode_all(raw: Dataset, codec: Codec, batch_size: int = 64, num_workers: int = 0) -> TensorPairs:
    """Encode a whole raw dataset in batches (latents stored in fp16: half the disk, ample precision), into
    one tensor allocated at the first batch: one copy of the encodings in memory (ImageNet-512's latents
    take 42 GB), not a list of batches and their concatenation. Workers read the raw items."""
    name = _name(raw)
    loader = DataLoader(_Readable(raw), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=functools.partial(_collate, name=name))  # fmt: skip
    n = len(raw)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError(f"{name} has no items to encode")
    x0, labels, start = torch.empty(0), torch.empty(n, dtype=torch.long), 0
    for batch in loader:
        if batch is None:  # every item of the batch unreadable
            continue
        media, y = batch
        x = codec.encode(media).to("cpu", torch.float16)
        if start == 0:
            x0 = torch.empty((n, *x.shape[1:]), dtype=torch.float16)  # (N, C, *dims)
        elif x.shape[1:] != x0.shape[1:]:
            shapes = f"{tuple(x0.shape[1:])} and {tuple(x.shape[1:])}"
            raise ValueError(f"{name}'s items encode to different shapes ({shapes}), so they cannot be encoded into "
                             "one tensor to train on: give it a fixed length (crop or pad its items)")  # fmt: skip
        x0[start : start + len(x)], labels[start : start + len(x)] = x, y
        start += len(x)
    if start == 0:
        raise ValueError(f"none of the {n} items of {name} could be read")
    if start < n:  # some were unreadable (warned): the cache holds the others
        x0, labels = x0[:start].clone(), labels[:start].clone()
    return TensorPairs(x0, labels, int(getattr(raw, "num_classes", 0)))


def _name(raw: Dataset) -> str:
    """The raw dataset's class name for messages (of the whole dataset for one rank's share)."""
    return type(raw.dataset if isinstance(raw, Subset) else raw).__name__


def _collate(
    items: list[tuple[Any, Any] | None], name: str = "the raw dataset"
) -> tuple[torch.Tensor, torch.Tensor] | None:
    pairs = _as_items(items)
    if not pairs:
        return None
    shapes = sorted({tuple(m.shape) for m, _ in pairs})
    if len(shapes) > 1:
        raise ValueError(f"{name}'s items differ in shape ({', '.join(map(str, shapes[:4]))}), so they cannot "
                         "be encoded into one tensor to train on: give it a fixed length (crop or pad its items)")
    return torch.stack([m for m, _ in pairs]), torch.stack([y for _, y in pairs])


@torch.no_grad()
def encode_whole(source: Dataset, codec: Codec, batch_size: int = 64, num_workers: int = 0) -> dict[str, torch.Tensor]:
    """Encode items of any length along the last axis, batching neighbours of one shape: {"x0": the
    encodings end to end (*lead, total), fp16, "lengths": (N,), "labels": (N,)} (RandomViews' tensors)."""
    pieces: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for chunk in DataLoader(_Readable(source), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_items):
        for _, same in itertools.groupby(chunk, key=lambda item: tuple(item[0].shape)):
            group = list(same)
            pieces += codec.encode(torch.stack([m for m, _ in group])).to("cpu", torch.float16).unbind(0)
            labels += [y for _, y in group]
    if not pieces:
        raise ValueError(f"none of the items of {_name(source)} could be read")
    leads = {tuple(p.shape[:-1]) for p in pieces}
    if len(leads) > 1:
        raise ValueError(f"encoded items may differ only in their last axis; found leading shapes {sorted(leads)}")
    return {
        "x0": torch.cat(pieces, -1),
        "lengths": torch.tensor([p.shape[-1] for p in pieces], dtype=torch.long),
        "labels": torch.stack(labels),
    }


def _as_items(items: list[tuple[Any, Any] | None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The readable items of a batch (`_Readable` gives None for the others)."""
    return [_as_item(*item) for item in items if item is not None]


def training_set(
    raw: Dataset,
    codec: Codec,
    cache_dir: str | Path | None = None,  # where cached encodings live; None: never cache
    batch_size: int = 64,                 # encoding batch size
    num_workers: int = 0,                 # DataLoader workers that read the raw items for encoding
    info: DistInfo | None = None,         # under torchrun: each rank encodes its share (see _cached)
) -> Dataset:
    """The dataset of (x0, label) to train on: lazily encoded, or encoded once and cached (random views:
    their source encoded once and cached, each view cut when drawn; see the module docstring)."""
    if not codec.cacheable:
        return EncodedDataset(raw, codec)
    num_classes = int(getattr(raw, "num_classes", 0))
    info = info or DistInfo()
    views = raw.random_views(codec) if hasattr(raw, "random_views") else None
    if views is None:
        items = functools.partial(encode_all, codec=codec, batch_size=batch_size, num_workers=num_workers)
        tensors = _cached(raw, codec, cache_dir, "encoded", lambda share: items(share).tensors(), info)
        _warn_if_short(tensors["labels"], raw)
        return TensorPairs(tensors["x0"], tensors["labels"], num_classes)
    source, view = views
    whole = functools.partial(encode_whole, codec=codec, batch_size=batch_size, num_workers=num_workers)
    tensors = _cached(source, codec, cache_dir, "views", whole, info)
    _warn_if_short(tensors["labels"], source)
    return RandomViews(tensors["x0"], tensors["lengths"], tensors["labels"], view, num_classes)


def _warn_if_short(labels: torch.Tensor, raw: Dataset) -> None:
    """Say so when the encodings (fresh or cached) hold fewer items than the raw dataset: some were
    unreadable when it was encoded, and a cache keeps that until it is deleted."""
    if len(labels) < len(raw):  # type: ignore[arg-type]
        warnings.warn(f"training on {len(labels)} of the {len(raw)} items of {_name(raw)}: the others were "  # type: ignore[arg-type]
                      "unreadable when it was encoded (delete the cache to encode it again)", stacklevel=3)


Encode = Callable[[Dataset], dict[str, torch.Tensor]]
_JOIN_DIMS = {"encoded": {"x0": 0, "labels": 0}, "views": {"x0": -1, "lengths": 0, "labels": 0}}  # shards' axes


def _cached(
    raw: Dataset, codec: Codec, cache_dir: str | Path | None, kind: str, encode: Encode, info: DistInfo
) -> dict[str, torch.Tensor]:
    """The tensors `encode(raw)` gives, read from `cache_dir` if an earlier run wrote them, else written there.
    Without a cache folder every rank encodes everything; with one, under torchrun, the ranks share the
    work (`_encode_shares`). Every rank acts on rank 0's view of the folder."""
    if cache_dir is None:
        return encode(raw)
    path = Path(cache_dir) / f"{kind}-{cache_key(raw, codec)}.safetensors"
    path, cached = from_main(lambda: (path, path.exists()), info)
    if cached:
        return load_file(str(path))
    meta = {"fingerprint": str(getattr(raw, "fingerprint", "")), "codec": json.dumps(codec.state(), default=str),
            **{k: json.dumps(v) for k, v in _encoding(codec).items()}}  # fmt: skip
    if not info.enabled:
        tensors = encode(raw)
        _save_atomically(tensors, path, meta)
        return tensors
    _encode_shares(raw, encode, path, kind, meta, info)
    return load_file(str(path))


def _encode_shares(raw: Dataset, encode: Encode, path: Path, kind: str, meta: dict[str, str], info: DistInfo) -> None:
    """Each rank encodes a contiguous share of the items into a part file, then rank 0 joins the parts in
    order into `path`: for a codec whose encodings do not depend on the batch or on random draws (a VAE's
    posterior mean, the default) the cache one process writes, in a world-size-th of the time. A part
    that a killed run finished is kept. Another job encoding the same data into the same folder at the
    same time may share parts; whichever joins first writes the cache, and the other then reads it.
    Random draws (a posterior sample) come from a generator seeded by the share's first item."""
    n = len(raw)  # type: ignore[arg-type]
    shares = min(info.world_size, n)  # ranks beyond the item count have nothing to encode
    bounds = [n * r // shares for r in range(shares + 1)]
    parts = [path.with_name(f"{path.stem}.part{r}-of-{shares}{path.suffix}") for r in range(shares)]
    if info.rank < shares and not parts[info.rank].exists():
        with torch.random.fork_rng(devices=[info.device.index or 0] if info.device.type == "cuda" else []):
            torch.manual_seed(bounds[info.rank])  # shares draw apart, and each the same in a rerun
            tensors = encode(Subset(raw, range(bounds[info.rank], bounds[info.rank + 1])))
        _save_atomically(tensors, parts[info.rank], meta)
    barrier(info)
    if info.is_main:
        _join(parts, path, kind, meta)
    barrier(info)


def _join(parts: list[Path], path: Path, kind: str, meta: dict[str, str]) -> None:
    """The parts' tensors joined in order into `path`, unless another job wrote it first; then the parts go."""
    try:
        if not path.exists():
            loaded = [load_file(str(part)) for part in parts]  # memory-mapped: read as they are copied
            _save_atomically({k: torch.cat([p[k] for p in loaded], dim) for k, dim in _JOIN_DIMS[kind].items()},
                             path, meta)  # fmt: skip
    except FileNotFoundError:  # another job joined these parts and removed them: its cache must be there
        if not path.exists():
            raise
    for part in parts:
        part.unlink(missing_ok=True)


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    fsync(tmp)  # on disk before the rename: after a machine crash the cache is whole or absent
    os.replace(tmp, path)  # atomic: a killed encoder never leaves a half-written cache behind
    fsync(path.parent)
