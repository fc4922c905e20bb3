"""`mpdit bench`: training-step and sampling-step time and peak memory of model variants against the
DiT baseline (mp none, adaln-zero), measured in one process, in alternation (A B A B ...).

Training step: forward, backward, optimizer step and EMA update on one batch. Sampling step: one
guided network evaluation (conditional + unconditional halves) in eval mode under no_grad.
Ratios are to the baseline row of the same run. A benchmark, not a test: it asserts nothing.
With --count-ops each row also gives the number of kernel-launching operations in one training step and
one sampling step and the bytes they move (see mpdit/evaluation/kernels.py), counted on the code path a GPU
takes: the same on every machine, and on a GPU, where a small model's step is bound by kernel launches and
bytes moved, they track the time. With --compile as well, it also gives the kernels inductor generates for the
compiled steps (on a GPU, the Triton kernels a compiled step launches besides its matmuls and attention).
With --objective flow every variant is also measured trained with flow matching (its sampling step: one guided
velocity evaluation), each flow row with its ratios to the same variant under DDPM (train_vs_ddpm, sample_vs_ddpm).
"""

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mpdit.data.datasets import ImageDataset
from mpdit.diffusion.objectives import OBJECTIVES, ObjectiveConfig, make_objective
from mpdit.errors import MPDiTError
from mpdit.evaluation.kernels import KernelCounter, count_kernels, saved_bytes
from mpdit.files import strict_json
from mpdit.model.config import DiTConfig, mp_label
from mpdit.model.dit import MPDiT
from mpdit.training.ema import ClassicEMA
from mpdit.training.train import TrainConfig, Trainer, global_batch, make_optimizer

BASELINE = ("none", "adaln-zero")
DEFAULT_VARIANTS = "none:adaln-zero;all:scale-shift-gate;all:scale-rotation-gate"


