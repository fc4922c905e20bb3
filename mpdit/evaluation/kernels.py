"""Kernel counting and saved-activation bytes: what a step costs on any device, measured on any device.

A small model's GPU step is bound by kernel launches and bytes moved, not by FLOPs, and the number
of launches is the same on every machine, so it can be counted on a CPU. `count_kernels` runs a
function under a TorchDispatchMode and counts every ATen operation that reaches a backend kernel,
forward and backward, except the ones below that only make a new view of existing memory (no kernel
on any device). A `_foreach_*` operation counts once: on a GPU it launches one kernel per chunk of
tensors (multi_tensor_apply), not one per tensor.

It also adds up the bytes each of those kernels moves, the other bound of a small GPU step: every tensor
argument read once and every output written once (an in-place operation's tensor both, an `out=` tensor only
written), each as the memory it spans (a broadcast dimension of stride 0 read once). That is the least traffic
the kernel can have: a GPU's caches can only add to it (a matmul re-reading its operands), and a fused kernel
saves what its parts wrote and read back in between.
"""

import collections
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Operations that create a view, change metadata or allocate without writing: no kernel launch.
METADATA_OPS = frozenset({
    "_reshape_alias", "_unsafe_view", "alias", "as_strided", "detach", "empty", "empty_like", "empty_strided",
    "expand", "lift_fresh", "new_empty", "new_empty_strided", "permute", "select", "slice", "split",
    "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unflatten", "unsqueeze", "view", "view_as",
})


def spanned_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the elements a tensor addresses, a dimension of stride 0 (broadcast) counted once."""
    return math.prod(n for n, stride in zip(tensor.shape, tensor.stride()) if stride) * tensor.element_size()


class KernelCounter(TorchDispatchMode):
    """Counts kernel-launching ATen operations by name (overload packet, e.g. 'mul', 'addmm') and the bytes they
    move (`bytes_by_op`, same keys)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.bytes_by_op: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in METADATA_OPS:
            self.counts[name] += 1
            read = (args, {key: value for key, value in (kwargs or {}).items() if key != "out"})  # out=: written only
            tensors = [t for t in tree_leaves((read, out)) if isinstance(t, torch.Tensor)]
            self.bytes_by_op[name] += sum(spanned_bytes(t) for t in tensors)
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_op.values())


def count_kernels(fn) -> KernelCounter:
    """Run fn() once and return its KernelCounter (.total and .counts by operation name; .total_bytes and
    .bytes_by_op moved)."""
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
