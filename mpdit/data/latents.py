"""VAE latents: encode an image folder once with diffusers' AutoencoderKL, train on the shards, decode samples.

Layout of an encoded folder OUT (``mpdit encode``, ``encode_folder``):

- ``OUT/shard-NNNNN.safetensors``: ``mean`` and ``std`` (float16, (n, C, h, w): the posterior
  N(mean, std^2) of each image, unscaled) and ``labels`` (int64, (n,)); with ``flip`` each image is
  followed by its mirror copy. The header metadata holds ``skipped`` (unreadable files of the shard).
  Each shard covers files [k * shard_size, (k + 1) * shard_size) of the sorted file list and is
  written atomically, so an interrupted encoding resumes with the missing shards only.
- ``OUT/plan.json``: what is being encoded (fixed at the start; a resume must match it).
- ``OUT/metadata.json``: the plan plus counts and per-channel statistics of z = mean + std * eps
  over the dataset (``channel_mean``, ``channel_std``), written when every shard exists.

Training reads ``latents:OUT`` as a :class:`LatentDataset`: z = mean + std * eps with eps from the
step's generator, normalized per channel, (z - channel_mean) / channel_std. Decoding inverts that
and calls ``vae.decode`` (:class:`LatentDecoder`). Official DiT checkpoints use z * 0.18215
instead: ``LatentDecoder.official``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mpdit.data.datasets import SPEC_LOADERS, class_folders, to_uint8
from mpdit.errors import MPDiTError
from mpdit.hub_access import from_hub
from mpdit.files import atomic_write_text, load_safetensors, read_safetensors_metadata, save_safetensors, strict_json

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
OFFICIAL_DIT_SCALE = 0.18215  # the SD VAE's scaling factor, used by the official DiT checkpoints
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
PLAN, METADATA = "plan.json", "metadata.json"


def load_vae(name: str = DEFAULT_VAE, device: str | torch.device = "cpu"):
    """diffusers' AutoencoderKL from a local folder or a Hub id, in eval mode on ``device``."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise MPDiTError("the VAE needs diffusers: pip install -e \".[vae]\"") from None

    try:
        with warnings.catch_warnings():  # diffusers still passes an argument huggingface_hub deprecated
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
            vae = from_hub(name, "the VAE", lambda offline: AutoencoderKL.from_pretrained(
                name, low_cpu_mem_usage=False, local_files_only=offline),  # low_cpu_mem_usage off: no accelerate
                "pass --vae PATH, a local AutoencoderKL folder (config.json and its weights)")
    except MPDiTError:
        raise
    except Exception as error:  # diffusers / hub raise many types for a bad path or id
        message = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise MPDiTError(f"cannot load the VAE '{name}' (a local AutoencoderKL folder or a Hub id): {message}") from None
    return vae.eval().requires_grad_(False).to(device)


# ----------------------------------------------------------------------------------------------
# Images in


def center_crop_arr(image, resolution: int) -> np.ndarray:
    """ADM's / DiT's preprocessing: PIL image -> uint8 (resolution, resolution, 3).

    Halve with BOX while the short side is >= 2 * resolution, resize with BICUBIC so the short side
    is ``resolution``, then center-crop.
    """
    from PIL import Image

    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