class Bench:
    """One variant's model, optimizer, EMA and fixed inputs; `train_step()` and `sample_step()` time one call."""

    def __init__(self, config: DiTConfig, batch: int, device: torch.device, dtype: str, compile_model: bool,
                 objective: str = "ddpm"):
        torch.manual_seed(0)
        self.config, self.device = config, device
        self.model = MPDiT(config).to(device)
        self.optimizer = make_optimizer(self.model.parameters(), lr=1e-4)
        self.ema = ClassicEMA(self.model, 0.9999)
        self.objective = make_objective(ObjectiveConfig(objective, sigma_data=1.0), config)
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.guided = torch.compile(self.model.guided_forward) if compile_model else self.model.guided_forward
        self.dtype = torch.bfloat16 if dtype == "bf16" else None
        gen = torch.Generator().manual_seed(1)
        shape = (batch, config.in_channels, config.input_size, config.input_size)
        self.x = torch.randn(shape, generator=gen).to(device)
        self.t = self.objective.draw_times(batch, gen).to(device)
        self.time_input = self.objective.time_input(self.t)
        self.noise = torch.randn(shape, generator=gen).to(device)
        self.y = torch.randint(0, config.num_classes, (batch,), generator=gen).to(device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def train_loss(self) -> torch.Tensor:
        self.model.train()
        with self.autocast():
            return self.objective.training_losses(lambda x, s: self.forward(x, s, self.y), self.x, self.t,
                                                  self.noise)["loss"]

    def train_step(self) -> None:
        loss = self.train_loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        self.optimizer.step()
        self.ema.update(self.model)

    @torch.no_grad()
    def sample_step(self) -> None:
        self.model.eval()
        with self.autocast():
            self.guided(self.x, self.time_input, self.y, 4.0)

    def parameters(self) -> int:
        return self.model.num_params()

    @contextlib.contextmanager
    def gpu_code_path(self, eager: bool = False):
        """Weights stacked as on CUDA, whatever the device (MPDiT.stacking); with eager, the steps call the
        uncompiled model (counting operations must not run under dynamo, which would trace the counters' hooks)."""
        steps = self.forward, self.guided
        self.model.stack_weights = True
        if eager:
            self.forward, self.guided = self.model, self.model.guided_forward
        try:
            yield
        finally:
            self.model.stack_weights = None
            self.forward, self.guided = steps

    def compiled_kernels(self) -> tuple[int, int]:
        """Kernels inductor generates for the compiled training step (its forward and backward graphs) and for the
        compiled sampling step, on the GPU code path; compiled, each runs once per step. Matmuls and attention,
        library calls as in eager mode, are not among them. Compiles both again (the counts come from code
        generation), so every compiled model of the process recompiles on its next call."""
        from torch._inductor import metrics as inductor_metrics

        counts = []
        with self.gpu_code_path():
            for step in (self.train_step, self.sample_step):
                torch._dynamo.reset()
                inductor_metrics.reset()
                step()
                counts.append(inductor_metrics.generated_kernel_count)
        return counts[0], counts[1]

    def saved_mb(self) -> float:
        """MiB of activations a training step keeps for its backward pass (see mpdit/evaluation/kernels.py),
        on the GPU code path, eager."""
        with self.gpu_code_path(eager=True):
            return saved_bytes(self.train_loss, self.model.parameters()) / 2**20

    def kernels(self) -> tuple[KernelCounter, KernelCounter]:
        """Kernel-launching operations (and the bytes they move) of one training step and of one sampling step on
        the GPU code path, each in steady state (the optimizer's state exists; sampling reuses the normalized
        weights of the step before); eager, also when the bench compiles."""
        with self.gpu_code_path(eager=True):
            self.train_step()
            train = count_kernels(self.train_step)
            self.sample_step()
            return train, count_kernels(self.sample_step)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> float:
    """Milliseconds of one call."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return 1000 * (time.perf_counter() - start)


def loop_step_ms(config: DiTConfig, batch: int, device: torch.device, dtype: str, compile_model: bool,
                 repeats: int, warmup: int, objective: str = "ddpm") -> tuple[float, float]:
    """Median milliseconds of one step of the training loop (`Trainer.train_step`: batch drawn and copied to the
    device, forward, backward, gradient norm, AdamW, classic and power-function EMAs) on random uint8 images, and
    of the host-side part that assembles its global batch (`global_batch`: indices, t, noise, labels, images)."""
    gen = torch.Generator().manual_seed(0)
    shape = (4 * batch, config.in_channels, config.input_size, config.input_size)
    data = ImageDataset(torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8),
                        torch.randint(0, config.num_classes, (4 * batch,), generator=gen), config.num_classes)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainConfig(data="random", objective=objective, steps=warmup + repeats, batch_size=batch,
                          precision=dtype, compile=compile_model, device=str(device), progress=False)
        trainer = Trainer(run_dir, config, cfg, data=data)
        for _ in range(warmup):
            trainer.train_step(record=False)
        step_ms = statistics.median(timed(device, lambda: trainer.train_step(record=False)) for _ in range(repeats))
        batch_ms = statistics.median(
            timed(torch.device("cpu"), lambda: global_batch(trainer.data, trainer.cfg, trainer.objective, step))
            for step in range(repeats))
        return step_ms, batch_ms


def resident_bytes(bench: Bench) -> int:
    """Bytes a variant keeps between training steps: weights and buffers, optimizer state and EMA shadow."""
    tensors = [*bench.model.state_dict().values(), *bench.ema.state_dict().values()]
    tensors += [v for state in bench.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_memory_mb(bench: Bench) -> float:
    """Peak memory of one training step in MiB: the variant's resident_bytes plus the peak of the step's own
    allocations (gradients, activations, temporaries) above what was allocated before it, by CUDA's allocator or
    on CPU by torch's profiler (in time order). The other variants built in the same process do not count."""
    device = bench.device
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        bench.train_step()
        synchronize(device)
        step_peak = torch.cuda.max_memory_allocated(device) - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            bench.train_step()
        step_peak = current = 0
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):  # allocations and frees in order
            current += event.self_cpu_memory_usage
            step_peak = max(step_peak, current)
    return (resident_bytes(bench) + step_peak) / 2**20


