"""An independent float64 NVFP4 reference, shared by the evaluation tests.

Nothing here comes from the payload: the safetensors header is read by the host's parser
(launcher/verify/checkpoint_files.py), then its own E2M1 / E4M3 decoding from the bit layouts, its own
round-to-nearest-even, and its own Llama forward in numpy float64.
"""
import json
from pathlib import Path

import numpy as np

from launcher.verify import safetensors_header


def read_safetensors(path: Path) -> dict:
    header, start = safetensors_header(path)  # the host's one header parser (launcher/verify/checkpoint_files.py)
    body = path.read_bytes()[start:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        buf, shape = body[a:b], meta["shape"]
        if meta["dtype"] == "BF16":
            u = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = u.view(np.float32).astype(np.float64)
        elif meta["dtype"] == "F32":
            arr = np.frombuffer(buf, dtype="<f4").astype(np.float64)
        elif meta["dtype"] == "U8":
            arr = np.frombuffer(buf, dtype=np.uint8).copy()
        elif meta["dtype"] == "F8_E4M3":
            arr = decode_e4m3(np.frombuffer(buf, dtype=np.uint8))
        else:
            raise AssertionError(f"unexpected dtype {meta['dtype']} for {name}")
        out[name] = arr.reshape(shape)
    return out


def decode_e4m3(b: np.ndarray) -> np.ndarray:
    sign = np.where(b >> 7, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, (b & 7).astype(np.float64)
    assert not np.any((exp == 15) & (man == 7)), "NaN in an fp8 tensor"
    value = np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp.astype(np.float64) - 7))
    return sign * value


def decode_e2m1(codes: np.ndarray) -> np.ndarray:
    sign = np.where(codes & 8, -1.0, 1.0)
    exp, man = (codes >> 1) & 3, (codes & 1).astype(np.float64)
    value = np.where(exp == 0, man * 0.5, (1 + man / 2) * 2.0 ** (exp.astype(np.float64) - 1))
    return sign * value


def round_e2m1(y: np.ndarray) -> np.ndarray:
    """Nearest representable magnitude; a tie goes to the level with an even mantissa."""
    levels = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    odd = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    a = np.minimum(np.abs(y), 6.0)[..., None]
    dist = np.abs(a - levels)
    best = dist.min(axis=-1, keepdims=True)
    # among the nearest levels (one, or two on a tie) prefer the even mantissa
    score = np.where(dist == best, odd, 99)
    q = levels[score.argmin(axis=-1)]
    return np.where(y < 0, -q, q)


def round_e4m3(v: np.ndarray) -> np.ndarray:
    """FP8 E4M3 round-to-nearest-even, saturating at 448 (non-negative input)."""
    v = np.minimum(np.asarray(v, dtype=np.float64), 448.0)
    _, e = np.frexp(np.where(v > 0, v, 1.0))          # v = m * 2**e, m in [0.5, 1)
    step = 2.0 ** (np.maximum(e - 1, -6) - 3)         # 3 mantissa bits; subnormals below 2**-6
    return np.minimum(np.round(v / step) * step, 448.0)  # np.round: half to even


def dequant_nvfp4(packed: np.ndarray, scale: np.ndarray, scale_2: float) -> np.ndarray:
    out, half = packed.shape
    codes = np.empty((out, 2 * half), dtype=np.uint8)
    codes[:, 0::2], codes[:, 1::2] = packed & 0xF, packed >> 4
    return (decode_e2m1(codes).reshape(out, -1, 16) * scale[..., None] * scale_2).reshape(out, -1)


def fq_nvfp4(x: np.ndarray, input_scale: float) -> np.ndarray:
    xb = x.reshape(*x.shape[:-1], -1, 16)
    s = round_e4m3(np.abs(xb).max(axis=-1, keepdims=True) / 6 / input_scale) * input_scale
    q = np.where(s > 0, round_e2m1(xb / np.where(s > 0, s, 1.0)), 0.0)
    return (q * s).reshape(x.shape)


