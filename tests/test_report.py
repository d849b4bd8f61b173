"""The HTML report renders in a real headless Chromium, with one SVG per plot.

The eval JSONs are synthetic but shaped exactly as container_payload/evaluate.py writes
them (tests/test_emulation.py checks that shape against the real payload).
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from launcher import report

REPO = Path(__file__).resolve().parents[1]
N_PLOTS = 4  # KL bars, per-layer error, KL distribution, memory


def fake_eval(name: str, kl: float, err: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    layers = [f"model.layers.{i}.{m}" for i in range(30) for m in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    tokens = 16352
    logs = rng.normal(np.log10(kl) - 0.4, 0.7, tokens)
    counts, edges = np.histogram(np.clip(logs, -6, 2), bins=50, range=(-6, 2))
    return {
        "perplexity": 9.1 * (1 + 3 * kl), "reference_perplexity": 9.1, "kl_divergence": kl,
        "top1_agreement": 1 - 2 * kl, "tokens": tokens, "windows": 32, "seq_len": 512,
        "checkpoint": f"/models/{name}", "reference": "/models/SmolLM2-135M", "text": "wiki-heldout.txt",
        "format": {"quantized": True, "naming": "modelopt", "algo": "NVFP4", "activations": ["nvfp4"]},
        "per_layer": [{"name": n, "kind": "nvfp4", "act": "nvfp4", "rel_error": err * (1 + 0.2 * rng.random())}
                      for n in layers],
        "kl_per_token": {"mean": kl, "max": 10 ** logs.max(), "quantiles": {"0.5": kl / 2, "0.99": kl * 8},
                         "histogram": {"scale": "log10 nats", "edges": edges.tolist(),
                                       "counts": counts.tolist()}},
        "generations": [{"prompt": "Write a haiku about the ocean.", "reference": "Waves <fold> & return",
                         "quantized": f"{name}: waves fold", "identical": False, "chat_template": True}],
        "model": {"params": 134_515_008, "kv_bytes_per_token_bf16": 2 * 30 * 3 * 64 * 2,
                  "reference_bytes": 269_060_552},
        "checkpoint_bytes": 101_000_000, "weights_bytes": 100_000_000, "timings": {"total_s": 60},
    }


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = "headless Chromium is missing: apt-get install -y chromium"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


def screenshot(html: Path, png: Path, tmp: Path) -> None:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp / 'chromium-profile'}", f"--screenshot={png}",
           "--window-size=1200,2000", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists(), f"no screenshot ({proc.returncode}): {proc.stderr[-2000:]}"


def decode_png(path: Path) -> np.ndarray:
    """8-bit RGB/RGBA PNG -> uint8 [h, w, channels], with the stdlib's zlib."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", chunk[:10])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + n
    assert depth == 8 and ctype in (2, 6), (depth, ctype)
    bpp = 3 if ctype == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), dtype=np.uint8)
    prev = np.zeros(w * bpp, dtype=np.int64)
    for y in range(h):
        f, x = raw[y, 0], raw[y, 1:].astype(np.int64)
        if f == 0:
            row = x
        elif f == 1:  # Sub: a running sum per channel
            row = np.cumsum(x.reshape(w, bpp), axis=0).reshape(-1) % 256
        elif f == 2:
            row = (x + prev) % 256
        else:  # Average / Paeth depend on the byte just decoded: byte by byte
            row, xs, up = [0] * (w * bpp), x.tolist(), prev.tolist()
            for i in range(w * bpp):
                a = row[i - bpp] if i >= bpp else 0
                b = up[i]
                c = up[i - bpp] if i >= bpp else 0
                if f == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                row[i] = (xs[i] + pred) % 256
            row = np.array(row, dtype=np.int64)
        out[y] = row
        prev = row
    return out.reshape(h, w, bpp)


@pytest.fixture(scope="module")
def evals(tmp_path_factory):
    d = tmp_path_factory.mktemp("evals")
    paths = []
    for name, kl, err, seed in (("nvfp4-default", 0.031, 0.10, 1), ("nvfp4-awq", 0.022, 0.09, 2)):
        p = d / f"{name}.json"
        p.write_text(json.dumps(fake_eval(name, kl, err, seed)))
        paths.append(p)
    return paths


def test_html_has_one_svg_per_plot_and_escapes(evals, tmp_path):
    cands = [{"name": p.stem, "eval_json": json.loads(p.read_text()), "checkpoint_bytes": 101_000_000}
             for p in evals]
    out = report.build_report(cands, tmp_path / "r.html")
    page = out.read_text()
    assert page.count("<svg") == N_PLOTS and page.count("</svg>") == N_PLOTS
    assert "Waves &lt;fold&gt; &amp; return" in page and "<fold>" not in page
    assert "DGX Spark (128 GB unified)" in page and "original (bf16)" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    assert page.count("nvfp4-default") >= 3 and "0.03100" in page


def test_cli_and_renders_in_chromium(evals, tmp_path):
    out = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, "-m", "launcher", "report", str(out), f"{evals[0]}:default",
                           f"{evals[1]}:awq-lite"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert page.count("<svg") == N_PLOTS and ">awq-lite<" in page
    png = tmp_path / "report.png"
    screenshot(out, png, tmp_path)
    img = decode_png(png)
    assert img.shape[:2] == (2000, 1200)
    colors = np.unique(img[..., :3].reshape(-1, 3), axis=0)
    assert len(colors) > 50, f"screenshot looks blank ({len(colors)} colours)"
    # The plot colours of both candidates are on the page (the bars and lines drew).
    for hexcolor in report.COLORS[:2]:
        rgb = [int(hexcolor[i:i + 2], 16) for i in (1, 3, 5)]
        assert (np.abs(img[..., :3].astype(int) - rgb).sum(-1) == 0).sum() > 200, hexcolor
