"""The HTML report renders in a real headless Chromium, with one SVG per plot.

The eval JSONs are synthetic but shaped exactly as container_payload/evaluate.py writes
them (tests/test_emulation.py checks that shape against the real payload).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launcher.quality import report

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
    """PNG -> uint8 [h, w, channels] (Pillow)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGBA") if img.mode not in ("RGB", "RGBA") else img)


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


def test_cli_never_writes_the_page_through_a_symlink(evals, tmp_path):
    """OUT_HTML planted as a link (a shared folder, a checkout): one line, exit 2, target untouched."""
    victim, out = tmp_path / "victim.txt", tmp_path / "report.html"
    victim.write_text("precious")
    out.symlink_to(victim)
    proc = subprocess.run([sys.executable, "-m", "launcher", "report", str(out), str(evals[0])], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "report.html is a symlink" in proc.stderr and victim.read_text() == "precious"
