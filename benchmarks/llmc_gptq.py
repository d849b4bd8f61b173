"""llm-compressor's GPTQ to NVFP4 on a checkpoint folder: the peer that issue 14 (docs/decisions.md) times us against.

    python3 benchmarks/llmc_gptq.py MODEL_DIR CALIB_TXT SAMPLES SEQ_LEN METRICS_JSON [--save DIR] [--recipe NAME]

As the issue measured it: `oneshot` with GPTQModifier(targets="Linear", scheme="NVFP4",
ignore=["lm_head"]), the model loaded on the CPU in bf16 and onloaded layer by layer by
llm-compressor's sequential pipeline, on the same token windows as our payload
(container_payload.pipelines.calib_data.token_windows with the folder's tokenizer). The time reported is
the oneshot call alone (the quantize stage); the load is timed apart.

--recipe picks the modifiers (issue 21's peers, llm-compressor 0.14): gptq (the above, the default),
gptq-mse (GPTQ with the MSE weight observer), awq-gptq (AWQModifier, then GPTQ, as its AWQ
examples pair a transform with a quantizing modifier) and awq-gptq-mse; gptq-imatrix and
gptq-imatrix-x (GPTQ with the iMatrix observers `imatrix_mse` and `nvfp4_expanded_imatrix`: block
scales weighted by the inputs' E[x^2]) and awq-gptq-imatrix-x.
"""
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def modifiers(name: str) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier

    observer = {"weight_observer": OBSERVERS[name.rsplit("-", 1)[-1]]} if name.rsplit("-", 1)[-1] in OBSERVERS else {}
    gptq = GPTQModifier(targets="Linear", scheme="NVFP4", ignore=["lm_head"], **observer)
    if name.startswith("awq-"):
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(duo_scaling="both"), gptq]
    return [gptq]


OBSERVERS = {"mse": "mse", "imatrix": "imatrix_mse", "x": "nvfp4_expanded_imatrix"}  # recipe suffix -> observer
RECIPES = ("gptq", "gptq-mse", "awq-gptq", "awq-gptq-mse", "gptq-imatrix", "gptq-imatrix-x", "awq-gptq-imatrix-x")


def main(argv) -> int:
    model_dir, calib, n, seq, metrics = argv[0], argv[1], int(argv[2]), int(argv[3]), Path(argv[4])
    save = argv[argv.index("--save") + 1] if "--save" in argv else None
    recipe = argv[argv.index("--recipe") + 1] if "--recipe" in argv else "gptq"
    if recipe not in RECIPES:
        print(f"--recipe must be one of {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    t0 = time.time()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from container_payload.pipelines.calib_data import fingerprint, token_windows

    import llmcompressor
    t_imp = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    win = token_windows(tok, Path(calib).read_text(encoding="utf-8", errors="replace"), n, seq)
    ds = Dataset.from_dict({"input_ids": win, "attention_mask": [[1] * seq] * n})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    t_load = time.time()
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    oneshot(model=model, dataset=ds, max_seq_length=seq, num_calibration_samples=n,
            recipe=modifiers(recipe))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t_q = time.time()
    res = {"llmcompressor": llmcompressor.__version__, "recipe": recipe, "imports_s": round(t_imp - t0, 3),
           "load_s": round(t_load - t_imp, 3), "quantize_s": round(t_q - t_load, 3),
           "gpu_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
           "samples": n, "seq_len": seq, "windows_sha256": fingerprint(win)}
    if save:
        model.save_pretrained(save, save_compressed=True)
        res["save_s"] = round(time.time() - t_q, 3)
    metrics.write_text(json.dumps(res, indent=2))
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
