"""The causal video autoencoder: causality, the 1 + f_t k frame rule, chunked decoding equal to whole decoding,
save/load, a short training run that reduces the loss and resumes exactly, and the codec on top of it."""

import json

import pytest
import torch
from helpers import config

from scm_mm.app import train
from scm_mm_video import vae_train
from scm_mm_video.autoencoder import VideoVAE, VideoVAEConfig, load_video_vae, save_video_vae, vae_preset
from scm_mm_video.codec import VideoLatentCodec, codec_from_state
from scm_mm_video.data import MovingDigits
from scm_mm_video.vae_train import VAEOptions, reconstruction_psnr, train_video_vae

TINY = dict(in_channels=1, latent_channels=2, base_channels=8, channel_mult=(1, 2), temporal_factor=2, patch_size=2,
            groups=4)  # fmt: skip


def tiny(**overrides) -> VideoVAE:
    torch.manual_seed(0)
    return VideoVAE(VideoVAEConfig(**{**TINY, **overrides}))


def test_shapes_follow_the_frame_rule_and_bad_shapes_name_valid_ones():
    vae = tiny()
    for frames, latent in ((1, 1), (5, 3), (9, 5)):
        z = vae.encode(torch.zeros(1, 1, frames, 16, 16)).mean
        assert z.shape == (1, 2, latent, 4, 4)
        assert vae.decode(z).shape == (1, 1, frames, 16, 16)
    with pytest.raises(ValueError, match="use 7 or 9"):
        vae.encode(torch.zeros(1, 1, 8, 16, 16))
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.zeros(1, 1, 9, 18, 16))
    assert tiny(temporal_factor=1).encode(torch.zeros(1, 1, 4, 16, 16)).mean.shape[2] == 4


def test_encoder_and_decoder_are_causal():
    vae = tiny().double()
    x = torch.randn(1, 1, 9, 16, 16, dtype=torch.float64)
    y = x.clone()
    y[:, :, 5:] += 1  # change frames 5..8: latent frames 3.. (frames 5, 6) may change, 0..2 (frames 0-4) not
    zx, zy = vae.encode(x).mean, vae.encode(y).mean
    assert torch.equal(zx[:, :, :3], zy[:, :, :3]) and not torch.equal(zx[:, :, 3:], zy[:, :, 3:])
    w = zx.clone()
    w[:, :, 3:] += 1  # latent frame 3 decodes to frames 5, 6
    assert torch.equal(vae.decode(zx)[:, :, :5], vae.decode(w)[:, :, :5])


def test_chunked_decoding_equals_whole_decoding():
    vae = tiny().double()
    z = torch.randn(2, 2, 7, 4, 4, dtype=torch.float64)
    whole = vae.decode_raw(z, chunk_frames=None)
    for chunk in (1, 2, 3):
        assert torch.allclose(vae.decode_raw(z, chunk_frames=chunk), whole, atol=1e-12, rtol=0)


