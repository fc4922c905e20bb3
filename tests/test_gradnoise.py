"""The gradient noise scale estimator on a problem with a known gradient covariance, and `mpdit gradnoise`."""

import json

import pytest
import torch

from mpdit.cli.main import main
from mpdit.training.gradnoise import GradientMoments


def test_estimator_recovers_a_known_gradient_covariance():
    """Per-example gradients G + e, e ~ N(0, diag(s^2)): a batch of b has covariance diag(s^2) / b, so
    tr(Sigma) = sum s^2 and B_simple = sum s^2 / |G|^2."""
    gen = torch.Generator().manual_seed(0)
    G = torch.tensor([1.0, -2.0, 0.5, 0.0])
    s = torch.tensor([3.0, 1.0, 2.0, 4.0])
    b, k = 8, 4000
    moments = GradientMoments()
    for _ in range(k):
        examples = G + s * torch.randn(b, 4, generator=gen, dtype=torch.float64)
        moments.add(examples.mean(0))
    result = moments.noise_scale(b)
    assert result["trace_sigma"] == pytest.approx(30.0, rel=0.05)
    assert result["grad_norm_sq"] == pytest.approx(5.25, rel=0.03)
    assert result["b_simple"] == pytest.approx(30.0 / 5.25, rel=0.06)
    # the plain |g_bar|^2 carries the variance of the mean, tr(Sigma) / (b k)
    assert result["grad_norm_sq_biased"] - result["grad_norm_sq"] == pytest.approx(result["trace_sigma"] / (b * k))


def test_gradnoise_command_reports_total_and_bins(tmp_path, tiny_idx, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "DiT-Nano/4", "--data", tiny_idx, "--steps", "2", "--batch-size", "16",
                 "--no-progress", "--out", str(run), "--objective", "flow"]) == 0
    capsys.readouterr()
    assert main(["gradnoise", "--ckpt", str(run), "--batches", "3", "--batch-size", "4", "--bins", "2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["objective"] == "flow" and result["weights"] == "raw" and len(result["bins"]) == 2
    assert result["bins"][0]["range"] == [0.0, 0.5] and result["total"]["trace_sigma"] > 0
    assert json.loads((run / "checkpoints/step-0000002/gradnoise.json").read_text())["total"] == result["total"]
    assert main(["gradnoise", "--ckpt", str(run), "--batches", "1"]) == 2
    assert "needs --batches >= 2" in capsys.readouterr().err
