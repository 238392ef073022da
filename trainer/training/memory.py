"""Counting the memory a step allocates: every tensor storage an op creates, until it is freed.

``MemoryTracker`` is a dispatch mode that sees each op's outputs. A storage it has not seen is an
allocation (its bytes added to ``live``), freed when Python lets go of it; ``peak`` is the most that was
live at once. This is what the CUDA caching allocator's ``max_memory_allocated`` counts (without its
rounding to 512-byte blocks and without cuBLAS/cuDNN workspaces), and what PyTorch's CPU allocator sees;
``tests/test_memory_estimate.py`` checks it against the profiler's record of real CPU allocations. It works
the same on PyTorch's fake tensors (``FakeTensorMode``), which carry shapes and dtypes but no memory, so a
step of the real SDXL can be counted on a laptop in seconds to minutes.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_map_only


def _plain(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The tensors that hold memory: a tensor itself, or the inner ones of a wrapper (torchao's quantized)."""
    if not is_traceable_wrapper_subclass(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [inner for name in names for inner in _plain(getattr(tensor, name))]


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by distinct storages among ``tensors`` (views and shared weights counted once)."""
    seen = {}
    for plain in (plain for tensor in tensors for plain in _plain(tensor)):
        seen[_storage_key(plain)] = plain.untyped_storage().nbytes()
    return sum(seen.values())


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the storages ops create while the mode is on.

    ``existing`` tensors (weights, inputs, optimizer state) are already in memory: an op writing into them
    in place does not count as an allocation.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {_storage_key(plain): 0 for tensor in existing for plain in _plain(tensor)}

    def _track(self, tensor: torch.Tensor) -> None:
        for plain in _plain(tensor):
            self._track_plain(plain)

    def _track_plain(self, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if key in self._sizes:
            return
        storage = tensor.untyped_storage()
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def restart_peak(self) -> None:
        """Count the next peak from what is live now (a new phase of the step)."""
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out
