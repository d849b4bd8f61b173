"""Compare two ModelOpt checkpoints tensor by tensor, without torch (host test venv).

    python compare_ckpt.py A B    -> prints the differences, exit 1 if any

The rule (issue 15): the same tensor names; every tensor byte-identical (dtype, shape, bytes),
except input_scale, which may differ by up to 1% (activation amax depends on the batch
arithmetic); hf_quant_config.json identical but for the producer; config.json's
quantization_config identical.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

INPUT_SCALE_TOLERANCE = 0.01


def tensors(folder: Path) -> dict[str, tuple[str, list[int], bytes]]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        header.pop("__metadata__", None)
        for name, info in header.items():
            b, e = info["data_offsets"]
            out[name] = (info["dtype"], info["shape"], data[8 + n + b:8 + n + e])
    return out


def differences(a: Path, b: Path) -> list[str]:
    ta, tb = tensors(a), tensors(b)
    problems = [f"only in {a.name}: {k}" for k in sorted(set(ta) - set(tb))]
    problems += [f"only in {b.name}: {k}" for k in sorted(set(tb) - set(ta))]
    worst = 0.0
    for k in sorted(set(ta) & set(tb)):
        (da, sa, ba), (db, sb, bb) = ta[k], tb[k]
        if (da, sa) != (db, sb):
            problems.append(f"{k}: {da}{sa} vs {db}{sb}")
        elif ba != bb:
            if k.endswith("input_scale") and da == "F32" and len(ba) == 4:
                x, y = struct.unpack("<f", ba)[0], struct.unpack("<f", bb)[0]
                rel = abs(x - y) / max(abs(x), abs(y), 1e-30)
                worst = max(worst, rel)
                if rel > INPUT_SCALE_TOLERANCE:
                    problems.append(f"{k}: input_scale {x} vs {y} ({rel:.2%})")
            else:
                problems.append(f"{k}: bytes differ")
    qa, qb = (json.loads((f / "hf_quant_config.json").read_text()) for f in (a, b))
    if qa["quantization"] != qb["quantization"]:
        problems.append(f"hf_quant_config.json differs: {qa['quantization']} vs {qb['quantization']}")
    ca, cb = (json.loads((f / "config.json").read_text()).get("quantization_config") for f in (a, b))
    if ca != cb:
        problems.append("config.json quantization_config differs")
    if not ta:
        problems.append(f"no tensors in {a}")
    return problems


if __name__ == "__main__":
    found = differences(Path(sys.argv[1]), Path(sys.argv[2]))
    print("\n".join(found) or "identical (input_scale within 1%)")
    sys.exit(1 if found else 0)
