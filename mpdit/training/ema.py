"""Exponential moving averages of model weights: classic and EDM2's power-function EMA.

Both track every floating-point entry of ``model.state_dict()`` (parameters and buffers; float16 /
bfloat16 entries are averaged in float32) and copy non-floating entries as they are, so their
state dicts have the model's keys and load straight into a model. Pass the bare module, or a
DDP / ``torch.compile`` wrapper (unwrapped here).

Power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", sec. 3): after t updates (t = 1, 2, ...; one per optimizer step) the shadow is

    ema_t = sum_{k=1..t} w_k p_k,    w_k = (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1),

i.e. the integral over [k-1, k] of the power profile f(tau) = (gamma+1) tau^gamma / t^(gamma+1),
realised by the recursion ema.lerp_(p_t, 1 - beta_t), beta_t = (1 - 1/t)^(gamma+1). The profile's
relative width is sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3))) (EDM2 eq. 3), which lies in
(0, 1/sqrt(12) ~ 0.2887) for gamma > 0.

Snapshots of each sigma_rel saved at several steps let one rebuild, after training, the EMA of any
sigma_rel at any step up to the last snapshot (EDM2 sec. 3.2): least-squares projection of the
target profile on the snapshot profiles in L2, then the same linear combination of the weights.
Because the discrete weights above are exact integrals of the continuous profiles, a target that
is itself a snapshot's (step, sigma_rel) is reproduced exactly.
"""

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mpdit.errors import MPDiTError
from mpdit.training.checkpoint import load_safetensors, read_safetensors_metadata, save_safetensors

SNAPSHOTS = "ema_snapshots"
SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)  # exp_to_std(0): gamma > 0  <=>  sigma_rel < 1/sqrt(12)
_SNAPSHOT = re.compile(r"^step-(\d{7,})-sigma-(\d+\.\d{3})\.safetensors$")

# ----------------------------------------------------------------------------- sigma_rel <-> gamma


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 exp_to_std: sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))."""
    gamma = float(gamma)
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def _check_sigma_rel(sigma_rel: float) -> float:
    s = float(sigma_rel)
    if not (0 < s < SIGMA_REL_MAX):
        raise MPDiTError(
            f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}) (the power-function EMA needs gamma > 0), got {sigma_rel!r}"
        )
    return s


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2 std_to_exp: the gamma > 0 whose profile has relative width sigma_rel, 0 < sigma_rel < 1/sqrt(12).

    Solves gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 (EDM2 eq. 3 squared and
    cleared of denominators); it has exactly one positive root in that range.
    """
    t = _check_sigma_rel(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots[np.abs(roots.imag) < 1e-6 * (1 + np.abs(roots.real))].real.max())


def power_ema_weights(num_updates: int, sigma_rel: float) -> np.ndarray:
    """Weights w_k (k = 1..t) of the parameters p_k in the power EMA after t updates; (t,) float64, sums to 1."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    k = np.arange(num_updates + 1, dtype=np.float64) / num_updates
    return np.diff(k ** (gamma + 1))  # w_k = (k^(g+1) - (k-1)^(g+1)) / t^(g+1)


# ----------------------------------------------------------------------------- shadow bookkeeping


def _unwrap(model):
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, torch.nn.Module) and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _named_tensors(source) -> dict[str, torch.Tensor]:
    """name -> tensor for a module (its state_dict), a mapping, or an iterable of tensors ("0", "1", ...)."""
    source = _unwrap(source)
    if isinstance(source, torch.nn.Module):
        return source.state_dict()
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, Iterable):
        return {str(i): t for i, t in enumerate(source)}
    raise MPDiTError(f"EMA needs a module, a state dict or an iterable of tensors, got {type(source).__name__}")


def _new_shadow(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies; float16/bfloat16 promoted to float32 for averaging."""
    shadow = {}
    for name, t in tensors.items():
        t = t.detach()
        shadow[name] = t.float().clone() if t.dtype in (torch.float16, torch.bfloat16) else t.clone()
    return shadow


