"""Building blocks: magnitude-preserving primitives and modulation operations."""

from mpdit.nn.modulation import (CONDITIONINGS, ConditionProjection, RotationModulation, conditioning_ops,
                                 modulate, rotate)
from mpdit.nn.primitives import (MPEmbedding, MPFourier, MPLinear, MPSiLU, mp_silu, mp_sum, normalize)

__all__ = ["CONDITIONINGS", "ConditionProjection", "MPEmbedding", "MPFourier", "MPLinear", "MPSiLU",
           "RotationModulation", "conditioning_ops", "modulate", "mp_silu", "mp_sum", "normalize", "rotate"]
