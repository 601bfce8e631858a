"""load_vocoder: one entry point for every vocoder source, and clear errors for the sources it cannot read."""

import pytest
import torch

from scm_mm_audio.codec import GriffinLim
from scm_mm_audio.gan_vocoders import HiFiGANGenerator, save_official
from scm_mm_audio.mel import PRESETS
from scm_mm_audio.vocoders import load_vocoder
from scm_mm_audio.vocos import Vocos, save_vocoder


def small_vocos() -> Vocos:
    torch.manual_seed(0)
    return Vocos("small_16k", dim=16, intermediate_dim=32, num_layers=1)


def test_a_weights_file_loads_the_vocoder_of_its_folder(tmp_path):
    ours = save_vocoder(small_vocos(), tmp_path / "ours")
    logmel = torch.randn(1, 64, 6)
    with torch.no_grad():
        expected = load_vocoder(ours)(logmel)
        torch.testing.assert_close(load_vocoder(ours / "model.safetensors")(logmel), expected, rtol=0, atol=0)
    hifi = save_official(HiFiGANGenerator(upsample_initial_channel=32), tmp_path / "hifi")
    assert isinstance(load_vocoder(hifi / "config.json"), HiFiGANGenerator)  # the file beside the generator
    assert isinstance(load_vocoder(hifi / "g_00000000"), HiFiGANGenerator)
    assert isinstance(load_vocoder("griffin-lim", PRESETS["small_16k"]), GriffinLim)


def test_unreadable_sources_say_what_to_pass(tmp_path):
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "weights.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights.pt is a file.*pass the vocoder's folder.*BigVGAN"):
        load_vocoder(tmp_path / "loose" / "weights.pt")
    with pytest.raises(ValueError, match="loose holds no vocoder"):
        load_vocoder(tmp_path / "loose")
    run = tmp_path / "run"  # a vocoder training run killed before its final vocoder/
    for it in ("iter-000000500", "iter-000001000"):
        save_vocoder(small_vocos(), run / "checkpoints" / it / "vocoder")
    with pytest.raises(ValueError, match=r"has not finished .* newest checkpoint loads: .*iter-000001000$"):
        load_vocoder(run)
    assert isinstance(load_vocoder(run / "checkpoints" / "iter-000001000"), Vocos)