class _Tracker:
    """The keys, split into floating (averaged) and other (copied) entries."""

    def _init_keys(self, source) -> dict[str, torch.Tensor]:
        tensors = _named_tensors(source)
        self._keys = list(tensors)
        self._float_keys = [k for k in self._keys if tensors[k].is_floating_point()]
        self._other_keys = [k for k in self._keys if not tensors[k].is_floating_point()]
        return tensors

    def _current(self, model) -> dict[str, torch.Tensor]:
        tensors = _named_tensors(model)
        if set(tensors) != set(self._keys):
            missing = sorted(set(self._keys) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(self._keys))[:3]
            raise MPDiTError(
                f"EMA tracks {len(self._keys)} tensors but got {len(tensors)} (missing {missing}, unexpected {extra}); "
                "update it with the model it was built from"
            )
        return tensors

    @torch.no_grad()
    def _lerp(self, shadow: dict[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], weight: float) -> None:
        """shadow <- shadow + weight * (p - shadow) for floating entries; copy the rest."""
        dst = [shadow[k] for k in self._float_keys]
        src = [tensors[k].detach().to(shadow[k].dtype) for k in self._float_keys]
        if dst:
            torch._foreach_lerp_(dst, src, float(weight))
        for k in self._other_keys:
            shadow[k].copy_(tensors[k])

    def _check_state(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        if set(state) != set(self._keys):
            missing = sorted(set(self._keys) - set(state))[:3]
            extra = sorted(set(state) - set(self._keys))[:3]
            raise MPDiTError(
                f"{what} does not match the model (missing {missing}, unexpected {extra}); was it saved for another model?"
            )


def _copy_into(model, shadow: Mapping[str, torch.Tensor]) -> None:
    model = _unwrap(model)
    if isinstance(model, torch.nn.Module):
        model.load_state_dict(shadow)
    else:
        with torch.no_grad():
            for name, t in _named_tensors(model).items():
                t.copy_(shadow[name])


class ClassicEMA(_Tracker):
    """ema <- decay * ema + (1 - decay) * p after each update (DiT uses decay 0.9999, from the first step).

    After n updates from the initial copy p_0: ema_n = decay^n p_0 + sum_{k=1..n} (1-decay) decay^(n-k) p_k.
    """

    def __init__(self, model_or_params, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise MPDiTError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = _new_shadow(self._init_keys(model_or_params))

    def update(self, model) -> None:
        """One EMA step toward the model's current weights (call after optimizer.step())."""
        self._lerp(self.shadow, self._current(model), 1.0 - self.decay)  # ema.lerp_(p, 1 - decay)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's state_dict keys (loads into the model)."""
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self._check_state(state, "classic EMA state")
        with torch.no_grad():
            for k, v in state.items():
                self.shadow[k].copy_(v)

    def copy_to(self, model) -> None:
        """Load the averaged weights into ``model``."""
        _copy_into(model, self.shadow)


class PowerFunctionEMA(_Tracker):
    """EDM2's power-function EMA, one shadow per sigma_rel (default 0.05 and 0.10).

    The t-th update (t = 1, 2, ...) does ema.lerp_(p, 1 - beta_t), beta_t = (1 - 1/t)^(gamma+1), so the
    first update copies p. Call it once per optimizer step; then ``num_updates`` equals the step count.
    """

    def __init__(self, model, sigma_rels: Sequence[float] = (0.05, 0.10)):
        sigma_rels = tuple(_check_sigma_rel(s) for s in sigma_rels)
        if not sigma_rels or len({f"{s:.3f}" for s in sigma_rels}) != len(sigma_rels):
            raise MPDiTError(f"sigma_rels must be one or more distinct values, got {sigma_rels}")
        for s in sigma_rels:
            if abs(round(s, 3) - s) > 1e-12:
                raise MPDiTError(f"sigma_rel {s} has more than 3 decimals; snapshot names keep 3 (use {round(s, 3)})")
        self.sigma_rels = sigma_rels
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in sigma_rels)
        self.num_updates = 0
        tensors = self._init_keys(model)
        self.shadows = [_new_shadow(tensors) for _ in sigma_rels]

    def update(self, model) -> None:
        """One EMA step toward the model's current weights (call after optimizer.step())."""
        tensors = self._current(model)
        t = self.num_updates + 1
        for gamma, shadow in zip(self.gammas, self.shadows):
            beta = (1.0 - 1.0 / t) ** (gamma + 1.0)  # beta_t = (1 - 1/t)^(gamma + 1)
            self._lerp(shadow, tensors, 1.0 - beta)  # ema.lerp_(p, 1 - beta_t)
        self.num_updates = t

    def shadow(self, sigma_rel: float) -> dict[str, torch.Tensor]:
        """The averaged weights of one tracked sigma_rel (model keys)."""
        for s, shadow in zip(self.sigma_rels, self.shadows):
            if abs(s - sigma_rel) < 5e-4:
                return shadow
        tracked = ", ".join(f"{s:.3f}" for s in self.sigma_rels)
        raise MPDiTError(f"sigma_rel {sigma_rel} is not tracked; this EMA tracks {tracked}")

    def copy_to(self, model, sigma_rel: float) -> None:
        """Load one sigma_rel's averaged weights into ``model``."""
        _copy_into(model, self.shadow(sigma_rel))

    def state_dict(self) -> dict:
        """{"num_updates": int, "sigma_rels": [float], "shadows": [state dict per sigma_rel]} (weights_only-loadable)."""
        shadows = [dict(s) for s in self.shadows]
        return {"num_updates": self.num_updates, "sigma_rels": list(self.sigma_rels), "shadows": shadows}

    def load_state_dict(self, state: Mapping) -> None:
        try:
            sigma_rels, shadows, num_updates = state["sigma_rels"], state["shadows"], int(state["num_updates"])
        except (KeyError, TypeError) as error:
            raise MPDiTError(f"power-function EMA state lacks {error}; was it saved by PowerFunctionEMA.state_dict()?") from None
        if [f"{s:.3f}" for s in sigma_rels] != [f"{s:.3f}" for s in self.sigma_rels]:
            raise MPDiTError(
                f"EMA state has sigma_rels {list(sigma_rels)} but this run tracks {list(self.sigma_rels)}; "
                "resume with the same sigma_rels"
            )
        for shadow, saved in zip(self.shadows, shadows):
            self._check_state(saved, "power-function EMA state")
            with torch.no_grad():
                for k, v in saved.items():
                    shadow[k].copy_(v)
        self.num_updates = num_updates


# ----------------------------------------------------------------------------- snapshots and post-hoc EMA


def snapshot_path(run_dir: str | Path, step: int, sigma_rel: float) -> Path:
    """RUN_DIR/ema_snapshots/step-NNNNNNN-sigma-S.SSS.safetensors."""
    return Path(run_dir) / SNAPSHOTS / f"step-{step:07d}-sigma-{sigma_rel:.3f}.safetensors"


def save_snapshot(run_dir: str | Path, step: int, ema: PowerFunctionEMA) -> list[Path]:
    """Atomically write each sigma_rel's shadow at ``step`` (must equal ema.num_updates, >= 1); returns the paths."""
    if step != ema.num_updates or step < 1:
        raise MPDiTError(
            f"EMA snapshot step {step} must equal the EMA's update count {ema.num_updates} (>= 1): "
            "update the EMA once per optimizer step and pass the number of steps done"
        )
    paths = []
    for s, gamma, shadow in zip(ema.sigma_rels, ema.gammas, ema.shadows):
        path = snapshot_path(run_dir, step, s)
        metadata = {"step": step, "sigma_rel": repr(s), "gamma": repr(gamma), "kind": "power-function-ema"}
        save_safetensors(path, shadow, metadata)
        paths.append(path)
    return paths


def list_snapshots(run_dir: str | Path) -> list[tuple[int, float, Path]]:
    """[(step, sigma_rel, path)] of RUN_DIR/ema_snapshots, sorted by step then sigma_rel (temp files ignored)."""
    folder = Path(run_dir) / SNAPSHOTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), float(m.group(2)), p) for p in folder.iterdir() if (m := _SNAPSHOT.match(p.name))]
    return sorted(found)


