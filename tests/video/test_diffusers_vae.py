"""diffusers' video VAEs behind the VideoAutoencoder interface, on tiny random models saved here (no download):
latent and decoded shapes for 4k+1 frames, factors and frame rules against the models' real outputs, encode_raw
and decode_raw against diffusers called directly, grey clips, shipped statistics, describe() stable across
reloads and dtypes and sensitive to the weights, and clear errors for what cannot be loaded."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from scm_mm_video.codec import VideoAutoencoder  # noqa: E402
from scm_mm_video.diffusers_vae import DiffusersVideoVAE, load_diffusers_video_vae  # noqa: E402

# 62K-89K parameters each; (config, temporal factor, spatial factor, frame step) as measured on their outputs.
TINY = {
    "wan": (
        "AutoencoderKLWan",
        dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
             latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 2.0, 2.5, 3.0]),
        4, 8, 4,
    ),
    "wan2.2": (  # TI2V-5B's layout: residual blocks, 2x2 patches folded into 12 channels inside the model
        "AutoencoderKLWan",
        dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True, patch_size=2,
             in_channels=12, out_channels=12, latents_mean=[0.0] * 4, latents_std=[1.0] * 4),
        4, 16, 4,
    ),
    "cogvideox": (
        "AutoencoderKLCogVideoX",
        dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4),
        4, 8, 8,
    ),
    "ltx": (
        "AutoencoderKLLTXVideo",
        dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
             layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1), patch_size=2),
        8, 16, 8,
    ),
}  # fmt: skip
LTX_STATS = ([0.5, -0.5, 0.25, 0.0], [1.0, 2.0, 0.5, 4.0])


def build(kind: str, **overrides):
    name, config, *_ = TINY[kind]
    torch.manual_seed(0)
    vae = getattr(diffusers, name)(**{**config, **overrides})
    if name == "AutoencoderKLLTXVideo":  # trained LTX-Video VAEs ship these buffers
        vae.latents_mean.copy_(torch.tensor(LTX_STATS[0]))
        vae.latents_std.copy_(torch.tensor(LTX_STATS[1]))
    return vae.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers_vaes")
    for kind in TINY:
        build(kind).save_pretrained(root / kind)
    return root


def video(frames: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, channels, frames, 32, 32, generator=g) * 2 - 1


@pytest.mark.parametrize("kind", TINY)
def test_shapes_follow_the_factors_for_4k_plus_1_frames(folders, kind):
    _, _, temporal, spatial, step = TINY[kind]
    vae = load_diffusers_video_vae(folders / kind)
    assert isinstance(vae, VideoAutoencoder)
    assert (vae.temporal_factor, vae.spatial_factor, vae.frame_step) == (temporal, spatial, step)
    assert vae.in_channels == 3 and vae.latent_channels == 4
    for frames in (17, 9):
        latent = vae.encode_raw(video(frames))
        assert latent.shape == (2, 4, 1 + (frames - 1) // temporal, 32 // spatial, 32 // spatial)
        assert latent.dtype == torch.float32
        assert vae.decode_raw(latent).shape == (2, 3, frames, 32, 32)


@pytest.mark.parametrize("kind", TINY)
def test_encode_and_decode_are_diffusers_posterior_mean_and_decoder(folders, kind):
    name = TINY[kind][0]
    reference = getattr(diffusers, name).from_pretrained(folders / kind, low_cpu_mem_usage=False).eval()
    x = video(9)
    with torch.no_grad():
        mean = reference.encode(x).latent_dist.mean
        decoded = reference.decode(mean).sample
    whole = load_diffusers_video_vae(folders / kind, slicing=False)  # the same batched calls: bit-exact
    assert torch.equal(whole.encode_raw(x), mean) and torch.equal(whole.decode_raw(mean), decoded)
    vae = load_diffusers_video_vae(folders / kind)  # one clip at a time: equal up to round-off
    latent = vae.encode_raw(x)
    torch.testing.assert_close(latent, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vae.decode_raw(latent), decoded, rtol=1e-4, atol=1e-5)
    # Grey clips: replicated into the 3-channel VAE, the decoded RGB averaged back.
    grey = load_diffusers_video_vae(folders / kind, media_channels=1)
    assert grey.in_channels == 1
    z = grey.encode_raw(x[:, :1])
    torch.testing.assert_close(z, vae.encode_raw(x[:, :1].expand(-1, 3, -1, -1, -1)), rtol=0, atol=0)
    torch.testing.assert_close(grey.decode_raw(z), vae.decode_raw(z).mean(1, keepdim=True), rtol=0, atol=0)


def test_shipped_latent_statistics_are_read(folders, tmp_path):
    wan = TINY["wan"][1]
    assert load_diffusers_video_vae(folders / "wan").latents_mean == pytest.approx(wan["latents_mean"])
    assert load_diffusers_video_vae(folders / "wan").latents_std == pytest.approx(wan["latents_std"])
    ltx = load_diffusers_video_vae(folders / "ltx")
    assert (ltx.latents_mean, ltx.latents_std) == LTX_STATS
    cog = load_diffusers_video_vae(folders / "cogvideox")
    assert cog.latents_mean is None and cog.latents_std is None  # scaling_factor only: measured on data
    build("cogvideox", latents_mean=(0.0, 1.0, 2.0, 3.0), latents_std=(1.0, 1.0, 2.0, 2.0)).save_pretrained(
        tmp_path / "cog")
    assert load_diffusers_video_vae(tmp_path / "cog").latents_std == [1.0, 1.0, 2.0, 2.0]
    build("wan", latents_mean=[0.0] * 16, latents_std=[1.0] * 16).save_pretrained(tmp_path / "wan16")
    with pytest.raises(ValueError, match="4 latent channels"):
        load_diffusers_video_vae(tmp_path / "wan16")


def test_an_ltx_vae_with_its_initial_zero_one_buffers_ships_no_statistics(tmp_path):
    from scm_mm_video.codec import VideoLatentCodec

    untrained = build("ltx")
    untrained.latents_mean.zero_()
    untrained.latents_std.fill_(1.0)  # as diffusers initialises them
    untrained.save_pretrained(tmp_path / "ltx0")
    vae = load_diffusers_video_vae(tmp_path / "ltx0")
    assert (vae.latents_mean, vae.latents_std) == (None, None)
    codec = VideoLatentCodec(vae, sigma_d=0.5)
    assert not codec.fitted  # so the trainer measures them (fit) and x0 gets std sigma_d
    clips = [(((video(9, seed=i)[0] + 1) * 127.5).round().to(torch.uint8), 0) for i in range(4)]
    x0 = codec.fit(clips).encode(torch.stack([c for c, _ in clips]))
    torch.testing.assert_close(x0.transpose(0, 1).flatten(1).std(1, correction=0), torch.full((4,), 0.5),
                               rtol=1e-3, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("kind", TINY)
def test_describe_identifies_the_weights_not_the_path(folders, tmp_path, kind):
    described = load_diffusers_video_vae(folders / kind).describe()
    assert described["kind"] == "diffusers-video-vae" and described["class"] == TINY[kind][0]
    assert described["media_channels"] == 3 and "decode_timestep" not in described  # not timestep-conditioned
    text = json.dumps(described)
    assert str(folders) not in text and json.loads(text) == described
    assert load_diffusers_video_vae(folders / kind).describe() == described  # a reload
    assert load_diffusers_video_vae(folders / kind, dtype=torch.float16).describe() == described
    changed = build(kind)
    weight = next(p for n, p in changed.named_parameters() if n.startswith("decoder.conv_out") and "weight" in n)
    with torch.no_grad():
        weight.view(-1)[0] += 0.5
    changed.save_pretrained(tmp_path / "changed")
    other = load_diffusers_video_vae(tmp_path / "changed").describe()
    assert other["weights_digest"] != described["weights_digest"] and other["config"] == described["config"]


def test_a_pipeline_folder_with_vae_subfolder_loads(folders, tmp_path):
    build("wan").save_pretrained(tmp_path / "pipeline" / "vae")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    vae = load_diffusers_video_vae(tmp_path / "pipeline", tiling=True)
    assert vae.describe() == load_diffusers_video_vae(folders / "wan").describe()
    assert vae.vae.use_tiling and vae.vae.use_slicing
    assert not load_diffusers_video_vae(folders / "wan", slicing=False).vae.use_slicing


def test_unloadable_folders_and_bad_inputs_say_what_is_wrong(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers_video_vae(tmp_path)
    (tmp_path / "image").mkdir()
    (tmp_path / "image" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="_class_name='AutoencoderKL'"):
        load_diffusers_video_vae(tmp_path / "image")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((folders / "wan" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_diffusers_video_vae(tmp_path / "noweights")
    build("ltx", patch_size_t=2).save_pretrained(tmp_path / "ltx_pt2")
    with pytest.raises(ValueError, match="patch_size_t"):
        load_diffusers_video_vae(tmp_path / "ltx_pt2")
    cog = load_diffusers_video_vae(folders / "cogvideox")
    with pytest.raises(ValueError, match=r"1 \+ 8k frames \(e.g. 9 or 17\)"):
        cog.encode_raw(video(13))  # 4 latent frames would decode to 16 frames
    with pytest.raises(ValueError, match=r"1 \+ 8k"):
        cog.decode_raw(torch.zeros(1, 4, 4, 4, 4))
    wan = load_diffusers_video_vae(folders / "wan")
    with pytest.raises(ValueError, match=r"1 \+ 4k"):
        wan.encode_raw(video(16))  # diffusers would silently encode 13 of them
    with pytest.raises(ValueError, match="multiples of 8"):
        wan.encode_raw(video(9)[..., :20])
    with pytest.raises(ValueError, match="media_channels"):
        DiffusersVideoVAE(build("wan"), media_channels=2)


def test_a_cogvideox_with_fewer_blocks_than_its_ratio_needs_compresses_time_less():
    """Only the down blocks but the last halve time: with two blocks the ratio 4 of the config is 2."""
    blocks = {"down_block_types": ("CogVideoXDownBlock3D",) * 2, "up_block_types": ("CogVideoXUpBlock3D",) * 2}
    vae = DiffusersVideoVAE(build("cogvideox", block_out_channels=(8, 8), **blocks))
    assert (vae.temporal_factor, vae.spatial_factor, vae.frame_step) == (2, 2, 4)
    latent = vae.encode_raw(video(9)[..., :16, :16])
    assert latent.shape[2] == 5 and vae.decode_raw(latent).shape[2] == 9


def test_the_three_frame_rules_match_diffusers_outputs(folders):
    """What the rules are for: the lengths the raw diffusers models give back for other frame counts."""
    with torch.no_grad():
        cog = diffusers.AutoencoderKLCogVideoX.from_pretrained(folders / "cogvideox", low_cpu_mem_usage=False).eval()
        assert cog.decode(cog.encode(video(13)).latent_dist.mean).sample.shape[2] == 16
        wan = diffusers.AutoencoderKLWan.from_pretrained(folders / "wan", low_cpu_mem_usage=False).eval()
        assert wan.decode(wan.encode(video(16)).latent_dist.mean).sample.shape[2] == 13


def test_a_timestep_conditioned_ltx_decoder_decodes_deterministically(tmp_path):
    build("ltx", timestep_conditioning=True).save_pretrained(tmp_path / "ltx_t")
    vae = load_diffusers_video_vae(tmp_path / "ltx_t", decode_timestep=0.05)
    assert vae.describe()["decode_timestep"] == 0.05
    latent = vae.encode_raw(video(9))
    out = vae.decode_raw(latent)  # sliced: one clip per call
    assert torch.equal(out, vae.decode_raw(latent))
    with torch.no_grad():
        direct = [vae.vae.decode(z, torch.full((1,), 0.05)).sample for z in latent.split(1)]
        other_t = vae.vae.decode(latent[:1], torch.full((1,), 0.5)).sample
    assert torch.equal(out, torch.cat(direct)) and not torch.allclose(out[:1], other_t)
    whole = load_diffusers_video_vae(tmp_path / "ltx_t", decode_timestep=0.05, slicing=False)
    torch.testing.assert_close(whole.decode_raw(latent), out, rtol=1e-4, atol=1e-5)


def test_the_video_codec_uses_it_with_the_shipped_statistics(folders):
    from scm_mm_video.codec import VideoLatentCodec, load_autoencoder

    assert isinstance(load_autoencoder(folders / "wan"), DiffusersVideoVAE)
    vae = load_diffusers_video_vae(folders / "wan", media_channels=1)
    codec = VideoLatentCodec(vae, sigma_d=0.5)
    clips = ((video(9, channels=1) + 1) * 127.5).round().to(torch.uint8)
    x0 = codec.encode(clips)
    mean, std = (torch.tensor(TINY["wan"][1][key]).view(1, -1, 1, 1, 1) for key in ("latents_mean", "latents_std"))
    torch.testing.assert_close(x0, (vae.encode_raw(clips.float() / 127.5 - 1) - mean) * 0.5 / std)
    assert codec.decode(x0).shape == clips.shape and codec.decode(x0).dtype == torch.uint8


def test_the_codec_follows_the_frame_step_not_only_the_temporal_factor(folders):
    """CogVideoX (f = 4) takes back 8k + 1 frames: odd latent counts only."""
    from scm_mm_video.codec import VideoLatentCodec

    codec = VideoLatentCodec(folders / "cogvideox", mean=[0.0] * 4, std=[1.0] * 4)
    assert (codec.vae.temporal_factor, codec.vae.frame_step) == (4, 8)
    assert codec.latent_frames(9) == 3 and codec.frames_for(3) == 9
    with pytest.raises(ValueError, match=r"1 \+ 8k frames, e.g. 1 or 9"):
        codec.latent_frames(5)
    assert [codec.latent_frames_at_least(n) for n in (1, 2, 9, 10, 17)] == [1, 3, 3, 5, 5]
    assert codec.latent_frames_at_least(2, multiple=3) == 3
    with pytest.raises(ValueError, match="temporal patch 2"):
        codec.latent_frames_at_least(2, multiple=2)


def test_grey_clips_on_an_rgb_vae_from_a_folder_and_from_a_checkpoint_state(folders):
    from scm_mm_video.codec import VideoLatentCodec, codec_from_state

    codec = VideoLatentCodec(folders / "wan", media_channels=1)
    clips = ((video(5, channels=1) + 1) * 127.5).round().to(torch.uint8)
    x0 = codec.encode(clips)
    restored = codec_from_state(codec.state())
    assert restored.vae.in_channels == 1
    torch.testing.assert_close(restored.encode(clips), x0)
    assert restored.decode(x0).shape == clips.shape


class Fingerprinted(list):
    fingerprint = "clips"


def test_tiling_and_dtype_reach_the_diffusers_vae_through_the_codec_and_its_config(folders, tmp_path):
    from helpers import config
    from hydra.utils import instantiate

    from scm_mm.data import cache_key
    from scm_mm_video.autoencoder import save_video_vae, vae_preset
    from scm_mm_video.codec import VideoLatentCodec, as_dtype, codec_from_state

    calls = []  # latent frames per call of LTX-Video's decoder
    for tiling in (False, True):
        vae = load_diffusers_video_vae(folders / "ltx", tiling=tiling)
        handle = vae.vae.decoder.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[2]))
        latent = vae.encode_raw(video(25))  # 4 latent frames
        assert vae.decode_raw(latent).shape == (2, 3, 25, 32, 32)
        handle.remove()
    assert calls[:2] == [4, 4]  # whole clips, one per call (slicing)
    assert calls[2:] and max(calls[2:]) < 4  # with tiling: overlapping chunks of latent frames
    cfg = config("train", ["experiment=digits_teacher", f"modality.codec.vae={folders / 'ltx'}",
                           "modality.codec.tiling=true", "modality.codec.dtype=bfloat16",
                           "modality.codec.media_channels=1"])  # fmt: skip
    codec = instantiate(cfg.modality.codec)
    assert isinstance(codec, VideoLatentCodec) and codec.vae.dtype == torch.bfloat16
    assert codec.vae.vae.use_tiling and codec.vae.vae.use_framewise_decoding
    clips = ((video(9, channels=1) + 1) * 127.5).round().to(torch.uint8)
    assert codec.decode(codec.encode(clips)).shape == clips.shape
    # Run-time choices, not part of what a checkpoint records: the same state decodes with or without them.
    plain = codec_from_state(codec.state())
    assert plain.vae.dtype == torch.float32 and not plain.vae.vae.use_tiling
    raw = [(clips[0], -1)]  # a one-clip data set: the encode cache tells the two apart
    assert cache_key(Fingerprinted(raw), plain) != cache_key(Fingerprinted(raw), codec)
    assert codec.encoding() == {"dtype": "torch.bfloat16", "tiling": True}
    assert codec_from_state(codec.state(), tiling=True, dtype="float16").vae.dtype == torch.float16
    save_video_vae(vae_preset("digits", base_channels=8, groups=4), tmp_path / "own")
    with pytest.raises(ValueError, match="for diffusers VAEs"):
        VideoLatentCodec(tmp_path / "own", tiling=True)
    assert as_dtype("torch.bfloat16") == torch.bfloat16 and as_dtype(None) is None
    with pytest.raises(ValueError, match="floating-point"):
        as_dtype("int64")
