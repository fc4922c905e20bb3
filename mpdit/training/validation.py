"""A validation loss that ranks runs cheaply: the objective's own training target on held-out images at fixed
noise levels with fixed noise, unweighted, so two checkpoints of one objective compare exactly (`mpdit eval
--loss`, the ablation runner's val_loss column, `mpdit train --val-every`).

Held-out images: the first ``num`` of a seeded draw from the data's test split (MNIST's and IDX test files, an
image folder's val/ or test/, latents' test split), or of the share a run kept out with `mpdit train --holdout`.
Levels: the objective's VALIDATION_LEVELS fixed times (DDPM: steps 50, 150, ..., 950; flow: t = 0.05, ..., 0.95);
the noise of batch b at level k comes from a generator seeded by (seed, b, k); labels are the true classes.
"""

import torch

from mpdit.data.datasets import ImageDataset, load_dataset, split_holdout
from mpdit.diffusion.objectives import Objective
from mpdit.errors import MPDiTError
from mpdit.model.dit import MPDiT

VALIDATION_IMAGES = 1000


def held_out_data(data: str, image_size: int, holdout: float = 0.0) -> ImageDataset:
    """The images a run never trained on: its holdout share (``holdout`` > 0), else the data's test split."""
    if holdout > 0:
        return split_holdout(load_dataset(data, "train", image_size), holdout)[1]
    try:
        return load_dataset(data, "test", image_size)
    except MPDiTError as error:
        raise MPDiTError(f"no held-out images for a validation loss ({error}): train with --holdout FRACTION to keep "
                         "a share of the training images out") from None


@torch.no_grad()
def validation_loss(model: MPDiT, objective: Objective, data: ImageDataset, *, num: int = VALIDATION_IMAGES,
                    seed: int = 0, batch_size: int = 250, device="cpu") -> dict:
    """{"val_loss": mean over images and levels, "per_level": the mean at each level, "levels", "num_images"};
    ``data``: held-out images (an ImageDataset or latents)."""
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:num]
    model.eval()
    sums = torch.zeros(len(objective.validation_levels()), dtype=torch.float64)
    for b, idx in enumerate(chosen.split(batch_size)):
        x0 = data.model_batch(idx, torch.Generator().manual_seed(seed * 1_000_003 + b)).to(device)
        y = data.labels[idx].to(device)
        for k, t in enumerate(objective.validation_times(len(idx))):
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed((seed * 1_000_003 + b) * 64 + k))
            mse = objective.training_losses(lambda x, s: model(x, s, y), x0, t.to(device), noise.to(device))["mse"]
            sums[k] += mse.double().sum().cpu()
    per_level = (sums / len(chosen)).tolist()
    return {"val_loss": sum(per_level) / len(per_level), "per_level": per_level,
            "levels": list(objective.validation_levels()), "num_images": len(chosen), "seed": seed}