def _profile_dot(t_a, g_a, t_b, g_b):
    """EDM2 p_dot_p: integral of f_a f_b for f(tau) = (g+1) tau^g / t^(g+1) on [0, t]; broadcasts.

    = (g_a+1)(g_b+1) / (g_a+g_b+1) * (t_min/t_max)^(g of the longer profile) / t_max.
    """
    t_ratio = np.minimum(t_a, t_b) / np.maximum(t_a, t_b)
    g_long = np.where(t_a < t_b, g_b, g_a)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * t_ratio**g_long / np.maximum(t_a, t_b)


def _normal_equations(in_steps, in_sigma_rels, out_step, out_sigma_rel):
    """A_ij = <f_i, f_j>, b_i = <f_i, f_out>, c = <f_out, f_out> for the input and target profiles."""
    in_steps = np.asarray(in_steps, dtype=np.float64).reshape(-1)
    in_gammas = np.array([sigma_rel_to_gamma(s) for s in np.ravel(in_sigma_rels)], dtype=np.float64)
    if in_steps.size != in_gammas.size or in_steps.size == 0:
        raise MPDiTError(
            f"need one sigma_rel per input step and at least one input, got {in_steps.size} steps "
            f"and {in_gammas.size} sigma_rels"
        )
    if (in_steps < 1).any() or out_step < 1:
        raise MPDiTError("post-hoc EMA steps must be >= 1 (number of EMA updates)")
    t_out, g_out = float(out_step), sigma_rel_to_gamma(out_sigma_rel)
    a = _profile_dot(in_steps[:, None], in_gammas[:, None], in_steps[None, :], in_gammas[None, :])
    b = _profile_dot(in_steps, in_gammas, t_out, g_out)
    return a, b, float(_profile_dot(t_out, g_out, t_out, g_out))


