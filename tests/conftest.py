"""Shared fixtures: a tiny IDX dataset cut from the embedded MNIST, and a fast training config."""

import gzip
import struct

import numpy as np
import pytest
import torch

from mpdit.data.datasets import load_dataset


def write_idx(path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (gzip): magic 0x0000 08 ndim, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests use tiny tensors: one intra-op thread is faster, and immune to a busy machine's oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_idx(tmp_path_factory):
    """idx:PATH spec of 512 train and 128 test MNIST digits (the first ones of each split)."""
    folder = tmp_path_factory.mktemp("tiny_idx")
    for split, prefix, count in (("train", "train", 512), ("test", "t10k", 128)):
        data = load_dataset("mnist", split)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", data.images[:count, 0].numpy())
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", data.labels[:count].numpy())
    return f"idx:{folder}"
