"""Vocos: official layout and names, the ISTFT head against torch.istft, frame alignment, our folders."""

import json

import pytest
import torch
import torch.nn.functional as F
import torchaudio
import yaml

from scm_mm_audio.mel import PRESETS, log_mel, mel_spec
from scm_mm_audio.vocos import (
    ISTFT,
    Vocos,
    load_vocoder_dir,
    load_vocos,
    overlap_add,
    save_vocoder,
    save_vocos,
    spec_from_official,
    vocos_preset,
)

# charactr/vocos-mel-24khz/config.yaml as published (the model's three parts, their init_args)
OFFICIAL_CONFIG = {
    "feature_extractor": {
        "class_path": "vocos.feature_extractors.MelSpectrogramFeatures",
        "init_args": {"sample_rate": 24000, "n_fft": 1024, "hop_length": 256, "n_mels": 100, "padding": "center"},
    },
    "backbone": {
        "class_path": "vocos.models.VocosBackbone",
        "init_args": {"input_channels": 100, "dim": 512, "intermediate_dim": 1536, "num_layers": 8},
    },
    "head": {
        "class_path": "vocos.heads.ISTFTHead",
        "init_args": {"dim": 512, "n_fft": 1024, "hop_length": 256, "padding": "center"},
    },
}


def official_state_shapes(n_mels=100, dim=512, intermediate=1536, layers=8, n_fft=1024):
    """The state dict of vocos.pretrained.Vocos(MelSpectrogramFeatures, VocosBackbone, ISTFTHead), key by
    key in registration order, as its source builds it (pretrained.py, models.py, modules.py, heads.py,
    spectral_ops.py); the feature extractor's part is torchaudio's MelSpectrogram's own state dict."""
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=24000, n_fft=n_fft, hop_length=256, n_mels=n_mels, power=1)
    shapes = {f"feature_extractor.mel_spec.{k}": tuple(v.shape) for k, v in mel.state_dict().items()}
    shapes.update({"backbone.embed.weight": (dim, n_mels, 7), "backbone.embed.bias": (dim,),
                   "backbone.norm.weight": (dim,), "backbone.norm.bias": (dim,)})  # fmt: skip
    for i in range(layers):
        block = {"gamma": (dim,), "dwconv.weight": (dim, 1, 7), "dwconv.bias": (dim,), "norm.weight": (dim,),
                 "norm.bias": (dim,), "pwconv1.weight": (intermediate, dim), "pwconv1.bias": (intermediate,),
                 "pwconv2.weight": (dim, intermediate), "pwconv2.bias": (dim,)}  # fmt: skip
        shapes.update({f"backbone.convnext.{i}.{k}": v for k, v in block.items()})
    shapes.update({"backbone.final_layer_norm.weight": (dim,), "backbone.final_layer_norm.bias": (dim,),
                   "head.out.weight": (n_fft + 2, dim), "head.out.bias": (n_fft + 2,),
                   "head.istft.window": (n_fft,)})  # fmt: skip
    return shapes


@pytest.fixture(scope="module")
def official_folder(tmp_path_factory):
    torch.manual_seed(0)
    vocos = vocos_preset("official-24k").eval()
    folder = save_vocos(vocos, tmp_path_factory.mktemp("vocos") / "vocos-mel-24khz")
    return vocos, folder


def test_official_layout_keys_and_config(official_folder):
    vocos, folder = official_folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "pytorch_model.bin"]
    assert yaml.safe_load((folder / "config.yaml").read_text()) == OFFICIAL_CONFIG
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    expected = official_state_shapes()
    assert list(state) == list(expected)  # names and order
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(p.numel() for p in vocos.parameters()) == 13_531_650  # "13.5M" (Vocos README)
    # the feature buffers are torchaudio's own for the official features
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=24000, n_fft=1024, hop_length=256, n_mels=100, power=1)
    torch.testing.assert_close(state["feature_extractor.mel_spec.mel_scale.fb"], mel.mel_scale.fb)
    torch.testing.assert_close(state["feature_extractor.mel_spec.spectrogram.window"], mel.spectrogram.window)


def test_load_vocos_round_trip(official_folder):
    vocos, folder = official_folder
    loaded = load_vocos(folder)
    assert loaded.spec == PRESETS["vocos_24k"]
    assert loaded.kwargs == vocos.kwargs
    logmel = torch.randn(2, 100, 12) - 4
    with torch.no_grad():
        out = loaded(logmel)
        torch.testing.assert_close(out, vocos(logmel), rtol=0, atol=0)
    assert out.shape == (2, loaded.spec.samples(12))