def run_bench(model: str, variants: list[tuple[str, str]], *, batch: int, input_size: int, in_channels: int,
              num_classes: int, device: str, dtype: str, compile_model: bool, repeats: int, warmup: int,
              count_ops: bool = False, loop: bool = False, objectives: tuple[str, ...] = ("ddpm",)) -> list[dict]:
    """Time every variant under every objective in alternation; return one row per (variant, objective) with ratios
    to the baseline (the baseline variant under the first objective), and for each row of a later objective, its
    ratios to the same variant under the first (train_vs_ddpm, sample_vs_ddpm)."""
    if BASELINE not in variants:
        variants = [BASELINE, *variants]
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    runs = [(variant, objective) for variant in variants for objective in objectives]
    benches = [Bench(DiTConfig.from_preset(model, mp=mp, conditioning=cond, input_size=input_size,
                                           in_channels=in_channels, num_classes=num_classes,
                                           learn_sigma=OBJECTIVES[objective].learn_sigma), batch, dev, dtype,
                     compile_model, objective) for (mp, cond), objective in runs]
    for bench in benches:
        for _ in range(warmup):
            bench.train_step()
            bench.sample_step()
    train_ms = [[] for _ in benches]
    sample_ms = [[] for _ in benches]
    for _ in range(repeats):  # A B A B ...: drifts in machine load hit every variant alike
        for i, bench in enumerate(benches):
            train_ms[i].append(timed(dev, bench.train_step))
            sample_ms[i].append(timed(dev, bench.sample_step))
    rows = []
    for i, bench in enumerate(benches):
        rows.append({
            "model": model, "mp": mp_label(bench.config.mp), "conditioning": bench.config.conditioning,
            "objective": bench.objective.name, "params": bench.parameters(), "train_ms": statistics.median(train_ms[i]),
            "train_spread_ms": _spread(train_ms[i]), "sample_ms": statistics.median(sample_ms[i]),
            "sample_spread_ms": _spread(sample_ms[i]), "peak_mem_mb": peak_memory_mb(bench),
            "device": str(dev), "dtype": dtype, "batch": batch, "compile": compile_model, "repeats": repeats,
        })
        if loop:  # the whole loop's step against the bare step just timed; the host's batch assembly within it
            loop_ms, batch_ms = loop_step_ms(bench.config, batch, dev, dtype, compile_model, repeats, warmup,
                                             bench.objective.name)
            rows[-1]["loop_ms"], rows[-1]["batch_ms"] = round(loop_ms, 2), round(batch_ms, 3)
        if count_ops:
            train, sample = bench.kernels()
            rows[-1].update(train_kernels=train.total, sample_kernels=sample.total,
                            train_moved_mb=round(train.total_bytes / 2**20, 1),
                            sample_moved_mb=round(sample.total_bytes / 2**20, 1), saved_mb=round(bench.saved_mb(), 2))
    if count_ops and compile_model:  # after every row's timing and memory: this recompiles every model
        for row, bench in zip(rows, benches):
            row["train_compiled_kernels"], row["sample_compiled_kernels"] = bench.compiled_kernels()
    base = rows[runs.index((BASELINE, objectives[0]))]
    ratios = [("train_ratio", "train_ms"), ("sample_ratio", "sample_ms"), ("mem_ratio", "peak_mem_mb")]
    if count_ops:
        ratios += [("train_kernels_ratio", "train_kernels"), ("sample_kernels_ratio", "sample_kernels"),
                   ("train_moved_ratio", "train_moved_mb"), ("sample_moved_ratio", "sample_moved_mb"),
                   ("saved_ratio", "saved_mb")]
    if count_ops and compile_model:
        ratios += [("train_compiled_ratio", "train_compiled_kernels"),
                   ("sample_compiled_ratio", "sample_compiled_kernels")]
    for row in rows:
        for key, ref in ratios:
            row[key] = round(row[ref] / base[ref], 3)
        for key in ("train_ms", "train_spread_ms", "sample_ms", "sample_spread_ms", "peak_mem_mb"):
            row[key] = round(row[key], 2)
        if loop:
            row["loop_over_step"] = round(row["loop_ms"] / row["train_ms"], 3)
    for (variant, objective), row in zip(runs, rows):
        if objective != objectives[0]:
            first = rows[runs.index((variant, objectives[0]))]
            row["train_vs_ddpm"] = round(row["train_ms"] / first["train_ms"], 3)
            row["sample_vs_ddpm"] = round(row["sample_ms"] / first["sample_ms"], 3)
    return rows


def _spread(values: list[float]) -> float:
    """Interquartile range, in the values' unit."""
    if len(values) < 4:
        return max(values) - min(values)
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def parse_variants(spec: str) -> list[tuple[str, str]]:
    """'mp:conditioning;mp:conditioning' -> [(mp, conditioning)]."""
    variants = []
    for item in spec.split(";"):
        if ":" not in item:
            raise MPDiTError(f"variant '{item}' should look like mp:conditioning, e.g. all:scale-rotation-gate")
        mp, conditioning = item.split(":", 1)
        variants.append((mp.strip(), conditioning.strip()))
    return variants


