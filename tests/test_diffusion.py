"""Tests for mpdit.diffusion: forward process, posterior, learned-range variance, loss, respacing, samplers."""

import math

import pytest
import torch

from mpdit.diffusion import (
    GaussianDiffusion,
    ddim_sample,
    ddpm_sample,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    respace,
    sample,
    space_timesteps,
)
from mpdit.errors import MPDiTError

BASE = GaussianDiffusion.dit()


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads only add contention (7x slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reference_abar(T=1000):
    """abar_t = prod_{s<=t} (1 - beta_s), computed independently in Python floats."""
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return betas, out


def point_mass_oracle(c, calls=None, learn_sigma=True):
    """Exact eps for data x0 = c under the ORIGINAL 1000-step diffusion: (x_t - sqrt(abar) c) / sqrt(1 - abar)."""

    def model_fn(x, t):
        if calls is not None:
            calls.append(t.clone())
        abar = BASE.alphas_cumprod[t.cpu()].to(x.dtype).view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * c) / (1 - abar).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    return model_fn


def gaussian_oracle(s):
    """Exact E[eps | x_t] for data x0 ~ N(0, s^2): sqrt(1 - abar) x_t / (abar s^2 + 1 - abar); v = -1."""

    def model_fn(x, t):
        abar = BASE.alphas_cumprod[t.cpu()].to(x.dtype).view(-1, 1, 1, 1)
        eps = (1 - abar).sqrt() * x / (abar * s * s + 1 - abar)
        return torch.cat([eps, -torch.ones_like(eps)], 1)

    return model_fn


# ----------------------------------------------------------------------------
# Schedule and forward process.


