"""Preemption: SIGTERM (what Slurm, Kubernetes and `timeout` send) and SIGUSR1 (Slurm's `--signal` warning) during
training are a checkpoint, not a loss.

While ``StopSignals`` is active, either signal only sets a flag. The training loop asks ``StopSignals.agreed()``
after each step; once it says yes, the loop writes a checkpoint of that step and raises ``Preempted``, which the
command line reports in one line (how to resume) with the exit status of ``EXIT_STATUS``: 75 after SIGUSR1
(sysexits' EX_TEMPFAIL, "try again": the scheduler's warning that time is nearly up, so a job script requeues),
143 after SIGTERM (128 + 15, as a process ended by SIGTERM: stopped as asked, as by `scancel`, which must not
requeue; a preempting Slurm requeues the job itself). Either way the checkpoint is written before the exit.

Under torchrun every rank must stop at the same step (the checkpoint is a collective). Each step the ranks
all-reduce (MAX) their flags, and a rank reads the previous step's result, not this one's: the read then waits for
a reduction queued a whole step earlier, never for the step in flight, so a GPU run adds no stall per step, and
every rank reads the same value at the same step. The stop comes at most one step later than in a single process.
"""

import contextlib
import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The exit status after a stop (checkpoint written): SIGUSR1's 75 also where this rank got no signal itself.
EXIT_STATUS = {"SIGTERM": 128 + signal.SIGTERM, "SIGUSR1": 75}
TRY_AGAIN = EXIT_STATUS["SIGUSR1"]


class Preempted(Exception):
    """A run stopped by SIGTERM or SIGUSR1 (``received``: its name, None on a rank another rank's signal stopped)
    after writing a checkpoint. ``resume``: the command that goes on (a command that wraps training, such as
    `mpdit ablate`, sets its own); ``exit_status``: EXIT_STATUS's for the signal."""

    def __init__(self, stopped: str, resume: str, received: str | None):
        super().__init__(stopped)
        self.stopped, self.resume = stopped, resume
        self.exit_status = EXIT_STATUS.get(received, TRY_AGAIN)

    def __str__(self) -> str:
        return f"{self.stopped}; to go on, run {self.resume}"


@contextlib.contextmanager
def resumed_by(command: str):
    """A Preempted raised inside says to run ``command`` to go on (for commands that wrap training)."""
    try:
        yield
    except Preempted as stop:
        stop.resume = command
        raise


class StopSignals:
    """Between ``install()`` and ``restore()`` (in the main thread), SIGTERM and SIGUSR1 set ``received`` (the
    signal's name) instead of ending the process; ``restore()`` puts the previous handlers back."""

    def __init__(self, world_size: int = 1, device: torch.device | str = "cpu"):
        self.world_size, self.device = world_size, torch.device(device)
        self.received: str | None = None
        self.previous: dict = {}
        self.pending: torch.Tensor | None = None  # this rank's view of last step's all-reduced flag

    def handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            self.previous = {sig: signal.signal(sig, self.handle) for sig in SIGNALS}
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def agreed(self) -> bool:
        """Whether to stop after this step: this process got a signal (one process), or any rank had got one by
        the previous step (several: the same answer on every rank). Call it once per step on every rank."""
        if self.world_size == 1:
            return self.received is not None
        flag = torch.tensor(float(self.received is not None), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        previous, self.pending = self.pending, flag
        return previous is not None and bool(previous.item())
