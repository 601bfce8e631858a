"""Image codecs: exact pixel round trip; SD-VAE codec on a tiny random diffusers AutoencoderKL from a local folder."""

import json
import shutil

import pytest
import torch
from helpers import config
from hydra.utils import instantiate

from scm_mm.modality import Codec, codec_to
from scm_mm.train.build import build_model, load_teacher
from scm_mm.train.checkpoint import save_checkpoint
from scm_mm_image.codecs import PixelCodec, SDVAECodec, codec_from_state, latent_statistics

# ------------------------------------------------------------------------------------------- pixels


def test_pixel_codec_exact_round_trip():
    codec = PixelCodec()
    assert isinstance(codec, Codec) and codec.sigma_d == 0.5 and not codec.cacheable
    media = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 1, 16, 16).repeat(2, 3, 1, 1)
    x0 = codec.encode(media)
    assert x0.dtype == torch.float32 and x0.min() == -1 and x0.max() == 1
    assert torch.equal(x0, media.double().sub(127.5).div(127.5).float())  # correctly rounded k / 127.5 - 1
    assert torch.equal(x0.flatten()[:256], -x0.flatten()[:256].flip(0))  # symmetric about 127.5
    assert torch.equal(codec.decode(x0), media)
    assert codec.decode(torch.tensor([-3.0, -1.0, 0.0, 0.999, 5.0]).view(1, 1, 1, 5)).flatten().tolist() == [
        0, 0, 128, 255, 255,
    ]  # clamped to [-1, 1], then rounded: 0 -> 127.5 -> 128 (half to even gives 128)
    with pytest.raises(TypeError, match="uint8"):
        codec.encode(media.float())


def test_pixel_codec_state():
    codec = PixelCodec(channels=3)
    assert codec.state() == {"kind": "pixels", "sigma_d": 0.5, "channels": 3}
    rebuilt = codec_from_state(json.loads(json.dumps(codec.state())))
    assert isinstance(rebuilt, PixelCodec) and rebuilt.state() == codec.state()
    with pytest.raises(ValueError, match="3 channels"):
        codec.encode(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown image codec kind"):
        codec_from_state({"kind": "mel"})


# --------------------------------------------------------------------------------------------- VAE


def _save_vae(folder, seed=0, **config):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        **config,
    )
    vae.save_pretrained(folder)
    return vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    _save_vae(folder)
    return folder


