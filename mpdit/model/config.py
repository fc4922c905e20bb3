"""Typed model configuration, the magnitude-preservation switches, and the model zoo."""

import dataclasses
from dataclasses import dataclass, field

from mpdit.errors import MPDiTError, dataclass_from_dict, require_field_types
from mpdit.nn.modulation import conditioning_ops

# The eight switches of the paper's ablation (DESIGN.md section 1), each changing only its own piece.
MP_SWITCHES = (
    "cosine_attention",    # q, k normalized per head before attention
    "weight_norm",         # linears -> weight-normalized MPLinear without bias
    "forced_weight_norm",  # stored weights renormalized to unit rows in training
    "mp_residual",         # x + gate * branch -> mp_sum(x, gate * branch, 0.3)
    "mp_silu",             # every SiLU and the MLP's GELU -> mp_silu
    "no_layernorm",        # LayerNorms removed
    "mp_pos_embed",        # position table mean-removed, unit RMS, added by mp_sum(., ., 0.5)
    "mp_embedding",        # MP timestep (Fourier of ln(sigma)/4) and label embedders, mp_sum(t, y, 0.5)
)
MP_PRESETS = {"all": MP_SWITCHES, "none": ()}


def parse_mp(spec) -> tuple[str, ...]:
    """'all', 'none', 'a,b,...' or a sequence of switch names -> the switches in canonical order."""
    if isinstance(spec, str):
        if spec in MP_PRESETS:
            return MP_PRESETS[spec]
        names = [name.strip() for name in spec.split(",") if name.strip()]
    else:
        names = list(spec)
    unknown = [name for name in names if name not in MP_SWITCHES]
    if unknown:
        raise MPDiTError(f"unknown mp switch '{unknown[0]}': use all, none, or a comma list of {', '.join(MP_SWITCHES)}")
    return tuple(name for name in MP_SWITCHES if name in names)


ATTENTION_OUTPUTS = ("normalized", "plain")
NORMS = ("layernorm", "dyt")


def attention_output_setting(choice: str, switches) -> bool:
    """DiTConfig.normalize_attention_output for a command-line or grid choice: "normalized" (each cosine-attention
    head's output rescaled to RMS 1, this project's addition) or "plain" (the paper's exact cosine attention);
    "plain" needs the cosine_attention switch among ``switches`` (without it there is nothing to switch off)."""
    if choice not in ATTENTION_OUTPUTS:
        raise MPDiTError(f"unknown attention output '{choice}': choose {' or '.join(ATTENTION_OUTPUTS)}")
    if choice == "plain" and "cosine_attention" not in parse_mp(switches):
        raise MPDiTError("attention output 'plain' switches off the rescaling of cosine attention: it needs the "
                         "cosine_attention switch (mp all or a list naming it)")
    return choice == "normalized"


def mp_label(switches: tuple[str, ...]) -> str:
    """The preset name of a switch set if it has one ('all', 'none'), else the comma list."""
    for name, preset in MP_PRESETS.items():
        if tuple(switches) == preset:
            return name
    return ",".join(switches)


ZERO_INIT = {"on": True, "off": False, None: None}  # --zero-init on|off as a DiTConfig.zero_init
HEAD_DIM = 32  # a width (mpdit train --width, a grid row's) sets the heads: width / HEAD_DIM


