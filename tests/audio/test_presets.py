"""Mel network presets: their sizes, frame strides, and any clip length through one network."""

import pytest
import torch

from scm_mm.train.checkpoint import build_from_spec, canonical_spec
from scm_mm_audio.presets import PRESETS, build_mel_net, frame_multiple, mel_net_spec

# Parameter counts (M) with 12 classes, as documented in scm_mm_audio/presets.py.
SIZES = {"notes-dit": (64, 1.30), "mel-dit-s": (80, 32.59), "mel-dit-m": (80, 76.71), "mel-dit-l": (80, 257.19),
         "mel-unet-s": (1, 23.03), "mel-unet-m": (1, 121.04)}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_sizes_match_the_documented_counts(name):
    in_channels, millions = SIZES[name]
    with torch.device("meta"):
        net = build_mel_net(name, in_channels, num_classes=12)
        written_out = build_from_spec(mel_net_spec(name, in_channels, num_classes=12))
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(millions, abs=0.005)
    # the preset written out builds the same net, and compares equal to the preset's name
    assert type(written_out) is type(net)
    assert {k: v.shape for k, v in written_out.state_dict().items()} == {
        k: v.shape for k, v in net.state_dict().items()
    }
    by_name = {"_target_": "scm_mm_audio.presets.build_mel_net", "name": name, "in_channels": in_channels,
               "num_classes": 12}  # fmt: skip
    assert canonical_spec(by_name) == canonical_spec(mel_net_spec(name, in_channels, num_classes=12))


def test_one_network_takes_any_frame_count_its_stride_divides():
    dit = build_mel_net("notes-dit", 64, num_classes=12, hidden=32, depth=1, heads=1)
    unet = build_mel_net("mel-unet-s", 1, model_channels=8, channel_mult=(1, 1, 1, 1), num_blocks=1, groups=4)
    assert (frame_multiple(dit), frame_multiple(unet)) == (2, 8)
    for frames in (32, 34, 80):
        x = torch.randn(2, 64, frames)
        assert dit(x, torch.rand(2), torch.tensor([0, 11])).shape == x.shape
    for frames in (16, 40):
        x = torch.randn(1, 1, 64, frames)
        assert unet(x, torch.rand(1)).shape == x.shape
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        dit(torch.randn(1, 64, 33), torch.rand(1))
    with pytest.raises(KeyError, match="unknown mel network preset"):
        build_mel_net("mel-dit-xxl", 80)
