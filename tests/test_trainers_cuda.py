"""The video autoencoder and vocoder trainers on CUDA repeat their CPU losses (`device=` reaches them).

Imports only what the GPU image of bench/gpu_checks.sh has (no Hydra, PyAV, soundfile or librosa).
"""

import math

import pytest
import torch

from scm_mm_audio.vocoder_train import VocoderOptions, train_vocoder
from scm_mm_audio.vocos import Vocos
from scm_mm_video.autoencoder import VideoVAE, VideoVAEConfig, load_video_vae
from scm_mm_video.vae_train import VAEOptions, train_video_vae

pytestmark = pytest.mark.gpu


def tiny_vae() -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(VideoVAEConfig(in_channels=1, latent_channels=2, base_channels=8, channel_mult=(1, 2),
                                   temporal_factor=2, patch_size=2, groups=4))  # fmt: skip


def tiny_vocoder() -> Vocos:
    torch.manual_seed(0)
    return Vocos("small_16k", dim=16, intermediate_dim=32, num_layers=1)


class Clips:
    """Eight random grey clips, uint8 (1, 5, 16, 16)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.randint(256, (1, 5, 16, 16), generator=torch.Generator().manual_seed(i), dtype=torch.uint8), 0


class Tones:
    """Two harmonic tones, one second each at 16 kHz."""

    sample_rate, num_classes, fingerprint = 16000, 0, "cuda-tones"

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        t = torch.arange(16000) / 16000
        return 0.5 * torch.sin(2 * math.pi * (220 + 110 * i) * t)[None], 0


def test_the_video_autoencoder_trains_on_cuda(tmp_path):
    options = VAEOptions(iters=3, batch_size=2, warmup_iters=0, progress=False)
    cpu = train_video_vae(tiny_vae(), options, Clips(), tmp_path / "cpu")
    vae = tiny_vae()
    cuda = train_video_vae(vae, options, Clips(), tmp_path / "cuda", device="cuda")
    assert next(vae.parameters()).device.type == "cuda"
    assert next(iter(load_video_vae(cuda.vae_dir).state_dict().values())).device.type == "cpu"
    assert cuda.losses == pytest.approx(cpu.losses, rel=1e-3)


def test_the_vocoder_trains_on_cuda(tmp_path):
    options = VocoderOptions(iters=3, batch_size=2, segment_frames=6, progress=False)
    cpu = train_vocoder(tiny_vocoder(), Tones(), options, tmp_path / "cpu")
    vocoder = tiny_vocoder()
    cuda = train_vocoder(vocoder, Tones(), options, tmp_path / "cuda", device="cuda")
    assert next(vocoder.parameters()).device.type == "cuda"
    assert cuda.losses == pytest.approx(cpu.losses, rel=1e-3)
