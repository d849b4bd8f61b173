"""Peak bytes of tensor storage allocated inside a block, on any device (the CPU here): what
torch.cuda.max_memory_allocated says on a GPU, for tests that bound a pass's GPU memory without
a GPU. Every storage an op returns counts from its creation until it is freed (a finalizer on
the storage); storages that existed before the block do not count. Not counted: workspace a
kernel allocates without returning it (LAPACK's), so a bound here is a lower bound of the GPU's.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """with LiveBytes() as m: ...; m.peak (bytes), m.live (still allocated at the end)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        key, n = s.data_ptr(), s.nbytes()
        if n == 0 or key in self._seen:  # a view or an in-place result: counted already
            return
        self._seen.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(s, self._gone, key, n)

    def _gone(self, key: int, n: int) -> None:
        self.live -= n
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares an input's storage: not new memory (a slice of a
        # weight made before the block counted the whole weight)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" \
                    and t.untyped_storage().data_ptr() not in inputs:
                self._track(t)
        return out
