"""Score a quantized checkpoint against the original model on held-out text.

    python3 -m container_payload evaluate JOB.json

The job is a contract.EvalJob: checkpoint, reference, text, tokens (T), seq_len (L),
json_out, generations (prompts), max_new_tokens, device. Everything comes from the job
file and the only file written is json_out.

Text contract (as calibration, calib_data.py): the whole file tokenized without special
tokens, the first T tokens cut into T//L windows of L. In each window the L-1 next-token
predictions are scored. The checkpoint runs through emulate.py (exact float32 NVFP4
emulation), the reference in float32, so the KL measures quantization and nothing else;
an unquantized checkpoint is loaded as it is, and against itself gives KL 0 exactly.

Stages: load -> tokenize -> score -> layers -> generate -> write json_out.
"""
import json
import os
import sys
import time
from pathlib import Path

from .core import events
from .core.contract import DONE, EvalJob
from .core.events import PayloadError
from .numerics.emulate import EmulatedLinear
from .numerics.emulate_moe import EmulatedExperts
from .numerics.emulated_model import load_any, load_reference
from .pipelines.calib_data import fingerprint, read_text, token_windows
from .quantize import cpu_seconds, pick_device

DEFAULT_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the ocean.",
    "Explain in two sentences why the sky is blue.",
]
# Per-token KL histogram on fixed log10 bins, so that candidates share one x axis.
KL_LOG10_RANGE = (-6.0, 2.0)
KL_BINS = 50
KL_QUANTILES = (0.5, 0.9, 0.95, 0.99, 0.999)


def load_models(checkpoint: Path, reference: Path, device: str, trust_remote_code: bool = False):
    events.stage("load", detail=f"{reference} (reference), {checkpoint} (emulated)")
    ref, _ = load_reference(reference, device, trust_remote_code=trust_remote_code)
    if checkpoint.resolve() == reference.resolve():
        # The same original model: one copy computes both sides, exactly.
        return ref, ref, {"quantized": False, "same_as_reference": True}
    model, info = load_any(checkpoint, device, trust_remote_code=trust_remote_code)
    return ref, model, info


def windows_for(tokenizer, job: EvalJob) -> list[list[int]]:
    events.stage("tokenize", detail=job.text)
    tokens, seq_len = int(job.tokens), int(job.seq_len)
    if seq_len < 2 or tokens < seq_len:
        raise PayloadError(f"need seq_len >= 2 and tokens >= seq_len (got {tokens}, {seq_len})",
                           kind="input")
    text = read_text(job.text, tokenizer)
    try:
        return token_windows(tokenizer, text, tokens // seq_len, seq_len)
    except PayloadError as e:  # same check, worded for evaluation
        msg = str(e).replace("calibration text", "evaluation text")
        raise PayloadError(msg.split("; lower")[0] + "; lower --tokens/--seq-len or give more text",
                           kind="input")


def score(ref, model, windows, device: str) -> dict:
    """Perplexities, mean KL(ref || quantized) and top-1 agreement over all predictions."""
    import torch

    events.stage("evaluate", total=len(windows))
    nll_ref = nll_q = kl_sum = 0.0
    agree = 0
    kl_tokens, kl_windows = [], []
    events.progress("evaluate", 0, len(windows))
    with torch.inference_mode():
        for i, window in enumerate(windows, 1):
            ids = torch.tensor([window], device=device)
            target = ids[0, 1:].unsqueeze(-1)
            lp_ref = torch.log_softmax(ref(input_ids=ids).logits[0, :-1].float(), dim=-1)
            lp_q = (lp_ref if model is ref else
                    torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1))
            kl = (lp_ref.exp() * (lp_ref - lp_q)).sum(dim=-1).double()
            nll_ref -= lp_ref.gather(-1, target).double().sum().item()
            nll_q -= lp_q.gather(-1, target).double().sum().item()
            kl_sum += kl.sum().item()
            agree += int((lp_ref.argmax(-1) == lp_q.argmax(-1)).sum())
            kl_tokens.append(kl.cpu())
            kl_windows.append(kl.mean().item())
            events.progress("evaluate", i, len(windows))
    n = sum(len(w) - 1 for w in windows)
    kl_all = torch.cat(kl_tokens)
    return {
        "tokens": n,
        "perplexity": float(torch.tensor(nll_q / n, dtype=torch.float64).exp()),
        "reference_perplexity": float(torch.tensor(nll_ref / n, dtype=torch.float64).exp()),
        "nll": nll_q / n,
        "reference_nll": nll_ref / n,
        "kl_divergence": kl_sum / n,
        "top1_agreement": agree / n,
        "kl_per_token": kl_summary(kl_all, kl_windows),
    }


def kl_summary(kl, kl_windows: list[float]) -> dict:
    import torch

    lo, hi = KL_LOG10_RANGE
    # Rounding can leave a token's KL a hair below 0; those (and exact zeros) go in bin 0.
    logs = kl.clamp_min(10 ** lo).log10().clamp(lo, hi)
    counts = torch.histc(logs.float(), bins=KL_BINS, min=lo, max=hi)
    return {
        "mean": kl.mean().item(),
        "max": kl.max().item(),
        "quantiles": {str(q): torch.quantile(kl, q).item() for q in KL_QUANTILES},
        "histogram": {"scale": "log10 nats", "edges": torch.linspace(lo, hi, KL_BINS + 1).tolist(),
                      "counts": [int(c) for c in counts.tolist()]},
        "per_window": kl_windows,
    }