def read_image(path: Path, resolution: int) -> np.ndarray | None:
    """uint8 (resolution, resolution, 3), or None when PIL cannot read the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return center_crop_arr(image, resolution)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def list_images(root: str | Path, class_index: str | Path | None = None) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of an ImageNet-layout folder, sorted.

    Without ``class_index``: one sub-folder per class (classes sorted by name; every file below a class
    folder is listed, non-images are caught when read). With ``class_index``: a text file of lines
    ``RELATIVE/PATH LABEL`` (or ``PATH,LABEL``), LABEL a class name; class names are sorted.
    """
    root = Path(root)
    if not root.is_dir():
        raise MPDiTError(f"image folder {root} does not exist")
    if class_index is not None:
        pairs = []
        for number, line in enumerate(Path(class_index).read_text().splitlines(), 1):
            fields = line.replace(",", " ").split()
            if not fields:
                continue
            if len(fields) < 2:
                raise MPDiTError(f"{class_index}:{number}: expected 'PATH LABEL', got {line!r}")
            pairs.append((root / fields[0], fields[1]))
        names = sorted({label for _, label in pairs})
        index = {name: i for i, name in enumerate(names)}
        pairs.sort(key=lambda p: str(p[0]))
        return [p for p, _ in pairs], [index[label] for _, label in pairs], names
    classes = class_folders(root, drop_split_names=False)
    if not classes:
        raise MPDiTError(f"no class sub-folders in {root}: expected {root}/<class>/<images> or pass a class index file")
    files, labels = [], []
    for label, folder in enumerate(classes):
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            files.append(path)
            labels.append(label)
    return files, labels, [p.name for p in classes]


# ----------------------------------------------------------------------------------------------
# Encoding


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


