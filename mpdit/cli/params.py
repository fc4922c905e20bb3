"""`mpdit params`: parameter counts per conditioning variant and mp preset, with differences in percent; for mp
settings that keep LayerNorms, also the DyT rows (each LayerNorm replaced by tanh(alpha x): one scalar per layer)."""

from mpdit.files import strict_json
from mpdit.model.config import NORMS, DiTConfig, mp_label, parse_mp
from mpdit.model.dit import count_params
from mpdit.nn.modulation import CONDITIONINGS


def param_table(model: str, mp_specs: list[str], conditionings: list[str], **overrides) -> list[dict]:
    """One row per (mp, conditioning): params and the change against adaln-zero and scale-shift-gate rows."""
    rows = []
    for spec in mp_specs:
        switches = parse_mp(spec)
        for norm in NORMS if "no_layernorm" not in switches else ("layernorm",):
            counts = {name: count_params(DiTConfig.from_preset(model, mp=switches, conditioning=name, norm=norm,
                                                               **overrides))
                      for name in conditionings}
            for name, params in counts.items():
                row = {"model": model, "mp": mp_label(switches), "norm": norm, "conditioning": name, "params": params}
                for ref in ("adaln-zero", "scale-shift-gate"):
                    if ref in counts:
                        row[f"vs_{ref}_pct"] = round(100.0 * (params - counts[ref]) / counts[ref], 3)
                rows.append(row)
    return rows


def run(args) -> int:
    overrides = dict(input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes,
                     learn_sigma=not args.no_learn_sigma)
    conditionings = args.conditioning.split(",") if args.conditioning else list(CONDITIONINGS)
    rows = param_table(args.model, args.mp.split(";"), conditionings, **overrides)
    if args.json:
        print(strict_json(rows, "the rows", indent=2))
        return 0
    print(f"{args.model}, input {args.in_channels}x{args.input_size}x{args.input_size}, "
          f"{args.num_classes} classes, learned sigma: {not args.no_learn_sigma}")
    print(f"{'mp':<8} {'norm':<10} {'conditioning':<22} {'params':>14} {'vs adaln-zero':>14} "
          f"{'vs scale-shift-gate':>20}")
    for row in rows:
        pct = [f"{row[k]:+.2f}%" if k in row else "-" for k in ("vs_adaln-zero_pct", "vs_scale-shift-gate_pct")]
        print(f"{row['mp']:<8} {row['norm']:<10} {row['conditioning']:<22} {row['params']:>14,} {pct[0]:>14} "
              f"{pct[1]:>20}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("params", help="parameter counts per conditioning variant and mp preset",
                                   description=__doc__)
    parser.add_argument("--model", default="DiT-S/2", help="zoo name, e.g. DiT-S/2 (default)")
    parser.add_argument("--input-size", type=int, default=32, help="latent/image side (default 32)")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--no-learn-sigma", action="store_true", help="output noise only (C, not 2C channels)")
    parser.add_argument("--mp", default="none;all",
                        help="';'-separated mp settings, each all, none or a comma list of switches (default none;all)")
    parser.add_argument("--conditioning", default=None, help="comma list of variants (default: all of them)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of row objects")
    parser.set_defaults(func=run)
