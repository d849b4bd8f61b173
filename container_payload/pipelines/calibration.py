"""Calibration: the job's text -> token windows -> batches, and the forward loop ModelOpt's
calibration runs them through (the same for the whole-model and the streamed pipelines)."""
import time

from ..core import events
from ..core.contract import Calibration
from .calib_data import fingerprint, read_text, token_windows


def calibration_windows(tokenizer, calib: Calibration):
    text = read_text(calib.source, tokenizer)
    return token_windows(tokenizer, text, calib.samples, calib.seq_len)


def calibration_batches(windows: list[list[int]], calib: Calibration, device: str, model=None, low_memory=False,
                        gpu_budget: int | None = None):
    """Batches of the (already tokenized, see run()) calibration windows."""
    import torch  # quantize.run imports torch after gc.disable: not at this module's import

    events.stage("tokenize", detail=calib.source)
    bs = calib.batch_size
    if bs == "auto":
        bs = auto_batch_size(calib.seq_len, device, model=model, low_memory=low_memory, gpu_budget=gpu_budget)
        bs = min(bs, len(windows))
    ids = torch.tensor(windows, dtype=torch.long)
    batches = [ids[i:i + bs] for i in range(0, len(ids), bs)]
    # batch_shapes: what each forward was fed, in order. The batch is part of the calibration
    # contract: bf16 kernels round differently for other shapes (AMX), so references replay these.
    info = {"samples": len(windows), "seq_len": calib.seq_len, "batch_size": bs,
            "batch_shapes": [list(b.shape) for b in batches],
            "tokens": len(windows) * calib.seq_len, "windows_sha256": fingerprint(windows)}
    return batches, info


def auto_batch_size(seq_len: int, device: str, model=None, low_memory: bool = False,
                    gpu_budget: int | None = None) -> int:
    """Largest batch whose activations fit comfortably: calibration runs the decoder
    only (no lm_head logits), so the peak is a few copies of the widest activation
    (the MLP's intermediate) per token. Fewer, larger batches also mean fewer passes of
    ModelOpt's per-batch weight statistics. Capped at 128 (8 at low_memory)."""
    if device != "cuda":
        return 4  # CPU: bigger batches only add memory, not speed
    import torch

    free, _ = torch.cuda.mem_get_info()
    if gpu_budget:  # a spread model: what its budget leaves on the fullest GPU
        free = min(free, max(0, gpu_budget - max(torch.cuda.memory_allocated(i)
                                                 for i in range(torch.cuda.device_count()))))
    cfg = getattr(model, "config", None)
    width = max(getattr(cfg, "intermediate_size", 0) or 0, 4 * (getattr(cfg, "hidden_size", 0) or 0))
    # bf16 gate/up/act/product copies + ModelOpt's fp32 statistics temporaries; 64 KiB floor
    per_token = max(64 * 1024, 10 * width)
    cap = 8 if low_memory else 128
    return int(max(1, min(cap, (free * 0.5) // (per_token * seq_len))))


def forward_loop_for(batches, device: str, times: dict | None = None):
    import torch

    def forward_loop(model):
        # Calibrate through the decoder only: lm_head stays unquantized, so its
        # vocabulary-sized logits would cost memory and time for nothing.
        t = time.time()
        body = model.get_decoder() if hasattr(model, "get_decoder") else model
        if hasattr(model, "_original_forward"):
            # ModelOpt's layerwise calibration (its GPTQ and local-Hessian recipes) patches the
            # model's own forward to catch the signal that stops each pass early: call that one
            # (the decoder alone let the signal escape; found on an H100, the fix not yet run there)
            body = model
        total = len(batches)
        events.progress("calibrate", 0, total)
        # The model's own bf16 products, also on a CPU: float32 ones (linear_compute.py, 5x faster
        # on AVX2) differ by a bf16 rounding at the largest activations, which moved input_scale
        # up to 1.4% away from ModelOpt run directly (tests/test_real_image.py). Our own passes
        # (smoothing statistics, ranking, the sequential streams) still compute in float32.
        with torch.inference_mode():
            for i, batch in enumerate(batches, 1):
                body(input_ids=batch.to(device, non_blocking=True), use_cache=False)
                events.progress("calibrate", i, total)
        if device == "cuda":
            torch.cuda.synchronize()
        if times is not None:
            times["calibrate_s"] = times.get("calibrate_s", 0.0) + time.time() - t

    return forward_loop
