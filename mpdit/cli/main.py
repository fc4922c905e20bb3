"""Entry point of the ``mpdit`` command: dispatches to the subcommand modules.

Each subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed arguments, returning an exit code or None).
User errors (``MPDiTError``) become a one-line ``mpdit: error: ...`` and exit code 2; a training stopped by SIGTERM
or SIGUSR1 (``Preempted``, after its checkpoint), one line saying how to go on and exit code 143 or 75
(mpdit.training.preemption.EXIT_STATUS).
Commands whose parser sets ``cpu_heavy=True`` (quickstart, train) first pick their CPU thread count
(``mpdit.cli.threads``).
"""

import argparse
import importlib
import re
import sys

import torch

from mpdit import __version__
from mpdit.cli.threads import choose_threads
from mpdit.errors import MPDiTError
from mpdit.training.preemption import Preempted

SUBCOMMANDS = ["quickstart", "encode", "train", "sample", "eval", "ema", "export", "ablate", "plot", "params", "bench",
               "gradnoise", "classifier"]


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad command line reported in one line (no usage block) and exit code 2; the subcommands'
    parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mpdit", description="Magnitude-preserving Diffusion Transformers with rotation modulation."
    )
    parser.add_argument("--version", action="version", version=f"mpdit {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"mpdit.cli.{name}").register(subparsers)
    return parser


def out_of_memory(error: BaseException) -> bool:
    """Whether torch ran out of memory: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error)


def memory_advice(args, error: BaseException) -> str:
    """The one line for an allocation that failed: how much could not be had, the batch size and a smaller one."""
    text = str(error)
    cpu = re.search(r"tried to allocate (\d+) bytes", text)
    cuda = re.search(r"Tried to allocate ([\d.]+ \w+)", text)
    wanted = f"{int(cpu.group(1)) / 2**30:,.2f} GiB" if cpu else cuda.group(1) if cuda else "memory"
    where = "CUDA" if "CUDA" in text else "the CPU" if cpu else type(error).__name__
    batch = getattr(args, "batch_size", None)
    advice = (f"with --batch-size {batch}: if the batch is what does not fit, try --batch-size {max(batch // 2, 1)}, "
              "else a smaller model or image size" if isinstance(batch, int) else "try a smaller model or image size")
    return (f"out of memory: {where} could not allocate {wanted} {advice}. Files are written whole, so nothing "
            "half-written was left (a training run resumes from its newest checkpoint with --resume)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "cpu_heavy", False):
            choose_threads(getattr(args, "device", "auto"))
        code = args.func(args)
    except (MPDiTError, OSError) as error:  # OSError: a missing file, a full disk, a read-only folder...
        print(f"mpdit: error: {error}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"mpdit: {stop}", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:
        print("mpdit: interrupted", file=sys.stderr)
        return 130
    except torch._dynamo.exc.BackendCompilerFailed as error:  # e.g. no working C++ toolchain for a CPU
        cause = getattr(error, "inner_exception", error)
        first = next((line for line in str(cause).splitlines() if line.strip()), "")
        print(f"mpdit: error: torch.compile failed on this machine ({type(cause).__name__}: {first[:200]}): run "
              "again with --no-compile", file=sys.stderr)
        return 2
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:  # after BackendCompilerFailed (a RuntimeError)
        if not out_of_memory(error):
            raise
        print(f"mpdit: error: {memory_advice(args, error)}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
