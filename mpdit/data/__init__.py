"""Datasets: the embedded MNIST, IDX files and image folders, all as uint8 ImageDataset."""

from mpdit.data.datasets import (
    ImageDataset,
    center_crop_or_pad,
    load_dataset,
    mnist_data_dir,
    read_idx,
    to_model_space,
    to_uint8,
)
from mpdit.data import latents  # noqa: F401, E402 (registers the latents:PATH spec with load_dataset)

__all__ = [
    "ImageDataset",
    "center_crop_or_pad",
    "load_dataset",
    "mnist_data_dir",
    "read_idx",
    "to_model_space",
    "to_uint8",
]
