"""Training a vocoder on raw waveforms, and copy-synthesis evaluation.

Objective: Vocos's mel-spectrogram L1 (weight 45, its `mel_loss_coeff`) plus a multi-resolution STFT
loss (Parallel WaveGAN, Yamamoto et al. 2020, eq. 4-6), without Vocos's adversarial losses. The
MR-STFT term compares linear magnitudes at three resolutions finer and coarser than the mel's, which
constrains the phase coherence between frames that the mel loss alone leaves free.

`train_vocoder` is one function, read top to bottom: resume, then per iteration draw random crops,
take their mels, vocode, compute the losses, step AdamW, log, checkpoint. The crops of iteration `it`
come from a generator seeded by (seed, it), so a run killed and resumed from its last checkpoint
draws the same crops and, on the CPU, repeats the uninterrupted run's losses exactly.

Run folder:
    log.jsonl                  one JSON line of scalars per log interval
    tensorboard/               the same scalars
    checkpoints/iter-<N>/      vocoder/ (save_vocoder format) + state.pt (optimizer, iteration, RNG)
    vocoder/                   the final vocoder (save_vocoder format; load_vocoder_dir loads it)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from scm_mm.train.checkpoint import checkpoint_name, load_into, prune_checkpoints, resume_source, writing_directory
from scm_mm.train.step import apply_gradients

from .mel import MelSpec, check_specs, log_mel
from .vocos import Vocos, read_vocoder_config, save_vocoder

STFT_RESOLUTIONS = ((512, 128, 512), (1024, 256, 1024), (2048, 512, 2048))  # (n_fft, hop, win)


# ---- losses ---------------------------------------------------------------------------------------


def mel_l1(wave_hat: torch.Tensor, wave: torch.Tensor, spec: MelSpec) -> torch.Tensor:
    """Mean absolute difference of the log-mels (spec's log domain) of (..., samples) waveforms."""
    return (log_mel(wave_hat, spec) - log_mel(wave, spec)).abs().mean()


def _stft_magnitude(wave: torch.Tensor, n_fft: int, hop: int, win: int, eps: float) -> torch.Tensor:
    window = torch.hann_window(win, device=wave.device, dtype=wave.dtype)
    z = torch.stft(wave.reshape(-1, wave.shape[-1]), n_fft, hop, win, window=window, return_complex=True)
    return torch.sqrt((z.real**2 + z.imag**2).clamp_min(eps))  # (N, n_fft // 2 + 1, frames)


def multi_resolution_stft_loss(
    wave_hat: torch.Tensor,    # (..., samples) generated
    wave: torch.Tensor,        # (..., samples) reference
    resolutions: Sequence[tuple[int, int, int]] = STFT_RESOLUTIONS,  # (n_fft, hop, win_length) each
    eps: float = 1e-7,         # |X| = sqrt(max(re^2 + im^2, eps)) (Parallel WaveGAN)
) -> torch.Tensor:
    """Mean over resolutions of spectral convergence + log-magnitude L1 (Parallel WaveGAN eq. 4-6;
    auraloss STFTLoss with its default weights):

        SC = ||  |S| - |S_hat|  ||_F / || |S| ||_F          (Frobenius norms over the whole batch)
        LM = mean | log|S| - log|S_hat| |

    STFTs are centred with reflect padding and a periodic Hann window (torch.stft defaults).
    """
    total = wave.new_zeros(())
    for n_fft, hop, win in resolutions:
        mag_hat = _stft_magnitude(wave_hat, n_fft, hop, win, eps)
        mag = _stft_magnitude(wave, n_fft, hop, win, eps)
        sc = torch.linalg.vector_norm(mag - mag_hat) / torch.linalg.vector_norm(mag)
        lm = (mag.log() - mag_hat.log()).abs().mean()
        total = total + sc + lm
    return total / len(resolutions)


# ---- training -------------------------------------------------------------------------------------


@dataclass
class VocoderOptions:
    """How to train a vocoder; the vocoder and the data come separately."""

    iters: int = 20_000                 # optimiser steps
    batch_size: int = 16                # crops per step
    segment_frames: int = 32            # crop length in mel frames (x hop samples; Vocos: 64 at 24 kHz)
    lr: float = 5e-4                    # AdamW learning rate (Vocos: 5e-4; the small preset on CPU: 4e-3)
    betas: tuple[float, float] = (0.8, 0.9)  # Vocos's AdamW betas
    weight_decay: float = 0.01          # AdamW's default (Vocos keeps it)
    lr_decay: Literal["cosine", "none"] = "cosine"  # Vocos: cosine decay to 0 over the run
    warmup_iters: int = 0               # linear warmup before the decay (Vocos: 0)
    mel_weight: float = 45.0            # Vocos's mel_loss_coeff
    stft_weight: float = 15.0           # MR-STFT loss; on the bench's notes x15 beat x1 and x45
    max_grad_norm: float | None = None  # clip the gradient norm; None: no clipping
    seed: int = 0
    log_every: int = 50                 # iterations between log.jsonl/TensorBoard lines
    ckpt_every: int = 1000              # iterations between checkpoints (and one at the end)
    keep_last: int = 2                  # checkpoints kept
    resume: str = "auto"                # "auto": latest checkpoint of run_dir if any; "never"; or a path
    progress: bool = True               # the tqdm bar


@dataclass
class VocoderResult:
    losses: list[float] = field(default_factory=list)  # total loss per iteration of this call
    start_iteration: int = 0            # the iteration this call resumed from
    iteration: int = 0                  # the iteration it stopped at
    skipped_steps: int = 0              # steps with a non-finite gradient, left out
    seconds: float = 0.0                # wall time of this call's iterations
    checkpoint: Path | None = None      # the last checkpoint written
    vocoder_dir: Path | None = None     # run_dir/vocoder once the run is complete


def vocoder_lr(options: VocoderOptions, it: int) -> float:
    """Linear warmup, then cosine decay to 0 at options.iters (or constant)."""
    if options.warmup_iters > 0 and it < options.warmup_iters:
        return options.lr * (it + 1) / options.warmup_iters
    if options.lr_decay == "none":
        return options.lr
    progress = (it - options.warmup_iters) / max(options.iters - options.warmup_iters, 1)
    return options.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def random_crops(dataset: Any, count: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random mono crops (count, samples) from items (wave (channels, samples), label); items
    shorter than a crop are zero-padded at the end. Indices and offsets come from `generator`."""
    crops = torch.zeros(count, samples)
    for row, index in enumerate(torch.randint(len(dataset), (count,), generator=generator).tolist()):
        wave = torch.as_tensor(dataset[index][0], dtype=torch.float32)
        mono = wave.mean(0) if wave.ndim == 2 else wave  # average the channels
        start = int(torch.randint(max(mono.shape[-1] - samples, 0) + 1, (), generator=generator))
        piece = mono[start : start + samples]
        crops[row, : piece.shape[-1]] = piece
    return crops


def _load_checkpoint(ckpt: Path, vocoder: Vocos, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    config = read_vocoder_config(ckpt / "vocoder")
    check_specs(MelSpec.from_dict(config["spec"]), vocoder.spec, "mel settings of the checkpoint and the vocoder")
    if config["kwargs"] != vocoder.kwargs:
        raise ValueError(f"{ckpt}: the checkpoint's vocoder {config['kwargs']} is not this one {vocoder.kwargs}")
    weights = load_file(str(ckpt / "vocoder" / "model.safetensors"), device=str(next(vocoder.parameters()).device))
    load_into(vocoder, weights, str(ckpt / "vocoder" / "model.safetensors"))
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state


def _save_checkpoint(
    run_dir: Path, it: int, vocoder: Vocos, optimizer: torch.optim.Optimizer, state: dict[str, Any], keep_last: int
) -> Path:
    final = run_dir / "checkpoints" / checkpoint_name(it)
    with writing_directory(final) as tmp:
        save_vocoder(vocoder, tmp / "vocoder")
        torch.save({**state, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "state.pt")
    prune_checkpoints(run_dir, keep_last, newest=it)
    return final


def train_vocoder(
    vocoder: Vocos,                     # initialised; trained in place
    dataset: Any,                       # raw items (wave (channels, samples) float, label), .sample_rate
    options: VocoderOptions,
    run_dir: str | Path,
    *,
    device: torch.device | str | None = None,  # where to train; None: where `vocoder` is
    stop_at: int | None = None,         # end after that iteration, as a kill would: no extra checkpoint
) -> VocoderResult:
    """Train `vocoder` on random crops of `dataset`; see the module docstring for the run folder."""
    run_dir = Path(run_dir)
    spec = vocoder.spec
    rate = getattr(dataset, "sample_rate", spec.sample_rate)
    if rate != spec.sample_rate:
        raise ValueError(f"the dataset is at {rate} Hz, the vocoder's mel spec at {spec.sample_rate} Hz")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    samples = options.segment_frames * spec.hop_length  # its mel has spec.frames(samples) frames, and
    assert spec.samples(spec.frames(samples)) == samples  # the vocoder gives back exactly `samples`
    longest = max(n_fft for n_fft, _, _ in STFT_RESOLUTIONS)
    if samples <= longest // 2:  # the STFT's reflect padding needs more samples than n_fft / 2
        raise ValueError(f"segment_frames={options.segment_frames} gives {samples}-sample crops; the MR-STFT loss "
                         f"needs more than {longest // 2}")  # fmt: skip
    device = torch.device(device) if device is not None else next(vocoder.parameters()).device
    torch.manual_seed(options.seed)
    vocoder.to(device).train()
    optimizer = torch.optim.AdamW(
        vocoder.parameters(), lr=options.lr, betas=options.betas, weight_decay=options.weight_decay
    )

    it, skipped = 0, 0
    source = resume_source(options.resume, run_dir, marker="state.pt",
                           required=("vocoder/config.json", "vocoder/model.safetensors"))  # fmt: skip
    if source is not None:
        state = _load_checkpoint(source, vocoder, optimizer)
        it, skipped = state["iteration"], state["skipped"]
        tqdm.write(f"resumed from {source} at iteration {it}")
    run_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (TensorBoard loads slowly)

    writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=it if it > 0 else None)
    bar = tqdm(total=options.iters, initial=it, disable=not options.progress, desc="vocoder")
    result = VocoderResult(start_iteration=it, iteration=it, skipped_steps=skipped)
    sums: dict[str, float] = {}
    start = last_log = time.perf_counter()
    last_log_it = it

    while it < options.iters and (stop_at is None or it < stop_at):
        lr = vocoder_lr(options, it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = torch.Generator().manual_seed(options.seed * 1_000_003 + it)
        wave = random_crops(dataset, options.batch_size, samples, generator).to(device)  # (B, samples)
        wave_hat = vocoder(log_mel(wave, spec))  # (B, samples)
        mel = mel_l1(wave_hat, wave, spec)
        stft = multi_resolution_stft_loss(wave_hat, wave)
        loss = options.mel_weight * mel + options.stft_weight * stft
        loss.backward()
        applied, grad_norm = apply_gradients(optimizer, vocoder.parameters(), options.max_grad_norm)
        skipped += int(not applied)
        it += 1

        values = {"loss": loss.item(), "mel_l1": mel.item(), "mr_stft": stft.item(), "grad_norm": grad_norm.item()}
        result.losses.append(values["loss"])
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value
        if it % options.log_every == 0 or it == options.iters or it == stop_at:
            now = time.perf_counter()
            n = it - last_log_it
            scalars = {f"train/{k}": v / n for k, v in sums.items()}
            scalars.update({"train/lr": lr, "train/iters_per_s": n / max(now - last_log, 1e-9),
                            "train/skipped_steps": skipped})  # fmt: skip
            for key, scalar in scalars.items():
                writer.add_scalar(key, scalar, it)
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps({"iteration": it, **scalars}) + "\n")
            bar.set_postfix(loss=f"{scalars['train/loss']:.3f}", mel_l1=f"{scalars['train/mel_l1']:.3f}", refresh=False)
            bar.update(n)
            sums, last_log, last_log_it = {}, now, it
        if it % options.ckpt_every == 0 or it == options.iters:
            state = {"iteration": it, "skipped": skipped, "options": json.dumps(asdict(options))}
            result.checkpoint = _save_checkpoint(run_dir, it, vocoder, optimizer, state, options.keep_last)

    result.seconds = time.perf_counter() - start
    bar.close()
    writer.close()
    if it == options.iters:
        result.vocoder_dir = save_vocoder(vocoder, run_dir / "vocoder")
    vocoder.eval()
    result.iteration, result.skipped_steps = it, skipped
    return result


# ---- copy synthesis -------------------------------------------------------------------------------


def _perceptual(ref: torch.Tensor, deg: torch.Tensor, sample_rate: int) -> dict[str, float]:
    """PESQ (wide band, at 16 kHz) and STOI, each only if its package (`pesq`, `pystoi`) imports."""
    import torchaudio.functional as AF  # noqa: PLC0415

    scores: dict[str, float] = {}
    try:
        from pesq import pesq  # noqa: PLC0415
    except ImportError:
        pass
    else:
        r16, d16 = (AF.resample(x, sample_rate, 16000) for x in (ref, deg))
        scores["pesq"] = float(pesq(16000, r16.numpy(), d16.numpy(), "wb"))
    try:
        from pystoi import stoi  # noqa: PLC0415
    except ImportError:
        pass
    else:
        scores["stoi"] = float(stoi(ref.numpy(), deg.numpy(), sample_rate, extended=False))
    return scores


@torch.no_grad()
def copy_synthesis(
    vocoder: nn.Module,                 # any vocoder: .spec and forward(logmel (B, n_mels, T)) -> (B, samples)
    waves: torch.Tensor | Sequence[torch.Tensor],  # (B, samples), (B, channels, samples) or a list of clips
    spec: MelSpec | None = None,        # the mels to take; must equal vocoder.spec (default: vocoder.spec)
) -> dict[str, float]:
    """Real waveform -> log_mel -> vocoder -> waveform, scored against the original; means over clips.

    mel_l1    mean |log-mel(vocoded) - log-mel(original)| in the spec's log domain
    mr_stft   `multi_resolution_stft_loss`(vocoded, original)
    pesq      wide-band PESQ at 16 kHz, only when the `pesq` package imports
    stoi      STOI, only when the `pystoi` package imports

    Neither `pesq` nor `pystoi` is a dependency of scm-mm (both are on PyPI): without them the two keys
    are absent. Clips are mono (channels averaged) and cut to the vocoder's output length,
    spec.samples(spec.frames(samples)) (a whole number of hops).
    """
    vocoder_spec = cast(MelSpec, vocoder.spec)
    spec = vocoder_spec if spec is None else spec
    check_specs(spec, vocoder_spec, "mel settings asked for and the vocoder's")
    clips = list(waves) if not isinstance(waves, torch.Tensor) or waves.ndim > 1 else [waves]
    device = next((p.device for p in vocoder.parameters()), torch.device("cpu"))
    totals: dict[str, float] = {}
    for clip in clips:
        clip = clip.float()
        mono = clip.mean(0) if clip.ndim == 2 else clip
        vocoded = vocoder(log_mel(mono[None].to(device), spec))[0].float().cpu()
        original = mono[: vocoded.shape[-1]]
        scores = {"mel_l1": float(mel_l1(vocoded, original, spec)),
                  "mr_stft": float(multi_resolution_stft_loss(vocoded, original)),
                  **_perceptual(original, vocoded, spec.sample_rate)}  # fmt: skip
        for key, value in scores.items():
            totals[key] = totals.get(key, 0.0) + value
    return {key: value / len(clips) for key, value in totals.items()}
