"""A small CNN classifier of our own for the embedded dataset (MNIST 28x28 grayscale).

It gives an offline metric with no download and no GPU: the class accuracy of conditional
samples, and a Fréchet distance in its penultimate (feature) layer. The packaged weights live
in ``mpdit/evaluation/weights/mnist_classifier.safetensors`` (+ ``.json`` with the recipe) and
were made by ``mpdit classifier --data mnist --out OUT --seed 0`` (see docs/evaluation.md).

Input convention: uint8 images -> ``to_model_space`` (x / 127.5 - 1, range [-1, 1]) at the
classifier's input size; other sizes are brought to it with ``center_crop_or_pad``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mpdit.data import ImageDataset, center_crop_or_pad, load_dataset, to_model_space
from mpdit.errors import MPDiTError
from mpdit.files import strict_json

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PACKAGED_WEIGHTS = WEIGHTS_DIR / "mnist_classifier.safetensors"
FORMAT = "mpdit-classifier-v1"
NORMALIZATION = "x / 127.5 - 1 (uint8 0..255 -> [-1, 1])"


class SmallCNN(nn.Module):
    """Three conv3x3-BatchNorm-ReLU blocks (max-pooled to 14, 7, then 3x3) -> linear layer to
    ``feature_dim`` ReLU features -> dropout -> linear head (52,410 parameters for MNIST).

    ``features(x)`` is the penultimate layer used for the Fréchet distance; ``forward(x)``
    gives logits. ``x`` is float in [-1, 1], shape (N, in_channels, input_size, input_size).
    """

    def __init__(
        self,
        in_channels: int = 1,
        input_size: int = 28,
        num_classes: int = 10,
        channels: tuple[int, int, int] = (16, 32, 32),
        feature_dim: int = 128,
        dropout: float = 0.25,
    ):
        super().__init__()
        c1, c2, c3 = channels
        self.config = {
            "in_channels": int(in_channels),
            "input_size": int(input_size),
            "num_classes": int(num_classes),
            "channels": [int(c) for c in channels],
            "feature_dim": int(feature_dim),
            "dropout": float(dropout),
        }
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1, bias=False),
            nn.BatchNorm2d(c3),
            nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool2d(3),
            nn.Flatten(),
            nn.Linear(c3 * 9, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def input_size(self) -> int:
        return self.config["input_size"]

    @property
    def in_channels(self) -> int:
        return self.config["in_channels"]

    @property
    def num_features(self) -> int:
        return self.config["feature_dim"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))

    def prepare(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float model input: crop/pad to input_size, [-1, 1]."""
        if images_uint8.ndim != 4:
            raise MPDiTError(f"expected images of shape (N, C, H, W), got {tuple(images_uint8.shape)}")
        if images_uint8.dtype != torch.uint8:
            raise MPDiTError(f"expected uint8 images (0..255), got {images_uint8.dtype}: convert with mpdit.data.to_uint8")
        channels = images_uint8.shape[1]
        if channels != self.in_channels:
            if self.in_channels == 1 and channels == 3:
                images_uint8 = images_uint8.float().mean(dim=1, keepdim=True).round().to(torch.uint8)
            else:
                raise MPDiTError(f"the classifier takes {self.in_channels}-channel images, got {channels} channels")
        images_uint8 = center_crop_or_pad(images_uint8, self.input_size)
        param = next(self.parameters())
        return to_model_space(images_uint8).to(param.device)


@torch.no_grad()
def predict(classifier: SmallCNN, images_uint8: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 (N, D), predicted labels int64 (N,)) for uint8 images."""
    classifier.eval()
    features, predictions = [], []
    for start in range(0, images_uint8.shape[0], batch_size):
        x = classifier.prepare(images_uint8[start : start + batch_size])
        f = classifier.features(x)
        features.append(f.float().cpu())
        predictions.append(classifier.head(f).argmax(dim=1).cpu())
    if not features:
        raise MPDiTError("no images given to the classifier")
    return torch.cat(features), torch.cat(predictions)


def accuracy(classifier: SmallCNN, images_uint8: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of images whose predicted class equals ``labels``."""
    _, predictions = predict(classifier, images_uint8, batch_size)
    return float((predictions == torch.as_tensor(labels, dtype=torch.int64).cpu()).double().mean())


