"""The video modality's plug (`VideoModality`) and its Python API (`VideoSCM`).

    from scm_mm_video import VideoSCM
    model = VideoSCM.load("runs/digits_scd")          # a run (its latest checkpoint) or a checkpoint
    videos = model.generate(8, steps=2, labels=[7] * 8, guidance=1.2, seed=0)   # uint8 (8, T, H, W, C)
    model.save_mp4("sevens.mp4")                      # sevens-000.mp4 ... H.264 yuv420p at the data's fps

Lengths: a model trained on clips of T = 1 + f_t (t - 1) frames (f_t: the autoencoder's temporal
factor) generates any clip of 1 + f_t k frames whose k + 1 latent frames its network's temporal patch
divides; `frames=` (or `seconds=` in scm-mm-sample) is rounded up to the next such count. Quality at
lengths other than the training length is not promised: the network saw one length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from scm_mm.pipeline import SCMPipeline
from scm_mm.train.distributed import Shards

from .codec import VideoLatentCodec, codec_from_state
from .io import write_frame_strip, write_gif, write_mp4
from .metrics import cached_video_classifiers, evaluate_video

FORMATS = ("mp4", "gif", "png")  # png: a strip of the frames side by side


def clip_strip(media: torch.Tensor, max_frames: int = 9, gap: int = 2) -> torch.Tensor:
    """uint8 clips (B, C, T, H, W) -> one uint8 RGB picture (3, B H + gaps, T' W + gaps) for TensorBoard:
    one row per clip, up to `max_frames` frames spread over the clip, white gaps between them."""
    if media.dtype != torch.uint8 or media.ndim != 5:
        raise ValueError(f"expected uint8 clips (B, C, T, H, W), got {media.dtype} {tuple(media.shape)}")
    b, c, t, h, w = media.shape
    frames = media[:, :, torch.linspace(0, t - 1, min(t, max_frames)).round().long()].expand(-1, 3, -1, -1, -1)
    canvas = torch.full((3, b * (h + gap) - gap, frames.shape[2] * (w + gap) - gap), 255, dtype=torch.uint8)
    for i in range(b):
        for j in range(frames.shape[2]):
            canvas[:, i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = frames[i, :, j]
    return canvas


def video_paths(path: str | Path, n: int) -> list[Path]:
    """Where n clips go: `path` itself for one clip, `stem-000.mp4`... for several, or `000000.mp4`... inside
    `path` when it is a folder (no suffix, or an existing folder). Any other suffix than FORMATS' is refused,
    not taken for a folder name."""
    path = Path(path)
    if not path.suffix or path.is_dir():
        return [path / f"{i:06d}.mp4" for i in range(n)]
    if path.suffix.lower().lstrip(".") not in FORMATS:
        raise ValueError(f"{path}: cannot write {path.suffix} files; write .mp4 (H.264), .gif or .png (a strip of "
                         "the frames), or give a folder (a path without suffix) for one .mp4 per clip")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i:03d}{path.suffix}") for i in range(n)]


class VideoModality:
    """The plug of scm_mm.modality.Modality for video (registered as entry point "video")."""

    name = "video"
    default_suffix = ".mp4"  # one file per clip

    @property
    def pipeline(self) -> type[VideoSCM]:
        return VideoSCM

    def codec_from_state(self, state: Mapping[str, Any], **overrides: Any) -> VideoLatentCodec:
        """The codec a checkpoint was trained with; vae=<local folder> where its autoencoder now lives."""
        return codec_from_state(state, **overrides)

    def preview(self, media: torch.Tensor) -> torch.Tensor:
        return clip_strip(media)

    def save(
        self,
        media: torch.Tensor,   # uint8 clips (B, C, T, H, W)
        path: str | Path,      # .mp4 / .gif / .png (frame strip), or a folder
        fps: float = 8.0,
        crf: int = 18,         # H.264 quality (0 lossless .. 51); 18 is visually lossless
    ) -> list[Path]:
        """One file per clip (see `video_paths`); odd frame sizes are padded for H.264, never rescaled."""
        out = []
        for clip, target in zip(media, video_paths(path, media.shape[0]), strict=True):
            frames = clip.permute(1, 2, 3, 0).cpu()  # (T, H, W, C)
            suffix = target.suffix.lower()
            if suffix == ".gif":
                out.append(write_gif(frames, target, fps))
            elif suffix == ".png":
                out.append(write_frame_strip(frames, target))
            else:
                out.append(write_mp4(frames, target, fps, crf=crf))
        return out

    def evaluate(
        self,
        media: torch.Tensor | Iterable[torch.Tensor],  # generated uint8 clips (N, C, T, H, W), or batches
        reference: Dataset,                 # real clips: items (uint8 (C, T, H, W), label)
        classifier_path: str | None = None,  # a folder with the two classifiers; None: trained once and cached
        cache_dir: str | Path | None = None,
        max_reference: int = 2000,          # real clips scored against: a random subset of this size
        reference_seed: int = 0,            # which subset; fixed, so scores are reproducible
        shards: Shards | None = None,       # a distributed evaluation: `media` are this process's share
        **_: Any,                           # options of other modalities (features, inception_path, fps)
    ) -> dict[str, float]:
        """Frechet video distance and per-frame Frechet distance in the features of small classifiers
        trained on the reference data, IS, precision and recall (scm_mm_video.metrics), with the size and
        seed of the reference subset. With `shards`, every process extracts its own clips' features and
        scores everyone's."""
        media = media if isinstance(media, torch.Tensor) else torch.cat(list(media))
        shards = shards or Shards()
        with shards.main_first():  # classifiers trained here are trained once and cached
            video_net, frame_net = cached_video_classifiers(reference, cache_dir, path=classifier_path)
        return evaluate_video(media, reference, video_net, frame_net, max_reference=max_reference,
                              seed=reference_seed, cache_dir=cache_dir, shards=shards)  # fmt: skip


class VideoSCM(SCMPipeline):
    """A trained video model with its autoencoder: `generate` returns uint8 clips (N, T, H, W, C)."""

    codec: VideoLatentCodec
    last: torch.Tensor | None = None

    @property
    def fps(self) -> float:
        """The frame rate of the training clips (8 when the run did not record one)."""
        return float(self.meta.get("fps") or 8.0)

    @property
    def frames(self) -> int:
        """The training clips' length in frames."""
        return self.codec.frames_for(self.sample_shape[1])

    def shape_for_frames(self, frames: int) -> list[int]:
        """x0 shape of a clip of at least `frames` frames: rounded up to a length the autoencoder and the
        network's temporal patch both take."""
        patch = int(getattr(self.model.net, "patch_size", (1,))[0])
        latent = self.codec.latent_frames_at_least(frames, multiple=patch)
        return [self.sample_shape[0], latent, *self.sample_shape[2:]]

    def shape_for(self, seconds: float) -> list[int]:
        return self.shape_for_frames(math.ceil(seconds * self.fps))

    def media_options(self) -> dict[str, Any]:
        return {"fps": self.fps}

    def generate(  # type: ignore[override]
        self,
        n: int,
        steps: int | None = None,       # None: 2 consistency steps, or a teacher's 32 heun steps
        frames: int | None = None,      # None: the training length; else rounded up (see the module docstring)
        labels: Any = None,             # class ids; None: cycle through the classes
        guidance: float | None = None,  # the CFG scale input of an sCD student
        seed: int | None = None,
        **kwargs: Any,                  # method="heun" for a teacher, t_mid, batch_size
    ) -> torch.Tensor:
        """n clips as uint8 (n, T, H, W, C) on the CPU, the layout video writers take."""
        shape = self.shape_for_frames(frames) if frames is not None else None
        x0 = self.sample_latents(n, steps=steps, labels=labels, guidance=guidance, seed=seed, shape=shape, **kwargs)
        self.codec.vae.to(self.device)  # type: ignore[attr-defined]  # decode where the model runs
        clips = self.codec.decode(x0).cpu()  # (n, C, T, H, W)
        self.last = clips.permute(0, 2, 3, 4, 1).contiguous()
        return self.last

    def save_mp4(
        self,
        path: str | Path,
        videos: torch.Tensor | None = None,  # uint8 (N, T, H, W, C); default: the last generated
        fps: float | None = None,            # default: the training clips' frame rate
        crf: int = 18,
    ) -> list[Path]:
        """H.264 yuv420p files (one per clip, see `video_paths`; .gif and .png strips by suffix)."""
        videos = self.last if videos is None else videos
        if videos is None:
            raise ValueError("nothing to save: call generate() first or pass videos")
        return self.modality.save(videos.permute(0, 4, 1, 2, 3), path, fps=fps or self.fps, crf=crf)  # type: ignore[call-arg]
