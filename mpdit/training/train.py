"""The training loop: one process or many (torchrun + DistributedDataParallel), resumable bit for bit.

Determinism: the global batch of step s (data indices, timesteps, noise, label dropout) is a
function of (seed, s) alone, drawn the same on every rank and then split, so a resumed run, a
single process and N processes with the same global batch all see the same numbers.
"""

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mpdit.data.datasets import ImageDataset, load_dataset, split_holdout
from mpdit.diffusion.objectives import OBJECTIVE_FILE, OBJECTIVES, Objective, ObjectiveConfig, fit_objective
from mpdit.errors import MPDiTError, dataclass_from_dict, require_field_types
from mpdit.files import read_json, remove_path, strict_json
from mpdit.model.config import DiTConfig
from mpdit.model.dit import MPDiT, compile_default, load_state_dict_checked, require_memory
from mpdit.training import checkpoint as ckpt
from mpdit.training.ema import SNAPSHOTS, ClassicEMA, PowerFunctionEMA, save_snapshot, snapshot_path
from mpdit.training.guard import DivergenceGuard, json_safe, require_finite
from mpdit.training.preemption import Preempted, StopSignals
from mpdit.training.rundir import RunLock, remove_leftovers, trim_log
from mpdit.training.schedules import make_schedule, set_lr
from mpdit.training.telemetry import Telemetry
from mpdit.training.validation import held_out_data, validation_loss

TRAIN_CONFIG = ckpt.TRAIN_CONFIG
# Optimizer settings per family (DESIGN.md section 4): DiT's, or the paper's for weight-normalized MP models.
DIT_OPTIMIZER = dict(lr=1e-4, schedule="constant", betas=(0.9, 0.999), warmup_steps=0)
MP_OPTIMIZER = dict(lr=1e-2, schedule="edm2", betas=(0.9, 0.99))
STATE_FILE = ckpt.STATE_FILE