def test_schedule_matches_reference():
    betas, abar = reference_abar()
    assert BASE.num_timesteps == 1000 and BASE.betas.dtype == torch.float64
    torch.testing.assert_close(BASE.betas, torch.tensor(betas, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(BASE.alphas_cumprod, torch.tensor(abar, dtype=torch.float64), rtol=1e-10, atol=0)


def test_q_sample_moments():
    torch.manual_seed(0)
    n = 20000
    x0 = torch.tensor([[0.8, -0.5], [0.1, -1.0]]).view(1, 1, 2, 2)
    for step in (10, 600):
        t = torch.full((n,), step, dtype=torch.long)
        xt = BASE.q_sample(x0.expand(n, 1, 2, 2), t)
        abar = BASE.alphas_cumprod[step].item()
        mean, var = math.sqrt(abar) * x0[0], 1 - abar
        se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / n)
        assert (xt.mean(0) - mean).abs().max() < 5 * se_mean
        assert (xt.var(0) - var).abs().max() < 5 * se_var
        m, v, lv = BASE.q_mean_variance(x0, t[:1])
        torch.testing.assert_close(m, mean.unsqueeze(0))
        torch.testing.assert_close(v.squeeze(), torch.tensor(var, dtype=v.dtype))
        torch.testing.assert_close(lv, v.log())


def test_extract_broadcasts_per_sample_in_input_dtype():
    x = torch.zeros(3, 2, 4, 4)
    t = torch.tensor([0, 5, 999])
    v = BASE._extract("alphas_cumprod", t, x)
    assert v.shape == (3, 1, 1, 1) and v.dtype == torch.float32
    assert BASE._extract("betas", t, x.double()).dtype == torch.float64
    torch.testing.assert_close(v.flatten(), BASE.alphas_cumprod[t].float())


# ----------------------------------------------------------------------------
# Posterior.


def test_posterior_closed_form():
    betas, abar = reference_abar()
    x0 = torch.randn(4, 1, 1, 1, dtype=torch.float64)
    xt = torch.randn(4, 1, 1, 1, dtype=torch.float64)
    ts = [0, 1, 300, 999]
    mean, var, log_var = BASE.q_posterior_mean_variance(x0, xt, torch.tensor(ts))
    for i, t in enumerate(ts):
        b, a, a_prev = betas[t], abar[t], abar[t - 1] if t > 0 else 1.0
        post_var = b * (1 - a_prev) / (1 - a)
        post_mean = b * math.sqrt(a_prev) / (1 - a) * x0[i].item() + (1 - a_prev) * math.sqrt(1 - b) / (1 - a) * xt[i].item()
        assert mean[i].item() == pytest.approx(post_mean, rel=1e-9, abs=1e-12)
        assert var[i].item() == pytest.approx(post_var, rel=1e-9, abs=1e-15)
        clipped = betas[1] * (1 - abar[0]) / (1 - abar[1]) if t == 0 else post_var  # log(0) clipped to t = 1
        assert log_var[i].item() == pytest.approx(math.log(clipped), rel=1e-9)


@pytest.mark.parametrize("diffusion", [BASE, respace(BASE, 10)], ids=["T1000", "respaced10"])
@pytest.mark.parametrize("t", [1, 5, -1])
def test_posterior_is_bayes(diffusion, t):
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), integrated numerically on a grid in 1-D."""
    t = t % diffusion.num_timesteps
    x0, xt = torch.tensor([0.7], dtype=torch.float64), torch.tensor([-0.3], dtype=torch.float64)
    beta, a_prev = diffusion.betas[t].item(), diffusion.alphas_cumprod_prev[t].item()
    mean, var, _ = diffusion.q_posterior_mean_variance(x0.view(1, 1, 1, 1), xt.view(1, 1, 1, 1), torch.tensor([t]))
    mean, var = mean.item(), var.item()
    grid = torch.linspace(mean - 12 * math.sqrt(var), mean + 12 * math.sqrt(var), 40001, dtype=torch.float64)
    log_lik = -0.5 * (xt - math.sqrt(1 - beta) * grid) ** 2 / beta  # q(x_t | x_{t-1})
    log_prior = -0.5 * (grid - math.sqrt(a_prev) * x0) ** 2 / (1 - a_prev)  # q(x_{t-1} | x0)
    w = (log_lik + log_prior - (log_lik + log_prior).max()).exp()
    w = w / torch.trapezoid(w, grid)
    num_mean = torch.trapezoid(w * grid, grid).item()
    num_var = torch.trapezoid(w * (grid - num_mean) ** 2, grid).item()
    assert num_mean == pytest.approx(mean, abs=1e-6 * math.sqrt(var) + 1e-9)
    assert num_var == pytest.approx(var, rel=1e-5)


# ----------------------------------------------------------------------------
# Reverse process: learned-range variance.


def test_learned_range_variance_endpoints():
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 999])
    eps = torch.randn_like(x)
    outs = {v: BASE.p_mean_variance(torch.cat([eps, torch.full_like(x, v)], 1), x, t) for v in (-1.0, 0.0, 1.0)}
    post = BASE.posterior_log_variance_clipped[t].view(-1, 1, 1, 1)
    logb = BASE.betas[t].log().view(-1, 1, 1, 1)
    torch.testing.assert_close(outs[-1.0]["log_variance"], post.expand_as(x))
    torch.testing.assert_close(outs[1.0]["log_variance"], logb.expand_as(x))
    torch.testing.assert_close(outs[0.0]["log_variance"], ((post + logb) / 2).expand_as(x))
    torch.testing.assert_close(outs[0.0]["variance"], outs[0.0]["log_variance"].exp())
    # The mean is the posterior mean at pred_x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar); eps is passed through.
    abar = BASE.alphas_cumprod[t].view(-1, 1, 1, 1)
    pred_x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    torch.testing.assert_close(outs[0.0]["pred_x0"], pred_x0)
    torch.testing.assert_close(outs[0.0]["mean"], BASE.q_posterior_mean_variance(pred_x0, x, t)[0])
    torch.testing.assert_close(outs[0.0]["eps"], eps)
    assert BASE.p_mean_variance(torch.cat([eps * 100, eps], 1), x, t, clip_denoised=True)["pred_x0"].abs().max() <= 1


def test_fixed_variance_and_output_shape_check():
    fixed = GaussianDiffusion.dit(learn_sigma=False)
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 500])
    out = fixed.p_mean_variance(torch.randn_like(x), x, t)
    assert out["variance"].flatten()[1].item() == pytest.approx(fixed.betas[500].item(), rel=1e-6)
    assert out["variance"].flatten()[0].item() == pytest.approx(fixed.posterior_variance[1].item(), rel=1e-6)
    with pytest.raises(MPDiTError, match="learn_sigma"):
        BASE.p_mean_variance(torch.randn_like(x), x, t)  # C channels where 2C are expected
    with pytest.raises(MPDiTError, match="learn_sigma"):
        fixed.p_mean_variance(torch.randn(2, 6, 4, 4), x, t)


# ----------------------------------------------------------------------------
# Loss helpers and training loss.


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-12


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.3)), (0.9, math.log(0.01)), (-0.95, math.log(2.0))])
def test_discretized_likelihood_is_a_distribution_over_256_bins(mean, log_scale):
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
    assert torch.isfinite(logp).all() and (logp <= 0).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    # An interior bin's probability is the Gaussian mass over [x - 1/255, x + 1/255].
    k = int(torch.argmin((bins - mean).abs()).clamp(1, 254))
    d = torch.distributions.Normal(mean, math.exp(log_scale))
    ref = d.cdf(bins[k] + 1 / 255) - d.cdf(bins[k] - 1 / 255)
    assert logp[k].exp().item() == pytest.approx(ref.item(), rel=1e-6)


def oracle_model(noise, v):
    """Returns the true noise and a constant v (v = -1: the true posterior variance)."""
    return lambda x, t: torch.cat([noise, torch.full_like(noise, v)], 1)


def test_training_losses_oracle():
    torch.manual_seed(1)
    x0 = (torch.rand(4, 3, 8, 8, dtype=torch.float64) * 2 - 1) * 0.9  # interior bins only
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 400, 999])
    out = BASE.training_losses(oracle_model(noise, -1.0), x0, t, noise=noise)
    assert set(out) >= {"loss", "mse", "vb"} and all(v.shape == (4,) for v in out.values())
    assert out["mse"].abs().max().item() == 0.0
    # Correct mean and the true posterior variance: the KL is zero for t > 0.
    assert out["vb"][1:].abs().max().item() < 1e-9
    # t = 0: decoder NLL in bits, -log2 P(|z| < 1/255 / sigma) with the mean at x0 and sigma^2 the clipped variance.
    sigma = BASE.posterior_variance[1].sqrt().item()
    assert out["vb"][0].item() == pytest.approx(-math.log2(math.erf(1 / 255 / sigma / math.sqrt(2))), rel=1e-6)
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    # The wrong variance (beta_t instead of the posterior's) costs a KL, large at t = 1 where the two differ most.
    wrong = BASE.training_losses(oracle_model(noise, 1.0), x0, t, noise=noise)
    assert (wrong["vb"][1:] > out["vb"][1:]).all() and wrong["vb"][1] > 0.05


def test_min_snr_weighting():
    t = torch.tensor([0, 50, 100, 140, 300, 999])
    snr = BASE.alphas_cumprod[t] / (1 - BASE.alphas_cumprod[t])
    weights = BASE.min_snr_weights(t, 5.0)
    torch.testing.assert_close(weights.double(), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr,
                               rtol=1e-6, atol=0)
    assert weights[0] < 0.002 and weights[-2:].tolist() == [1.0, 1.0]  # SNR ~1e4 at t = 0, below 5 from t ~ 130 on
    torch.manual_seed(3)
    x0, noise = torch.rand(6, 1, 4, 4) * 2 - 1, torch.randn(6, 1, 4, 4)
    off_by_one = lambda x, tt: torch.cat([noise + 1, torch.zeros_like(x0)], 1)  # mse 1 at every step
    out = BASE.training_losses(off_by_one, x0, t, noise, min_snr_gamma=5.0)
    torch.testing.assert_close(out["loss"], weights * out["mse"] + out["vb"])
    torch.testing.assert_close(out["mse"], torch.ones(6))


def test_training_losses_decrease_towards_the_noise():
    torch.manual_seed(2)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise, delta = torch.randn_like(x0), torch.randn_like(x0)
    t = torch.tensor([1, 50, 400, 999])
    losses = []
    for s in (1.0, 0.5, 0.1, 0.0):
        out = BASE.training_losses(lambda x, tt: torch.cat([noise + s * delta, torch.zeros_like(x0)], 1), x0, t, noise)
        assert torch.isfinite(out["vb"]).all() and (out["vb"] >= 0).all()
        losses.append(out["loss"])
    for a, b in zip(losses, losses[1:]):
        assert (b < a).all()


def test_training_losses_vb_trains_only_the_variance():
    torch.manual_seed(3)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    output = torch.randn(2, 6, 4, 4, requires_grad=True)
    BASE.training_losses(lambda x, t: output, x0, torch.tensor([3, 700]), noise)["vb"].sum().backward()
    assert output.grad[:, :3].abs().max() == 0 and output.grad[:, 3:].abs().max() > 0
    output.grad = None
    BASE.training_losses(lambda x, t: output, x0, torch.tensor([3, 700]), noise)["mse"].sum().backward()
    assert output.grad[:, :3].abs().max() > 0 and output.grad[:, 3:].abs().max() == 0


def test_training_losses_random_outputs_and_no_sigma():
    torch.manual_seed(4)
    x0 = torch.rand(8, 3, 4, 4) * 2 - 1
    t = torch.randint(0, 1000, (8,))
    out = BASE.training_losses(lambda x, tt: torch.randn(8, 6, 4, 4).clamp(-1, 1), x0, t)
    assert torch.isfinite(out["loss"]).all() and (out["vb"] >= 0).all()
    fixed = GaussianDiffusion.dit(learn_sigma=False)
    out = fixed.training_losses(lambda x, tt: torch.zeros_like(x), x0, t, torch.ones_like(x0))
    torch.testing.assert_close(out["mse"], torch.ones(8))
    assert out["vb"].abs().max() == 0 and torch.equal(out["loss"], out["mse"])


def test_training_losses_call_the_model_with_original_timesteps():
    d = respace(BASE, 250)
    seen = []
    x0 = torch.zeros(3, 1, 2, 2)

    def model_fn(x, t):
        seen.append(t)
        return torch.zeros(3, 2, 2, 2)

    d.training_losses(model_fn, x0, torch.tensor([0, 1, 249]))
    assert seen[0].dtype == torch.long and seen[0].tolist() == [0, 4, 999]
    with pytest.raises(MPDiTError, match="one step per sample"):
        d.training_losses(model_fn, x0, torch.tensor([0, 1]))


# ----------------------------------------------------------------------------
# Respacing.


def test_respace_identity():
    d = respace(BASE, 1000)
    assert d.num_timesteps == 1000 and torch.equal(d.timestep_map, torch.arange(1000))
    torch.testing.assert_close(d.betas, BASE.betas, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(d.alphas_cumprod, BASE.alphas_cumprod, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [250, 50, 10, 2])
def test_respace_keeps_cumulative_alphas(n):
    d = respace(1000, n)
    expect = [round(k * 999 / (n - 1)) for k in range(n)]  # evenly spaced, first 0 and last 999
    assert d.timestep_map.tolist() == expect and d.num_timesteps == n and d.learn_sigma
    torch.testing.assert_close(d.alphas_cumprod, BASE.alphas_cumprod[d.timestep_map], rtol=1e-12, atol=0)
    assert (d.betas > 0).all() and (d.betas < 1).all()


def test_respace_ddim_strings_sections_and_nesting():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim250") == list(range(0, 1000, 4))
    assert space_timesteps(1000, "2,3") == [0, 499, 500, 750, 999]
    assert respace(1000, 1).timestep_map.tolist() == [0]
    inner = respace(BASE, 250)
    nested = respace(inner, "ddim50")  # every 5th of the 250 kept steps
    assert torch.equal(nested.timestep_map, inner.timestep_map[::5])
    torch.testing.assert_close(nested.alphas_cumprod, BASE.alphas_cumprod[nested.timestep_map], rtol=1e-12, atol=0)
    assert not respace(GaussianDiffusion.dit(learn_sigma=False), 10).learn_sigma


@pytest.mark.parametrize("bad", [0, -5, 1001, "0", "ddim0", "ddim999", "ddimx", "abc", "600,600"])
def test_respace_bad_counts(bad):
    with pytest.raises(MPDiTError):
        respace(BASE, bad)


def test_bad_constructor_inputs():
    with pytest.raises(MPDiTError):
        GaussianDiffusion(torch.tensor([0.1, 0.0]))
    with pytest.raises(MPDiTError):
        GaussianDiffusion(linear_betas(10), timestep_map=torch.arange(9))


# ----------------------------------------------------------------------------
# Samplers.


@pytest.mark.parametrize("sampler,steps", [("ddpm", 50), ("ddim", 20)])
def test_samplers_recover_a_point_mass(sampler, steps):
    c = torch.linspace(-0.9, 0.9, 3 * 8 * 8).view(1, 3, 8, 8).expand(4, 3, 8, 8)
    calls = []
    x = sample(point_mass_oracle(c, calls), (4, 3, 8, 8), sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, c, rtol=0, atol=1e-4)
    # The model saw original-scale steps, from T-1 down to 0, as (N,) long tensors.
    expect = respace(BASE, steps).timestep_map.flip(0).tolist()
    assert [t[0].item() for t in calls] == expect and expect[0] == 999
    assert all(t.dtype == torch.long and t.shape == (4,) and (t == t[0]).all() for t in calls)


def test_point_mass_without_learned_sigma():
    c = torch.full((2, 1, 4, 4), 0.25)
    d = respace(GaussianDiffusion.dit(learn_sigma=False), 25)
    x = ddpm_sample(d, point_mass_oracle(c, learn_sigma=False), c.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, c, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_samplers_are_deterministic_given_a_generator(sampler, eta):
    model = lambda x, t: torch.cat([0.1 * x, torch.zeros_like(x)], 1)  # noqa: E731
    run = lambda seed: sample(model, (2, 3, 4, 4), sampler=sampler, steps=10, eta=eta, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, other = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.allclose(a, other)


def test_ddim_eta_one_equals_ddpm_with_posterior_variance():
    """ADM's DDIM step at eta = 1 is the ancestral step with the posterior variance (v = -1), draw for draw."""
    d = respace(BASE, 30)
    model = gaussian_oracle(0.5)
    a = ddpm_sample(d, model, (64, 1, 1, 1), generator=torch.Generator().manual_seed(3))
    b = ddim_sample(d, model, (64, 1, 1, 1), eta=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_given_noise_makes_ddim_independent_of_the_generator():
    d = respace(BASE, 10)
    noise = torch.randn(2, 3, 4, 4)
    model = lambda x, t: torch.cat([0.3 * x, torch.zeros_like(x)], 1)  # noqa: E731
    a = ddim_sample(d, model, noise.shape, generator=torch.Generator().manual_seed(0), noise=noise)
    b = ddim_sample(d, model, noise.shape, generator=torch.Generator().manual_seed(1), noise=noise)
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler,steps", [("ddim", 250), ("ddpm", 1000)])
def test_samplers_reproduce_gaussian_data(sampler, steps):
    """With the exact eps of data N(0, 0.5^2) (independent pixels), enough steps give std 0.5 and mean 0."""
    x = sample(gaussian_oracle(0.5), (1, 1, 100, 100), sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item()) < 5 * 0.5 / math.sqrt(x.numel())
    assert x.std().item() == pytest.approx(0.5, rel=0.03)


def test_sample_progress_bar(capsys):
    model = lambda x, t: torch.cat([x, x], 1)  # noqa: E731
    sample(model, (1, 1, 2, 2), sampler="ddim", steps=5, generator=torch.Generator().manual_seed(0), progress=True)
    assert "ddim" in capsys.readouterr().err


def test_unknown_sampler():
    with pytest.raises(MPDiTError, match=r"^unknown sampler 'euler': choose ddpm or ddim$"):
        sample(lambda x, t: x, (1, 1, 2, 2), sampler="euler", generator=torch.Generator())
