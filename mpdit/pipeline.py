"""MPDiTPipeline: class-conditional sampling in diffusers style, with diffusers' schedulers.

    pipe = MPDiTPipeline(model, dit_scheduler("ddim"), vae=vae, latent_mean=mean, latent_std=std)
    images = pipe(class_labels=[207, 360], num_inference_steps=50, guidance_scale=1.5,
                  generator=torch.Generator().manual_seed(0)).images  # PIL images

The pipeline samples the model's objective (mpdit.diffusion.objectives; DDPM unless given): the objective turns
the scheduler's timesteps into the model's time input and scales its input where it should. DDPM models take
the DDPM-family schedulers (DDPM, DDIM, DPMSolverMultistep, or any diffusers scheduler) configured with DiT's
diffusion (linear betas 1e-4..0.02 over 1000 steps, epsilon prediction, no clipping), fed the first C channels
of the model's output, the epsilon (the learned-variance channels are dropped). Flow models take
FlowMatchEulerDiscreteScheduler (``flow_scheduler``), fed the velocity, on our uniform time grid (its ``shift``
is SD3's time shift). Classifier-free guidance is the model's own (``MPDiT.guided_forward``). For a latent model
the samples are un-normalized (z = x * latent_std + latent_mean) and decoded by the VAE.

Parity with `mpdit sample` (tests/test_pipeline.py): DDIMScheduler's default ("leading") spacing is ADM's DDIM
spacing, `mpdit sample --sampler ddim --steps ddimN`; FlowMatchEulerDiscreteScheduler is `--sampler euler`.
"""

import diffusers
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       FlowMatchEulerDiscreteScheduler, ImagePipelineOutput)
from diffusers.utils.torch_utils import randn_tensor

from mpdit.data.latents import LatentDecoder, load_vae
from mpdit.diffusion.objectives import DIT_SCHEDULE, Objective, ObjectiveConfig, make_objective
from mpdit.errors import MPDiTError
from mpdit.model.dit import MPDiT

SCHEDULERS = {"ddpm": (DDPMScheduler, dict(clip_sample=False, variance_type="fixed_small")),
              "ddim": (DDIMScheduler, dict(clip_sample=False)),
              "dpm": (DPMSolverMultistepScheduler, {})}


def flow_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """diffusers' flow-matching Euler scheduler for a flow model; ``shift``: SD3's time shift (1: none)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def objective_scheduler(objective: Objective, scheduler=None):
    """The scheduler for a pipeline of ``objective``: given (a name of a DDPM scheduler, 'euler' for flow, a class or
    an instance), else the objective's default (DDIM for DDPM, FlowMatchEulerDiscrete for flow)."""
    if scheduler is None:
        options = objective.scheduler_config()
        return getattr(diffusers, options.pop("_class_name"))(**options)
    if isinstance(scheduler, str):
        names = NAMED_SCHEDULERS[objective.name]
        if scheduler not in names:
            raise MPDiTError(f"unknown scheduler '{scheduler}' for a {objective.name} model: choose "
                             f"{', '.join(names)} or pass a diffusers one")
        return names[scheduler]()
    return scheduler


def check_scheduler(objective: Objective, scheduler) -> None:
    """MPDiTError unless the scheduler samples the objective's kind of model: a flow-matching scheduler for flow, one
    of the DDPM family for DDPM (the family of the objective's own default scheduler)."""
    flow_matching = type(scheduler).__name__.startswith("FlowMatch")
    if flow_matching != objective.scheduler_config()["_class_name"].startswith("FlowMatch"):
        raise MPDiTError(f"{type(scheduler).__name__} does not sample a {objective.name} model: give a "
                         f"{objective.scheduler_config()['_class_name']}-like scheduler, or the model's objective "
                         "(MPDiTPipeline(..., objective=...); from_pretrained_model reads it)")


def dit_scheduler(scheduler="ddim"):
    """A diffusers scheduler with DiT's schedule: a name (ddpm, ddim, dpm), a scheduler class, or an instance
    (its other settings kept)."""
    if isinstance(scheduler, str):
        if scheduler not in SCHEDULERS:
            raise MPDiTError(f"unknown scheduler '{scheduler}': choose {', '.join(SCHEDULERS)} or pass a diffusers one")
        cls, extra = SCHEDULERS[scheduler]
        return cls(**DIT_SCHEDULE, **extra)
    if isinstance(scheduler, type):
        return scheduler(**DIT_SCHEDULE)
    return type(scheduler).from_config(scheduler.config, **DIT_SCHEDULE)


