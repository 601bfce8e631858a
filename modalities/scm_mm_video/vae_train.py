"""Training the video autoencoder on raw clips, and its reconstruction score.

Objective per clip: L1 on pixels, plus L1 on frame differences (x_t - x_(t-1): the motion, which a
pixel loss alone under-weights on mostly-black Moving-MNIST frames), plus a KL term summed over the
latent elements with weight kl_weight (1e-6 for the digits clips), which keeps the posterior near N(0, I)
without blurring; no adversarial or perceptual loss (a CPU recipe). Against pixel losses averaged over
the clip's pixels, that weight is the number of pixels times stronger than the same number in SD's VAE
loss (which sums its pixel losses): 1e-6 here is 9.2e-3 in SD's terms at 9 x 32 x 32, where SD uses 1e-6.

`train_video_vae` reads top to bottom: resume, then per iteration draw a batch, reconstruct from a
posterior sample, step AdamW, log, checkpoint. Batch `it` and its posterior noise come from a
generator seeded by (seed, it), so a run killed and resumed from its last checkpoint repeats the
uninterrupted run's losses exactly on the CPU.

Run folder:
    log.jsonl                  one JSON line of scalars per log interval
    tensorboard/               the same scalars
    checkpoints/iter-<N>/      vae/ (save_video_vae format) + state.pt (optimizer, iteration)
    vae/                       the final autoencoder: the `modality.codec.vae` of the video models
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from scm_mm.train.checkpoint import checkpoint_name, load_into, prune_checkpoints, resume_source, writing_directory
from scm_mm.train.step import apply_gradients

from .autoencoder import VideoVAE, load_video_vae, save_video_vae
from .codec import to_unit


@dataclass
class VAEOptions:
    """How to train a video autoencoder; the autoencoder and the data come separately."""

    iters: int = 20_000
    batch_size: int = 16                # clips per step
    lr: float = 1e-3                    # AdamW peak learning rate
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_iters: int = 100             # linear warmup, then cosine decay to lr_min_ratio * lr
    lr_min_ratio: float = 0.05
    motion_weight: float = 1.0          # L1 on frame differences
    kl_weight: float = 1e-6             # on the KL summed over a clip's latents; x pixels per clip = SD's weight
    max_grad_norm: float | None = 1.0
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last: int = 2
    resume: str = "auto"                # "auto": latest checkpoint of run_dir if any; "never"; or a path
    progress: bool = True


@dataclass
class VAEResult:
    losses: list[float] = field(default_factory=list)  # total loss per iteration of this call
    start_iteration: int = 0
    iteration: int = 0
    seconds: float = 0.0
    checkpoint: Path | None = None
    vae_dir: Path | None = None         # run_dir/vae once the run is complete


def vae_lr(options: VAEOptions, it: int) -> float:
    if it < options.warmup_iters:
        return options.lr * (it + 1) / options.warmup_iters
    progress = min((it - options.warmup_iters) / max(options.iters - options.warmup_iters, 1), 1.0)
    low = options.lr * options.lr_min_ratio
    return low + (options.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def random_batch(dataset: Any, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` clips drawn with replacement, as float in [-1, 1] (count, C, T, H, W)."""
    indices = torch.randint(len(dataset), (count,), generator=generator).tolist()
    return to_unit(torch.stack([torch.as_tensor(dataset[i][0]) for i in indices]))


def vae_losses(vae: VideoVAE, video: torch.Tensor, options: VAEOptions, generator: torch.Generator
               ) -> dict[str, torch.Tensor]:  # fmt: skip
    recon, posterior = vae(video, generator)
    l1 = (recon - video).abs().mean()
    motion = (recon.diff(dim=2) - video.diff(dim=2)).abs().mean() if video.shape[2] > 1 else l1 * 0
    kl = posterior.kl().mean() / video[0].numel()  # per pixel, like the reconstruction terms
    loss = l1 + options.motion_weight * motion + options.kl_weight * posterior.kl().mean()
    return {"loss": loss, "l1": l1, "motion_l1": motion, "kl_per_pixel": kl}


def _save_checkpoint(run_dir: Path, it: int, vae: VideoVAE, optimizer: torch.optim.Optimizer,
                     state: dict[str, Any], keep_last: int) -> Path:  # fmt: skip
    final = run_dir / "checkpoints" / checkpoint_name(it)
    with writing_directory(final) as tmp:
        save_video_vae(vae, tmp / "vae")
        torch.save({**state, "optimizer": optimizer.state_dict()}, tmp / "state.pt")
    prune_checkpoints(run_dir, keep_last, newest=it)
    return final