def width_overrides(width: int | None) -> dict:
    """A width N: the model's hidden size N with heads of dimension HEAD_DIM (so heads scale with the width)."""
    if width is None:
        return {}
    if width < HEAD_DIM or width % HEAD_DIM:
        raise MPDiTError(f"width must be a multiple of the head dimension {HEAD_DIM}, got {width}")
    return {"hidden_size": width, "num_heads": width // HEAD_DIM}


# Model zoo: DiT's sizes plus XS (the paper) and small sizes for CPU work: (depth, hidden, heads).
SIZES = {
    "Nano": (2, 64, 2),
    "Micro": (4, 128, 4),
    "Mini": (6, 192, 3),
    "XS": (6, 256, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
# The keys a saved config.json must name: left to their defaults, they would build a model of another shape.
SAVED_KEYS = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes",
              "learn_sigma", "mp", "conditioning")
MODELS = [f"DiT-{size}/{patch}" for size in SIZES for patch in PATCH_SIZES]


@dataclass
class DiTConfig:
    """Everything that defines a model; saved as config.json beside the weights.

    input_size and in_channels describe the (latent or pixel) image the model sees; with
    learn_sigma the output has 2 * in_channels channels (noise, variance interpolation).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    mp: tuple[str, ...] = ()
    conditioning: str = "adaln-zero"
    # MP timestep embedder input: EDM2's ln(sigma_t)/4 ("log-sigma") or the raw step 0..999 ("raw", ablation); the
    # objective (mpdit.diffusion.objectives) computes it and passes it in as the model's time input.
    timestep_input: str = "log-sigma"
    # With cosine_attention: scale each head's attention output back to RMS 1 (see docs/design-notes.md).
    normalize_attention_output: bool = True
    residual_balance: float = 0.3
    # What stands where DiT has a LayerNorm (unless no_layernorm removes them): "layernorm" or "dyt" (DynamicTanh).
    norm: str = "layernorm"
    # DiT's zero initialisation of the adaLN projections and the final linear; DyT's DiT recipe turns it off.
    # None: on, except for norm dyt on DiT's plain linears (resolved when the config is built).
    zero_init: bool | None = None
    num_timesteps: int = 1000
    name: str = field(default="custom")

    def __post_init__(self):
        require_field_types(self, "model config key")
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes",
                     "num_timesteps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise MPDiTError(f"model config {name} must be an integer >= 1, got {getattr(self, name)!r}")
        self.mp = parse_mp(self.mp)
        conditioning_ops(self.conditioning)
        if self.input_size % self.patch_size:
            raise MPDiTError(f"patch size {self.patch_size} does not divide input size {self.input_size}: "
                             "pick a patch size that divides it or pad the input")
        if self.has("mp_pos_embed") and self.input_size == self.patch_size:
            raise MPDiTError(f"input size {self.input_size} with patch size {self.patch_size} is a single patch, and "
                             "mp_pos_embed removes each channel's mean over the positions, which leaves zeros (NaN once "
                             "normalized) at a single one: use a smaller patch, a larger input, or mp without mp_pos_embed")
        if self.hidden_size % self.num_heads:
            raise MPDiTError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if "rotation" in conditioning_ops(self.conditioning) and self.hidden_size % 2:
            raise MPDiTError(f"rotation modulation pairs channels, so the hidden size must be even, got {self.hidden_size}")
        if self.timestep_input not in ("log-sigma", "raw"):
            raise MPDiTError(f"unknown timestep_input '{self.timestep_input}': choose log-sigma or raw")
        if self.norm not in NORMS:
            raise MPDiTError(f"unknown norm '{self.norm}': choose {' or '.join(NORMS)}")
        if self.norm == "dyt" and self.has("no_layernorm"):
            raise MPDiTError("norm dyt replaces LayerNorms, but the no_layernorm switch (in mp all) removes them all: "
                             "drop --norm dyt or choose mp switches without no_layernorm")
        weight_normalized = self.has("weight_norm") or self.has("forced_weight_norm")
        if self.zero_init is None:
            self.zero_init = self.norm != "dyt" or weight_normalized
        if not self.zero_init and weight_normalized:
            raise MPDiTError("zero_init off applies to DiT's plain linear layers; weight-normalized layers start from "
                             "a zero gain instead: drop --zero-init off or the weight_norm switches")
        if not 0 <= self.class_dropout_prob < 1:
            raise MPDiTError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    def has(self, switch: str) -> bool:
        """Whether an MP switch is on."""
        return switch in self.mp

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DiTConfig":
        return dataclass_from_dict(cls, values, "model config key")

    @classmethod
    def from_saved(cls, values: dict, source: str) -> "DiTConfig":
        """from_dict for the config.json of a checkpoint, run or export (``source``), which must name every key of
        SAVED_KEYS: a one-line error names the first one it lacks."""
        missing = [key for key in SAVED_KEYS if isinstance(values, dict) and key not in values]
        if missing:
            raise MPDiTError(f"model config {source} lacks the key '{missing[0]}' (a saved config names each of "
                             f"{', '.join(SAVED_KEYS)})")
        return cls.from_dict(values)

    @classmethod
    def from_preset(cls, model: str, **overrides) -> "DiTConfig":
        """A zoo entry such as 'DiT-S/2', with any field overridden (e.g. mp='all', input_size=16)."""
        try:
            prefix, rest = model.split("-", 1)
            size, patch = rest.split("/")
            depth, hidden, heads = SIZES[size]
            patch = int(patch)
            if prefix != "DiT" or patch not in PATCH_SIZES:
                raise KeyError(model)
        except (ValueError, KeyError):
            raise MPDiTError(f"unknown model '{model}': choose one of {', '.join(MODELS)}") from None
        values = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, name=model)
        values.update(overrides)
        return cls.from_dict(values)