@dataclass
class TrainConfig:
    """Everything about a training run except the model; saved as RUN_DIR/train_config.json."""

    data: str = "mnist"
    # The objective (mpdit.diffusion.objectives.ObjectiveConfig, flattened): ddpm or flow, and flow's time sampling;
    # sigma_data (flow, MP models): the data's RMS for the input scaling, measured at the run's start when None.
    objective: str = "ddpm"
    time_sampling: str = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigma_data: float | None = None
    holdout: float = 0.0  # > 0: this share of the training images (a fixed draw) is kept out, for a validation loss
    image_size: int | None = None  # pad / resize the data to this side; None: the model's input size
    steps: int = 1000
    batch_size: int = 64  # global: split across ranks
    lr: float = 1e-2
    schedule: str = "edm2"  # constant | edm2
    warmup_steps: int = 200
    t_ref: int = 1000  # edm2: lr / sqrt(max(step / t_ref, 1))
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    min_snr_gamma: float = 0.0  # > 0: Min-SNR-gamma weighting of the mse term; 0: DiT's unweighted loss
    ema_decay: float | None = 0.9999  # classic EMA; None disables
    ema_sigma_rels: tuple[float, ...] = (0.05, 0.10)  # power-function EMA; () disables
    snapshot_every: int = 0  # power-EMA snapshots for post-hoc reconstruction; 0: at checkpoints only
    seed: int = 0
    log_every: int = 50
    telemetry_every: int = 200
    sample_every: int = 0  # 0: a grid at the end only
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool | None = None  # torch.compile the model; None: on CUDA only (see compile_default)
    device: str = "auto"
    progress: bool = True
    max_bad_steps: int = 10  # stop after this many steps in a row skipped for a non-finite loss or gradient
    val_every: int = 0  # > 0: log the validation loss (mpdit.training.validation) of the raw weights every N steps

    def __post_init__(self):
        require_field_types(self, "training option")
        self.betas = tuple(self.betas)
        self.ema_sigma_rels = tuple(self.ema_sigma_rels)
        if self.precision not in ("fp32", "bf16"):
            raise MPDiTError(f"unknown precision '{self.precision}': choose fp32 or bf16")
        if self.min_snr_gamma < 0:
            raise MPDiTError(f"min_snr_gamma must be >= 0 (0: off), got {self.min_snr_gamma}")
        if self.steps < 0 or self.batch_size < 1:
            raise MPDiTError("steps must be >= 0 and batch size >= 1")
        for name in ("log_every", "telemetry_every", "sample_every", "ckpt_every", "snapshot_every", "keep_checkpoints",
                     "val_every"):
            if getattr(self, name) < 0:
                raise MPDiTError(f"{name} must be >= 0")
        if not self.lr > 0:
            raise MPDiTError(f"the learning rate must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise MPDiTError(f"betas must be two numbers in [0, 1) ('b1,b2', e.g. 0.9,0.99), got {self.betas}")
        if self.weight_decay < 0 or (self.grad_clip is not None and not self.grad_clip > 0):
            raise MPDiTError("weight decay must be >= 0 and the gradient clip (if given) > 0")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise MPDiTError(f"the EMA decay must be in (0, 1) (0 on the command line disables it), got {self.ema_decay}")
        if self.max_bad_steps < 1:
            raise MPDiTError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if not 0 <= self.holdout < 1:
            raise MPDiTError(f"the holdout fraction must be in [0, 1) (0: none), got {self.holdout}")
        objective = self.objective_config()
        if self.min_snr_gamma and not OBJECTIVES[objective.objective].min_snr:
            raise MPDiTError(f"Min-SNR weights DDPM's epsilon loss; {objective.objective} trains with plain MSE: set "
                             "--min-snr-gamma 0")

    def objective_config(self) -> ObjectiveConfig:
        """The run's objective (checked: an unknown name or a bad option is a one-line error)."""
        return ObjectiveConfig(self.objective, self.time_sampling, self.logit_mean, self.logit_std, self.sigma_data)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return dataclass_from_dict(cls, values, "training option")


def training_bytes_per_param(cfg: TrainConfig) -> int:
    """float32 bytes each parameter takes in training: weight, gradient, Adam's two moments, and one copy per EMA."""
    return 4 * (4 + bool(cfg.ema_decay) + len(cfg.ema_sigma_rels))


def family_optimizer(model_cfg: DiTConfig) -> dict:
    """The default optimizer settings of a model: MP_OPTIMIZER with weight_norm on, else DIT_OPTIMIZER."""
    return dict(MP_OPTIMIZER if model_cfg.has("weight_norm") else DIT_OPTIMIZER)


def make_optimizer(params, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, fused: one multi-tensor kernel per step for all parameters of a device and dtype."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


def default_image_size(native: int, patch: int) -> int:
    """The data's side, padded up to a multiple of the patch size."""
    return -(-native // patch) * patch


def model_config_for_data(model: str, data: ImageDataset, image_size: int | None = None, **overrides) -> DiTConfig:
    """A zoo model sized for a dataset: its channels and classes, input padded to a multiple of the patch size."""
    size = image_size or default_image_size(max(data.resolution), DiTConfig.from_preset(model).patch_size)
    return DiTConfig.from_preset(model, input_size=size, in_channels=data.channels, num_classes=data.num_classes,
                                 **overrides)


@dataclass
class Distributed:
    """Rank layout: a single process unless launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Distributed:
    """Join the process group when torchrun set WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise MPDiTError(f"unknown device '{device}': use auto, cpu or cuda")
    if use_cuda and not torch.cuda.is_available():
        raise MPDiTError("CUDA was asked for but is not available: use --device cpu")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Distributed(rank, world_size, local_rank, dev)


class TrainingDiverged(MPDiTError):
    """A run stopped because its last max_bad_steps steps were all skipped (non-finite); `step`: where it stopped."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A CPU generator fixed by (seed, step, stream): the same on every rank and after a resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + stream)


def batch_indices(num_items: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Dataset indices of the global batch of `step`: epochs are seeded permutations, last partial batch dropped."""
    per_epoch = num_items // batch_size
    if per_epoch == 0:
        raise MPDiTError(f"batch size {batch_size} is larger than the dataset ({num_items} images)")
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(num_items, generator=step_generator(seed, epoch, stream=0))
    return order[index * batch_size:(index + 1) * batch_size]


def global_batch(data: ImageDataset, cfg: TrainConfig, objective: Objective, step: int):
    """x0 (B, C, H, W) in model space (data.model_batch), labels with dropout to the null class, t (B,), noise.

    t are the objective's times (DDPM: integer steps), drawn first from the step's generator; the data's own draws
    (a latent dataset's eps) come from it after t, noise and dropout.
    """
    idx = batch_indices(len(data), cfg.batch_size, cfg.seed, step)
    gen = step_generator(cfg.seed, step, stream=1)
    t = objective.draw_times(len(idx), gen)
    x0, y, noise = noised_batch(data, idx, objective.model_config, gen)
    return x0, y, t, noise


def noised_batch(data: ImageDataset, index: torch.Tensor, model_cfg: DiTConfig, generator: torch.Generator):
    """(x0 in model space, labels with dropout to the null class, noise) for the images at ``index``: the noise, the
    dropout and then the data's own draws taken from ``generator`` in that order (after the batch's times)."""
    noise = torch.randn((len(index), data.channels, *data.resolution), generator=generator)
    drop = torch.rand(len(index), generator=generator) < model_cfg.class_dropout_prob
    y = torch.where(drop, model_cfg.num_classes, data.labels[index])
    return data.model_batch(index, generator), y, noise


def weight_decay_groups(model: MPDiT, weight_decay: float) -> list[dict]:
    """Decay matrices only (not gains, biases or embeddings' fixed tables)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class Trainer:
    """Owns the model, optimizer, EMAs and run directory; `run()` trains to cfg.steps."""

    def __init__(self, run_dir: Path, model_cfg: DiTConfig, cfg: TrainConfig, resume: bool = False,
                 data: ImageDataset | None = None, from_step: int | None = None):
        """``data``: the training split already in memory (fitted to the model's size here); else cfg.data is loaded.
        ``from_step``: with ``resume``, continue from that checkpoint rather than the newest."""
        self.run_dir, self.model_cfg, self.cfg = Path(run_dir), model_cfg, cfg
        self.dist = setup_distributed(cfg.device)
        torch.manual_seed(cfg.seed)  # model init
        size = cfg.image_size or model_cfg.input_size
        self.data = data.fit(size) if data is not None else load_dataset(cfg.data, "train", size)
        if cfg.holdout:
            self.data = split_holdout(self.data, cfg.holdout)[0]
        self.check_data_fits_model()
        require_memory(model_cfg, self.dist.device, training_bytes_per_param(cfg),
                       "training (weights, gradients, Adam's moments and the EMAs; activations not counted)")
        self.model = MPDiT(model_cfg).to(self.dist.device)
        self.objective = fit_objective(cfg.objective_config(), model_cfg, self.data)
        cfg.sigma_data = self.objective.config.sigma_data  # measured from the data where the objective needs it
        # fused (make_optimizer): its kernel reads optimizer.found_inf, so the divergence guard skips without a sync
        self.optimizer = make_optimizer(weight_decay_groups(self.model, cfg.weight_decay), cfg.lr, cfg.betas)
        self.schedule = make_schedule(cfg.schedule, cfg.lr, cfg.warmup_steps, cfg.t_ref)
        self.ema = ClassicEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        self.power_ema = PowerFunctionEMA(self.model, cfg.ema_sigma_rels) if cfg.ema_sigma_rels else None
        self.step = 0
        self.guard = DivergenceGuard(self.dist.device)
        self.resumed_at_stop = False  # resumed from the checkpoint of a run stopped by a signal (no snapshot there)
        if resume:
            self.load_latest(from_step)
        self.ddp = DistributedDataParallel(self.model) if self.dist.world_size > 1 else None
        net = self.ddp or self.model
        self.compiled = compile_default(cfg.compile, self.dist.device)
        self.eager_forward = net
        self.forward = torch.compile(net) if self.compiled else net
        self.telemetry = Telemetry(self.model)
        # the held-out images of --val-every, loaded now so that a run without any fails before it starts
        self.held_out = (held_out_data(cfg.data, model_cfg.input_size, cfg.holdout)
                         if cfg.val_every and self.dist.is_main else None)

    def check_data_fits_model(self) -> None:
        shape, m = (self.data.channels, *self.data.resolution), self.model_cfg
        if shape != (m.in_channels, m.input_size, m.input_size):
            raise MPDiTError(f"data {self.cfg.data} gives images {shape}, the model expects "
                             f"({m.in_channels}, {m.input_size}, {m.input_size}): set --image-size or the model size")
        if self.data.num_classes != m.num_classes:
            raise MPDiTError(f"data has {self.data.num_classes} classes, the model {m.num_classes}")
        if self.cfg.batch_size % self.dist.world_size:
            raise MPDiTError(f"batch size {self.cfg.batch_size} is not divisible by {self.dist.world_size} processes")

    # --- files ------------------------------------------------------------------------------

    def write_run_files(self) -> None:
        """RUN_DIR/config.json (model) and train_config.json, written once at the start."""
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(self.run_dir / ckpt.CONFIG_FILE, strict_json(self.model_cfg.to_dict(), "the model config", indent=2))
        ckpt.atomic_write_text(self.run_dir / TRAIN_CONFIG, strict_json(dataclasses.asdict(self.cfg), "the training config",
                                                                       indent=2))

    def check_ranks_in_sync(self) -> None:
        """Raise if the ranks' parameters differ (a checksum compared across processes)."""
        if self.dist.world_size == 1:
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().double().flatten() for p in self.model.parameters()])
            checksum = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.arange(len(flat), device=flat.device,
                                                                                       dtype=flat.dtype)).sum()])
        low, high = checksum.clone(), checksum.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(f"ranks out of sync at step {self.step}: parameter checksums {low.tolist()} vs {high.tolist()}")

    def require_finite_state(self, what: str) -> None:
        """MPDiTError (on every rank) if the weights or an EMA hold a NaN or an infinity: such a state is never saved."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        if self.power_ema:
            for sigma_rel in self.power_ema.sigma_rels:
                tensors.update({f"ema-sigma-{sigma_rel:.3f}.{k}": v for k, v in self.power_ema.shadow(sigma_rel).items()})
        last = ckpt.latest_checkpoint(self.run_dir)
        require_finite(tensors, f"the {what} of step {self.step}",
                       f"; the training diverged: the newest checkpoint is {last}" if last else "")

    def save_checkpoint(self, stopped: bool = False) -> Path | None:
        """Atomically write RUN_DIR/checkpoints/step-NNNNNNN (rank 0 only) and prune old ones. ``stopped``: the
        checkpoint of a run stopped by a signal (``stop_for_signal``), off the run's schedule.

        A state with non-finite tensors is refused before anything is written (so pruning never removes the
        last finite checkpoint)."""
        self.check_ranks_in_sync()
        self.require_finite_state("checkpoint")
        if not self.dist.is_main:
            return None
        with self.reporting_write_errors(ckpt.checkpoint_dir(self.run_dir, self.step)):
            self.write_checkpoint(stopped)
        if self.cfg.keep_checkpoints:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        return ckpt.checkpoint_dir(self.run_dir, self.step)

    @contextlib.contextmanager
    def reporting_write_errors(self, path: Path):
        """An OSError (disk full, read-only folder...) while writing ``path`` becomes a one-line MPDiTError saying
        which path, why, and which checkpoint is intact."""
        try:
            yield
        except OSError as error:
            last = ckpt.latest_checkpoint(self.run_dir)
            raise MPDiTError(f"could not write {path} ({error.strerror or error}); "
                             + (f"the newest intact checkpoint is {last}" if last else "no checkpoint was written yet")
                             + f": free space or fix the folder, then --resume {self.run_dir}") from None

    def write_checkpoint(self, stopped: bool = False) -> None:
        """The files of RUN_DIR/checkpoints/step-NNNNNNN (built in a temp folder, renamed in whole), then the
        step's power-EMA snapshots when they go with checkpoints, except at a ``stopped`` checkpoint (a run that
        was never stopped has no snapshot there, and post-hoc EMA must not depend on when a run was stopped)."""
        with ckpt.atomic_directory(ckpt.checkpoint_dir(self.run_dir, self.step)) as tmp:
            ckpt.save_safetensors(tmp / ckpt.MODEL_FILE, self.model.state_dict())
            (tmp / ckpt.CONFIG_FILE).write_text(strict_json(self.model_cfg.to_dict(), "the model config", indent=2))
            (tmp / OBJECTIVE_FILE).write_text(strict_json(self.objective.config.to_dict(), "the objective", indent=2))
            if self.ema:
                ckpt.save_safetensors(tmp / "ema.safetensors", self.ema.state_dict())
            if self.power_ema:
                for sigma_rel in self.power_ema.sigma_rels:
                    ckpt.save_safetensors(tmp / f"ema-sigma-{sigma_rel:.3f}.safetensors",
                                          self.power_ema.shadow(sigma_rel))
            ckpt.save_torch(tmp / STATE_FILE, {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "power_ema_updates": self.power_ema.num_updates if self.power_ema else 0,
                "rng": ckpt.capture_rng_state(),
                "skipped_steps": self.guard.counts()[1],
                "stopped_by_signal": stopped,
            })
        if self.power_ema and self.step > 0 and not self.cfg.snapshot_every and not stopped:
            save_snapshot(self.run_dir, self.step, self.power_ema)

    def load_latest(self, from_step: int | None = None) -> None:
        """Load the newest checkpoint (or the one of ``from_step``). If it is damaged, the error names the newest
        older checkpoint that loads, to resume from with --from-step."""
        found = ckpt.list_checkpoints(self.run_dir)
        if not found:
            raise MPDiTError(f"nothing to resume in {self.run_dir}: no checkpoints/step-NNNNNNN folder")
        if from_step is not None and from_step not in dict(found):
            raise MPDiTError(f"{self.run_dir} has no checkpoint of step {from_step} "
                             f"(it has: {', '.join(str(step) for step, _ in found)})")
        candidates = [path for step, path in found if from_step is None or step <= from_step]
        try:
            self.load_checkpoint(candidates[-1])
        except MPDiTError as error:
            for older in reversed(candidates[:-1]):
                try:
                    self.load_checkpoint(older)
                except MPDiTError:
                    continue
                raise MPDiTError(f"{error}; the previous checkpoint {older} is intact: "
                                 f"resume from it with --resume {self.run_dir} --from-step {self.step}") from None
            raise

    def load_checkpoint(self, path: Path) -> None:
        """Model, optimizer, EMAs, RNG state and step from one checkpoint folder."""
        device = self.dist.device
        load_state_dict_checked(self.model, ckpt.load_safetensors(path / ckpt.MODEL_FILE, device), str(path))
        state = ckpt.load_torch(path / STATE_FILE, map_location=device)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema:
            self.ema.load_state_dict(ckpt.load_safetensors(path / "ema.safetensors", device))
        if self.power_ema:
            self.power_ema.load_state_dict({
                "num_updates": state["power_ema_updates"], "sigma_rels": list(self.power_ema.sigma_rels),
                "shadows": [ckpt.load_safetensors(path / f"ema-sigma-{s:.3f}.safetensors", device)
                            for s in self.power_ema.sigma_rels]})
        ckpt.restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.guard = DivergenceGuard(device, skipped=int(state.get("skipped_steps", 0)))
        self.resumed_at_stop = bool(state.get("stopped_by_signal", False))

    # --- one step ---------------------------------------------------------------------------

    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, record: bool) -> dict:
        """One optimizer step on this rank's share of the global batch; returns scalar stats as 0-d tensors
        (read them only when logging: reading one waits for the device)."""
        x0, y, t, noise = global_batch(self.data, self.cfg, self.objective, self.step)
        share = slice(self.dist.rank * len(x0) // self.dist.world_size,
                      (self.dist.rank + 1) * len(x0) // self.dist.world_size)
        cuda = self.dist.device.type == "cuda"  # pinned + non_blocking: the copy does not wait for the device
        x0, y, t, noise = (v[share].pin_memory().to(self.dist.device, non_blocking=True) if cuda
                           else v[share].to(self.dist.device) for v in (x0, y, t, noise))
        set_lr(self.optimizer, self.schedule(self.step))
        self.model.train()
        forward = self.eager_forward if record else self.forward  # a compiled graph runs no telemetry hooks
        with self.telemetry.recording(record), self.autocast():
            losses = self.objective.training_losses(lambda x, s: forward(x, s, y), x0, t, noise,
                                                    min_snr_gamma=self.cfg.min_snr_gamma)
        loss = losses["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        else:  # the norm alone: no pass over the gradients to scale them by 1
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        stats = {"loss": loss.detach(), "mse": losses["mse"].mean().detach(), "vb": losses["vb"].mean().detach()}
        if self.dist.world_size > 1:  # average the logged figures over ranks (and agree on the guard's flag)
            packed = torch.stack(list(stats.values()))
            dist.all_reduce(packed)
            stats = dict(zip(stats, packed / self.dist.world_size))
        self.optimizer.found_inf = self.guard.found_inf(stats["loss"], grad_norm)  # 1: the step changes nothing
        self.optimizer.step()
        self.step += 1
        if self.ema:
            self.ema.update(self.model)
        if self.power_ema:
            self.power_ema.update(self.model)
        return stats | {"grad_norm": grad_norm.detach()}

    def validation_loss(self) -> float:
        """The validation loss of the raw weights (mpdit.training.validation) on the run's held-out images."""
        return validation_loss(self.model, self.objective, self.held_out, device=self.dist.device)["val_loss"]

    # --- the loop ---------------------------------------------------------------------------

    def run(self, sample_grid=None) -> Path | None:
        """Train from self.step to cfg.steps; log, checkpoint, and call sample_grid(trainer) when due.

        The main process holds the run folder's lock (rundir.RunLock) throughout, and first repairs what a killed
        process left (repair_run_dir). A run resumed at a step that has a grid (its last, or one of --sample-every)
        draws that grid again, before going on (as a run never stopped draws it after that step's checkpoint)."""
        if not self.dist.is_main:
            return self._train(sample_grid)
        with RunLock(self.run_dir):
            self.repair_run_dir()
            every = self.cfg.sample_every
            if sample_grid is not None and self.step > 0 and (self.step == self.cfg.steps or every and
                                                              self.step % every == 0):
                sample_grid(self)  # a kill during that grid left none
            return self._train(sample_grid)

    def repair_run_dir(self) -> None:
        """Before training (lock held): delete killed writers' temp files; set aside the checkpoints after the step
        resumed from (--from-step); rewrite that step's power-EMA snapshots if a kill lost them; cut log.jsonl back
        to that step. A new run (step 0) with no checkpoint starts the log and the snapshots afresh."""
        remove_leftovers(self.run_dir)
        found = ckpt.list_checkpoints(self.run_dir)
        for step, path in found:
            if self.step and step > self.step:
                aside = path.with_name(f"{path.name}.discarded")
                remove_path(aside)
                os.replace(path, aside)
                print(f"set aside {path} (after the resumed step {self.step}) as {aside.name}")
        if self.power_ema and self.step > 0 and (self.step % self.cfg.snapshot_every == 0 if self.cfg.snapshot_every
                                                 else not self.resumed_at_stop):
            if not all(snapshot_path(self.run_dir, self.step, s).is_file() for s in self.power_ema.sigma_rels):
                save_snapshot(self.run_dir, self.step, self.power_ema)
        if self.step == 0 and not found:
            for path in (self.run_dir / SNAPSHOTS).glob("step-*"):
                path.unlink()  # left by a run killed before its first checkpoint
        trim_log(self.run_dir, self.step)

    def check_divergence(self, streak: int, skipped: int) -> None:
        """TrainingDiverged once the last cfg.max_bad_steps steps were all skipped (``DivergenceGuard.counts``)."""
        if streak >= self.cfg.max_bad_steps:
            last = ckpt.latest_checkpoint(self.run_dir)
            raise TrainingDiverged(
                f"training diverged: the loss or gradient norm was not finite for the last {streak} steps (to step "
                f"{self.step}; {skipped} skipped in all), so they changed nothing; "
                + (f"the newest checkpoint is {last}. " if last else "") + "Train again with a lower --lr",
                step=self.step)

    def stop_for_signal(self, received: str | None, checkpointed: bool) -> None:
        """Raise Preempted after writing this step's checkpoint (unless the loop has just written it)."""
        if not checkpointed:
            self.save_checkpoint(stopped=True)
        raise Preempted(f"stopped by {received or 'a signal to another rank'} after step {self.step:,}: checkpoint "
                        f"{ckpt.checkpoint_dir(self.run_dir, self.step)}", f"mpdit train --resume {self.run_dir}",
                        received)

    def _train(self, sample_grid) -> Path | None:
        cfg, main = self.cfg, self.dist.is_main
        self.write_run_files()
        log = open(self.run_dir / "log.jsonl", "a") if main else None
        bar = None
        if main and cfg.progress:
            from tqdm.auto import tqdm
            # One speed: images/s averaged since this call started (smoothing=0), the rate tqdm's estimate uses too.
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True, smoothing=0,
                       bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]")
        last_time, last_step, start_step = time.perf_counter(), self.step, self.step
        start_time = last_time
        stop = StopSignals(self.dist.world_size, self.dist.device).install()
        try:
            while self.step < cfg.steps:
                record = bool(cfg.telemetry_every) and (self.step + 1) % cfg.telemetry_every == 0
                first_compiled = self.compiled and self.step == start_step
                started = time.perf_counter()
                stats = self.train_step(record)
                if first_compiled and main:  # the first step of a compiled model includes its compilation
                    print(f"compiled the training step: first step took {time.perf_counter() - started:.1f} s",
                          flush=True)
                due = lambda every: bool(every) and self.step % every == 0  # noqa: E731
                snapshot = bool(cfg.snapshot_every and self.power_ema) and due(cfg.snapshot_every)
                validate = due(cfg.val_every)  # on every rank, so that all synchronise; computed on the main one
                logged = due(cfg.log_every) or record or self.step == cfg.steps or validate
                synchronised = logged or snapshot or due(cfg.ckpt_every)  # steps that read the device anyway
                if synchronised:
                    streak, skipped = self.guard.counts()
                if main and logged:
                    stats = {k: float(v) for k, v in stats.items()} | {"skipped_steps": skipped}
                    now = time.perf_counter()
                    rate = (self.step - last_step) * cfg.batch_size / max(now - last_time, 1e-9)
                    last_time, last_step = now, self.step
                    entry = {"step": self.step, **stats, "lr": self.optimizer.param_groups[0]["lr"],
                             "images_per_s": round(rate, 2), "time": time.time()}
                    if record:
                        entry["telemetry"] = self.telemetry.report()
                    if validate:
                        entry["val_loss"] = self.validation_loss()
                    log.write(json.dumps(json_safe(entry), allow_nan=False) + "\n")
                    log.flush()
                    if bar is not None:
                        average = (self.step - start_step) * cfg.batch_size / max(now - start_time, 1e-9)
                        bar.set_postfix_str(f"{average:.0f} images/s, loss {stats['loss']:.4f}", refresh=False)
                if synchronised:
                    self.check_divergence(streak, skipped)
                if snapshot and main:
                    require_finite({f"sigma-{s:.3f}.{k}": v for s, shadow in zip(self.power_ema.sigma_rels,
                                                                                self.power_ema.shadows)
                                    for k, v in shadow.items()}, f"the power-EMA snapshot of step {self.step}")
                    with self.reporting_write_errors(self.run_dir / SNAPSHOTS):
                        save_snapshot(self.run_dir, self.step, self.power_ema)
                if bar is not None:
                    bar.update(1)
                    if self.step == cfg.steps:
                        bar.close()  # the bar times the steps, not the final checkpoint and sample grid
                if due(cfg.ckpt_every) or self.step == cfg.steps:
                    self.save_checkpoint()
                if main and sample_grid is not None and (due(cfg.sample_every) or self.step == cfg.steps):
                    sample_grid(self)
                if self.step < cfg.steps and stop.agreed():
                    self.stop_for_signal(stop.received, checkpointed=due(cfg.ckpt_every))
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        if self.step == cfg.steps and ckpt.latest_checkpoint(self.run_dir) is None and main:
            self.save_checkpoint()  # a zero-step run still leaves a checkpoint to sample from
        return ckpt.latest_checkpoint(self.run_dir) if main else None


def read_run_configs(run_dir: Path) -> tuple[DiTConfig, TrainConfig]:
    """The model and training configs a run wrote at its start."""
    try:
        model_cfg = DiTConfig.from_saved(read_json(run_dir / ckpt.CONFIG_FILE, "model config"),
                                         str(run_dir / ckpt.CONFIG_FILE))
        train_cfg = TrainConfig.from_dict(read_json(run_dir / TRAIN_CONFIG, "training config"))
    except FileNotFoundError as error:
        raise MPDiTError(f"{run_dir} is not a training run: missing {Path(error.filename).name}") from None
    return model_cfg, train_cfg