NAMED_SCHEDULERS = {"ddpm": {name: (lambda name=name: dit_scheduler(name)) for name in SCHEDULERS},
                    "flow": {"euler": flow_scheduler}}


class MPDiTPipeline(DiffusionPipeline):
    """transformer: an MPDiT; scheduler: a diffusers scheduler; vae: an AutoencoderKL for latent models (else None)
    with the per-channel latent statistics latent_mean / latent_std (C,) (mean 0, std 1/0.18215 for official DiT);
    objective: the model's training objective (an Objective or ObjectiveConfig; None: DDPM), which the scheduler
    must suit."""

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: MPDiT, scheduler, vae=None, latent_mean=None, latent_std=None,
                 objective: Objective | ObjectiveConfig | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        if not isinstance(objective, Objective):
            objective = make_objective(objective, transformer.config)
        check_scheduler(objective, scheduler)
        self.objective = objective
        c = transformer.config.in_channels
        self.latent_mean = torch.zeros(c) if latent_mean is None else torch.as_tensor(latent_mean, dtype=torch.float32)
        self.latent_std = torch.ones(c) if latent_std is None else torch.as_tensor(latent_std, dtype=torch.float32)

    @property
    def device(self) -> torch.device:
        """The transformer's device (an MPDiT has no ``.device`` attribute for diffusers to read)."""
        return next(self.transformer.parameters()).device

    def to(self, *args, **kwargs) -> "MPDiTPipeline":
        """Move the transformer and the VAE (torch's .to arguments; diffusers' version needs module.dtype)."""
        for module in (self.transformer, self.vae):
            if module is not None:
                module.to(*args, **kwargs)
        return self

    @classmethod
    def from_pretrained_model(cls, path: str, scheduler=None, vae: str | None = None) -> "MPDiTPipeline":
        """A pipeline for a folder or Hub repo written by ``mpdit.model.hub.save_pretrained``: its objective and
        VAE from its mpdit.json (``vae`` overrides the VAE); ``scheduler``: as ``objective_scheduler`` (default: the
        objective's own)."""
        from mpdit.model.hub import read_info

        info = read_info(path)
        latents = info.get("latents") or {}
        model = MPDiT.from_pretrained(path)
        objective = make_objective(ObjectiveConfig.from_dict(info.get("objective") or {}), model.config)
        vae_name = vae or latents.get("vae")
        return cls(model, objective_scheduler(objective, scheduler), load_vae(vae_name) if vae_name else None,
                   latents.get("channel_mean"), latents.get("channel_std"), objective=objective)

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int = 50, guidance_scale: float = 1.0, generator=None,
                 output_type: str = "pil", return_dict: bool = True):
        """Samples for ``class_labels`` (a list of class indices): ImagePipelineOutput(images=[PIL images]), or
        (images,) when not return_dict. output_type "pil", "np" (uint8 (N, H, W, C)) or "pt" (uint8 (N, C, H, W))."""
        cfg, device = self.transformer.config, self.device
        y = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if len(y) == 0 or int(y.min()) < 0 or int(y.max()) >= cfg.num_classes:
            raise MPDiTError(f"class_labels must be a non-empty list of classes in 0..{cfg.num_classes - 1}")
        if output_type not in ("pil", "np", "pt"):
            raise MPDiTError(f"unknown output_type '{output_type}': choose pil, np or pt")
        y, c = y.to(device), cfg.in_channels
        shape = (len(y), c, cfg.input_size, cfg.input_size)
        x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start at unit noise
        self.objective.set_scheduler_timesteps(self.scheduler, num_inference_steps, device)
        self.transformer.eval()
        denoiser = self.objective.denoiser(lambda x_in, s: self.transformer.guided_forward(x_in, s, y, guidance_scale))
        with self.transformer.reusing_weights():  # the weights do not change while sampling: normalized once
            for t in self.progress_bar(self.scheduler.timesteps):
                x_in = self.scheduler.scale_model_input(x, t) if hasattr(self.scheduler, "scale_model_input") else x
                out = denoiser(x_in, self.objective.scheduler_time(t.reshape(1).expand(len(y)).to(device)))
                x = self.scheduler.step(out[:, :c].float(), t, x, generator=generator).prev_sample  # eps or velocity
        if self.vae is not None:
            images = LatentDecoder(self.vae, self.latent_mean, self.latent_std)(x)
        else:
            from mpdit.data.datasets import to_uint8

            images = to_uint8(x.cpu())
        self.maybe_free_model_hooks()
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                from PIL import Image

                images = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in images]
        return ImagePipelineOutput(images=images) if return_dict else (images,)
