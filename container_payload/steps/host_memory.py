"""Tensors that wait in host memory while the GPU works on something else.

Pinned, so that copies either way are asynchronous and run at the link's speed: pageable copies of
~4 GB of unit inputs per 8B layer made the original stream 70x slower on an H200 (145 s vs 2 s).
torch's caching host allocator reuses the pinned blocks layer after layer."""
import torch


def pinned_copy(t: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """A copy of t in pinned host memory; non_blocking queues it on t's stream (work queued after
    it on that stream cannot overwrite t first)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=non_blocking)


def waiting_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of t that waits off the GPU: pinned_copy for a CUDA tensor, a plain clone on the CPU
    (where the copy costs the same wherever it waits)."""
    return pinned_copy(t, non_blocking=True) if t.is_cuda else t.clone()
