"""HiFi-GAN / BigVGAN generators and loaders (scm_mm_audio.gan_vocoders).

Sources of truth: the published configs (jik876/hifi-gan config_v1/v2/v3.json, NVIDIA/BigVGAN configs/),
parameter counts and key names measured by running the official models.py / bigvgan.py (numbers below),
torch's own weight_norm implementations for the checkpoint layout, scipy's FIR design for the
anti-aliasing filter and analytic sinusoids for the resamplers.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import librosa
import numpy as np
import pytest
import torch
from scipy import signal
from torch import nn
from torch.nn.utils import parametrizations

from scm_mm_audio.gan_vocoders import (
    Activation1d,
    BigVGANGenerator,
    HiFiGANGenerator,
    Snake,
    SnakeBeta,
    UpSample1d,
    fuse_weight_norm,
    kaiser_sinc_filter,
    load_bigvgan,
    load_hifigan,
    save_official,
    spec_from_hparams,
    weight_norm_state,
)
from scm_mm_audio.mel import PRESETS, mel_filters
from scm_mm_audio.vocoders import load_vocoder

MEL_22K = {"sampling_rate": 22050, "n_fft": 1024, "hop_size": 256, "win_size": 1024, "num_mels": 80,
           "fmin": 0, "fmax": 8000}  # fmt: skip
# The generator fields of jik876/hifi-gan config_v1/v2/v3.json.
HIFIGAN_V1 = {"resblock": "1", "upsample_rates": [8, 8, 2, 2], "upsample_kernel_sizes": [16, 16, 4, 4],
              "upsample_initial_channel": 512, "resblock_kernel_sizes": [3, 7, 11],
              "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], **MEL_22K}  # fmt: skip
HIFIGAN_V2 = {**HIFIGAN_V1, "upsample_initial_channel": 128}
HIFIGAN_V3 = {"resblock": "2", "upsample_rates": [8, 8, 4], "upsample_kernel_sizes": [16, 16, 8],
              "upsample_initial_channel": 256, "resblock_kernel_sizes": [3, 5, 7],
              "resblock_dilation_sizes": [[1, 2], [2, 6], [3, 12]], **MEL_22K}  # fmt: skip
# BigVGAN configs/bigvgan_v2_22khz_80band_fmax8k_256x.json (generator fields), and _44khz_128band_512x.
BIGVGAN_V2_22K = {"resblock": "1", "upsample_rates": [4, 4, 2, 2, 2, 2], "upsample_kernel_sizes": [8, 8, 4, 4, 4, 4],
                  "upsample_initial_channel": 1536, "resblock_kernel_sizes": [3, 7, 11],
                  "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "use_tanh_at_final": False,
                  "use_bias_at_final": False, "activation": "snakebeta", "snake_logscale": True,
                  **MEL_22K}  # fmt: skip
BIGVGAN_V2_44K_512X = {**BIGVGAN_V2_22K, "upsample_rates": [8, 4, 2, 2, 2, 2],
                       "upsample_kernel_sizes": [16, 8, 4, 4, 4, 4], "num_mels": 128, "n_fft": 2048,
                       "hop_size": 512, "win_size": 2048, "sampling_rate": 44100, "fmax": None}  # fmt: skip

# Tiny configs for round trips: hop 16 = 4 * 4.
MEL_TINY = {"sampling_rate": 22050, "n_fft": 64, "hop_size": 16, "win_size": 64, "num_mels": 8,
            "fmin": 0, "fmax": 8000}  # fmt: skip
TINY_HIFIGAN = {"1": {"resblock": "1", "upsample_rates": [4, 4], "upsample_kernel_sizes": [8, 8],
                      "upsample_initial_channel": 16, "resblock_kernel_sizes": [3, 5],
                      "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5]], **MEL_TINY},
                "2": {"resblock": "2", "upsample_rates": [4, 4], "upsample_kernel_sizes": [8, 8],
                      "upsample_initial_channel": 16, "resblock_kernel_sizes": [3, 5],
                      "resblock_dilation_sizes": [[1, 2], [2, 6]], **MEL_TINY}}  # fmt: skip
TINY_BIGVGAN = {"v2": {**BIGVGAN_V2_22K, "upsample_rates": [4, 4], "upsample_kernel_sizes": [8, 8],
                       "upsample_initial_channel": 16, "resblock_kernel_sizes": [3, 5],
                       "resblock_dilation_sizes": [[1, 3, 5], [1, 3]], **MEL_TINY},
                "v1-snake-amp2": {"resblock": "2", "upsample_rates": [4, 4], "upsample_kernel_sizes": [8, 8],
                                  "upsample_initial_channel": 16, "resblock_kernel_sizes": [3, 5],
                                  "resblock_dilation_sizes": [[1, 3], [1, 3]], "activation": "snake",
                                  "snake_logscale": False, **MEL_TINY}}  # fmt: skip


def _convs(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]


def _official_layout(generator: nn.Module, new_api: bool = False) -> nn.Module:
    """A copy with every conv wrapped in torch's weight norm, as the official training code does, and the
    norms g moved off ||v|| (as after training) and the snake parameters off their init."""
    wrapped = copy.deepcopy(generator)
    for conv in _convs(wrapped):
        if new_api:
            parametrizations.weight_norm(conv)
        else:
            with warnings.catch_warnings():  # deprecated in favour of parametrizations, but what they used
                warnings.simplefilter("ignore", FutureWarning)
                nn.utils.weight_norm(conv)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if name.endswith(("weight_g", "original0")):
                p.mul_(torch.rand_like(p) + 0.5)
            elif name.endswith(("alpha", "beta")):
                p.add_(0.3 * torch.randn_like(p))
    return wrapped.eval()


def _write(folder, name: str, state: dict, h: dict, legacy: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(h))
    torch.save({"generator": state}, folder / name, _use_new_zipfile_serialization=not legacy)
    return folder / name


# ---- mel settings ---------------------------------------------------------------------------------


def test_spec_from_hparams_v1_is_the_hifigan_preset():
    assert spec_from_hparams(HIFIGAN_V1) == PRESETS["hifigan_22k"]
    assert spec_from_hparams(HIFIGAN_V1).samples(7) == 7 * 256  # uncentred: T frames <-> T * hop samples


def test_spec_from_hparams_null_fmax_is_librosa_full_band():
    spec = spec_from_hparams(BIGVGAN_V2_44K_512X)
    assert spec.fmax == 22050.0
    want = librosa.filters.mel(sr=44100, n_fft=2048, n_mels=128, fmin=0, fmax=None)  # BigVGAN meldataset.py
    np.testing.assert_allclose(mel_filters(spec).T.numpy(), want, atol=1e-7, rtol=1e-5)  # float32 against float64


def test_spec_from_hparams_names_missing_fields():
    with pytest.raises(ValueError, match=r"my.json lacks the field\(s\) \['hop_size'\]"):
        spec_from_hparams({k: v for k, v in HIFIGAN_V1.items() if k != "hop_size"}, "my.json")


# ---- published sizes and names ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("h", "plain", "weight_norm", "paper"),
    [  # parameters of the official models.py Generator, measured after / before remove_weight_norm
        (HIFIGAN_V1, 13_926_017, 13_936_130, 13.92),
        (HIFIGAN_V2, 925_985, 928_514, 0.92),
        (HIFIGAN_V3, 1_462_273, 1_464_322, 1.46),
    ],
)
def test_hifigan_published_configs_have_the_official_parameter_counts(h, plain, weight_norm, paper):
    generator = HiFiGANGenerator.from_hparams(h)
    assert sum(p.numel() for p in generator.parameters()) == plain
    norms = sum(conv.weight.shape[0] for conv in _convs(generator))  # weight_g: one norm per row of dim 0
    assert sum(p.numel() for p in generator.parameters()) + norms == weight_norm
    assert math.floor(plain / 1e4) / 100 == paper  # the paper's 13.92M / 0.92M / 1.46M: truncated plain counts


@pytest.mark.parametrize(
    ("h", "plain", "published"),
    [(BIGVGAN_V2_22K, 112_199_472, 112e6), (BIGVGAN_V2_44K_512X, 122_152_752, 122e6)],  # README: 112M, 122M
)
def test_bigvgan_v2_configs_have_the_official_parameter_counts(h, plain, published):
    with torch.device("meta"):  # 112M parameters: count them without allocating
        generator = BigVGANGenerator.from_hparams(h)
    n = sum(p.numel() for p in generator.parameters())
    assert n == plain and round(n, -6) == published


def test_checkpoint_keys_are_the_official_ones():
    """Keys of the official Generator / BigVGAN state dicts for tiny configs (printed by the official code)."""
    h = {**TINY_HIFIGAN["1"], "upsample_rates": [16], "upsample_kernel_sizes": [32], "resblock_kernel_sizes": [3],
         "resblock_dilation_sizes": [[1, 3, 5]], "upsample_initial_channel": 8}  # fmt: skip
    wn = ("bias", "weight_g", "weight_v")
    want = {f"{layer}.{p}" for p in wn for layer in ("conv_pre", "conv_post", "ups.0")}
    want |= {f"resblocks.0.convs{i}.{j}.{p}" for i in (1, 2) for j in range(3) for p in wn}
    assert set(weight_norm_state(HiFiGANGenerator.from_hparams(h))) == want

    hb = {**TINY_BIGVGAN["v2"], "upsample_rates": [16], "upsample_kernel_sizes": [32], "resblock_kernel_sizes": [3],
          "resblock_dilation_sizes": [[1]], "upsample_initial_channel": 8}  # fmt: skip
    act = ("act.alpha", "act.beta", "downsample.lowpass.filter", "upsample.filter")
    want = {"conv_pre.bias", "conv_pre.weight_g", "conv_pre.weight_v", "conv_post.weight_g", "conv_post.weight_v"}
    want |= {f"ups.0.0.{p}" for p in wn} | {f"activation_post.{a}" for a in act}
    want |= {f"resblocks.0.activations.{j}.{a}" for j in (0, 1) for a in act}
    want |= {f"resblocks.0.convs{i}.0.{p}" for i in (1, 2) for p in wn}
    assert set(weight_norm_state(BigVGANGenerator.from_hparams(hb))) == want  # v2: conv_post has no bias


# ---- round trips through the official checkpoint layout ---------------------------------------------


@pytest.mark.parametrize("resblock", ["1", "2"])
def test_hifigan_official_checkpoint_round_trip(tmp_path, resblock):
    h = TINY_HIFIGAN[resblock]
    official = _official_layout(HiFiGANGenerator.from_hparams(h))
    state = official.state_dict()
    assert any(k.endswith("weight_g") for k in state)
    # hifi-gan's 2020 checkpoints predate torch's zip format: read the legacy one with weights_only
    path = _write(tmp_path / "run", "g_02500000", state, {**h, "batch_size": 16, "fmax_for_loss": None}, legacy=True)

    # path A: apply weight norm, load strictly, remove it (inference_e2e.py); path B: the loader's fusion
    reference = _official_layout(HiFiGANGenerator.from_hparams(h))
    reference.load_state_dict(state, strict=True)
    for conv in _convs(reference):
        nn.utils.remove_weight_norm(conv)
    by_file, by_folder = load_hifigan(path), load_hifigan(tmp_path / "run")

    logmel = torch.randn(2, 8, 5) - 4.0
    with torch.no_grad():
        want, direct = official(logmel), reference(logmel)
        got = by_file(logmel)
    assert got.shape == (2, by_file.spec.samples(5)) == (2, 5 * 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, direct, rtol=0, atol=1e-6)
    assert torch.equal(by_folder(logmel), got)
    assert not by_file.training and not any(p.requires_grad for p in by_file.parameters())


def test_parametrization_checkpoints_and_save_official_load_the_same(tmp_path):
    h = TINY_HIFIGAN["1"]
    official = _official_layout(HiFiGANGenerator.from_hparams(h), new_api=True)
    state = official.state_dict()
    assert any(".parametrizations.weight.original0" in k for k in state)
    loaded = load_hifigan(_write(tmp_path / "new", "g_00000001", state, h))
    logmel = torch.randn(1, 8, 6) - 4.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(logmel), official(logmel), rtol=0, atol=1e-6)
        again = load_hifigan(save_official(loaded, tmp_path / "ours"))
        torch.testing.assert_close(again(logmel), loaded(logmel), rtol=0, atol=1e-6)
    assert again.hparams() == loaded.hparams()
    # fusing the written layout gives back the weights
    fused = fuse_weight_norm(weight_norm_state(loaded))
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(fused[k], v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(TINY_BIGVGAN))
def test_bigvgan_official_checkpoint_round_trip(tmp_path, name):
    h = TINY_BIGVGAN[name]
    official = _official_layout(BigVGANGenerator.from_hparams(h))
    # BigVGAN._save_pretrained writes config.json (h, plus use_cuda_kernel) and {"generator": state_dict()}
    _write(tmp_path, "bigvgan_generator.pt", official.state_dict(), {**h, "use_cuda_kernel": False})
    loaded = load_bigvgan(tmp_path)
    logmel = torch.randn(2, 8, 5) - 4.0
    with torch.no_grad():
        want, got = official(logmel), loaded(logmel)
    assert got.shape == (2, loaded.spec.samples(5)) == (2, 80)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got.abs().max() <= 1.0
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # BigVGAN's train.py (and its v1 releases) name the generator g_<step>: load_vocoder tells it from a
    # HiFi-GAN's by the config beside it
    trained = tmp_path / "trained"
    _write(trained, "g_05000000", official.state_dict(), h)
    for source in (trained, trained / "g_05000000"):
        for vocoder in (load_bigvgan(source), load_vocoder(source)):
            assert isinstance(vocoder, BigVGANGenerator)
            with torch.no_grad():
                torch.testing.assert_close(vocoder(logmel), want, rtol=0, atol=1e-6)


# ---- refusals -----------------------------------------------------------------------------------


def test_a_checkpoint_missing_a_key_is_refused_by_name(tmp_path):
    h = TINY_HIFIGAN["1"]
    state = weight_norm_state(HiFiGANGenerator.from_hparams(h))
    del state["resblocks.1.convs2.0.weight_g"]
    path = _write(tmp_path, "g_00000000", state, h)
    with pytest.raises(ValueError, match="g_00000000") as error:
        load_hifigan(path)
    assert "missing: resblocks.1.convs2.0.weight" in str(error.value)
    assert "unexpected: resblocks.1.convs2.0.weight_v" in str(error.value)


def test_a_checkpoint_for_another_config_is_refused_with_its_keys(tmp_path):
    state = weight_norm_state(BigVGANGenerator.from_hparams(TINY_BIGVGAN["v2"]))
    _write(tmp_path, "bigvgan_generator.pt", state, TINY_BIGVGAN["v1-snake-amp2"])
    with pytest.raises(ValueError, match="bigvgan_generator.pt") as error:
        load_bigvgan(tmp_path)
    message = str(error.value)
    assert "unexpected: resblocks.0.convs1.0.weight" in message  # AMPBlock1 keys in an AMPBlock2 model
    assert "missing: resblocks.0.convs.0.weight" in message
    assert "missing: conv_post.bias" in message  # v1 configs default to a bias at the end, v2 has none

    h = {**TINY_HIFIGAN["1"], "upsample_initial_channel": 32}
    _write(tmp_path / "h", "g_00000000", weight_norm_state(HiFiGANGenerator.from_hparams(TINY_HIFIGAN["1"])), h)
    with pytest.raises(ValueError, match=r"shape of conv_pre.weight: expected \(32, 8, 7\), found \(16, 8, 7\)"):
        load_hifigan(tmp_path / "h")


def test_loader_refusals_name_the_problem(tmp_path):
    h = TINY_HIFIGAN["1"]
    state = weight_norm_state(HiFiGANGenerator.from_hparams(h))
    torch.save(state, tmp_path / "g_00000000")  # a bare state dict, not {"generator": ...}
    with pytest.raises(ValueError, match="expected a dict with the key 'generator'"):
        load_hifigan(tmp_path / "g_00000000", config=h)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hifigan(tmp_path / "g_00000000")
    _write(tmp_path, "g_00000001", state, h)
    with pytest.raises(FileNotFoundError, match=r"holds 2 HiFi-GAN generator files"):
        load_hifigan(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds 2 BigVGAN generator files .* bigvgan_generator.pt or one"):
        load_bigvgan(tmp_path)
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['activation'\]"):
        BigVGANGenerator.from_hparams({k: v for k, v in TINY_BIGVGAN["v2"].items() if k != "activation"})
    with pytest.raises(ValueError, match="multiply to 16, not hop 32"):
        HiFiGANGenerator.from_hparams({**h, "hop_size": 32})


def test_bigvgan_checkpoint_with_other_antialiasing_filters_is_refused(tmp_path):
    h = TINY_BIGVGAN["v2"]
    state = weight_norm_state(BigVGANGenerator.from_hparams(h))
    state["activation_post.upsample.filter"] = torch.full((1, 1, 12), 1 / 12)
    _write(tmp_path, "bigvgan_generator.pt", state, h)
    with pytest.raises(ValueError, match="activation_post.upsample.filter differs"):
        load_bigvgan(tmp_path)


# ---- the anti-aliased activation ----------------------------------------------------------------


def test_kaiser_sinc_filter_is_scipy_firwin():
    """ratio 2: cutoff 1/4 cycle per sample, transition half-width 0.3, 12 taps; A = 51.0 dB, beta = 4.66."""
    attenuation = 2.285 * (12 // 2 - 1) * math.pi * (4 * 0.3) + 7.95
    beta = signal.kaiser_beta(attenuation)
    assert attenuation == pytest.approx(51.02, abs=0.01) and beta == pytest.approx(4.663, abs=1e-3)
    want = signal.firwin(12, 0.5, window=("kaiser", beta))  # cutoff relative to Nyquist; unit DC gain
    np.testing.assert_allclose(kaiser_sinc_filter(0.25, 0.3, 12).view(-1).numpy(), want, atol=1e-7)
    odd = signal.firwin(11, 0.4, window=("kaiser", signal.kaiser_beta(2.285 * 4 * math.pi * 1.2 + 7.95)))
    np.testing.assert_allclose(kaiser_sinc_filter(0.2, 0.3, 11).view(-1).numpy(), odd, atol=1e-7)


@pytest.mark.parametrize("f", [0.02, 0.1, 0.2])  # cycles per input sample, below 0.4 x Nyquist
def test_upsampling_and_identity_activation_on_sinusoids(f):
    n = torch.arange(256, dtype=torch.float64)
    x = torch.sin(2 * math.pi * f * n + 0.3)[None, None]
    up = UpSample1d().double()(x)[0, 0]
    # output sample m lies at input time (m - 1/2) / 2: a quarter-sample delay, undone by the down-sampler
    want = torch.sin(2 * math.pi * f * (torch.arange(512, dtype=torch.float64) - 0.5) / 2 + 0.3)
    torch.testing.assert_close(up[32:-32], want[32:-32], rtol=0, atol=4e-3)
    same = Activation1d(nn.Identity()).double()(x)[0, 0]
    torch.testing.assert_close(same[16:-16], x[0, 0, 16:-16], rtol=0, atol=6e-3)
    ones = torch.ones(1, 3, 20, dtype=torch.float64)  # unit DC gain and replicate padding: constants pass
    torch.testing.assert_close(Activation1d(nn.Identity()).double()(ones), ones, rtol=0, atol=1e-6)  # fp32 taps


def test_snake_activations_match_their_formulas():
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    a, b = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), torch.tensor([0.3, 1.5, 0.7], dtype=torch.float64)
    snake, beta = Snake(3, logscale=True).double(), SnakeBeta(3, logscale=False).double()
    with torch.no_grad():
        snake.alpha.copy_(a.log())
        beta.alpha.copy_(a)
        beta.beta.copy_(b)
    a, b = a[:, None], b[:, None]
    torch.testing.assert_close(snake(x), x + torch.sin(a * x) ** 2 / a, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(beta(x), x + torch.sin(a * x) ** 2 / b, rtol=1e-7, atol=1e-8)