def posthoc_coefficients(
    in_steps: Sequence[int], in_sigma_rels: Sequence[float], out_step: int, out_sigma_rel: float, sum_to_one: bool = True
) -> np.ndarray:
    """Coefficients x (n_in,) minimising ||sum_i x_i f_i - f_out||_2 over the power profiles (EDM2 sec. 3.2).

    EDM2's solve_posthoc_coefficients solves the normal equations A x = b (A_ij = <f_i, f_j>,
    b_i = <f_i, f_out>) by least squares; with ``sum_to_one`` (default) we add the constraint
    sum_i x_i = 1 (KKT system) so the rebuilt EMA keeps weights summing to 1 even when the target is
    poorly covered (e.g. a step far from any snapshot); when the target is representable, both agree.
    Steps are update counts (>= 1); the rebuilt weights are sum_i x_i snapshot_i.
    """
    a, b, _c = _normal_equations(in_steps, in_sigma_rels, out_step, out_sigma_rel)
    if not sum_to_one:
        return np.linalg.lstsq(a, b, rcond=None)[0]  # A x = b
    n = b.size
    kkt = np.block([[a, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])  # [A 1; 1^T 0] [x; lam] = [b; 1]
    return np.linalg.lstsq(kkt, np.append(b, 1.0), rcond=None)[0][:n]


def posthoc_fit_error(
    in_steps: Sequence[int], in_sigma_rels: Sequence[float], out_step: int, out_sigma_rel: float, coefficients: np.ndarray
) -> float:
    """Relative L2 error ||sum_i x_i f_i - f_out|| / ||f_out|| of a post-hoc fit (0 = exact; above ~0.1 is poor)."""
    a, b, c = _normal_equations(in_steps, in_sigma_rels, out_step, out_sigma_rel)
    x = np.asarray(coefficients, dtype=np.float64)
    return math.sqrt(max(x @ a @ x - 2 * x @ b + c, 0.0) / c)  # ||g - f||^2 = x'Ax - 2x'b + c


def posthoc_plan(
    run_dir: str | Path, sigma_rel: float, step: int | None = None
) -> tuple[int, list[tuple[int, float, Path, float]], float]:
    """(out_step, [(step, sigma_rel, path, coefficient)], fit_error) for rebuilding sigma_rel at ``step``.

    ``step`` defaults to the last snapshot's step; only snapshots at or before it are used.
    fit_error is posthoc_fit_error's relative L2 profile error.
    """
    _check_sigma_rel(sigma_rel)
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        folder = Path(run_dir) / SNAPSHOTS
        raise MPDiTError(f"no EMA snapshots in {folder} (train with the power-function EMA and snapshots enabled)")
    out_step = snapshots[-1][0] if step is None else int(step)
    usable = [snap for snap in snapshots if snap[0] <= out_step]
    if not usable or out_step < 1:
        raise MPDiTError(f"no EMA snapshot at or before step {out_step}; the first is at step {snapshots[0][0]}")
    if out_step > snapshots[-1][0]:
        raise MPDiTError(f"step {out_step} is past the last EMA snapshot (step {snapshots[-1][0]}): the averages after "
                         f"it were never recorded; choose a step up to {snapshots[-1][0]}")
    steps, sigmas = [s for s, _, _ in usable], [g for _, g, _ in usable]
    coefs = posthoc_coefficients(steps, sigmas, out_step, sigma_rel)
    error = posthoc_fit_error(steps, sigmas, out_step, sigma_rel, coefs)
    return out_step, [(s, g, p, float(c)) for (s, g, p), c in zip(usable, coefs)], error


def reconstruct(run_dir: str | Path, sigma_rel: float, step: int | None = None) -> dict[str, torch.Tensor]:
    """EMA weights of ``sigma_rel`` at ``step`` (default: last snapshot) = sum_i x_i snapshot_i.

    Accumulated in float64 (coefficients can be large with alternating signs), returned in each
    entry's stored dtype; non-floating entries come from the newest snapshot used.
    """
    _out_step, plan, _error = posthoc_plan(run_dir, sigma_rel, step)
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for _s, _g, path, coef in plan:
        for name, t in load_safetensors(path).items():
            if not t.is_floating_point():
                total[name], dtypes[name] = t, t.dtype
            elif name not in total:
                total[name], dtypes[name] = t.double() * coef, t.dtype
            else:
                total[name].add_(t.double(), alpha=coef)
    return {name: t.to(dtypes[name]) for name, t in total.items()}


def snapshot_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of one snapshot file (step, sigma_rel, gamma)."""
    return read_safetensors_metadata(path)

