"""The gradient noise scale estimator on a problem with a known gradient covariance, and `mpdit gradnoise`."""

import json
import math
import statistics

import pytest
import torch

from mpdit.cli.main import main
from mpdit.errors import MPDiTError
from mpdit.evaluation.noise_scales import write_noise_report
from mpdit.model.dit import load_model
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


def moments_of(gradients: list[torch.Tensor]) -> GradientMoments:
    moments = GradientMoments()
    for g in gradients:
        moments.add(g)
    return moments


def test_jackknife_leaves_out_each_batch_in_turn():
    """Each leave-one-out B from the two scalar sums equals GradientMoments on the K - 1 gradients left."""
    gen = torch.Generator().manual_seed(1)
    b, k = 4, 6
    gradients = [torch.tensor([1.0, -0.5, 2.0]) + torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(k)]
    moments = moments_of(gradients)
    dots = [moments.total.dot(g).item() for g in gradients]
    left_out = [moments_of(gradients[:i] + gradients[i + 1:]).noise_scale(b)["b_simple"] for i in range(k)]
    mean = sum(left_out) / k
    expected = math.sqrt((k - 1) / k * sum((v - mean) ** 2 for v in left_out))
    assert moments.jackknife_error(b, dots) == pytest.approx(expected, rel=1e-9)
    # the two scalar sums give the coordinate-wise variance's trace
    assert moments.noise_scale(b)["trace_sigma"] == pytest.approx(b * moments.variance().sum().item(), rel=1e-9)
    assert moments_of(gradients[:2]).jackknife_error(b, dots[:2]) is None  # 2 batches leave 1: no variance


def test_jackknife_error_matches_the_spread_of_repeated_measurements():
    """The known-covariance problem above measured 400 times with K = 32 batches: the jackknife standard error
    of one measurement is close to the standard deviation of B over the repeats."""
    gen = torch.Generator().manual_seed(2)
    G = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    s = torch.tensor([3.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    b, k = 8, 32
    values, errors = [], []
    for _ in range(400):
        gradients = list(G + s * torch.randn(k, b, 4, generator=gen, dtype=torch.float64).mean(1))
        moments = moments_of(gradients)
        values.append(moments.noise_scale(b)["b_simple"])
        errors.append(moments.jackknife_error(b, [moments.total.dot(g).item() for g in gradients]))
    spread = statistics.stdev(values)
    assert statistics.fmean(errors) == pytest.approx(spread, rel=0.1)


def test_gradnoise_command_reports_total_and_bins(tmp_path, tiny_idx, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "DiT-Nano/4", "--data", tiny_idx, "--steps", "2", "--batch-size", "16",
                 "--no-progress", "--out", str(run), "--objective", "flow"]) == 0
    capsys.readouterr()
    assert main(["gradnoise", "--ckpt", str(run), "--batches", "3", "--batch-size", "4", "--bins", "2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["objective"] == "flow" and result["weights"] == "raw" and len(result["bins"]) == 2
    assert result["step"] == 2
    assert result["bins"][0]["range"] == [0.0, 0.5] and result["total"]["trace_sigma"] > 0
    measured = [scale for scale in [result["total"], *result["bins"]] if scale["b_simple"] is not None]
    assert all(scale["b_simple_se"] is None or scale["b_simple_se"] > 0 for scale in measured)
    assert json.loads((run / "checkpoints/step-0000002/gradnoise.json").read_text())["total"] == result["total"]
    assert main(["gradnoise", "--ckpt", str(run), "--batches", "1"]) == 2
    assert "needs --batches >= 2" in capsys.readouterr().err


def test_bf16_error_sets_the_gradient_rounding_against_the_batch_noise(tmp_path, tiny_idx, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "DiT-Nano/4", "--data", tiny_idx, "--steps", "2", "--batch-size", "16",
                 "--no-progress", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["gradnoise", "--ckpt", str(run), "--bf16-error", "--batches", "3", "--batch-size", "8",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["written_to"].endswith("step-0000002/bf16-error.json") and result["batches"] == 3
    assert 0 < result["gradient_error"] < 1 and result["error_over_noise"] > 0  # bf16 rounds; fp32 is the reference
    assert list(result["output_errors"]) == ["block 0", "block 1", "output"]  # DiT-Nano: 2 blocks
    assert all(0 < error < 0.1 for error in result["output_errors"].values())
    assert all(abs(bias) <= error for bias, error in zip(result["output_scale_errors"].values(),
                                                         result["output_errors"].values()))
    worst = list(result["worst_parameters"].values())
    assert len(worst) == 5 and worst == sorted(worst, reverse=True) and worst[0] > 0
    parameters = {name for name, _ in load_model(run / "checkpoints/step-0000002").named_parameters()}
    assert set(result["worst_parameters"]) <= parameters
    assert main(["gradnoise", "--ckpt", str(run), "--bf16-error", "--batches", "1"]) == 2
    assert "needs --batches >= 2" in capsys.readouterr().err


def test_noise_report_summarizes_seeds_per_objective_row_and_step(tmp_path):
    def result(objective, row, seed, step, total, bins, batches=32, total_se=None):
        path = tmp_path / objective / row / f"seed-{seed}" / f"step-{step}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"objective": objective, "batches": batches, "batch_size": 64, "weights": "raw",
                                    "total": {"b_simple": total, "b_simple_se": total_se},
                                    "bins": [{"range": [k / 2, (k + 1) / 2], "b_simple": b} for k, b in enumerate(bins)]}))
        return path

    result("flow", "mp", 0, 1000, 10.0, [1.0, 100.0], total_se=3.0)
    result("flow", "mp", 1, 1000, 14.0, [3.0, None], total_se=4.0)  # a bin whose |G|^2 was not measurable
    result("flow", "dit", 0, 1000, 20.0, [2.0, 200.0], total_se=5.0)
    result("ddpm", "dit", 0, 2000, 5.0, [0.5, 50.0])
    (tmp_path / "ddpm-runs").mkdir()
    (tmp_path / "ddpm-runs" / "grid.json").write_text("{}")  # not in the layout: left alone
    text = write_noise_report(tmp_path).read_text()
    assert "32 batches of 64, raw weights" in text
    # se: the root mean square of the seeds' standard errors, sqrt((3^2 + 4^2) / 2)
    assert "| mp | 1,000 | 2 | 12 ± 2.8 (se 3.5) | 2 ± 1.4 | 100 (1 not measurable) |" in text
    assert "| dit | 1,000 | 1 | 20 (se 5) | 2 | 200 |" in text and text.index("### ddpm") < text.index("### flow")
    assert (tmp_path / "noise-scale.png").stat().st_size > 1000
    result("flow", "mp", 2, 1000, 1.0, [1.0, 1.0], batches=8)
    with pytest.raises(MPDiTError, match="mixes measurements of different protocols"):
        write_noise_report(tmp_path)
    result("ddpm", "mp", 2, 1000, 1.0, [1.0, 1.0]).rename(tmp_path / "flow/mp/seed-2/step-1000.json")
    with pytest.raises(MPDiTError, match="holds a ddpm measurement but lies under flow/"):
        write_noise_report(tmp_path)
    with pytest.raises(MPDiTError, match="holds no gradient noise results"):
        write_noise_report(tmp_path / "ddpm-runs")
