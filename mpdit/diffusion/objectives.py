"""Training objectives: what a model is trained to predict and how it is sampled, behind one small interface.

An objective noises a batch at its own times (DDPM: integer steps 0..T-1; flow: t in [0, 1]), gives the training
loss, turns its time into the model's time input (and scales the model's input where it should), and samples.
The network is called as net(x_in, time_input) -> output; the trainer, the samplers, the pipeline and the
evaluation go through ``Objective`` and never branch on its name. The objective is recorded beside the model
(``ObjectiveConfig``: a run's train_config.json, a checkpoint's objective.json, an export's mpdit.json), never in
the model's config. Formulas: docs/objectives.md.
"""

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from mpdit.data.datasets import ImageDataset, model_space_rms
from mpdit.diffusion import flow
from mpdit.diffusion.gaussian import GaussianDiffusion, mean_flat, space_timesteps
from mpdit.diffusion.sampling import sample as ddpm_family_sample
from mpdit.diffusion.schedule import noise_conditioning
from mpdit.errors import MPDiTError, dataclass_from_dict
from mpdit.model.config import DiTConfig

OBJECTIVE_FILE = "objective.json"  # a checkpoint's objective (ObjectiveConfig.to_dict())
# DiT's diffusion as diffusers schedulers are configured (MPDiTPipeline, an export's scheduler config)
DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                    prediction_type="epsilon")
VALIDATION_LEVELS = 10  # the validation loss's fixed noise levels: midpoints of 10 equal bins of the objective's time