def _images(n=3, size=16, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_sd_vae_codec_shapes_and_raw_units(vae_dir):
    codec = SDVAECodec(vae_dir, batch_size=2)  # 3 images: two batches
    assert isinstance(codec, Codec) and codec.cacheable
    media = _images()
    x0 = codec.encode(media)
    assert x0.shape == (3, 4, 8, 8) and x0.dtype == torch.float32  # 2 blocks: downsampling by 2
    # x0 normalises the RAW posterior mean (before scaling_factor) per channel: x0 = (latent - mean) * sigma_d / std
    latent = codec.vae.encode(media.float() / 127.5 - 1).latent_dist.mean
    mean, std = torch.tensor(codec.mean).view(1, 4, 1, 1), torch.tensor(codec.std).view(1, 4, 1, 1)
    torch.testing.assert_close(x0, (latent - mean) * 0.5 / std, rtol=1e-5, atol=1e-6)
    decoded = codec.decode(x0)
    assert decoded.shape == (3, 3, 16, 16) and decoded.dtype == torch.uint8
    with torch.no_grad():
        expected = codec.vae.decode(latent).sample
    assert torch.equal(decoded, ((expected.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))


def test_sd_vae_normalization_is_exactly_inverted(vae_dir):
    codec = SDVAECodec(vae_dir)
    latent = torch.randn(2, 4, 3, 3, dtype=torch.float64) * 5 + 1
    x0 = codec.normalize(latent)
    assert x0.dtype == torch.float64
    for c in range(4):
        expected = (latent[:, c] - codec.mean[c]) * codec.sigma_d / codec.std[c]
        torch.testing.assert_close(x0[:, c], expected, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(codec.denormalize(x0), latent, rtol=1e-14, atol=1e-14)


def test_sd_vae_sampling_is_seeded(vae_dir):
    codec = SDVAECodec(vae_dir, sample=True)
    media = _images(2)
    a = codec.encode(media, generator=torch.Generator().manual_seed(1))
    b = codec.encode(media, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, SDVAECodec(vae_dir).encode(media))


def test_sd_vae_state_and_compatibility(vae_dir, tmp_path):
    codec = SDVAECodec(vae_dir, mean=(0.1, 0.2, 0.3, 0.4), std=(1, 2, 3, 4), sigma_d=0.5)
    state = json.loads(json.dumps(codec.state()))  # as stored with a checkpoint
    assert state["kind"] == "sd-vae" and state["path"] == str(vae_dir)
    assert state["mean"] == [0.1, 0.2, 0.3, 0.4] and state["std"] == [1, 2, 3, 4] and state["sigma_d"] == 0.5
    assert state["latent_channels"] == 4 and state["block_out_channels"] == [8, 16]
    assert state["scaling_factor"] == 0.18215 and state["sample"] is False
    codec.check_compatible(state)

    # the same VAE elsewhere: fine, given the new path
    _save_vae(tmp_path / "moved")
    moved = codec_from_state(state, path=tmp_path / "moved")
    assert torch.equal(moved.encode(_images(1)), codec.encode(_images(1)))

    # another VAE (other weights and scaling factor) at the checkpoint's path: refused, field by field
    _save_vae(tmp_path / "other", seed=1, scaling_factor=0.13025)
    with pytest.raises(ValueError, match="scaling_factor") as error:
        codec_from_state(state, path=tmp_path / "other")
    assert "weights_digest" in str(error.value) and "mean" not in str(error.value)
    with pytest.raises(ValueError, match=r"mean: \[0.1, 0.2, 0.3, 0.4\] != \[1.56"):
        SDVAECodec(vae_dir).check_compatible(state)


def _latent_teacher(run_dir, codec):
    """A one-checkpoint run of a tiny latent U-Net trained (notionally) with `codec`; returns its spec."""
    spec = {"net": {"_target_": "scm_mm.nn.unet.UNet", "in_channels": 4, "model_channels": 8, "channel_mult": [1],
                    "num_blocks": 1, "groups": 4}, "precond": {"sigma_d": 0.5}}  # fmt: skip
    model = build_model(spec)
    save_checkpoint(run_dir, 1, model=model.state_dict(), ema={}, state={}, rank_states={},
                    meta={"model": spec, "codec": json.loads(json.dumps(codec.state()))})  # fmt: skip
    return spec


def test_a_latent_teacher_distils_with_its_vae_at_another_path(vae_dir, tmp_path):
    """The same VAE copied elsewhere (another machine's disk) is the teacher's codec; another VAE is not."""
    spec = _latent_teacher(tmp_path / "teacher", SDVAECodec(vae_dir))
    shutil.copytree(vae_dir, tmp_path / "copy")
    teacher, student = load_teacher(tmp_path / "teacher", spec, SDVAECodec(tmp_path / "copy").state())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())
    _save_vae(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="codec.weights_digest") as error:
        load_teacher(tmp_path / "teacher", spec, SDVAECodec(tmp_path / "other").state())
    assert "path" not in str(error.value)


def test_codecs_move_their_network_and_pixels_have_none(vae_dir):
    codec = SDVAECodec(vae_dir, dtype=torch.float64)
    assert codec_to(codec, "meta") is codec
    assert {(p.device.type, p.dtype) for p in codec.vae.parameters()} == {("meta", torch.float64)}
    pixels = PixelCodec()
    assert codec_to(pixels, "meta") is pixels


@pytest.mark.parametrize(
    ("name", "dtype"), [("float16", torch.float16), ("torch.bfloat16", torch.bfloat16), (None, torch.float32)]
)
def test_sd_vae_dtype_by_name_as_a_config_gives_it(vae_dir, name, dtype):
    codec = SDVAECodec(vae_dir, dtype=name)
    assert {p.dtype for p in codec.vae.parameters()} == {dtype}
    assert codec.encode(_images(1)).dtype == torch.float32  # x0 in fp32 whatever the VAE computes in


def test_latent_cache_is_keyed_by_the_vae_dtype_not_its_folder(vae_dir, tmp_path):
    """A data set encoded in bf16 is not read back for a float32 run (nor the other way round); a copy of the
    VAE in another folder, in the same dtype, reads the same cache."""
    from scm_mm.data import cache_key
    from scm_mm_image.data import MNIST

    digits = MNIST(resolution=16)
    shutil.copytree(vae_dir, tmp_path / "copy")
    fp32, bf16 = SDVAECodec(vae_dir), SDVAECodec(vae_dir, dtype="bfloat16")
    assert fp32.state() == bf16.state()  # a checkpoint decodes with either
    assert cache_key(digits, fp32) != cache_key(digits, bf16)
    assert cache_key(digits, fp32) == cache_key(digits, SDVAECodec(tmp_path / "copy"))


def test_image_latent_config_sets_the_vae_dtype(vae_dir):
    cfg = config("train", ["modality=image_latent", f"modality.codec.path={vae_dir}", "modality.codec.dtype=bfloat16"])
    codec = instantiate(cfg.modality.codec)
    assert {p.dtype for p in codec.vae.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="floating-point torch dtype"):
        SDVAECodec(vae_dir, dtype="int64")


def test_sd_vae_missing_path_and_pipeline_folder(tmp_path, vae_dir):
    with pytest.raises(FileNotFoundError, match=r"no diffusers AutoencoderKL at .*nowhere.*config\.json"):
        SDVAECodec(tmp_path / "nowhere")
    _save_vae(tmp_path / "pipeline" / "vae")  # a Stable Diffusion pipeline folder
    assert SDVAECodec(tmp_path / "pipeline").state()["weights_digest"] == SDVAECodec(vae_dir).state()["weights_digest"]
    with pytest.raises(ValueError, match="4 latent channels"):
        SDVAECodec(vae_dir, mean=(0.0,) * 3, std=(1.0,) * 3)


def test_latent_statistics_normalise_to_sigma_d(vae_dir):
    media = _images(6, seed=3)
    dataset = [(image, -1) for image in media]
    mean, std = latent_statistics(SDVAECodec(vae_dir), dataset, n=6, batch_size=4)
    assert len(mean) == len(std) == 4
    x0 = SDVAECodec(vae_dir, mean=mean, std=std).encode(media)
    torch.testing.assert_close(x0.mean((0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(x0.std((0, 2, 3), correction=0), torch.full((4,), 0.5), rtol=0, atol=1e-5)