def fq_fp8(x: np.ndarray, scale: float) -> np.ndarray:
    y = x / scale
    return np.sign(y) * round_e4m3(np.abs(y)) * scale


class Float64Llama:
    """Embeddings, RMSNorm, default RoPE, GQA causal attention, SiLU MLP, tied lm_head."""

    def __init__(self, folder: Path, quant: str | None):
        self.cfg = json.loads((folder / "config.json").read_text())
        t = read_safetensors(folder / "model.safetensors")
        self.w, self.act = {}, {}
        for k in [k for k in t if k.endswith(".weight")]:
            p = k[:-len(".weight")]
            if quant == "nvfp4" and p + ".weight_scale_2" in t:
                self.w[p] = dequant_nvfp4(t[k], t[p + ".weight_scale"], float(t[p + ".weight_scale_2"]))
            elif quant == "fp8" and p + ".weight_scale" in t:
                self.w[p] = t[k] * float(t[p + ".weight_scale"])
            else:
                self.w[p] = t[k]
            if p + ".input_scale" in t:
                s = float(t[p + ".input_scale"])
                self.act[p] = (lambda x, s=s: fq_nvfp4(x, s)) if quant == "nvfp4" else (lambda x, s=s: fq_fp8(x, s))
        self.w.setdefault("lm_head", self.w["model.embed_tokens"])

    def linear(self, name: str, x: np.ndarray) -> np.ndarray:
        if name in self.act:
            x = self.act[name](x)
        return x @ self.w[name].T

    def norm(self, name: str, x: np.ndarray) -> np.ndarray:
        eps = self.cfg["rms_norm_eps"]
        return self.w[name] * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))

    def logits(self, ids: list[int]) -> np.ndarray:
        c = self.cfg
        nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
        hd = c.get("head_dim") or c["hidden_size"] // nh
        theta = (c.get("rope_parameters") or {}).get("rope_theta") or c.get("rope_theta", 10000.0)
        n = len(ids)
        inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
        ang = np.arange(n)[:, None] * inv[None]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

        def rope(v):  # v [heads, n, hd]
            rot = np.concatenate([-v[..., hd // 2:], v[..., :hd // 2]], -1)
            return v * cos + rot * sin

        x = self.w["model.embed_tokens"][ids]
        mask = np.triu(np.full((n, n), -np.inf), 1)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self.norm(p + "input_layernorm", x)
            q = self.linear(p + "self_attn.q_proj", h).reshape(n, nh, hd).transpose(1, 0, 2)
            k = self.linear(p + "self_attn.k_proj", h).reshape(n, nkv, hd).transpose(1, 0, 2)
            v = self.linear(p + "self_attn.v_proj", h).reshape(n, nkv, hd).transpose(1, 0, 2)
            q, k = rope(q), rope(k)
            k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
            s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            a = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, nh * hd)
            x = x + self.linear(p + "self_attn.o_proj", a)
            h = self.norm(p + "post_attention_layernorm", x)
            g, u = self.linear(p + "mlp.gate_proj", h), self.linear(p + "mlp.up_proj", h)
            x = x + self.linear(p + "mlp.down_proj", g / (1 + np.exp(-g)) * u)
        return self.linear("lm_head", self.norm("model.norm", x))


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def float64_metrics(ref: Float64Llama, q: Float64Llama, windows) -> dict:
    nll_r = nll_q = kl = agree = n = 0.0
    for w in windows:
        lr, lq = log_softmax(ref.logits(w)[:-1]), log_softmax(q.logits(w)[:-1])
        tgt = np.array(w[1:])
        rows = np.arange(len(tgt))
        nll_r -= lr[rows, tgt].sum()
        nll_q -= lq[rows, tgt].sum()
        kl += (np.exp(lr) * (lr - lq)).sum()
        agree += (lr.argmax(-1) == lq.argmax(-1)).sum()
        n += len(tgt)
    return {"perplexity": np.exp(nll_q / n), "reference_perplexity": np.exp(nll_r / n),
            "kl_divergence": kl / n, "top1_agreement": agree / n, "tokens": n}
