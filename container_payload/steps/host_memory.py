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


_STREAMS: dict = {}


def copy_stream(device, way: str) -> "torch.cuda.Stream":
    """The one side stream of `device` for copies going `way` ("in" to the GPU, "out" from it), for
    the whole process. A fresh torch.cuda.Stream per call hands out torch's 32 pooled streams in
    turn, and the caching allocator keeps each stream's freed blocks for that stream alone: 32 sets
    of pieces' memory held at once, which under a GPU cap means flushing the cache (a device
    synchronize) again and again."""
    dev = torch.device(device)
    dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    if (dev, way) not in _STREAMS:
        _STREAMS[dev, way] = torch.cuda.Stream(device=dev)
    return _STREAMS[dev, way]


class CopiesOut:
    """Copies from a GPU to pinned host memory on a side stream, for tensors nothing changes any more
    (a unit's caught input: the layer's forward stops at it): the GPU's next batch does not wait for
    them (at 8B, down_proj's inputs are 1.75 GB a layer). At most two in flight, so the GPU memory
    they pin down stays two batches' worth. Whoever brings a copy back to the GPU goes through
    `on`, which orders it after the copies."""

    def __init__(self, device):
        self.stream = copy_stream(device, "out")
        self.in_flight: list = []

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is made on the compute stream
        with torch.cuda.stream(self.stream):
            out = pinned_copy(t, non_blocking=True)
        t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        self.in_flight.append(self.stream.record_event())
        if len(self.in_flight) > 2:
            self.in_flight.pop(0).synchronize()
        return out

    def on(self, bring):
        """`bring` (a tensor to the GPU: Fit.on) on whichever stream calls it, after the copies out."""
        def after_copies(t):
            torch.cuda.current_stream().wait_stream(self.stream)
            return bring(t)
        return after_copies