def train_video_vae(
    vae: VideoVAE,                      # initialised; trained in place
    options: VAEOptions,
    dataset: Any,                       # raw items (clip uint8 (C, T, H, W), label)
    run_dir: str | Path,
    *,
    device: torch.device | str | None = None,  # where to train; None: where `vae` is
    stop_at: int | None = None,         # end after that iteration, as a kill would: no extra checkpoint
) -> VAEResult:
    """Train `vae` on random clips of `dataset`; see the module docstring for the run folder."""
    run_dir = Path(run_dir)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    channels = torch.as_tensor(dataset[0][0]).shape[0]
    if channels != vae.in_channels:
        raise ValueError(f"the clips have {channels} channel(s), the autoencoder takes {vae.in_channels}")
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=options.lr, betas=options.betas,
                                  weight_decay=options.weight_decay)  # fmt: skip
    it = 0
    source = resume_source(options.resume, run_dir, marker="state.pt",
                           required=("vae/config.json", "vae/model.safetensors"))  # fmt: skip
    if source is not None:
        saved = load_video_vae(source / "vae")
        if saved.config != vae.config:
            raise ValueError(f"{source}: the checkpoint's autoencoder {saved.config} is not this one {vae.config}")
        load_into(vae, saved.state_dict(), str(source / "vae"))
        state = torch.load(source / "state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        it = state["iteration"]
        tqdm.write(f"resumed from {source} at iteration {it}")
    run_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (TensorBoard loads slowly)

    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=it if it > 0 else None)
    bar = tqdm(total=options.iters, initial=it, disable=not options.progress, desc="video VAE")
    result = VAEResult(start_iteration=it, iteration=it)
    sums: dict[str, float] = {}
    start = last_log = time.perf_counter()
    last_log_it = it

    while it < options.iters and (stop_at is None or it < stop_at):
        lr = vae_lr(options, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(options.seed * 1_000_003 + it)
        video = random_batch(dataset, options.batch_size, generator).to(device)
        losses = vae_losses(vae, video, options, generator)
        losses["loss"].backward()
        _, grad_norm = apply_gradients(optimizer, vae.parameters(), options.max_grad_norm)
        it += 1

        values = {k: v.item() for k, v in losses.items()} | {"grad_norm": grad_norm.item()}
        result.losses.append(values["loss"])
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
        if it % options.log_every == 0 or it == options.iters or it == stop_at:
            now, n = time.perf_counter(), it - last_log_it
            scalars = {f"train/{k}": v / n for k, v in sums.items()}
            scalars.update({"train/lr": lr, "train/iters_per_s": n / max(now - last_log, 1e-9)})
            for key, scalar in scalars.items():
                writer.add_scalar(key, scalar, it)
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps({"iteration": it, **scalars}) + "\n")
            bar.set_postfix(l1=f"{scalars['train/l1']:.4f}", refresh=False)
            bar.update(n)
            sums, last_log, last_log_it = {}, now, it
        if it % options.ckpt_every == 0 or it == options.iters:
            state = {"iteration": it, "options": json.dumps(asdict(options))}
            result.checkpoint = _save_checkpoint(run_dir, it, vae, optimizer, state, options.keep_last)

    result.seconds = time.perf_counter() - start
    bar.close()
    writer.close()
    if it == options.iters:
        result.vae_dir = save_video_vae(vae, run_dir / "vae")  # also when a finished run was extended
    vae.eval()
    result.iteration = it
    return result


@torch.no_grad()
def reconstruction_psnr(vae: Any, dataset: Any, n: int = 64, batch_size: int = 16) -> dict[str, Any]:
    """PSNR (dB, peak 255) of decode_raw(encode_raw(x)) over the first n clips: overall and per frame position."""
    errors = []
    n = min(n, len(dataset))
    for start in range(0, n, batch_size):
        media = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(start, min(start + batch_size, n))])
        recon = ((vae.decode_raw(vae.encode_raw(to_unit(media))).clamp(-1, 1) + 1) * 127.5).round()
        errors.append((recon - media.float()).square().transpose(1, 2).flatten(2).mean(2))  # (B, T) per frame
    mse = torch.cat(errors)  # (n, T)
    psnr = lambda m: float(10 * torch.log10(255.0**2 / m.clamp_min(1e-10)))  # noqa: E731
    return {"psnr": psnr(mse.mean()), "psnr_per_frame": [psnr(m) for m in mse.mean(0)]}
