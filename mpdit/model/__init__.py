"""The model: typed config, the model zoo, the DiT / MP-DiT network, and the official-checkpoint converter."""

from mpdit.model.config import MODELS, MP_SWITCHES, SIZES, DiTConfig, mp_label, parse_mp
from mpdit.model.dit import MPDiT, build_model, load_model

__all__ = ["MODELS", "MP_SWITCHES", "SIZES", "DiTConfig", "MPDiT", "build_model", "load_model", "mp_label",
           "parse_mp"]
