"""Class-conditional generation with a trained model, and the files samples are written to."""

from pathlib import Path

import numpy as np
import torch

from mpdit.data.datasets import to_uint8
from mpdit.diffusion.objectives import Objective, make_objective
from mpdit.errors import MPDiTError
from mpdit.model.dit import MPDiT, compile_default

# Guidance for the small CPU models: at a few thousand steps class accuracy rises with the scale up to ~6
# (15% at 2, 27% at 4, 30% at 6 in one tuning run, docs/results.md); 4 keeps samples less saturated.
DEFAULT_CFG_SCALE = 4.0


def device_of(name: str) -> str:
    """'auto' -> 'cuda' where a GPU is available, else 'cpu'; any other name as it is."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@torch.no_grad()
def generate(model: MPDiT, labels: torch.Tensor, *, objective: Objective | None = None, sampler: str | None = None,
             steps: int | str = 50, cfg_scale: float = 1.0, seed: int = 0, batch_size: int = 256,
             device: str | torch.device = "cpu", progress: bool = False, decode=None, first_batch: int = 0,
             compile_model: bool | None = None, time_shift: float = 1.0) -> torch.Tensor:
    """Samples for class labels (N,) -> uint8 images (N, C, H, W); ``steps``: a count (or, for DDPM, ADM's 'ddimN').

    ``objective``: the model's (mpdit.diffusion.objectives; None: DDPM); ``sampler``: one of its samplers (None: its
    default); ``time_shift``: SD3's shift of a flow sampler's times.

    Batch b draws its noise from a generator seeded by (seed, first_batch + b): the same seed and batch size give
    the same images (``first_batch`` lets a process produce batches first_batch.. of a larger set).
    ``decode``: maps each batch of model outputs (float (B, C, H, W)) to uint8 images, e.g. a
    ``mpdit.data.latents.LatentDecoder``; default ``to_uint8`` (pixel models). ``progress``: one bar over the
    sampling steps of all batches.
    ``compile_model``: torch.compile the guided network evaluation; None: on CUDA only (compile_default).
    """
    objective = objective or make_objective(None, model.config)
    sampler = objective.check_sampler(sampler or objective.default_sampler)
    objective.check_time_shift(time_shift)
    if cfg_scale < 0:
        raise MPDiTError(f"guidance scale must be >= 0, got {cfg_scale}")
    if isinstance(steps, int) and steps < 1:
        raise MPDiTError(f"sampling steps must be >= 1, got {steps}")
    model.eval()
    cfg = model.config
    guided = model.guided_forward
    if compile_default(compile_model, torch.device(device)):
        guided = torch.compile(guided)
    out = []
    batches = labels.split(batch_size)
    bar = None
    if progress:  # one bar over every sampling step of every batch
        from tqdm.auto import tqdm

        total = len(batches) * objective.sampling_steps(steps)
        bar = tqdm(total=total, desc=f"sample {len(labels)} images ({sampler} {steps} steps)", unit="step",
                   dynamic_ncols=True, smoothing=0)  # the average speed so far, as the training bar
    try:
        with model.reusing_weights():  # the weights do not change while sampling: normalized once
            for b, y in enumerate(batches):
                y = y.to(device)
                gen = torch.Generator().manual_seed(seed * 1_000_003 + first_batch + b)
                shape = (len(y), cfg.in_channels, cfg.input_size, cfg.input_size)
                x = objective.sample(lambda x_in, t: guided(x_in, t, y, cfg_scale), shape, sampler=sampler,
                                     steps=steps, generator=gen, device=device, progress=bar, time_shift=time_shift)
                out.append(decode(x) if decode is not None else to_uint8(x.cpu()))
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> Path:
    """Tile uint8 images (N, C, H, W) into one PNG, nrow images per row, 2 px gaps."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + 2) + 2, nrow * (w + 2) + 2, c), dtype=np.uint8)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, col = divmod(i, nrow)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path


def save_npz(images: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None) -> Path:
    """Write uint8 images as the ADM evaluator reads them: arr_0 of shape (N, H, W, 3) (gray repeated), plus labels."""
    arr = images.permute(0, 2, 3, 1).numpy()
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if labels is None else {"labels": labels.numpy()}
    np.savez(path, arr_0=arr, **extra)
    return path


def grid_labels(num_classes: int, per_class: int, max_classes: int = 10) -> torch.Tensor:
    """Labels for a grid: the first min(num_classes, max_classes) classes, per_class each, row by row."""
    k = min(num_classes, max_classes)
    return torch.arange(k).repeat(per_class)
