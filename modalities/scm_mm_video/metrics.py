"""Offline video metrics in the features of two small classifiers trained on the data itself.

The SC09 recipe (scm_mm.metrics.classifier) applied to clips, because I3D weights are not available
offline: numbers are comparable only between runs scored with the same classifier files.

- "fvd": the Frechet distance in the features of `VideoClassifier`, a small 3-D CNN over whole clips.
  It is NOT the I3D-based FVD of Unterthiner et al. Motion matters to its features by construction:
  beside the class, it is trained to tell clips in their true frame order from the same clips with
  their frames shuffled or reversed, so temporally broken videos land far from real ones.
- "frame_fd": the Frechet distance in the features of `FrameClassifier`, a small 2-D CNN trained on single
  frames with their clip's label, over all frames of all clips pooled: per-frame quality, blind to motion.
- "is_mean"/"is_std", "precision"/"recall": from the video classifier's logits and features.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scm_mm.metrics.classifier import cached_classifier, extract_features, feature_scores
from scm_mm.metrics.frechet import FeatureStats
from scm_mm.train.checkpoint import load_into, load_module_folder, save_module_folder


def _unit(media: torch.Tensor, device: torch.device) -> torch.Tensor:
    return media.to(device, torch.float32) / 127.5 - 1.0


class _Saveable(nn.Module):
    settings: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        return save_module_folder(self, {"kind": type(self).__name__, **self.settings}, path)

    @classmethod
    def load(cls, path: str | Path) -> Any:
        config, weights = load_module_folder(path, f"{cls.__name__} folder")
        if config.pop("kind", None) != cls.__name__:
            raise ValueError(f"{path} does not hold a {cls.__name__}")
        model = cls(**config)
        load_into(model, weights, str(path))
        return model.eval().requires_grad_(False)


class VideoClassifier(_Saveable):
    """uint8 clips (B, C, T, H, W) -> (features (B, feature_dim), class logits (B, num_classes)).

    `stages` x (Conv3d 3x3x3, GroupNorm, ReLU, pool (1 or 2 in time, 2 in space)), global average pooling, a
    ReLU feature layer, a class head, and an order head (`order_logits`: true order vs shuffled/reversed).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, stages: int = 3,
                 feature_dim: int = 128) -> None:  # fmt: skip
        super().__init__()
        self.settings = dict(in_channels=in_channels, num_classes=num_classes, width=width, stages=stages,
                             feature_dim=feature_dim)  # fmt: skip
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(stages):
            out = width * 2**i
            layers += [nn.Conv3d(channels, out, 3, padding=1), nn.GroupNorm(8, out), nn.ReLU(),
                       nn.MaxPool3d((2 if i else 1, 2, 2), ceil_mode=True)]  # fmt: skip
            channels = out
        self.convs = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Linear(channels, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self.order_head = nn.Linear(feature_dim, 2)

    def embed(self, media: torch.Tensor) -> torch.Tensor:
        return self.features(self.convs(_unit(media, self.head.weight.device)).mean((2, 3, 4)))

    def forward(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(media)
        return features, self.head(features)


class FrameClassifier(_Saveable):
    """uint8 frames (B, C, H, W) -> (features (B, feature_dim), logits (B, num_classes)): the 2-D twin."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, stages: int = 3,
                 feature_dim: int = 128) -> None:  # fmt: skip
        super().__init__()
        self.settings = dict(in_channels=in_channels, num_classes=num_classes, width=width, stages=stages,
                             feature_dim=feature_dim)  # fmt: skip
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(stages):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(8, out), nn.ReLU(),
                       nn.MaxPool2d(2, ceil_mode=True)]  # fmt: skip
            channels = out
        self.convs = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Linear(channels, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(self.convs(_unit(media, self.head.weight.device)).mean((2, 3)))
        return features, self.head(features)


def broken_order(clips: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each clip (B, C, T, H, W) with its frames reversed or randomly permuted (never the identity)."""
    t = clips.shape[2]
    out = []
    for clip in clips:
        if torch.rand((), generator=generator) < 0.5:
            order = torch.arange(t - 1, -1, -1)
        else:
            order = torch.randperm(t, generator=generator)
            while torch.equal(order, torch.arange(t)):
                order = torch.randperm(t, generator=generator)
        out.append(clip[:, order])
    return torch.stack(out)


def _batches(dataset: Any, batch_size: int, steps: int, generator: torch.Generator
             ) -> Any:  # fmt: skip
    for _ in range(steps):
        indices = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
        items = [dataset[i] for i in indices]
        yield torch.stack([torch.as_tensor(m) for m, _ in items]), torch.tensor([int(y) for _, y in items])


def _fit(model: nn.Module, loss_fn: Callable[..., torch.Tensor], dataset: Any, steps: int, batch_size: int,
         lr: float, seed: int, log_every: int) -> None:  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    start = time.perf_counter()
    for step, (media, labels) in enumerate(_batches(dataset, batch_size, steps, generator), 1):
        if labels.min() < 0:
            raise ValueError("the video metrics train their classifiers on labelled clips; got label -1")
        loss = loss_fn(media, labels, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            elapsed = time.perf_counter() - start
            print(f"{type(model).__name__} step {step}/{steps} loss {loss.item():.4f} {elapsed:.1f} s")
    model.eval().requires_grad_(False)


def train_video_classifier(dataset: Any, num_classes: int, steps: int = 600, batch_size: int = 32, lr: float = 3e-3,
                           seed: int = 0, log_every: int = 0, **settings: Any) -> VideoClassifier:  # fmt: skip
    """Class cross-entropy on the clips + order cross-entropy on the clips vs broken_order copies of them."""
    channels = int(torch.as_tensor(dataset[0][0]).shape[0])
    torch.manual_seed(seed)
    model = VideoClassifier(in_channels=channels, num_classes=num_classes, **settings)

    def loss(media: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        both = torch.cat([media, broken_order(media, generator)])
        features = model.embed(both)
        order = torch.cat([torch.zeros(len(media)), torch.ones(len(media))]).long()
        return F.cross_entropy(model.head(features[: len(media)]), labels) + F.cross_entropy(
            model.order_head(features), order
        )

    _fit(model, loss, dataset, steps, batch_size, lr, seed, log_every)
    return model


def train_frame_classifier(dataset: Any, num_classes: int, steps: int = 400, batch_size: int = 16, lr: float = 3e-3,
                           seed: int = 0, log_every: int = 0, **settings: Any) -> FrameClassifier:  # fmt: skip
    """Class cross-entropy on every frame of the clips (batch_size clips x T frames per step)."""
    channels = int(torch.as_tensor(dataset[0][0]).shape[0])
    torch.manual_seed(seed)
    model = FrameClassifier(in_channels=channels, num_classes=num_classes, **settings)

    def loss(media: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        frames = media.transpose(1, 2).flatten(0, 1)  # (B T, C, H, W)
        return F.cross_entropy(model(frames)[1], labels.repeat_interleave(media.shape[2]))

    _fit(model, loss, dataset, steps, batch_size, lr, seed, log_every)
    return model


def cached_video_classifiers(reference: Any, cache_dir: str | Path | None, path: str | Path | None = None
                             ) -> tuple[VideoClassifier, FrameClassifier]:  # fmt: skip
    """(video, frame) classifiers: from path/video and path/frame, from the cache, or trained once and cached."""
    video = cached_classifier(reference, None if path is None else Path(path) / "video", cache_dir,
                              VideoClassifier.load, train_video_classifier, name="video-classifier")  # fmt: skip
    frame = cached_classifier(reference, None if path is None else Path(path) / "frame", cache_dir,
                              FrameClassifier.load, train_frame_classifier, name="frame-classifier")  # fmt: skip
    return video, frame


def all_frames(clips: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) -> (N T, C, H, W)."""
    return clips.transpose(1, 2).flatten(0, 1)


@torch.no_grad()
def reference_features(reference: Any, video_net: VideoClassifier, frame_net: FrameClassifier,
                       max_reference: int = 2000) -> dict[str, torch.Tensor]:  # fmt: skip
    """Features of the first max_reference real clips: {"video": (M, D), "frame": (M T, D)}."""
    n = min(len(reference), max_reference)
    clips = torch.stack([torch.as_tensor(reference[i][0]) for i in range(n)])
    return {"video": extract_features(video_net, clips, 100)[0], "frame": extract_features(frame_net, all_frames(clips),
                                                                                           500)[0]}  # fmt: skip


@torch.no_grad()
def video_scores(generated: torch.Tensor, real: dict[str, torch.Tensor], video_net: VideoClassifier,
                 frame_net: FrameClassifier) -> dict[str, float]:  # fmt: skip
    """Scores of generated uint8 clips (N, C, T, H, W) against `reference_features`."""
    features, logits = extract_features(video_net, generated, 100)
    scores = feature_scores(features, logits, real["video"], splits=min(10, len(features)))
    frame_features, _ = extract_features(frame_net, all_frames(generated), 500)
    frame_fd = FeatureStats().update(frame_features).frechet_distance(FeatureStats().update(real["frame"]))
    return {"fvd": scores["frechet"], "frame_fd": frame_fd, "is_mean": scores["is_mean"],
            "is_std": scores["is_std"], "precision": scores["precision"], "recall": scores["recall"]}  # fmt: skip


def evaluate_video(generated: torch.Tensor, reference: Any, video_net: VideoClassifier, frame_net: FrameClassifier,
                   max_reference: int = 2000) -> dict[str, float]:  # fmt: skip
    """See the module docstring; generated: uint8 clips (N, C, T, H, W)."""
    return video_scores(generated, reference_features(reference, video_net, frame_net, max_reference), video_net,
                        frame_net)  # fmt: skip


def frames_per_second(fn: Callable[[], Any], frames_per_call: int, repeats: int = 3) -> float:
    """Frames generated per second of wall clock: frames_per_call over the median time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return frames_per_call / sorted(times)[len(times) // 2]