@torch.no_grad()
def encode_folder(src: str | Path, out: str | Path, *, vae: str = DEFAULT_VAE, resolution: int = 128,
                  flip: bool = False, batch_size: int = 64, shard_size: int = 10_000,
                  class_index: str | Path | None = None, device: str = "cpu", rank: int = 0, world_size: int = 1,
                  progress: bool = True, vae_model=None) -> dict | None:
    """Encode the images of ``src`` into shards in ``out`` (see the module doc); returns the metadata.

    Shard k is encoded by rank k mod world_size; missing shards only. Under several processes every
    rank must call this; rank 0 writes metadata.json after a barrier and returns it (others: None).
    ``vae_model``: an already loaded AutoencoderKL (``vae`` is then only recorded).
    """
    if resolution < 1 or batch_size < 1 or shard_size < 1:
        raise MPDiTError("resolution, batch size and shard size must be >= 1")
    files, labels, class_names = list_images(src, class_index)
    if not files:
        raise MPDiTError(f"no files in {src}")
    out = Path(out)
    plan = {"source": str(Path(src).resolve()), "vae": vae, "resolution": resolution, "flip": flip,
            "shard_size": shard_size, "num_files": len(files), "class_names": class_names,
            "num_shards": -(-len(files) // shard_size)}
    plan_path = out / PLAN
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        changed = [k for k in plan if k != "source" and old.get(k) != plan[k]]
        if changed:
            raise MPDiTError(f"{out} holds an encoding with another {changed[0]} ({old.get(changed[0])!r}, now "
                             f"{plan[changed[0]]!r}): use another --out or the same options")
    elif rank == 0:
        atomic_write_text(plan_path, strict_json(plan, "the encoding plan", indent=2))
    todo = [k for k in range(rank, plan["num_shards"], world_size) if not (out / shard_name(k)).is_file()]
    if todo:
        vae_model = vae_model if vae_model is not None else load_vae(vae, device)
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        count = sum(len(files[k * shard_size:(k + 1) * shard_size]) for k in todo)
        bar = tqdm(total=count, desc=f"encode (rank {rank})" if world_size > 1 else "encode", unit="img")
    for k in todo:
        _encode_shard(vae_model, files[k * shard_size:(k + 1) * shard_size], labels[k * shard_size:(k + 1) * shard_size],
                      out / shard_name(k), resolution, flip, batch_size, bar)
    if bar is not None:
        bar.close()
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    return finalize(out) if rank == 0 else None


def _encode_shard(vae, files, labels, path: Path, resolution: int, flip: bool, batch_size: int, bar) -> None:
    means, stds, kept, skipped = [], [], [], 0
    device, dtype = vae.device, vae.dtype
    for start in range(0, len(files), batch_size):
        arrays = []
        for file, label in zip(files[start:start + batch_size], labels[start:start + batch_size]):
            array = read_image(file, resolution)
            if array is None:
                skipped += 1
                print(f"mpdit encode: skipped unreadable or non-image file {file}", file=sys.stderr)
            else:
                arrays.append(array)
                kept += [label] * (2 if flip else 1)
            if bar is not None:
                bar.update(1)
        if not arrays:
            continue
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (n, 3, R, R) in [-1, 1]
        if flip:  # each image then its mirror copy
            x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)
        posterior = vae.encode(x.to(device, dtype)).latent_dist
        means.append(posterior.mean.float().cpu().half())
        stds.append(posterior.std.float().cpu().half())
    c, h = vae.config.latent_channels, resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    empty = torch.zeros(0, c, h, h, dtype=torch.float16)
    save_safetensors(path, {"mean": torch.cat(means) if means else empty, "std": torch.cat(stds) if stds else empty,
                            "labels": torch.tensor(kept, dtype=torch.int64)}, metadata={"skipped": skipped})


def finalize(out: str | Path) -> dict:
    """Per-channel statistics of z = mean + std * eps over all shards -> out/metadata.json; returns it.

    E[z] = E[mean], E[z^2] = E[mean^2] + E[std^2], accumulated in float64 shard by shard.
    """
    out = Path(out)
    plan = json.loads((out / PLAN).read_text())
    missing = [k for k in range(plan["num_shards"]) if not (out / shard_name(k)).is_file()]
    if missing:
        raise MPDiTError(f"{out} misses {len(missing)} shard(s) (first {shard_name(missing[0])}): rerun mpdit encode")
    total, first, second, skipped, shape = 0, 0.0, 0.0, 0, None
    for k in range(plan["num_shards"]):
        shard = load_safetensors(out / shard_name(k))
        mean, std = shard["mean"].double(), shard["std"].double()
        total += len(mean)
        first = first + mean.sum(dim=(0, 2, 3))
        second = second + (mean**2 + std**2).sum(dim=(0, 2, 3))
        skipped += int(read_safetensors_metadata(out / shard_name(k)).get("skipped", 0))
        shape = shape or list(mean.shape[1:])
    if total == 0:
        raise MPDiTError(f"no readable images were encoded into {out} ({skipped} files skipped)")
    pixels = total * shape[1] * shape[2]
    channel_mean = first / pixels
    channel_std = (second / pixels - channel_mean**2).clamp(min=1e-12).sqrt()
    meta = {**plan, "latent_shape": shape, "num_items": total, "num_images": total // (2 if plan["flip"] else 1),
            "skipped": skipped, "channel_mean": channel_mean.tolist(), "channel_std": channel_std.tolist()}
    atomic_write_text(out / METADATA, strict_json(meta, "the latent statistics", indent=2))
    return meta


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not (path / METADATA).is_file():
        hint = "the encoding is unfinished: rerun mpdit encode" if (path / PLAN).is_file() else "run mpdit encode first"
        raise MPDiTError(f"no {METADATA} in {path}: {hint}")
    return json.loads((path / METADATA).read_text())


# ----------------------------------------------------------------------------------------------
# Training data


class LatentDataset:
    """Encoded latents in memory (float16 posterior mean and std, (N, C, h, w)) with labels (N,).

    ``model_batch(indices, generator)`` draws z = mean + std * eps and normalizes it per channel.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        shards = [load_safetensors(self.path / shard_name(k)) for k in range(self.meta["num_shards"])]
        self.mean = torch.cat([s["mean"] for s in shards])
        self.std = torch.cat([s["std"] for s in shards])
        self.labels = torch.cat([s["labels"] for s in shards])
        self.class_names = list(self.meta["class_names"])
        self.num_classes = len(self.class_names)
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < self.num_classes:
            raise MPDiTError(f"latents:{self.path} hold labels {int(self.labels.min())}..{int(self.labels.max())}, but "
                             f"{METADATA} names {self.num_classes} classes: encode the data again")
        self.channel_mean = torch.tensor(self.meta["channel_mean"], dtype=torch.float32)
        self.channel_std = torch.tensor(self.meta["channel_std"], dtype=torch.float32)
        self.source = f"latents:{self.path}"

    def __len__(self) -> int:
        return self.mean.shape[0]

    def __repr__(self) -> str:
        return f"LatentDataset({len(self)} latents {self.channels}x{self.resolution[0]}x{self.resolution[1]}, " \
               f"{self.num_classes} classes, vae={self.meta['vae']!r})"

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    @property
    def resolution(self) -> tuple[int, int]:
        return self.mean.shape[2], self.mean.shape[3]

    def fit(self, image_size: int) -> LatentDataset:
        """Itself when the latents are ``image_size`` wide; latents cannot be padded or resized."""
        if image_size != self.resolution[0]:
            raise MPDiTError(f"latents:{self.path} are {self.resolution[0]}x{self.resolution[1]}: image size "
                             f"{image_size} cannot change them (encode at another --resolution)")
        return self

    def model_batch(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Normalized latent samples (B, C, h, w), eps drawn from ``generator``."""
        mean, std = self.mean[indices].float(), self.std[indices].float()
        z = mean + std * torch.randn(mean.shape, generator=generator)
        return (z - self.channel_mean.view(1, -1, 1, 1)) / self.channel_std.view(1, -1, 1, 1)


def load_latents(path: str | Path, split: str, image_size: int | None) -> LatentDataset:
    """``latents:PATH`` for load_dataset: split train reads PATH, split test PATH/val (an encoded folder)."""
    path = Path(os.path.expanduser(str(path)))
    if split != "train":
        if not (path / "val" / METADATA).is_file():
            raise MPDiTError(f"latents:{path} has no encoded val/ folder for split '{split}' "
                             f"(encode the validation images into {path / 'val'})")
        path = path / "val"
    data = LatentDataset(path)
    return data if image_size is None else data.fit(image_size)


# ----------------------------------------------------------------------------------------------
# Decoding


@dataclass
class LatentDecoder:
    """Model-space latents (N, C, h, w) -> uint8 images (N, 3, fh, fw) (f = 8 for the SD VAE): z = x * std + mean,
    vae.decode."""

    vae: object
    channel_mean: torch.Tensor
    channel_std: torch.Tensor
    name: str = ""  # the VAE's id or folder, for reports
    batch_size: int = 32

    @classmethod
    def official(cls, vae: str = DEFAULT_VAE, device: str | torch.device = "cpu") -> LatentDecoder:
        """The official DiT latent space: x = z * 0.18215."""
        model = load_vae(vae, device)
        c = model.config.latent_channels
        return cls(model, torch.zeros(c), torch.full((c,), 1 / OFFICIAL_DIT_SCALE), vae)

    @classmethod
    def for_data(cls, spec: str, vae: str | None = None, device: str | torch.device = "cpu") -> LatentDecoder | None:
        """The decoder of a ``latents:PATH`` dataset spec (reads only its metadata); None for pixel data."""
        if not spec.startswith("latents:"):
            return None
        meta = read_metadata(Path(os.path.expanduser(spec.removeprefix("latents:"))))
        return cls(load_vae(vae or meta["vae"], device), torch.tensor(meta["channel_mean"]),
                   torch.tensor(meta["channel_std"]), vae or meta["vae"])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        device, dtype = self.vae.device, self.vae.dtype
        out = []
        for chunk in x.split(self.batch_size):
            z = chunk.to(device, torch.float32) * self.channel_std.to(device).view(1, -1, 1, 1) \
                + self.channel_mean.to(device).view(1, -1, 1, 1)
            out.append(to_uint8(self.vae.decode(z.to(dtype)).sample.float().cpu()))
        return torch.cat(out)


SPEC_LOADERS["latents"] = load_latents  # load_dataset("latents:PATH")
