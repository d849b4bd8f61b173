"""Write a real llm-compressor NVFP4 checkpoint (compressed-tensors format) of a tiny random Llama.

    .venv-llmc/bin/python tests/tools/make_llmc_ckpt.py OUT_DIR [--schemes NVFP4,NVFP4A16]

writes one checkpoint per scheme into OUT_DIR/<scheme>. Runs in the llm-compressor venv
(torch + llmcompressor, which pins its own transformers), never in the host venv. The
model and calibration tokens are random; oneshot + save_pretrained(save_compressed=True)
are the real ones, so the verifier is tested against the exact keys llm-compressor writes.
"""
import argparse
import sys
from pathlib import Path

import torch

# Same tiny Llama as make_modelopt_ckpt.py (kept in step by hand: the two scripts run
# in different venvs and must not import each other's dependencies).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            max_position_embeddings=128, tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"])
SCHEMES = ("NVFP4", "NVFP4A16")
SEQ_LEN = 32
SAMPLES = 8


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.bfloat16).eval()


def tiny_tokenizer():
    # oneshot insists on a processor whenever a dataset is given, even a tokenized one;
    # build a word-level one offline whose ids cover the vocabulary.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(TINY["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")


def calibration_set():
    # Already tokenized: random ids, the model is random too.
    from datasets import Dataset

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (SAMPLES, SEQ_LEN), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * SEQ_LEN] * SAMPLES})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    args = ap.parse_args()
    schemes = [s for s in args.schemes.split(",") if s]
    unknown = set(schemes) - set(SCHEMES)
    if unknown:
        ap.error(f"unknown schemes {sorted(unknown)}; known: {', '.join(SCHEMES)}")

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    # oneshot wants a model folder (it re-reads config.json from the path), so save the
    # bf16 model and its tokenizer first, as a user's Hugging Face download would be.
    base = Path(args.out) / "_bf16"
    tiny_llama().save_pretrained(str(base))
    tiny_tokenizer().save_pretrained(str(base))
    for scheme in schemes:
        recipe = QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
        model = oneshot(model=str(base), dataset=calibration_set(), recipe=recipe,
                        max_seq_length=SEQ_LEN, num_calibration_samples=SAMPLES)
        model.save_pretrained(str(Path(args.out) / scheme), save_compressed=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
