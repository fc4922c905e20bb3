"""`mpdit encode`: encode an image folder once into VAE latent shards (posterior mean and std) for `--data latents:OUT`.

Images are center-cropped and resized to --resolution as ADM / DiT do, optionally with a mirror copy
(--flip), and encoded with diffusers' AutoencoderKL (--vae: a Hub id or a local folder). An interrupted
run resumes with its missing shards; under torchrun the ranks split the shards. Unreadable or non-image
files are reported and skipped (their count is in OUT/metadata.json).
"""

from mpdit.data.latents import DEFAULT_VAE, encode_folder
from mpdit.files import strict_json
from mpdit.training.train import setup_distributed


def run(args) -> int:
    dist = setup_distributed(args.device)
    meta = encode_folder(args.src, args.out, vae=args.vae, resolution=args.resolution, flip=args.flip,
                         batch_size=args.batch_size, shard_size=args.shard_size, class_index=args.class_index,
                         device=str(dist.device),
                         rank=dist.rank, world_size=dist.world_size, progress=not args.no_progress)
    if meta is not None:
        keys = ("vae", "resolution", "flip", "latent_shape", "num_images", "num_items", "skipped", "num_shards")
        print(strict_json({"out": args.out, **{k: meta[k] for k in keys}, "num_classes": len(meta["class_names"])},
                          "the report"))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("encode", help="encode an image folder into VAE latent shards", description=__doc__)
    parser.add_argument("src", help="image folder: one sub-folder per class (or give --class-index)")
    parser.add_argument("--out", required=True, help="output folder for the shards and metadata.json")
    parser.add_argument("--vae", default=DEFAULT_VAE, help=f"AutoencoderKL Hub id or local folder (default {DEFAULT_VAE})")
    parser.add_argument("--resolution", type=int, default=128, help="image side before encoding (default 128)")
    parser.add_argument("--flip", action="store_true", help="also encode a horizontally flipped copy of each image")
    parser.add_argument("--class-index", default=None, help="text file of 'RELATIVE/PATH LABEL' lines")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=10_000, help="source images per shard (default 10000)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