def run(args) -> int:
    rows = run_bench(args.model, parse_variants(args.variants), batch=args.batch, input_size=args.input_size,
                     in_channels=args.in_channels, num_classes=args.num_classes, device=args.device,
                     dtype=args.dtype, compile_model=args.compile, repeats=args.repeats, warmup=args.warmup,
                     count_ops=args.count_ops, loop=args.loop,
                     objectives=("ddpm",) if args.objective == "ddpm" else ("ddpm", args.objective))
    if args.out:
        Path(args.out).write_text(strict_json(rows, "the benchmark", indent=2))
    if args.json:
        print(strict_json(rows, "the benchmark", indent=2))
        return 0
    first = rows[0]
    print(f"{args.model}, batch {args.batch}, input {args.in_channels}x{args.input_size}x{args.input_size}, "
          f"{first['device']} {args.dtype}{' compiled' if args.compile else ''}, median of {args.repeats} "
          "(spread = interquartile range)")
    loop = f" {'loop ms':>9} {'/step':>6} {'batch ms':>9}" if args.loop else ""
    compiled = args.count_ops and args.compile
    kernels = (f" {'train kernels':>13} {'x':>6} {'sample kernels':>14} {'x':>6} {'train moved MB':>14} {'x':>6} "
               f"{'sample moved MB':>15} {'x':>6} {'saved MB':>9} {'x':>6}" if args.count_ops else "")
    kernels += f" {'compiled train':>14} {'x':>6} {'compiled sample':>15} {'x':>6}" if compiled else ""
    flow = f" {'objective':<9} {'train x ddpm':>12} {'sample x ddpm':>13}" if args.objective != "ddpm" else ""
    print(f"{'mp':<6} {'conditioning':<21} {'params':>11} {'train ms':>15} {'x':>6} {'sample ms':>15} {'x':>6} "
          f"{'peak MB':>9} {'x':>6}{flow}{loop}{kernels}")
    for r in rows:
        kernels = (f" {r['train_kernels']:>13,} {r['train_kernels_ratio']:>6.3f} {r['sample_kernels']:>14,} "
                   f"{r['sample_kernels_ratio']:>6.3f} {r['train_moved_mb']:>14,.1f} {r['train_moved_ratio']:>6.3f} "
                   f"{r['sample_moved_mb']:>15,.1f} {r['sample_moved_ratio']:>6.3f} {r['saved_mb']:>9.1f} "
                   f"{r['saved_ratio']:>6.3f}") \
            if args.count_ops else ""
        if compiled:
            kernels += (f" {r['train_compiled_kernels']:>14,} {r['train_compiled_ratio']:>6.3f} "
                        f"{r['sample_compiled_kernels']:>15,} {r['sample_compiled_ratio']:>6.3f}")
        loop = f" {r['loop_ms']:>9.1f} {r['loop_over_step']:>6.3f} {r['batch_ms']:>9.2f}" if args.loop else ""
        flow = (f" {r['objective']:<9} {r.get('train_vs_ddpm', 1.0):>12.3f} {r.get('sample_vs_ddpm', 1.0):>13.3f}"
                if args.objective != "ddpm" else "")
        print(f"{r['mp']:<6} {r['conditioning']:<21} {r['params']:>11,} "
              f"{r['train_ms']:>8.1f} ±{r['train_spread_ms']:<5.1f} {r['train_ratio']:>6.3f} "
              f"{r['sample_ms']:>8.1f} ±{r['sample_spread_ms']:<5.1f} {r['sample_ratio']:>6.3f} "
              f"{r['peak_mem_mb']:>9.1f} {r['mem_ratio']:>6.3f}{flow}{loop}{kernels}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="time training and sampling steps against the DiT baseline",
                                   description=__doc__)
    parser.add_argument("--model", default="DiT-S/2", help="zoo name (default DiT-S/2, the paper's)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"';'-separated mp:conditioning pairs (default {DEFAULT_VARIANTS}); "
                             "the baseline none:adaln-zero is always added")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=16, help="latent side (default 16: 128px through the VAE)")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--objective", choices=list(OBJECTIVES), default="ddpm",
                        help="ddpm (default), or flow: every variant under ddpm and under flow, with flow's ratios "
                             "to ddpm")
    parser.add_argument("--repeats", type=int, default=12, help="timed steps per variant (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument("--count-ops", action="store_true",
                        help="also count kernel-launching operations per training and sampling step, the MiB "
                             "they move and the activation MiB a training step saves for backward (deterministic, "
                             "the same on any device; see mpdit/evaluation/kernels.py); with --compile also the "
                             "kernels inductor generates for the compiled steps")
    parser.add_argument("--loop", action="store_true",
                        help="also time a step of the real training loop (data, EMAs, logging stats) per variant, "
                             "as loop_ms and its ratio to the bare training step, and the host-side assembly of its "
                             "batch within it as batch_ms")
    parser.add_argument("--json", action="store_true", help="print a JSON list of row objects")
    parser.add_argument("--out", default=None, help="also write the JSON rows to this file")
    parser.set_defaults(func=run)
