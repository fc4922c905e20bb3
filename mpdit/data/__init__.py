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

__all__ = [
    "ImageDataset",
    "center_crop_or_pad",
    "load_dataset",
    "mnist_data_dir",
    "read_idx",
    "to_model_space",
    "to_uint8",
]