def test_load_vocos_checks_the_filterbank(official_folder, tmp_path):
    vocos, folder = official_folder
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    # a checkpoint trained on Slaney mels up to 8 kHz (the later vocos branch's defaults), config silent on it
    other = torchaudio.transforms.MelSpectrogram(
        sample_rate=24000, n_fft=1024, hop_length=256, n_mels=100, power=1, f_max=8000, norm="slaney",
        mel_scale="slaney",
    )
    state["feature_extractor.mel_spec.mel_scale.fb"] = other.mel_scale.fb
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(OFFICIAL_CONFIG))
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="mel_scale.fb"):
        load_vocos(tmp_path)
    # stated in the config, the same weights load
    config = json.loads(json.dumps(OFFICIAL_CONFIG))
    config["feature_extractor"]["init_args"].update(f_max=8000, norm="slaney", mel_scale="slaney")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_vocos(tmp_path).spec.fmax == 8000


@pytest.mark.parametrize(
    ("part", "change", "named"),
    [
        ("feature_extractor", {"power": 2}, "power"),
        ("feature_extractor", {"padding": "valid"}, "padding"),
        ("head", {"n_fft": 2048}, "head.init_args.n_fft"),
        ("backbone", {"input_channels": 80}, "backbone.init_args.input_channels"),
        ("backbone", {"adanorm_num_embeddings": 4}, "adanorm_num_embeddings"),
    ],
)
def test_load_vocos_refuses_unknown_configs(tmp_path, part, change, named):
    config = json.loads(json.dumps(OFFICIAL_CONFIG))
    config[part]["init_args"].update(change)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=named):
        load_vocos(tmp_path)


