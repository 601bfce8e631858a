"""The plug between the core and a modality: a codec, raw datasets, and a registry of modalities.

The core trains on tensors x0 of shape (B, C, *dims) with standard deviation about sigma_d. A modality
supplies
- a `Codec` that maps a batch of media (uint8 images, waveforms, video clips) to such tensors and
  back, and records every setting needed to invert it (`state`), so a checkpoint can refuse a
  decoder whose settings differ;
- raw datasets whose items are `(media, label)`: a media tensor of one sample and an int label
  (-1 = none), with a `fingerprint` string that names the data and its preprocessing (a cache key);
- a `Modality` object, registered under the entry-point group "scm_mm.modalities", that builds the
  codec from a saved state, turns decoded media into a picture for TensorBoard, and writes files.
  It may name its own API as `pipeline` (a subclass of scm_mm.pipeline.SCMPipeline), which
  `SCMPipeline.load` then returns.

A codec whose normalisation is measured on the data (the audio codec's per-bin mel statistics) also
has `fitted: bool` and `fit(raw_dataset) -> codec`; the trainer fits it on the training data, and a
student inherits the fitted codec of its teacher. A codec with a network (a VAE, a vocoder) also has
`to(device) -> codec`, which `codec_to` calls: the apps run it where the model runs. A cacheable codec
may have `encoding() -> dict`: run-time settings that change its encodings a little but not what decodes
them (a VAE's compute dtype, tiling), kept out of `state` so a checkpoint decodes with either, and added
to the key of the encoding cache (scm_mm.data.cache_key) so that a cache encoded with one is not read
for the other.

A modality that scm-mm-eval and `train.eval_every` can score has `evaluate(media, reference, labels=None,
device=..., **options) -> dict[str, float]`: `media` is decoded samples, one tensor or an iterable of
batches of them (scm-mm-eval streams them, `SCMPipeline.decoded_batches`), `reference` the run's raw
dataset, `device` where the model runs (the metrics may run there too), and options it does not know it
ignores. One that can score a distributed evaluation also takes `shards` (scm_mm.train.distributed.Shards):
then `media` is this process's share, and it returns the scores of every process's samples.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from .train.distributed import Shards

ENTRY_POINT_GROUP = "scm_mm.modalities"


@runtime_checkable
class Codec(Protocol):
    """media batch <-> x0 (B, C, *dims) with standard deviation about sigma_d."""

    sigma_d: float
    cacheable: bool  # encoding is expensive (a VAE): encode each dataset once and cache the result

    def encode(self, media: torch.Tensor) -> torch.Tensor: ...

    def decode(self, x0: torch.Tensor) -> torch.Tensor: ...

    def state(self) -> dict[str, Any]:
        """JSON-serialisable settings, stored with every checkpoint."""
        ...


def codec_to(codec: Codec, device: str | torch.device) -> Codec:
    """`codec` with its network (a VAE, a vocoder) on `device`; a codec without one (pixels) as it is."""
    move = getattr(codec, "to", None)
    return move(device) if move is not None else codec


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """"bfloat16" (as a config writes a codec's compute dtype), "torch.float16" or a torch.dtype -> the
    torch.dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must name a floating-point torch dtype (float32, bfloat16, float16), got {dtype!r}")
    return value


@runtime_checkable
class Modality(Protocol):
    name: str
    default_suffix: str  # what `save` writes when the path does not say (".png", ".wav", ".mp4")

    def codec_from_state(self, state: Mapping[str, Any], **overrides: Any) -> Codec:
        """Rebuild the codec a checkpoint was trained with (overrides: e.g. a local path to weights)."""
        ...

    def preview(self, media: torch.Tensor) -> torch.Tensor:
        """Decoded media (B, ...) -> one uint8 picture (3, H, W) for TensorBoard."""
        ...

    def save(self, media: torch.Tensor, path: str | Path, **options: Any) -> list[Path]:
        """Write decoded media to files (.png, .wav, .mp4); returns the paths written."""
        ...


# Codec-state fields that say only where a codec's files lie (a VAE's folder), not what it computes: the
# same VAE copied to another disk or machine is the same codec. What it is, the state records apart
# (SD-VAE's config and weights_digest, a video autoencoder's description).
LOCATION_FIELDS = ("path",)


def without_location(state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` without its LOCATION_FIELDS, at any depth: what to compare two codecs by (a teacher's and
    its student's) and what to key a cache of encodings by."""
    return {
        key: without_location(value) if isinstance(value, Mapping) else value
        for key, value in state.items()
        if key not in LOCATION_FIELDS
    }


def state_differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """One line per field that differs between two codec (or model) states, in key order."""
    lines = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key, "<missing>"), found.get(key, "<missing>")
        if a != b:
            lines.append(f"  {key}: {a!r} != {b!r}")
    return lines


def check_state(expected: Mapping[str, Any], found: Mapping[str, Any], what: str) -> None:
    """Raise ValueError listing every differing field; `what` names the two sides."""
    diff = state_differences(expected, found)
    if diff:
        raise ValueError(f"{what} differ in {len(diff)} field(s) (expected != found):\n" + "\n".join(diff))


def sharded_evaluation(modality: Modality, shards: Shards) -> dict[str, Any]:
    """The keywords that give a modality's `evaluate` its share of the samples: {"shards": shards} under
    torchrun, none on one process. Under torchrun a modality whose evaluate takes no shards is refused: it
    would score each process's share alone."""
    if not shards.info.enabled:
        return {}
    if "shards" not in inspect.signature(modality.evaluate).parameters:  # type: ignore[attr-defined]
        raise ValueError(f"the {modality.name} modality's evaluate takes no shards: it cannot score samples "
                         "shared between processes; run the evaluation without torchrun")  # fmt: skip
    return {"shards": shards}


def available_modalities() -> dict[str, str]:
    """name -> "module:object" of every registered modality."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_modality(name: str) -> Modality:
    """The registered modality `name`, instantiated. Third-party packages register the same way."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()()
    raise KeyError(
        f"no modality {name!r} is registered under the entry-point group {ENTRY_POINT_GROUP!r}; "
        f"available: {sorted(available_modalities())} (is its package installed?)"
    )
