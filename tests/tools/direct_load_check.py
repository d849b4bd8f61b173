"""Checks of container_payload.pipelines.direct_load and loading.model_from_state_dict; prints JSON.

    python tests/tools/direct_load_check.py WORKDIR MODEL_DIR
    python tests/tools/direct_load_check.py WORKDIR --random-llama TOKENIZER_DIR   # (device)

Run by tests/test_direct_load.py in the ModelOpt venv (torch); on a machine with CUDA it also
checks the GPU reader (the device runs it there; CI has no GPU).
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from container_payload.pipelines import direct_load, loading  # noqa: E402


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.reshape(-1).view(torch.uint8).numpy()) == \
        bytes(b.reshape(-1).view(torch.uint8).numpy())


def mixed_checkpoint(folder: Path) -> dict:
    """Two shards + index, dtypes of every size so that offsets are odd, a scalar, an empty tensor,
    a tensor larger than one read chunk, and a stray consolidated file the index does not name."""
    g = torch.Generator().manual_seed(0)
    shard1 = {"a.bf16": torch.randn(33, 17, generator=g).bfloat16(), "b.u8": torch.arange(7, dtype=torch.uint8),
              "c.f32": torch.randn(5, 3, generator=g), "d.scalar": torch.tensor(2.5),
              "e.empty": torch.empty(0, 4), "f.i8": torch.tensor([-3, 4, 5], dtype=torch.int8)}
    shard2 = {"g.f16": torch.randn(9, generator=g).half(), "h.i64": torch.arange(11),
              "i.big": torch.randn((direct_load.CHUNK // 2) + 3, generator=g).bfloat16(),
              "j.bool": torch.tensor([True, False, True])}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(shard1, folder / "model-00001-of-00002.safetensors")
    save_file(shard2, folder / "model-00002-of-00002.safetensors")
    save_file({"stray": torch.zeros(2)}, folder / "consolidated.safetensors")
    wm = {k: "model-00001-of-00002.safetensors" for k in shard1}
    wm.update({k: "model-00002-of-00002.safetensors" for k in shard2})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return {**shard1, **shard2}


class Done:
    """Stands in for the payload's background reader: result() gives the state dict."""

    def __init__(self, fn):
        self.fn = fn

    def result(self):
        return self.fn()


def random_llama(folder: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer bf16 Llama with tied embeddings around the given tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    work = Path(sys.argv[1])
    if sys.argv[2] == "--random-llama":
        model_dir = random_llama(work / "random-llama", Path(sys.argv[3]))
    else:
        model_dir = Path(sys.argv[2])
    res = {"cuda": torch.cuda.is_available()}

    expected = mixed_checkpoint(work / "mixed")
    files = direct_load.checkpoint_files(work / "mixed")
    res["files"] = [f.name for f in files]
    for device in ["cpu"] + (["cuda"] if res["cuda"] else []):
        got = direct_load.read_state_dict(files, device)
        res[f"mixed_{device}"] = {"keys_equal": sorted(got) == sorted(expected),
                                  "bytes_equal": all(same(got[k], expected[k]) for k in expected),
                                  "on_device": all(t.device.type == device for t in got.values())}

    device = "cuda" if res["cuda"] else "cpu"
    files = direct_load.checkpoint_files(model_dir)
    tok = loading.load_tokenizer(model_dir)
    direct, loader = loading.load_model(model_dir, device, Done(lambda: direct_load.read_state_dict(files, device)))
    usual, usual_loader = loading.load_model(model_dir, device, None)
    s1, s2 = direct.state_dict(), usual.state_dict()
    b1, b2 = dict(direct.named_buffers()), dict(usual.named_buffers())
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]], device=device)
    with torch.no_grad():
        logits_equal = torch.equal(direct(ids).logits, usual(ids).logits)
    res["model"] = {
        "loaders": [loader, usual_loader],
        "weights_equal": s1.keys() == s2.keys() and all(same(s1[k], s2[k]) for k in s1),
        "buffers_equal": b1.keys() == b2.keys() and all(same(b1[k], b2[k]) for k in b1),
        "tied": direct.config.tie_word_embeddings == (
            direct.lm_head.weight.data_ptr() == direct.get_input_embeddings().weight.data_ptr()),
        "config_equal": direct.config.to_json_string() == usual.config.to_json_string(),
        "generation_config_equal": direct.generation_config.to_json_string() == usual.generation_config.to_json_string(),
        "logits_equal": logits_equal,
    }

    # A checkpoint this loader does not take (fp16 weights) goes to from_pretrained.
    fp16 = work / "fp16"
    usual.half().save_pretrained(fp16)
    tok.save_pretrained(fp16)
    files = direct_load.checkpoint_files(fp16)
    _, fallback = loading.load_model(fp16, device, Done(lambda: direct_load.read_state_dict(files, device)))
    res["fp16_loader"] = fallback
    print(json.dumps(res))


if __name__ == "__main__":
    main()