def train_classifier(
    data: str = "mnist",
    seed: int = 0,
    epochs: int = 2,
    lr: float = 2e-3,
    batch_size: int = 128,
    max_steps: int | None = None,
    weight_decay: float = 1e-4,
    augment: bool = False,
    progress: bool = True,
    log=print,
) -> tuple[SmallCNN, dict]:
    """Train a SmallCNN on ``data``'s train split, deterministically for a seed (CPU).

    AdamW at ``lr`` with a cosine decay to 0 over the run, shuffling from a seeded generator,
    optional random shifts of up to 2 px (``augment``, off by default). Bit-identical reruns for
    a seed on the same machine and thread count. Returns the model in eval mode and the recipe
    (with the measured test accuracy).
    """
    if epochs < 1 or batch_size < 1 or lr <= 0 or (max_steps is not None and max_steps < 1):
        raise MPDiTError("epochs, batch size, lr and max steps must be positive")
    torch.manual_seed(seed)
    train = load_dataset(data, "train")
    test = load_dataset(data, "test")
    if train.resolution[0] != train.resolution[1]:
        raise MPDiTError(f"the classifier needs square images, {data} has {train.resolution}")
    model = SmallCNN(train.channels, train.resolution[0], train.num_classes)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    generator = torch.Generator().manual_seed(seed)
    images = to_model_space(train.images)
    size = train.resolution[0]
    step, start = 0, time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for first in range(0, len(train), batch_size):
            if step >= total_steps:
                break
            index = order[first : first + batch_size]
            x = images[index]
            # augmentation: shift by up to 2 px in each direction (pad with background -1, crop)
            if augment:
                shift = torch.randint(0, 5, (2,), generator=generator).tolist()
                x = F.pad(x, (2, 2, 2, 2), value=-1.0)[:, :, shift[0] : shift[0] + size, shift[1] : shift[1] + size]
            loss = F.cross_entropy(model(x), train.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if progress and (step % 100 == 0 or step == total_steps):
                log(f"step {step}/{total_steps} epoch {epoch + 1} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    train_seconds = time.perf_counter() - start
    model.eval()
    test_accuracy = accuracy(model, test.images, test.labels)
    recipe = {
        "format": FORMAT,
        "architecture": "SmallCNN",
        "config": model.config,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "recipe": {
            "data": data,
            "train_images": len(train),
            "seed": seed,
            "epochs": epochs,
            "max_steps": max_steps,
            "steps": step,
            "batch_size": batch_size,
            "optimizer": "AdamW",
            "lr": lr,
            "lr_schedule": "cosine to 0 over the steps, per step",
            "weight_decay": weight_decay,
            "dropout": model.config["dropout"],
            "augmentation": "random shift of 0..4 px after padding by 2 (same shift for a whole batch)"
            if augment
            else "none",
            "input_size": size,
            "normalization": NORMALIZATION,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "test_images": len(test),
        "test_accuracy": test_accuracy,
        "train_seconds": round(train_seconds, 1),
    }
    if progress:
        log(f"test accuracy {test_accuracy:.4f} on {len(test)} images; trained {step} steps in {train_seconds:.0f} s")
    return model, recipe


def save_classifier(model: SmallCNN, out, recipe: dict, name: str = "classifier") -> tuple[Path, Path]:
    """Write ``out/NAME.safetensors`` (weights, config in metadata) and ``out/NAME.json`` (recipe)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights_path, json_path = out / f"{name}.safetensors", out / f"{name}.json"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # a single metadata key: safetensors writes several keys in random order (files would differ)
    header = {"format": FORMAT, "architecture": "SmallCNN", "config": model.config}
    metadata = {"mpdit": strict_json(header, "the classifier header", sort_keys=True)}
    save_file(state, str(weights_path), metadata=metadata)
    json_path.write_text(strict_json(recipe, "the classifier recipe", indent=2) + "\n")
    return weights_path, json_path


def classifier_weights(path=None) -> Path:
    """The weights file a ``--classifier`` value names: PATH, PATH/classifier.safetensors for a folder, or the
    packaged MNIST weights for None."""
    path = PACKAGED_WEIGHTS if path is None else Path(path)
    return path / "classifier.safetensors" if path.is_dir() else path


def classifier_name(path=None) -> str:
    """How results name the classifier a ``--classifier`` value selects: the weights file it names, or the packaged
    MNIST weights by their place in the package (the same on every install)."""
    if path is None:
        return f"packaged: mpdit/evaluation/weights/{PACKAGED_WEIGHTS.name}"
    return str(classifier_weights(path))


_LOADED: dict = {}


def load_classifier(path=None, device="cpu") -> SmallCNN:
    """Load a classifier in eval mode: the packaged MNIST one by default, else a .safetensors file
    (or a folder holding ``classifier.safetensors``) written by ``mpdit classifier``."""
    from safetensors import safe_open

    path = classifier_weights(path)
    if not path.is_file():
        hint = " (the packaged weights are missing: reinstall mpdit)" if path == PACKAGED_WEIGHTS else ""
        raise MPDiTError(f"classifier weights {path} not found{hint}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        header = json.loads(metadata.get("mpdit", "{}"))
        if header.get("format") != FORMAT:
            raise ValueError(f"not an mpdit classifier (format {header.get('format')!r})")
        config = dict(header["config"])
        config["channels"] = tuple(config["channels"])
        model = SmallCNN(**config)
        model.load_state_dict(state)
    except MPDiTError:
        raise
    except Exception as error:  # safetensors raises its own error types for corrupt files
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise MPDiTError(f"cannot load classifier weights {path}: {message}") from None
    return model.to(device).eval()


def default_classifier() -> SmallCNN:
    """The packaged classifier, loaded once per process."""
    if "default" not in _LOADED:
        _LOADED["default"] = load_classifier()
    return _LOADED["default"]


NO_CLASSIFIER = "none"  # --classifier none: no classifier metrics (Inception FID alone)
# The packaged MNIST classifier gets ~99% of MNIST test digits right; below this on a dataset's real test
# images, that dataset is not MNIST and the classifier's FD and accuracy would mean nothing.
MIN_PACKAGED_ACCURACY = 0.5


def scoring_classifier(path, data: str, reference: ImageDataset, num_classes: int) -> tuple[SmallCNN, dict]:
    """The classifier that scores samples of ``data``, and the record a result keeps about it.

    ``path``: weights written by ``mpdit classifier --data SPEC`` (a .safetensors file or its folder), or None
    for the packaged MNIST classifier. ``reference``: real test images of ``data`` with their labels; the
    classifier's accuracy on them is recorded, and the packaged classifier is refused when it is below
    MIN_PACKAGED_ACCURACY (the data is not MNIST) or when its classes differ from the model's ``num_classes``.
    """
    weights = classifier_weights(path)
    classifier = default_classifier() if path is None else load_classifier(weights)
    fix = (f": train one for it with `mpdit classifier --data {data} --out CLASSIFIER` and pass --classifier "
           "CLASSIFIER (or --classifier none --inception for Inception FID alone)") if path is None else ""
    name = "the packaged MNIST classifier" if path is None else f"classifier {weights}"
    if classifier.config["num_classes"] != num_classes:
        raise MPDiTError(f"{name} has {classifier.config['num_classes']} classes, the model {num_classes}{fix}")
    reference_accuracy = accuracy(classifier, reference.images, reference.labels)
    if path is None and reference_accuracy < MIN_PACKAGED_ACCURACY:
        raise MPDiTError(f"{name} labels only {reference_accuracy:.0%} of {len(reference)} real {data} test "
                         f"images correctly, so {data} is not MNIST{fix}")
    recipe_path = weights.with_suffix(".json")
    recipe = json.loads(recipe_path.read_text()) if recipe_path.is_file() else {}
    return classifier, {"weights": classifier_name(path), "trained_on": recipe.get("recipe", {}).get("data"),
                        "test_accuracy": recipe.get("test_accuracy"), "reference_accuracy": reference_accuracy}


def classifier_test_accuracy(classifier: SmallCNN | None = None, data: str = "mnist", num_images: int | None = None) -> float:
    """Accuracy on the test split (the first ``num_images`` images, or all of them)."""
    classifier = classifier or default_classifier()
    test: ImageDataset = load_dataset(data, "test")
    n = len(test) if num_images is None else min(num_images, len(test))
    return accuracy(classifier, test.images[:n], test.labels[:n])