def test_save_load_round_trip_and_describe(tmp_path):
    vae = tiny()
    save_video_vae(vae, tmp_path / "vae")
    back = load_video_vae(tmp_path / "vae")
    x = torch.rand(1, 1, 5, 16, 16) * 2 - 1
    assert torch.equal(back.encode_raw(x), vae.encode_raw(x)) and back.describe() == vae.describe()
    with torch.no_grad():
        back.dec_out.conv.weight.add_(1e-2)
    assert back.describe()["weights_digest"] != vae.describe()["weights_digest"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"kind": "vocos"}))
    (tmp_path / "other" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a 'scm-mm-video-vae'"):
        load_video_vae(tmp_path / "other")


def test_realistic_preset_builds_with_its_compression():
    with torch.device("meta"):
        vae = vae_preset("video-4x8x8-16ch")
    assert (vae.temporal_factor, vae.spatial_factor, vae.latent_channels, vae.in_channels) == (4, 8, 16, 3)


def test_training_reduces_the_loss_and_a_killed_run_resumes_exactly(tmp_path):
    data = MovingDigits(size=16, frames=5, resolution=16, digit_size=8)
    options = VAEOptions(iters=6, batch_size=2, lr=3e-3, warmup_iters=0, log_every=1, ckpt_every=3, progress=False)
    full = train_video_vae(tiny(), options, data, tmp_path / "full")
    assert (tmp_path / "full" / "vae" / "model.safetensors").exists()
    killed = train_video_vae(tiny(), options, data, tmp_path / "killed", stop_at=4)
    assert killed.iteration == 4
    resumed = train_video_vae(tiny(), options, data, tmp_path / "killed")
    assert resumed.start_iteration == 3  # the last checkpoint before the kill
    assert resumed.losses == full.losses[3:]
    longer = train_video_vae(tiny(), VAEOptions(iters=40, batch_size=4, lr=3e-3, warmup_iters=0, log_every=10,
                                                ckpt_every=100, progress=False), data, tmp_path / "longer")  # fmt: skip
    assert sum(longer.losses[-5:]) < 0.7 * sum(longer.losses[:5])


def test_extending_a_finished_run_rewrites_its_vae_folder(tmp_path):
    data = MovingDigits(size=8, frames=5, resolution=16, digit_size=8)
    options = VAEOptions(iters=2, batch_size=2, warmup_iters=0, ckpt_every=2, progress=False)
    train_video_vae(tiny(), options, data, tmp_path)
    vae = tiny()
    result = train_video_vae(vae, VAEOptions(**{**options.__dict__, "iters": 4}), data, tmp_path)
    assert (result.start_iteration, result.iteration) == (2, 4)
    saved = load_video_vae(result.vae_dir).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in vae.state_dict().items())  # not the 2-iteration weights


def test_reconstruction_psnr_scores_at_most_the_dataset():
    data = MovingDigits(size=3, frames=5, resolution=16, digit_size=8)
    scores = reconstruction_psnr(tiny().eval(), data, n=64, batch_size=2)
    assert len(scores["psnr_per_frame"]) == 5 and scores["psnr"] > 0


def test_the_train_app_trains_the_autoencoder_on_its_device(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(vae_train, "train_video_vae", lambda *args, **kwargs: calls.append(kwargs))
    train.run(config("train", ["experiment=digits_vae", f"run_dir={tmp_path}", "data.dataset.size=2", "device=cpu"]))
    assert calls[0]["device"] == torch.device("cpu")


def test_codec_fits_statistics_and_refuses_another_autoencoder(tmp_path):
    data = MovingDigits(size=8, frames=5, resolution=16, digit_size=8)
    save_video_vae(tiny(), tmp_path / "vae")
    codec = VideoLatentCodec(tmp_path / "vae")
    assert not codec.fitted
    codec = codec.fit(data, n=8)
    media = torch.stack([data[i][0] for i in range(8)])
    x0 = codec.encode(media)
    assert x0.shape == (8, 2, 3, 4, 4)
    assert torch.allclose(x0.transpose(0, 1).flatten(1).std(1, unbiased=False), torch.full((2,), 0.5), atol=1e-3)
    assert codec.decode(x0).shape == media.shape and codec.decode(x0).dtype == torch.uint8
    rebuilt = codec_from_state(json.loads(json.dumps(codec.state())))
    assert torch.equal(rebuilt.encode(media), x0)
    save_video_vae(tiny(base_channels=16), tmp_path / "other")
    with pytest.raises(ValueError, match="base_channels: 8 != 16"):
        codec_from_state(codec.state(), vae=tmp_path / "other")
    with pytest.raises(ValueError, match="encodes 1-channel clips, not media_channels=3"):
        VideoLatentCodec(tmp_path / "vae", media_channels=3)
    assert codec.latent_frames_at_least(6) == 4 and codec.frames_for(4) == 7  # f = 2: every 2k + 1 frames
