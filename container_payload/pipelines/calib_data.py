"""Calibration and evaluation text: the token-window contract.

For plain text, so that any other tool fed the same file sees the same tokens:
tokenize the WHOLE file with the model's tokenizer without special tokens, then
take the first N consecutive, non-overlapping windows of exactly L tokens.
A JSONL file is read as one text per record ("text" field, or "messages" rendered
with the chat template), joined by blank lines, then cut the same way.
"""
import hashlib
import json
from pathlib import Path

from ..core.events import PayloadError


def read_text(source: str, tokenizer) -> str:
    if source.startswith("hf:"):
        return _hf_dataset_text(source[3:])
    path = Path(source)
    if not path.is_file():
        raise PayloadError(f"calibration file not found: {source}", kind="input")
    if path.suffix in (".jsonl", ".json"):
        return "\n\n".join(_jsonl_texts(path, tokenizer))
    return path.read_text(encoding="utf-8", errors="replace")


def _jsonl_texts(path: Path, tokenizer):
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PayloadError(f"{path}:{n}: not JSON ({e.msg})", kind="input")
        if isinstance(rec, dict) and "messages" in rec and getattr(tokenizer, "chat_template", None):
            yield tokenizer.apply_chat_template(rec["messages"], tokenize=False)
        elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
            yield rec["text"]
        else:
            raise PayloadError(f"{path}:{n}: a record needs a 'text' string or 'messages'", kind="input")


def _hf_dataset_text(spec: str) -> str:
    name, split, field = (spec.split(":") + ["train", "text"])[:3]
    try:
        import datasets
    except ImportError:
        raise PayloadError("hf: calibration needs the `datasets` package in the image; "
                           "use --calib FILE or builtin instead", kind="input")
    ds = datasets.load_dataset(name, split=split, streaming=True)
    parts, size = [], 0
    for rec in ds:  # enough text for any sane N x L, without downloading everything
        parts.append(str(rec[field]))
        size += len(parts[-1])
        if size > 64_000_000:
            break
    return "\n\n".join(parts)


def token_windows(tokenizer, text: str, samples: int, seq_len: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = samples * seq_len
    if len(ids) < need:
        raise PayloadError(f"calibration text has {len(ids)} tokens but {samples} x {seq_len} = "
                           f"{need} are needed; lower --calib-samples/--calib-seq-len or give more text",
                           kind="input")
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(samples)]


def fingerprint(windows: list[list[int]]) -> str:
    h = hashlib.sha256()
    for w in windows:
        h.update(json.dumps(w).encode())
    return h.hexdigest()
