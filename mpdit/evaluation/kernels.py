"""Kernel counting and saved-activation bytes: what a step costs on any device, measured on any device.

A small model's GPU step is bound by kernel launches and bytes moved, not by FLOPs, and the number
of launches is the same on every machine, so it can be counted on a CPU. `count_kernels` runs a
function under a TorchDispatchMode and counts every ATen operation that reaches a backend kernel,
forward and backward, except the ones below that only make a new view of existing memory (no kernel
on any device). A `_foreach_*` operation counts once: on a GPU it launches one kernel per chunk of
tensors (multi_tensor_apply), not one per tensor.
"""

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operations that create a view, change metadata or allocate without writing: no kernel launch.
METADATA_OPS = frozenset({
    "_reshape_alias", "_unsafe_view", "alias", "as_strided", "detach", "empty", "empty_like", "empty_strided",
    "expand", "lift_fresh", "new_empty", "new_empty_strided", "permute", "select", "slice", "split",
    "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unflatten", "unsqueeze", "view", "view_as",
})


class KernelCounter(TorchDispatchMode):
    """Counts kernel-launching ATen operations by name (overload packet, e.g. 'mul', 'addmm')."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in METADATA_OPS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_kernels(fn) -> KernelCounter:
    """Run fn() once and return its KernelCounter (.total, .counts by operation name)."""
    counter = KernelCounter()
    with counter:
        fn()
    return counter


def saved_bytes(fn, params) -> int:
    """Bytes of the tensors autograd saves for backward while fn() runs, except those sharing storage with `params`."""
    exclude = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(seen.values())