def layer_errors(ref, model) -> list[dict]:
    """||W - Wq|| / ||W|| for every emulated Linear, in model order."""
    pairs = []
    ref_modules = dict(ref.named_modules())
    for name, mod in model.named_modules():
        if isinstance(mod, EmulatedLinear) and name in ref_modules:
            pairs.append((name, mod, ref_modules[name].weight))
        elif isinstance(mod, EmulatedExperts) and name in ref_modules:  # fused experts, per expert
            pairs += [(f"{name}.{sub}", lin, w) for sub, lin, w in mod.per_expert(ref_modules[name])]
    rows = []
    for name, mod, ref_weight in pairs:
        w = ref_weight.detach().double()
        err = (w - mod.weight.detach().double()).norm() / w.norm().clamp_min(1e-30)
        rows.append({"name": name, "kind": mod.kind, "act": mod.act or "none",
                     "rel_error": err.item(), "shape": list(mod.weight.shape)})
    return rows


def prompt_ids(tokenizer, prompt: str, device: str):
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return enc["input_ids"].to(device), getattr(tokenizer, "chat_template", None) is not None


def generate(ref, model, tokenizer, prompts: list[str], max_new_tokens: int, device: str) -> list[dict]:
    import torch
    from transformers import GenerationConfig

    events.stage("generate", total=len(prompts))
    eos = ref.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    out = []
    for i, prompt in enumerate(prompts, 1):
        ids, chat = prompt_ids(tokenizer, prompt, device)
        texts, toks = {}, {}
        for side, m in (("reference", ref), ("quantized", model)):
            with torch.inference_mode():
                seq = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
            toks[side] = seq[0, ids.shape[1]:].tolist()
            texts[side] = tokenizer.decode(toks[side], skip_special_tokens=True)
        same = 0
        for a, b in zip(toks["reference"], toks["quantized"]):
            if a != b:
                break
            same += 1
        out.append({"prompt": prompt, "chat_template": chat, **texts,
                    "identical": toks["reference"] == toks["quantized"], "common_prefix_tokens": same})
        events.progress("generate", i, len(prompts))
    return out


def model_facts(ref, reference: Path) -> dict:
    """What the report's memory model needs: parameter count and KV bytes per token."""
    c = ref.config
    heads = getattr(c, "num_attention_heads", None)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or (c.hidden_size // heads if heads else None)
    layers = getattr(c, "num_hidden_layers", None)
    kv = 2 * layers * kv_heads * head_dim * 2 if layers and kv_heads and head_dim else None
    return {"architecture": (getattr(c, "architectures", None) or ["?"])[0],
            "params": sum(p.numel() for p in {id(p): p for p in ref.parameters()}.values()),
            "num_hidden_layers": layers, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "hidden_size": getattr(c, "hidden_size", None), "vocab_size": getattr(c, "vocab_size", None),
            "max_position_embeddings": getattr(c, "max_position_embeddings", None),
            "kv_bytes_per_token_bf16": kv, "reference_bytes": folder_bytes(reference, "*.safetensors")}


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(folder).glob(pattern) if p.is_file())


def write_json(out: Path, result: dict) -> None:
    """A command's result file (eval, eval --tasks), written whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, out)


def model_folders(job) -> tuple[Path, Path]:
    """The job's checkpoint and reference folders (eval and eval --tasks), each with its config.json."""
    checkpoint, reference = Path(job.checkpoint), Path(job.reference)
    for p in (checkpoint, reference):
        if not (p / "config.json").exists():
            raise PayloadError(f"no config.json in model folder {p}", kind="input")
    return checkpoint, reference


def run(job: EvalJob) -> dict:
    import torch
    from transformers import AutoTokenizer

    timings = {}
    t0 = time.time()
    checkpoint, reference = model_folders(job)
    device = pick_device(job.device)
    # The reference's tokenizer defines the tokens; the checkpoint's copy must agree anyway.
    tokenizer = AutoTokenizer.from_pretrained(reference, trust_remote_code=job.trust_remote_code)
    ref, model, info = load_models(checkpoint, reference, device, job.trust_remote_code)
    timings["load_s"] = round(time.time() - t0, 3)

    t = time.time()
    windows = windows_for(tokenizer, job)
    timings["tokenize_s"] = round(time.time() - t, 3)

    t = time.time()
    metrics = score(ref, model, windows, device)
    timings["score_s"] = round(time.time() - t, 3)
    per_layer = layer_errors(ref, model)

    t = time.time()
    prompts = DEFAULT_PROMPTS if job.generations is None else list(job.generations)
    gens = generate(ref, model, tokenizer, prompts, int(job.max_new_tokens), device)
    timings["generate_s"] = round(time.time() - t, 3)
    timings["total_s"] = round(time.time() - t0, 3)
    timings["cpu_s"] = cpu_seconds()

    import transformers

    result = {
        **metrics,
        "checkpoint": str(checkpoint),
        "reference": str(reference),
        "text": str(job.text),
        "seq_len": int(job.seq_len),
        "windows": len(windows),
        "windows_sha256": fingerprint(windows),
        "format": info,
        "per_layer": per_layer,
        "generations": gens,
        "model": model_facts(ref, reference),
        "checkpoint_bytes": folder_bytes(checkpoint),
        "weights_bytes": folder_bytes(checkpoint, "*.safetensors"),
        "device": device,
        "compute_dtype": "float32",
        "timings": timings,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
    }
    out = Path(job.json_out)
    write_json(out, result)
    events.emit(DONE, result=str(out), kl_divergence=result["kl_divergence"],
                perplexity=result["perplexity"], timings=timings)
    return result


if __name__ == "__main__":
    sys.exit(events.run_command(["evaluate", *sys.argv[1:]]))
