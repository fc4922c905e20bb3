"""Shared fixtures: a tiny IDX dataset cut from the embedded MNIST, and a fast training config."""

import gzip
import os
import socket
import struct

import numpy as np
import pytest
import torch

from mpdit.data.datasets import load_dataset
from mpdit.model.config import DiTConfig
from mpdit.training.train import TrainConfig, Trainer


def write_idx(path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (gzip): magic 0x0000 08 ndim, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def train_tiny_run(folder, data: str, steps: int, **options):
    """A DiT-Nano/4 all-MP scale-rotation-gate run of ``steps`` steps on MNIST-shaped ``data``, batch 16, checkpointed
    at its last step; returns ``folder``."""
    model_cfg = DiTConfig.from_preset("DiT-Nano/4", input_size=28, in_channels=1, num_classes=10, mp="all",
                                      conditioning="scale-rotation-gate")
    Trainer(folder, model_cfg, TrainConfig(data=data, image_size=28, steps=steps, batch_size=16, ckpt_every=steps,
                                           progress=False, **options)).run()
    return folder


def two_process_env() -> tuple[dict, int]:
    """The environment and a free local port for a 2-process gloo run under torch.distributed.run."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}, port


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


@pytest.fixture(scope="session")
def shifted_idx(tmp_path_factory, tiny_idx):
    """idx:PATH spec of the tiny set with every label moved to the next class: 10 classes, not MNIST's."""
    folder = tmp_path_factory.mktemp("shifted_idx")
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = load_dataset(tiny_idx, split)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", data.images[:, 0].numpy())
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", ((data.labels + 1) % 10).numpy())
    return f"idx:{folder}"


@pytest.fixture(scope="session")
def shifted_classifier(tmp_path_factory, shifted_idx):
    """Folder of a classifier trained for a few steps on shifted_idx by `mpdit classifier`."""
    from mpdit.cli.main import main

    folder = tmp_path_factory.mktemp("shifted_classifier")
    assert main(["classifier", "--data", shifted_idx, "--out", str(folder), "--epochs", "6", "--batch-size", "64",
                 "--quiet"]) == 0
    return folder
