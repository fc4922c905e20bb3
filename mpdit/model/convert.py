"""Official DiT checkpoints (facebookresearch/DiT layout) <-> our baseline (mp none, adaln-zero).

Our baseline uses DiT's own key names except for the adaLN projections, which are
`modulation.proj` here (`adaLN_modulation.1` there, index 1 behind the SiLU).
"""

from pathlib import Path

import torch

from mpdit.errors import MPDiTError
from mpdit.files import load_torch
from mpdit.model.config import SIZES, DiTConfig
from mpdit.model.dit import MPDiT, load_state_dict_checked

RENAMES = [(".adaLN_modulation.1.", ".modulation.proj.")]  # (official, ours)


def rename_keys(state: dict[str, torch.Tensor], to_ours: bool) -> dict[str, torch.Tensor]:
    """Official -> our key names (to_ours) or back; tensors are shared, not copied."""
    out = {}
    for key, value in state.items():
        for official, ours in RENAMES:
            key = key.replace(official, ours) if to_ours else key.replace(ours, official)
        out[key] = value
    return out


def from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official DiT state dict to our key names."""
    return rename_keys(state, to_ours=True)


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our baseline's state dict to the official DiT layout."""
    return rename_keys(state, to_ours=False)


def _shape(state: dict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise MPDiTError(f"not an official DiT state dict: missing key '{key}'")
    return tuple(state[key].shape)


def infer_config(state: dict[str, torch.Tensor], num_classes: int | None = None) -> DiTConfig:
    """The baseline config of an official-layout state dict, read from its tensor shapes.

    The label table has num_classes rows, plus one for the null class when DiT trained with label dropout: the
    shapes cannot tell which, so without ``num_classes`` the table is taken to end with a null class (as in every
    released DiT checkpoint); give ``num_classes`` for a DiT trained without label dropout (no guidance then)."""
    hidden, in_channels, patch, _ = _shape(state, "x_embedder.proj.weight")
    num_tokens = _shape(state, "pos_embed")[1]
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    rows = _shape(state, "y_embedder.embedding_table.weight")[0]
    out = _shape(state, "final_layer.linear.weight")[0] // patch**2
    heads = next((h for d, dim, h in SIZES.values() if (d, dim) == (depth, hidden)), None)
    if heads is None:
        raise MPDiTError(f"no DiT size with depth {depth} and hidden size {hidden}: cannot infer the head count")
    if num_classes is not None and rows not in (num_classes, num_classes + 1):
        raise MPDiTError(f"the checkpoint's label table has {rows} rows: that is not {num_classes} classes "
                         f"(with or without a null class); its class count is {rows - 1} or {rows}")
    null_class = num_classes is None or rows == num_classes + 1
    grid = int(round(num_tokens**0.5))
    return DiTConfig(input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                     depth=depth, num_heads=heads, num_classes=rows - null_class, learn_sigma=out == 2 * in_channels,
                     class_dropout_prob=0.1 if null_class else 0.0, mp=(), conditioning="adaln-zero",
                     name="official-DiT")


def load_official_state_dict(model: MPDiT, state: dict[str, torch.Tensor], source: str = "state dict") -> MPDiT:
    """Load an official-layout state dict into our baseline model; one-line error naming a bad key."""
    if model.config.mp or model.config.conditioning != "adaln-zero":
        raise MPDiTError("official DiT weights only fit the baseline: use mp none and conditioning adaln-zero")
    load_state_dict_checked(model, from_official(state), source)
    return model


def load_official_checkpoint(path: str | Path, device: str = "cpu", num_classes: int | None = None) -> MPDiT:
    """Build and load our baseline from an official checkpoint file (e.g. DiT-XL-2-256x256.pt).

    Accepts a bare state dict or a training checkpoint holding 'ema' (preferred) or 'model'. ``num_classes``: see
    infer_config (needed for a DiT trained without label dropout).
    """
    path = Path(path)
    if not path.is_file():
        raise MPDiTError(f"no DiT checkpoint at {path}")
    state = load_torch(path)  # safe loading: pickled objects are refused, and said so
    if isinstance(state, dict) and ("ema" in state or "model" in state):
        state = state.get("ema", state.get("model"))
    if not isinstance(state, dict):
        raise MPDiTError(f"DiT checkpoint {path} does not hold a state dict")
    model = MPDiT(infer_config(state, num_classes))
    return load_official_state_dict(model, state, str(path)).to(device)
