"""Tests for mpdit.training.ema: classic EMA, EDM2 power-function EMA, snapshots, post-hoc reconstruction, `mpdit ema`."""

import argparse
import json

import numpy as np
import pytest
import torch

import mpdit.cli.ema as cli_ema
import mpdit.cli.main as cli_main
from mpdit.errors import MPDiTError
from mpdit.training.checkpoint import load_safetensors, load_torch, read_safetensors_metadata, save_torch
from mpdit.training.ema import (
    SIGMA_REL_MAX,
    ClassicEMA,
    PowerFunctionEMA,
    gamma_to_sigma_rel,
    list_snapshots,
    posthoc_coefficients,
    posthoc_fit_error,
    posthoc_plan,
    power_ema_weights,
    reconstruct,
    save_snapshot,
    sigma_rel_to_gamma,
)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def _set(model, value: float):
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.fill_(value)
        model.count += 1


# ----------------------------------------------------------------------------- sigma_rel <-> gamma


def test_sigma_rel_gamma_facts():
    # EDM2 paper: sigma_rel 0.05 <-> gamma 16.97, sigma_rel 0.10 <-> gamma 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    for gamma in (0.01, 0.5, 1.0, 6.94, 16.97, 80.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9)
    for s in (0.001, 0.03, 0.07, 0.2, 0.288):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    assert SIGMA_REL_MAX == pytest.approx(gamma_to_sigma_rel(0.0))
    for bad in (0.0, -0.1, 0.29, float("nan")):
        with pytest.raises(MPDiTError, match="sigma_rel must be in"):
            sigma_rel_to_gamma(bad)


def test_profile_weights_have_relative_std_sigma_rel():
    """sigma_rel is the std of the averaging profile over training time, relative to t."""
    t = 20000
    for s in (0.05, 0.10, 0.2):
        w = power_ema_weights(t, s)
        assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
        tau = (np.arange(1, t + 1) - 0.5) / t
        mean = (w * tau).sum()
        assert np.sqrt((w * (tau - mean) ** 2).sum()) == pytest.approx(s, rel=1e-3)


# ----------------------------------------------------------------------------- classic EMA


def test_classic_ema_of_constant_stays_constant_and_loads_into_model():
    model = Tiny()
    _set(model, 0.37)
    ema = ClassicEMA(model, decay=0.9)
    for _ in range(50):
        model.count += 1
        ema.update(model)
    sd = ema.state_dict()
    assert list(sd) == list(model.state_dict())
    assert all(torch.all(v == 0.37) for k, v in sd.items() if v.is_floating_point())
    assert sd["count"].item() == 51  # integer buffers are copied, not averaged
    other = Tiny()
    other.load_state_dict(sd)
    ema.copy_to(other)
    assert torch.all(other.lin.weight == 0.37)


def test_classic_ema_matches_closed_form():
    rng = np.random.default_rng(1)
    seq = rng.standard_normal((30, 4))
    d = 0.8
    params = {"p": torch.tensor(seq[0])}
    ema = ClassicEMA(params, decay=d)
    for k in range(1, 30):
        params["p"].copy_(torch.from_numpy(seq[k]))
        ema.update(params)
    n = 29  # ema_n = d^n p_0 + sum_k (1-d) d^(n-k) p_k
    expected = d**n * seq[0] + sum((1 - d) * d ** (n - k) * seq[k] for k in range(1, n + 1))
    np.testing.assert_allclose(ema.state_dict()["p"].numpy(), expected, rtol=1e-12)


def test_classic_ema_low_precision_and_mismatch():
    model = Tiny().to(torch.bfloat16)
    ema = ClassicEMA(model, decay=0.999)
    assert ema.state_dict()["lin.weight"].dtype == torch.float32
    ema.update(model)
    with pytest.raises(MPDiTError, match="missing"):
        ema.load_state_dict({"lin.weight": torch.zeros(2, 3)})
    with pytest.raises(MPDiTError, match="EMA tracks"):
        ema.update(torch.nn.Linear(3, 2))


# ----------------------------------------------------------------------------- power-function EMA


def test_power_ema_equals_explicit_weighted_average():
    rng = np.random.default_rng(2)
    seq = np.cumsum(rng.standard_normal(60))
    params = {"p": torch.tensor([123.0], dtype=torch.float64)}  # initial value gets weight 0
    ema = PowerFunctionEMA(params, sigma_rels=(0.05, 0.10, 0.25))
    for x in seq:
        params["p"].fill_(x)
        ema.update(params)
    assert ema.num_updates == 60
    for s in ema.sigma_rels:
        gamma = sigma_rel_to_gamma(s)
        rec = 0.0  # independent recursion in Python floats
        for t, x in enumerate(seq, start=1):
            beta = (1 - 1 / t) ** (gamma + 1)
            rec = beta * rec + (1 - beta) * x
        k = np.arange(1, 61)
        w = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / 60 ** (gamma + 1)
        assert rec == pytest.approx(float(w @ seq), rel=1e-10)
        assert ema.shadow(s)["p"].item() == pytest.approx(rec, rel=1e-10)
        np.testing.assert_allclose(power_ema_weights(60, s), w, rtol=1e-10)


