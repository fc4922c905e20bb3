"""CPU threads for the heavy commands (`quickstart`, `train`): fewer when other processes keep the cores busy.

On this project's 2-core machine, torch's default of one intra-op thread per core ran 7-10x slower than one
thread while another job kept both cores busy (the threads wait on each other), and faster on a quiet machine.
So at start the cores other processes keep busy are measured (CPU time over half a second from /proc/stat on
Linux, else the 1-minute load average) and the cores they leave free, at least one, become the thread count.
A count set with OMP_NUM_THREADS is kept. When the machine is busy one line on stderr says what was decided.
"""

import os
import sys
import time

import torch

THREADS_ENV = "OMP_NUM_THREADS"


def _cpu_times() -> tuple[int, int, int] | None:
    """(busy ticks, all ticks, cores) of the whole machine from /proc/stat, or None where it is not readable."""
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    ticks = [int(v) for v in lines[0].split()[1:]]
    cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return sum(ticks) - idle, sum(ticks), cores


def busy_cores(interval: float = 0.5) -> tuple[float, int] | None:
    """(cores kept busy by running processes, cores) now: measured over `interval` s while this process sleeps,
    else the 1-minute load average; None where neither is available."""
    first = _cpu_times()
    if first is not None:
        time.sleep(interval)
        second = _cpu_times()
        total = second[1] - first[1]
        if total > 0:
            return (second[0] - first[0]) / total * second[2], second[2]
    if hasattr(os, "getloadavg"):
        return os.getloadavg()[0], os.cpu_count() or 1
    return None


def thread_plan(busy: float, cores: int, threads: int, chosen: bool) -> tuple[int, str | None]:
    """(threads to use, a line to print or None) given the busy cores, the cores, torch's current thread count
    and whether the user chose it (OMP_NUM_THREADS)."""
    free = max(1, round(cores - busy))
    if free >= min(threads, cores):
        return threads, None
    state = f"mpdit: the CPU is busy ({busy:.1f} of {cores} cores in use by other processes)"
    if chosen:
        return threads, (f"{state}: keeping {threads} threads from {THREADS_ENV}; expect slower runs than on a "
                         "quiet machine")
    return free, (f"{state}: using {free} thread{'s' * (free > 1)} instead of {threads}; expect slower runs than "
                  f"on a quiet machine (set {THREADS_ENV} to choose)")


def choose_threads(device: str = "auto") -> int:
    """Apply thread_plan to this process and print its line; returns the thread count. Only for a CPU run in one
    process with more than one thread (under torchrun, on a GPU, or at one thread nothing is measured)."""
    threads = torch.get_num_threads()
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if threads < 2 or on_gpu or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return threads
    measured = busy_cores()
    if measured is None:
        return threads
    chosen = THREADS_ENV in os.environ
    threads, line = thread_plan(*measured, threads, chosen)
    if line:
        print(line, file=sys.stderr)
    if not chosen:
        torch.set_num_threads(threads)
    return threads