@dataclass
class ObjectiveConfig:
    """Which objective and its options. time_sampling, logit_mean, logit_std: flow's training times; sigma_data:
    the RMS of the training data in model space, for the flow input scaling of MP models (None elsewhere)."""

    objective: str = "ddpm"
    time_sampling: str = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigma_data: float | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise MPDiTError(f"unknown objective '{self.objective}': choose {' or '.join(OBJECTIVES)}")
        if self.time_sampling not in flow.TIME_SAMPLINGS:
            raise MPDiTError(f"unknown time sampling '{self.time_sampling}': choose {' or '.join(flow.TIME_SAMPLINGS)}")
        if not math.isfinite(self.logit_mean):
            raise MPDiTError(f"the logit-normal mean must be a finite number, got {self.logit_mean}")
        if not (math.isfinite(self.logit_std) and self.logit_std > 0):
            raise MPDiTError(f"the logit-normal std must be a finite number > 0, got {self.logit_std}")
        if self.sigma_data is not None and not (math.isfinite(self.sigma_data) and self.sigma_data > 0):
            raise MPDiTError(f"sigma_data must be a finite number > 0, got {self.sigma_data}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ObjectiveConfig":
        return dataclass_from_dict(cls, values, "objective option")


def check_time_shift(shift: float) -> float:
    """The SD3 time shift S of a flow sampler: a finite number > 0 (1: none)."""
    if not (math.isfinite(shift) and shift > 0):
        raise MPDiTError(f"--time-shift must be a finite number > 0 (1: no shift), got {shift}")
    return float(shift)


class Objective(ABC):
    """One training objective for one model (its config decides the model's time input and input scaling)."""

    name: str
    samplers: tuple[str, ...]
    default_sampler: str
    learn_sigma: bool  # whether a new model for this objective outputs variance channels besides its prediction
    min_snr: bool  # whether its loss takes Min-SNR-gamma weights

    def __init__(self, config: ObjectiveConfig, model_config: DiTConfig):
        self.config, self.model_config = config, model_config

    @classmethod
    def uses_sigma_data(cls, model_config: DiTConfig) -> bool:
        """Whether this objective scales the input of such a model by the data's RMS."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # --- training ---------------------------------------------------------------------------------

    @abstractmethod
    def draw_times(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Training times (n,) drawn from ``generator`` (the step's own, so runs resume exactly)."""

    @abstractmethod
    def time_input(self, t: torch.Tensor) -> torch.Tensor:
        """The model's time input (N,) at the objective's times t (N,)."""

    def model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model sees of x_t (N, C, H, W): x_t itself unless the objective scales it."""
        return x_t

    def denoiser(self, net):
        """net(x_in, time_input) -> output, as a function of (x_t, t) in the objective's own time."""
        return lambda x_t, t: net(self.model_input(x_t, t), self.time_input(t))

    @abstractmethod
    def training_losses(self, net, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                        min_snr_gamma: float = 0.0) -> dict:
        """Per-sample (N,) tensors: loss (what is minimised), mse (unweighted, on the objective's target), vb."""

    @abstractmethod
    def time_bins(self, bins: int) -> list[tuple]:
        """``bins`` equal bins (low, high) of the objective's time, from low noise to high."""

    @abstractmethod
    def draw_times_between(self, n: int, generator: torch.Generator, low, high) -> torch.Tensor:
        """n times drawn uniformly within [low, high) of a bin."""

    def validation_times(self, n: int) -> list[torch.Tensor]:
        """The validation loss's fixed times: one (n,) tensor per level."""
        return [torch.full((n,), level) for level in self.validation_levels()]

    @abstractmethod
    def validation_levels(self) -> list:
        """VALIDATION_LEVELS fixed times, the midpoints of equal bins of the objective's time."""

    # --- sampling ---------------------------------------------------------------------------------

    def check_sampler(self, sampler: str) -> str:
        if sampler not in self.samplers:
            other = [name for cls in OBJECTIVES.values() if cls is not type(self) for name in cls.samplers]
            hint = f" ('{sampler}' is a sampler of another objective)" if sampler in other else ""
            raise MPDiTError(f"unknown sampler '{sampler}' for a {self.name} model{hint}: choose "
                             f"{', '.join(self.samplers)}")
        return sampler

    def check_time_shift(self, shift: float) -> float:
        """The time shift of a sampler of this objective (one line if it has none, or if it is not > 0)."""
        return check_time_shift(shift)

    @abstractmethod
    def sample(self, net, shape, *, sampler: str, steps: int, generator: torch.Generator, device="cpu",
               progress=False, time_shift: float = 1.0) -> torch.Tensor:
        """x_0 (N, C, H, W) = shape from noise drawn from ``generator``; net(x_in, time_input) guided or not."""

    @abstractmethod
    def sampling_steps(self, steps: int) -> int:
        """The number of steps (progress-bar ticks) of one sampling loop of ``steps`` steps."""

    # --- diffusers schedulers (MPDiTPipeline, export) ---------------------------------------------

    @abstractmethod
    def scheduler_config(self) -> dict:
        """The diffusers scheduler that samples this objective by default: {"_class_name": ..., its options}."""

    @abstractmethod
    def set_scheduler_timesteps(self, scheduler, steps: int, device) -> None:
        """scheduler.set_timesteps for ``steps`` steps on our grid where the scheduler allows it."""

    @abstractmethod
    def scheduler_time(self, timestep: torch.Tensor) -> torch.Tensor:
        """The objective's time of a diffusers scheduler's timestep."""


class DDPMObjective(Objective):
    """DiT / ADM: epsilon prediction (with learned variance when the model has it) on 1,000 linear-beta steps."""

    name, samplers, default_sampler, learn_sigma, min_snr = "ddpm", ("ddim", "ddpm"), "ddim", True, True

    def __init__(self, config: ObjectiveConfig, model_config: DiTConfig):
        super().__init__(config, model_config)
        self.diffusion = GaussianDiffusion.dit(model_config.num_timesteps, learn_sigma=model_config.learn_sigma)
        self.log_sigma = model_config.has("mp_embedding") and model_config.timestep_input == "log-sigma"
        self.raw = model_config.has("mp_embedding") and model_config.timestep_input == "raw"
        self.c_noise = noise_conditioning(model_config.num_timesteps) if self.log_sigma else None
        self.c_noise_on = {}  # the table per device, copied there once (not at every training step)

    def draw_times(self, n, generator):
        return torch.randint(0, self.model_config.num_timesteps, (n,), generator=generator)

    def time_input(self, t):
        """DiT: the step itself; MP: EDM2's ln(sigma_t)/4 from the schedule (fractional steps interpolate), or the
        raw step as a float."""
        if self.raw:
            return t.float()
        if not self.log_sigma:
            return t
        if t.device not in self.c_noise_on:
            self.c_noise_on[t.device] = self.c_noise.to(t.device)
        table = self.c_noise_on[t.device]
        if not t.is_floating_point():
            return table[t.clamp(0, len(table) - 1)]
        t = t.clamp(0, len(table) - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=len(table) - 1)
        return torch.lerp(table[low], table[high], (t - low).float())

    def training_losses(self, net, x0, t, noise, min_snr_gamma=0.0):
        return self.diffusion.training_losses(self.denoiser(net), x0, t, noise, min_snr_gamma=min_snr_gamma)

    def time_bins(self, bins):
        T = self.model_config.num_timesteps
        if not 1 <= bins <= T:
            raise MPDiTError(f"the noise levels split into 1 to {T} bins (one step each at most), got {bins}")
        edges = [round(k * T / bins) for k in range(bins + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def draw_times_between(self, n, generator, low, high):
        return torch.randint(low, high, (n,), generator=generator)

    def validation_levels(self):
        T = self.model_config.num_timesteps
        return [int((k + 0.5) * T / VALIDATION_LEVELS) for k in range(VALIDATION_LEVELS)]

    def check_time_shift(self, shift):
        if shift != 1:
            raise MPDiTError("--time-shift shifts a flow model's sampling times; this model is trained with ddpm")
        return 1.0

    def sample(self, net, shape, *, sampler, steps, generator, device="cpu", progress=False, time_shift=1.0):
        self.check_time_shift(time_shift)
        return ddpm_family_sample(self.denoiser(net), shape, sampler=self.check_sampler(sampler), steps=steps,
                                  generator=generator, device=device, learn_sigma=self.model_config.learn_sigma,
                                  progress=progress)

    def sampling_steps(self, steps):
        return len(space_timesteps(self.model_config.num_timesteps, steps))

    def scheduler_config(self):
        return {"_class_name": "DDIMScheduler", **DIT_SCHEDULE,
                "num_train_timesteps": self.model_config.num_timesteps, "clip_sample": False}

    def set_scheduler_timesteps(self, scheduler, steps, device):
        scheduler.set_timesteps(steps, device=device)

    def scheduler_time(self, timestep):
        return timestep


class FlowObjective(Objective):
    """Flow matching on the linear path with velocity prediction (flow.py), plain MSE; MP models see c_in x_t and
    ln(sigma)/4, DiT-family models x_t and 1000 t (the timesteps of diffusers' flow schedulers)."""

    name, samplers, default_sampler = "flow", ("heun", "euler", "euler-maruyama"), "heun"
    learn_sigma, min_snr = False, False

    def __init__(self, config: ObjectiveConfig, model_config: DiTConfig):
        super().__init__(config, model_config)
        if model_config.learn_sigma:
            raise MPDiTError("a flow model predicts the velocity alone: build it with learn_sigma off "
                             "(mpdit train --objective flow does)")
        if model_config.timestep_input == "raw":
            raise MPDiTError("--timestep-input raw feeds DDPM's integer step to an MP model; flow matching has no "
                             "integer steps: use log-sigma (the default) with --objective flow")
        self.log_sigma = model_config.has("mp_embedding")
        self.scales_input = self.uses_sigma_data(model_config)
        if self.scales_input and config.sigma_data is None:
            raise MPDiTError("a flow objective for an MP model needs sigma_data (the data's RMS) for its input scaling")

    @classmethod
    def uses_sigma_data(cls, model_config):
        """c_in goes with weight normalization, the switch that makes the patch embedding magnitude-preserving."""
        return model_config.has("weight_norm")

    def draw_times(self, n, generator):
        c = self.config
        return flow.draw_times(n, generator, c.time_sampling, c.logit_mean, c.logit_std)

    def time_input(self, t):
        return flow.log_sigma_input(t) if self.log_sigma else 1000 * t.float()

    def model_input(self, x_t, t):
        if not self.scales_input:
            return x_t
        c_in = flow.input_scale(t, self.config.sigma_data).to(x_t.device)
        return x_t * c_in.to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))

    def training_losses(self, net, x0, t, noise, min_snr_gamma=0.0):
        if min_snr_gamma and not self.min_snr:
            raise MPDiTError("Min-SNR weights DDPM's epsilon loss; flow matching trains with plain MSE: set "
                             "--min-snr-gamma 0")
        x_t = flow.interpolate(x0, noise, t)
        out = self.denoiser(net)(x_t, t)
        if out.shape != x0.shape:
            raise MPDiTError(f"model output has shape {tuple(out.shape)}, expected {tuple(x0.shape)} (the velocity)")
        mse = mean_flat((out.float() - flow.velocity(x0, noise)) ** 2)
        return dict(loss=mse, mse=mse, vb=torch.zeros_like(mse))

    def time_bins(self, bins):
        return [(k / bins, (k + 1) / bins) for k in range(bins)]

    def draw_times_between(self, n, generator, low, high):
        return low + (high - low) * torch.rand(n, generator=generator)

    def validation_levels(self):
        return [(k + 0.5) / VALIDATION_LEVELS for k in range(VALIDATION_LEVELS)]

    def sample(self, net, shape, *, sampler, steps, generator, device="cpu", progress=False, time_shift=1.0):
        sampler = self.check_sampler(sampler)
        grid = flow.time_grid(self.sampling_steps(steps), self.check_time_shift(time_shift))
        x = torch.randn(tuple(shape), generator=generator).to(device)
        velocity_fn = self.denoiser(net)
        if sampler == "euler-maruyama":
            return flow.euler_maruyama_sample(velocity_fn, x, grid, generator=generator, progress=progress)
        step = flow.heun_sample if sampler == "heun" else flow.euler_sample
        return step(velocity_fn, x, grid, progress=progress)

    def sampling_steps(self, steps):
        if not isinstance(steps, int):
            raise MPDiTError(f"flow samplers take a step count, got '{steps}' (ddimN is a DDPM spacing)")
        if steps < 1:
            raise MPDiTError(f"sampling steps must be >= 1, got {steps}")
        return steps

    def scheduler_config(self):
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}

    def set_scheduler_timesteps(self, scheduler, steps, device):
        """Our uniform grid (the scheduler appends t = 0 and applies its own shift to it)."""
        scheduler.set_timesteps(sigmas=flow.time_grid(steps)[:-1].tolist(), device=device)

    def scheduler_time(self, timestep):
        return timestep.float() / 1000


OBJECTIVES = {"ddpm": DDPMObjective, "flow": FlowObjective}


def make_objective(config: ObjectiveConfig | None, model_config: DiTConfig) -> Objective:
    """The objective of ``config`` (None: DDPM, the objective of every run that records none) for a model."""
    config = config or ObjectiveConfig()
    return OBJECTIVES[config.objective](config, model_config)


def fit_objective(config: ObjectiveConfig, model_config: DiTConfig, data: ImageDataset) -> Objective:
    """The objective of a new training run: sigma_data measured from the training data where the objective uses it
    and the config does not give it."""
    if config.sigma_data is None and OBJECTIVES[config.objective].uses_sigma_data(model_config):
        config = dataclasses.replace(config, sigma_data=model_space_rms(data))
    return make_objective(config, model_config)