def test_power_ema_state_dict_roundtrip_resumes_exactly(tmp_path):
    model = Tiny()
    ema = PowerFunctionEMA(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(7):
        _set(model, torch.rand((), generator=gen).item())
        ema.update(model)
    save_torch(tmp_path / "ema.pt", ema.state_dict())
    resumed = PowerFunctionEMA(Tiny())
    resumed.load_state_dict(load_torch(tmp_path / "ema.pt"))  # weights_only=True
    assert resumed.num_updates == 7
    for _ in range(5):
        _set(model, torch.rand((), generator=gen).item())
        ema.update(model)
        resumed.update(model)
    for a, b in zip(ema.shadows, resumed.shadows):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(MPDiTError, match="sigma_rels"):
        PowerFunctionEMA(Tiny(), (0.05, 0.15)).load_state_dict(ema.state_dict())
    target = Tiny()
    ema.copy_to(target, 0.10)
    assert torch.equal(target.lin.weight, ema.shadow(0.10)["lin.weight"])


def test_power_ema_argument_errors():
    with pytest.raises(MPDiTError, match="sigma_rel must be in"):
        PowerFunctionEMA(Tiny(), (0.05, 0.3))
    with pytest.raises(MPDiTError, match="distinct"):
        PowerFunctionEMA(Tiny(), (0.05, 0.05))
    with pytest.raises(MPDiTError, match="3 decimals"):
        PowerFunctionEMA(Tiny(), (0.0725,))
    with pytest.raises(MPDiTError, match="not tracked"):
        PowerFunctionEMA(Tiny()).shadow(0.07)


# ----------------------------------------------------------------------------- snapshots and post-hoc EMA

STEPS, EVERY = 400, 40


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A random-walk parameter (float32 vector + float64 scalar + int buffer) with power EMAs tracked
    at 0.05/0.10 (snapshots every 40 steps) and, for reference, directly at 0.07."""
    run = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(3)
    walk = np.cumsum(rng.standard_normal((STEPS, 33)), axis=0)
    params = {"w": torch.zeros(32), "b": torch.zeros((), dtype=torch.float64), "n": torch.zeros((), dtype=torch.long)}
    ema = PowerFunctionEMA(params, (0.05, 0.10))
    ref = PowerFunctionEMA(params, (0.07,))
    for step in range(1, STEPS + 1):
        params["w"].copy_(torch.from_numpy(walk[step - 1, :32]))
        params["b"].fill_(walk[step - 1, 32])
        params["n"].fill_(step)
        ema.update(params)
        ref.update(params)
        if step % EVERY == 0:
            save_snapshot(run, step, ema)
    return run, ema, ref


def test_snapshot_files(trained_run):
    run, ema, _ref = trained_run
    names = sorted(p.name for p in (run / "ema_snapshots").iterdir())
    assert len(names) == 2 * STEPS // EVERY
    assert names[:2] == ["step-0000040-sigma-0.050.safetensors", "step-0000040-sigma-0.100.safetensors"]
    snaps = list_snapshots(run)
    assert [(s, g) for s, g, _ in snaps[-2:]] == [(400, 0.05), (400, 0.10)]
    meta = read_safetensors_metadata(snaps[-1][2])
    assert meta["step"] == "400" and float(meta["sigma_rel"]) == 0.10
    last = load_safetensors(snaps[-1][2])
    assert all(torch.equal(last[k], ema.shadow(0.10)[k]) for k in last)
    (run / "ema_snapshots" / "step-0000440-sigma-0.050.safetensors.tmp-99").write_bytes(b"partial")
    assert list_snapshots(run) == snaps


def test_posthoc_reproduces_stored_sigma_rel_exactly(trained_run):
    run, ema, _ref = trained_run
    out = reconstruct(run, 0.10)  # last step, from the snapshots of both sigma_rels
    true = ema.shadow(0.10)
    assert out["w"].dtype == torch.float32 and out["b"].dtype == torch.float64
    torch.testing.assert_close(out["w"], true["w"], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out["b"], true["b"], rtol=1e-10, atol=1e-9)
    assert out["n"].item() == STEPS
    # an earlier step that has snapshots is also reproduced: the 0.05 EMA at step 200
    at200 = load_safetensors(run / "ema_snapshots" / "step-0000200-sigma-0.050.safetensors")
    torch.testing.assert_close(reconstruct(run, 0.05, step=200)["w"], at200["w"], rtol=1e-6, atol=1e-5)


def test_posthoc_intermediate_sigma_rel_close_to_tracked(trained_run):
    run, ema, ref = trained_run
    out = reconstruct(run, 0.07)["w"].double()
    true = ref.shadow(0.07)["w"].double()
    spread = (ema.shadow(0.05)["w"] - ema.shadow(0.10)["w"]).double().abs().max()
    rel_err = ((out - true).abs().max() / spread).item()
    assert rel_err < 0.02, f"post-hoc 0.07 is off by {rel_err:.3%} of the 0.05-0.10 spread"  # measured ~0.5%
    # the same check on the averaging weights themselves (L1 distance of the profiles)
    steps, plan, fit_error = posthoc_plan(run, 0.07)
    assert 0 < fit_error < 0.05
    rebuilt = sum(c * np.pad(power_ema_weights(s, g), (0, steps - s)) for s, g, _p, c in plan)
    assert np.abs(rebuilt - power_ema_weights(steps, 0.07)).sum() < 0.05


def test_posthoc_coefficients_properties():
    steps = [100, 200, 300, 400] * 2
    sigmas = [0.05] * 4 + [0.10] * 4
    x = posthoc_coefficients(steps, sigmas, 400, 0.10)
    np.testing.assert_allclose(x, np.eye(8)[7], atol=1e-6)
    assert posthoc_fit_error(steps, sigmas, 400, 0.10, x) < 1e-6
    np.testing.assert_allclose(posthoc_coefficients(steps, sigmas, 400, 0.10, sum_to_one=False), x, atol=1e-6)
    # a well-covered target: small error, and the constraint barely changes the fit
    x = posthoc_coefficients(steps, sigmas, 400, 0.07)
    assert x.sum() == pytest.approx(1.0) and posthoc_fit_error(steps, sigmas, 400, 0.07, x) < 0.05
    # a poorly covered target (step 350 from snapshots up to 300): EDM2's plain solve shrinks the
    # weights' total; the constrained one keeps it at 1 and the fit error says the match is poor
    early = [100, 200, 300] * 2, [0.05] * 3 + [0.10] * 3
    plain = posthoc_coefficients(*early, 350, 0.07, sum_to_one=False)
    x = posthoc_coefficients(*early, 350, 0.07)
    assert plain.sum() < 0.5 and x.sum() == pytest.approx(1.0)
    assert posthoc_fit_error(*early, 350, 0.07, x) > 0.5
    with pytest.raises(MPDiTError, match="one sigma_rel per input step"):
        posthoc_coefficients([100, 200], [0.05], 200, 0.1)


def test_posthoc_errors(trained_run, tmp_path):
    run, ema, _ref = trained_run
    with pytest.raises(MPDiTError, match="no EMA snapshots in"):
        reconstruct(tmp_path, 0.07)
    with pytest.raises(MPDiTError, match="sigma_rel must be in"):
        reconstruct(run, 0.3)
    with pytest.raises(MPDiTError, match="no EMA snapshot at or before step 10"):
        reconstruct(run, 0.07, step=10)
    with pytest.raises(MPDiTError, match="must equal the EMA's update count 400"):
        save_snapshot(tmp_path, 399, ema)


# ----------------------------------------------------------------------------- mpdit ema


def _cli(argv):
    parser = argparse.ArgumentParser(prog="mpdit")
    cli_ema.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_ema_writes_loadable_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    model = Tiny()
    ema = PowerFunctionEMA(model)
    for step in range(1, 31):
        _set(model, float(step % 7))
        ema.update(model)
        if step % 10 == 0:
            save_snapshot(run, step, ema)
    (run / "config.json").write_text(json.dumps({"model": "tiny"}))
    out = tmp_path / "out"
    assert _cli(["ema", "--run", str(run), "--sigma-rel", "0.07", "--step", "25", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sigma_rel=0.07 at step 25 from 4 snapshots" in printed and "coefficient" in printed
    assert "profile fit error" in printed
    weights = load_safetensors(out / "model.safetensors")
    expected = reconstruct(run, 0.07, 25)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    Tiny().load_state_dict(weights)
    assert json.loads((out / "config.json").read_text()) == {"model": "tiny"}
    assert read_safetensors_metadata(out / "model.safetensors")["step"] == "25"


def test_cli_ema_errors_are_one_line(tmp_path, capsys, monkeypatch):
    if "ema" not in cli_main.SUBCOMMANDS:  # until the lead registers it
        monkeypatch.setattr(cli_main, "SUBCOMMANDS", [*cli_main.SUBCOMMANDS, "ema"])
    run = tmp_path / "run"
    run.mkdir()
    assert cli_main.main(["ema", "--run", str(run), "--sigma-rel", "0.07", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpdit: error: no model config at") and err.count("\n") == 1
    (run / "config.json").write_text("{}")
    assert cli_main.main(["ema", "--run", str(run), "--sigma-rel", "0.07", "--out", str(tmp_path / "o")]) == 2
    assert "no EMA snapshots in" in capsys.readouterr().err
