"""mpdit: magnitude-preserving Diffusion Transformers with rotation modulation."""

__version__ = "0.1.0"
