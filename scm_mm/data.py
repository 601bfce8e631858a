"""From a modality's raw dataset to the tensors the core trains on: encoded lazily, or once and cached.

A raw dataset yields `(media, label)` (see scm_mm.modality). Cheap codecs (pixels) encode each item
as it is loaded; expensive ones (a VAE) encode the whole dataset once, in batches, into a safetensors
file named after the dataset's fingerprint and the codec's settings, which later runs reuse (EDM2
encodes ImageNet to latents once in the same spirit). Items are `(x0, label)` with x0 float32
(C, *dims) and label an int64 scalar tensor (-1 = none).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from .modality import Codec


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


def cache_key(raw: Dataset, codec: Codec) -> str:
    """A short hash of the dataset's fingerprint and the codec's settings."""
    fingerprint = getattr(raw, "fingerprint", None)
    if not fingerprint:
        raise ValueError(f"{type(raw).__name__} has no `fingerprint`, so its encoding cannot be cached safely")
    blob = json.dumps({"data": fingerprint, "codec": codec.state()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def encode_all(raw: Dataset, codec: Codec, batch_size: int = 64, num_workers: int = 0) -> TensorPairs:
    """Encode a whole raw dataset in batches (latents stored in fp16: half the disk, ample precision)."""
    loader = DataLoader(raw, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    xs, ys = [], []
    for media, labels in loader:
        xs.append(codec.encode(media).to("cpu", torch.float16))
        ys.append(labels)
    return TensorPairs(torch.cat(xs), torch.cat(ys), int(getattr(raw, "num_classes", 0)))


def _collate(items: list[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_as_item(m, y) for m, y in items]
    return torch.stack([m for m, _ in pairs]), torch.stack([y for _, y in pairs])


def training_set(
    raw: Dataset,
    codec: Codec,
    cache_dir: str | Path | None = None,  # where cached encodings live; None: never cache
    batch_size: int = 64,                 # encoding batch size
) -> Dataset:
    """The dataset of (x0, label) to train on: lazily encoded, or encoded once and cached."""
    if not codec.cacheable:
        return EncodedDataset(raw, codec)
    if cache_dir is None:
        return encode_all(raw, codec, batch_size)
    path = Path(cache_dir) / f"encoded-{cache_key(raw, codec)}.safetensors"
    if path.exists():
        tensors = load_file(str(path))
        return TensorPairs(tensors["x0"], tensors["labels"], int(getattr(raw, "num_classes", 0)))
    pairs = encode_all(raw, codec, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    meta = {"fingerprint": str(getattr(raw, "fingerprint", "")), "codec": json.dumps(codec.state(), default=str)}
    save_file({"x0": pairs.x0.contiguous(), "labels": pairs.labels.contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a killed encoder never leaves a half-written cache behind
    return pairs
