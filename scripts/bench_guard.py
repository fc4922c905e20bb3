"""Step time of Trainer.train_step with the divergence guard (its flag handed to the fused AdamW) vs without it
(the same optimizer, no flag), interleaved repeats, median ms/step:  python scripts/bench_guard.py [MODEL] [BATCH] [REPEATS]"""

import statistics
import sys
import tempfile
import time

import torch

from mpdit.data.datasets import load_dataset
from mpdit.model.config import DiTConfig
from mpdit.training.train import TrainConfig, Trainer

torch.set_num_threads(1)
model = sys.argv[1] if len(sys.argv) > 1 else "DiT-Micro/4"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
data = load_dataset("mnist", "train", 28)
mc = DiTConfig.from_preset(model, input_size=28, in_channels=1, num_classes=10)
cfg = TrainConfig(steps=10**6, batch_size=batch, image_size=28, progress=False, telemetry_every=0)

def make(guard):
    t = Trainer(tempfile.mkdtemp(), mc, cfg, data=data)
    if not guard:  # no flag: the optimizer always steps, no device-side counters
        t.guard.found_inf = lambda loss, norm: None
    return t

trainers = {"guard": make(True), "no guard": make(False)}
for t in trainers.values():
    for _ in range(3):
        t.train_step(False)
times = {k: [] for k in trainers}
for rep in range(int(sys.argv[3]) if len(sys.argv) > 3 else 6):
    for name, t in trainers.items():
        start = time.perf_counter()
        for _ in range(10):
            t.train_step(False)
        times[name].append((time.perf_counter() - start) / 10 * 1000)
for name, ts in times.items():
    print(f"{model} batch {batch} {name}: median {statistics.median(ts):.1f} ms/step (min {min(ts):.1f}, max {max(ts):.1f})")