def test_load_vocos_refuses_other_classes_and_missing_files(tmp_path):
    config = json.loads(json.dumps(OFFICIAL_CONFIG))
    config["feature_extractor"]["class_path"] = "vocos.feature_extractors.EncodecFeatures"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="feature_extractor.class_path"):
        load_vocos(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(OFFICIAL_CONFIG))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_vocos(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_vocos(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "features",
    [
        OFFICIAL_CONFIG["feature_extractor"]["init_args"],
        # configs/vocos-matcha.yaml: 22.05 kHz, Slaney, 8 kHz, "same" padding
        {"sample_rate": 22050, "n_fft": 1024, "hop_length": 256, "n_mels": 80, "padding": "same", "f_min": 0,
         "f_max": 8000, "norm": "slaney", "mel_scale": "slaney"},
    ],
)  # fmt: skip
def test_spec_from_official_computes_the_official_features(features):
    """vocos feature_extractors.MelSpectrogramFeatures: optional reflect pad, torchaudio mel, log(clip 1e-7)."""
    spec = spec_from_official(features)
    a = {"f_min": 0.0, "f_max": None, "norm": None, "mel_scale": "htk", **features}
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=a["sample_rate"], n_fft=a["n_fft"], hop_length=a["hop_length"], n_mels=a["n_mels"],
        center=a["padding"] == "center", power=1, f_min=a["f_min"], f_max=a["f_max"], norm=a["norm"],
        mel_scale=a["mel_scale"],
    )  # fmt: skip
    wave = torch.randn(2, 5000) * 0.1
    audio = wave
    if a["padding"] == "same":
        pad = a["n_fft"] - a["hop_length"]
        audio = F.pad(wave, (pad // 2, pad // 2), mode="reflect")
    expected = torch.log(torch.clip(mel(audio), min=1e-7))
    torch.testing.assert_close(log_mel(wave, spec), expected, atol=2e-4, rtol=1e-4)
    if features is OFFICIAL_CONFIG["feature_extractor"]["init_args"]:
        assert spec == PRESETS["vocos_24k"]


@pytest.mark.parametrize("preset", ["vocos_24k", "small_16k", "hifigan_22k"])
def test_output_length(preset):
    vocos = Vocos(preset, dim=16, intermediate_dim=32, num_layers=1)
    for frames in (1, 2, 9, 40):
        out = vocos(torch.randn(2, vocos.spec.n_mels, frames))
        assert out.shape == (2, vocos.spec.samples(frames))
    # a waveform's mel turns back into that many samples, cut to whole hops
    wave = torch.randn(1, 4321)
    assert vocos(log_mel(wave, vocos.spec)).shape[-1] == 4321 // vocos.spec.hop_length * vocos.spec.hop_length


def test_overlap_add_and_istft_against_torch():
    torch.manual_seed(0)
    frames = torch.randn(3, 100, 7, dtype=torch.float64)  # hop not dividing n: the general case
    folded = F.fold(frames, output_size=(1, 6 * 33 + 100), kernel_size=(1, 100), stride=(1, 33))[:, 0, 0]
    torch.testing.assert_close(overlap_add(frames, 33), folded, rtol=0, atol=1e-12)
    istft = ISTFT(1024, 256, "center").double()
    spec = torch.randn(2, 513, 20, dtype=torch.complex128)
    expected = torch.istft(spec, 1024, 256, 1024, istft.window, center=True)
    torch.testing.assert_close(istft(spec), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("preset", ["small_16k", "hifigan_22k"])
def test_head_inverts_the_mel_frames(preset):
    """The head's ISTFT is the exact inverse of an STFT framed like the spec's mels: frame t of a centred
    spec sits at sample t * hop, of an uncentred (HiFi-GAN) spec at t * hop + hop / 2."""
    spec = mel_spec(preset)
    wave = torch.randn(2, 40 * spec.hop_length + 77, dtype=torch.float64)
    istft = ISTFT(spec.n_fft, spec.hop_length, "center" if spec.center else "same").double()
    padded = wave
    if not spec.center:  # as scm_mm_audio.mel.stft_magnitude pads
        pad = (spec.n_fft - spec.hop_length) // 2
        padded = F.pad(wave[:, None], (pad, pad), mode="reflect")[:, 0]
    z = torch.stft(padded, spec.n_fft, spec.hop_length, window=istft.window, center=spec.center, return_complex=True)
    assert z.shape[-1] == spec.frames(wave.shape[-1])
    out = istft(z)
    assert out.shape[-1] == spec.samples(z.shape[-1])
    torch.testing.assert_close(out, wave[:, : out.shape[-1]], rtol=0, atol=1e-10)


def test_save_vocoder_round_trip(tmp_path):
    vocos = Vocos("hifigan_22k", dim=24, intermediate_dim=48, num_layers=2, layer_scale_init=0.3)
    folder = save_vocoder(vocos, tmp_path / "voc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc"]  # no temporary folder left
    config = json.loads((folder / "config.json").read_text())
    assert config == {"type": "vocos", "spec": PRESETS["hifigan_22k"].to_dict(),
                      "kwargs": {"dim": 24, "intermediate_dim": 48, "num_layers": 2, "layer_scale_init": 0.3}}
    logmel = torch.randn(1, 80, 10)
    with torch.no_grad():
        torch.testing.assert_close(load_vocoder_dir(folder)(logmel), vocos(logmel), rtol=0, atol=0)
    with torch.no_grad():  # overwriting replaces the folder
        vocos.head.out.bias.add_(1.0)
    save_vocoder(vocos, folder)
    torch.testing.assert_close(load_vocoder_dir(folder).head.out.bias, vocos.head.out.bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc"]


def test_load_vocoder_dir_errors(tmp_path, official_folder):
    with pytest.raises(FileNotFoundError, match="load_vocos"):
        load_vocoder_dir(official_folder[1])
    (tmp_path / "config.json").write_text(json.dumps({"type": "wavenet", "spec": {}, "kwargs": {}}))
    with pytest.raises(ValueError, match="unknown vocoder type 'wavenet'"):
        load_vocoder_dir(tmp_path)


def test_official_layout_refuses_specs_it_cannot_express(tmp_path):
    vocos = Vocos("hifigan_22k", dim=16, intermediate_dim=32, num_layers=1)  # clamp 1e-5 and |STFT| + 1e-9
    with pytest.raises(ValueError, match="clamp"):
        save_vocos(vocos, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_presets():
    small = vocos_preset("small")
    assert small.spec == PRESETS["small_16k"] and small.kwargs["num_layers"] == 4
    assert vocos_preset("small", spec="hifigan_22k").spec == PRESETS["hifigan_22k"]
    with pytest.raises(KeyError, match="small"):
        vocos_preset("large")
