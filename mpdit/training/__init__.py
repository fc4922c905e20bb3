"""Training utilities: learning-rate schedules, EMAs (classic and EDM2 power-function with post-hoc
reconstruction), atomic checkpoints and RNG state; the loop itself is in ``train.py``."""
