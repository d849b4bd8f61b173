"""One self-contained HTML page comparing evaluated checkpoints.

    launcher report OUT.html EVAL1.json[:NAME] [EVAL2.json[:NAME] ...]

Input: the JSON files container_payload/evaluate.py writes. The page has a table of
KL / perplexity / top-1 agreement / size, a KL bar chart, the per-layer weight error,
the per-token KL distribution, a memory table for DGX Spark and common GPUs, and the
greedy generations side by side. The plots are small hand-written SVGs, on purpose: a
plotting library (matplotlib: ~40 MB with numpy's friends and a font cache) would be the
launcher's heaviest dependency for four bar and line charts, and the page must load nothing
from anywhere (no JavaScript chart library from a CDN).
"""
from __future__ import annotations

import html
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from ..common.errors import ConfigError
from ..common.files import atomic_write_text
from ..common.output import MAX_RESULT_BYTES
from ..common.untrusted import parse, read_capped

GiB = 1 << 30
# The memory model: weights as stored + a KV cache of this many tokens in bf16 (one
# 32k-token sequence, or e.g. 8 sequences of 4k). Activations and runtime overhead
# (CUDA context, allocator slack: a few GiB) are not counted.
KV_BUDGET_TOKENS = 32768
DEVICES = [("DGX Spark (128 GB unified)", 128), ("GPU 80 GB", 80), ("GPU 48 GB", 48), ("GPU 24 GB", 24)]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1150px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}.yes{color:#17803d}.no{color:#b3261e}.note{color:#555;font-size:12px}
.gen td{vertical-align:top;text-align:left;white-space:pre-wrap;max-width:340px;font-size:12px}
svg{display:block;margin:6px 0;background:#fff}
"""


# ---------------------------------------------------------------- SVG helpers

def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [round(start + i * step, 12) for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.001:
        return f"{v:.2g}"
    return f"{v:.4g}"


class _Frame:
    """A plot area with linear axes; `x()`/`y()` map data to pixels."""

    def __init__(self, w, h, xlo, xhi, ylo, yhi, left=70, right=20, top=30, bottom=45):
        self.w, self.h = w, h
        self.xlo, self.xhi, self.ylo, self.yhi = xlo, xhi if xhi > xlo else xlo + 1, ylo, yhi if yhi > ylo else ylo + 1
        self.l, self.r, self.t, self.b = left, w - right, top, h - bottom
        self.parts: list[str] = []

    def x(self, v):
        return self.l + (v - self.xlo) / (self.xhi - self.xlo) * (self.r - self.l)

    def y(self, v):
        return self.b - (v - self.ylo) / (self.yhi - self.ylo) * (self.b - self.t)

    def add(self, s: str) -> None:
        self.parts.append(s)

    def axes(self, title: str, xlabel: str, ylabel: str, xticks=None, xtick_fmt=_fmt) -> None:
        a = self.add
        for v in _ticks(self.ylo, self.yhi):
            if self.ylo - 1e-12 <= v <= self.yhi + 1e-12:
                yy = self.y(v)
                a(f'<line x1="{self.l}" x2="{self.r}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>')
                a(f'<text x="{self.l - 6}" y="{yy + 4:.1f}" text-anchor="end" font-size="11">{_fmt(v)}</text>')
        for v in (xticks if xticks is not None else _ticks(self.xlo, self.xhi)):
            xx = self.x(v)
            a(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{self.b}" y2="{self.b + 4}" stroke="#444"/>')
            a(f'<text x="{xx:.1f}" y="{self.b + 16}" text-anchor="middle" font-size="11">{xtick_fmt(v)}</text>')
        a(f'<line x1="{self.l}" x2="{self.r}" y1="{self.b}" y2="{self.b}" stroke="#444"/>')
        a(f'<line x1="{self.l}" x2="{self.l}" y1="{self.t}" y2="{self.b}" stroke="#444"/>')
        a(f'<text x="{self.w / 2:.0f}" y="18" text-anchor="middle" font-size="14" font-weight="bold">'
          f'{html.escape(title)}</text>')
        a(f'<text x="{(self.l + self.r) / 2:.0f}" y="{self.h - 8}" text-anchor="middle" font-size="12">'
          f'{html.escape(xlabel)}</text>')
        a(f'<text transform="translate(16,{(self.t + self.b) / 2:.0f}) rotate(-90)" text-anchor="middle" '
          f'font-size="12">{html.escape(ylabel)}</text>')

    def legend(self, names: list[str]) -> None:
        # One row between the title and the plot area, so that it never hides data.
        x = self.l
        for i, name in enumerate(names):
            self.add(f'<rect x="{x}" y="{self.t - 19}" width="12" height="10" fill="{COLORS[i % len(COLORS)]}"/>')
            self.add(f'<text x="{x + 16}" y="{self.t - 10}" font-size="11">{html.escape(name)}</text>')
            x += 40 + 7 * len(name)

    def svg(self, label: str) -> str:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" '
                f'viewBox="0 0 {self.w} {self.h}" role="img" aria-label="{html.escape(label)}">'
                + "".join(self.parts) + "</svg>")


def bar_chart(labels: list[str], values: list[float], title: str, ylabel: str,
              hlines: list[tuple[float, str]] = (), colors: list[str] | None = None,
              w: int = 900, h: int = 300) -> str:
    top = max([*values, *(v for v, _ in hlines), 1e-12]) * 1.15
    f = _Frame(w, h, 0, len(labels), 0, top)
    f.axes(title, "", ylabel, xticks=[])
    slot = (f.r - f.l) / max(len(labels), 1)
    for i, (lab, v) in enumerate(zip(labels, values)):
        x0, bw = f.l + slot * i + slot * 0.2, slot * 0.6
        f.add(f'<rect x="{x0:.1f}" y="{f.y(v):.1f}" width="{bw:.1f}" height="{f.b - f.y(v):.1f}" '
              f'fill="{(colors or COLORS)[i % len(colors or COLORS)]}"><title>{html.escape(lab)}: {v:.6g}</title></rect>')
        f.add(f'<text x="{x0 + bw / 2:.1f}" y="{f.y(v) - 4:.1f}" text-anchor="middle" font-size="11">{_fmt(v)}</text>')
        f.add(f'<text x="{x0 + bw / 2:.1f}" y="{f.b + 16}" text-anchor="middle" font-size="11">{html.escape(lab)}</text>')
    for v, lab in hlines:
        f.add(f'<line x1="{f.l}" x2="{f.r}" y1="{f.y(v):.1f}" y2="{f.y(v):.1f}" stroke="#888" stroke-dasharray="5,4"/>')
        f.add(f'<text x="{f.r - 4}" y="{f.y(v) - 3:.1f}" text-anchor="end" font-size="10" fill="#555">{html.escape(lab)}</text>')
    return f.svg(title)


def line_plot(series: list[tuple[str, list[float], list[float], list[str] | None]], title: str,
              xlabel: str, ylabel: str, w: int = 1000, h: int = 340, xtick_fmt=_fmt, markers: bool = True) -> str:
    xs = [x for _, sx, _, _ in series for x in sx] or [0, 1]
    ys = [y for _, _, sy, _ in series for y in sy] or [0, 1]
    f = _Frame(w, h, min(xs), max(xs), 0, max(ys) * 1.1 if max(ys) > 0 else 1, top=52)
    f.axes(title, xlabel, ylabel, xtick_fmt=xtick_fmt)
    for i, (name, sx, sy, tips) in enumerate(series):
        c = COLORS[i % len(COLORS)]
        pts = " ".join(f"{f.x(x):.1f},{f.y(y):.1f}" for x, y in zip(sx, sy))
        f.add(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        if markers:
            for j, (x, y) in enumerate(zip(sx, sy)):
                tip = f"{name}: {tips[j] if tips else x} = {y:.5g}"
                f.add(f'<circle cx="{f.x(x):.1f}" cy="{f.y(y):.1f}" r="2.2" fill="{c}"><title>'
                      f'{html.escape(tip)}</title></circle>')
    f.legend([s[0] for s in series])
    return f.svg(title)


# ---------------------------------------------------------------- page sections

def _gb(n: float | None) -> str:
    return "?" if n is None else f"{n / GiB:.3g} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.3g} MiB"


def _format_label(ev: dict) -> str:
    f = ev.get("format") or {}
    if not f.get("quantized"):
        return "unquantized"
    acts = ",".join(f.get("activations") or [])
    return f"{f.get('algo', '?')} ({f.get('naming', '?')}; act {acts})"


def metrics_table(cands: list[dict]) -> str:
    rows = ["<tr><th class=l>candidate</th><th class=l>format</th><th>KL mean (nats)</th><th>KL p99</th>"
            "<th>top-1 agreement</th><th>perplexity</th><th>original ppl</th><th>Δ ppl</th>"
            "<th>size on disk</th><th>tokens</th></tr>"]
    for c in cands:
        ev = c["eval_json"]
        q99 = (ev.get("kl_per_token") or {}).get("quantiles", {}).get("0.99")
        dppl = ev["perplexity"] / ev["reference_perplexity"] - 1
        rows.append(
            f"<tr><td class=l>{html.escape(c['name'])}</td><td class=l>{html.escape(_format_label(ev))}</td>"
            f"<td>{ev['kl_divergence']:.5f}</td><td>{'?' if q99 is None else f'{q99:.4f}'}</td>"
            f"<td>{100 * ev['top1_agreement']:.2f}%</td><td>{ev['perplexity']:.4f}</td>"
            f"<td>{ev['reference_perplexity']:.4f}</td><td>{100 * dppl:+.2f}%</td>"
            f"<td>{_gb(c.get('checkpoint_bytes'))}</td><td>{ev['tokens']}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def kl_bars(cands: list[dict]) -> str:
    return bar_chart([c["name"] for c in cands], [c["eval_json"]["kl_divergence"] for c in cands],
                     "Mean KL(original || quantized) per token", "nats")


def layer_plot(cands: list[dict]) -> str:
    series = []
    for c in cands:
        rows = c["eval_json"].get("per_layer") or []
        series.append((c["name"], list(range(len(rows))), [r["rel_error"] for r in rows],
                       [r["name"] for r in rows]))
    return line_plot(series, "Relative weight quantization error ||W - Wq|| / ||W|| per Linear",
                     "quantized Linear, in model order (hover for its name)", "relative error")


def kl_histogram(cands: list[dict]) -> str:
    series = []
    for c in cands:
        hist = (c["eval_json"].get("kl_per_token") or {}).get("histogram")
        if not hist:
            continue
        total = max(sum(hist["counts"]), 1)
        e = hist["edges"]
        # A step outline: each bin drawn flat from its left edge to its right edge.
        xs, ys = [], []
        for i, n in enumerate(hist["counts"]):
            xs += [e[i], e[i + 1]]
            ys += [100 * n / total] * 2
        series.append((c["name"], xs, ys, None))
    return line_plot(series, "Distribution of per-token KL (first bin also holds KL ≤ 1e-6)",
                     "per-token KL (nats, log scale)", "% of tokens", markers=False,
                     xtick_fmt=lambda v: f"1e{v:.0f}" if float(v).is_integer() else f"1e{v:.1f}")


def memory_rows(cands: list[dict]) -> list[dict]:
    rows = []
    first = cands[0]["eval_json"] if cands else {}
    model = first.get("model") or {}
    if model.get("reference_bytes") and all((c["eval_json"].get("format") or {}).get("quantized") for c in cands):
        rows.append({"name": "original (bf16)", "weights": model["reference_bytes"],
                     "disk": model["reference_bytes"], "kv_tok": model.get("kv_bytes_per_token_bf16"),
                     "original": True})
    for c in cands:
        ev = c["eval_json"]
        rows.append({"name": c["name"], "weights": ev.get("weights_bytes") or c.get("checkpoint_bytes"),
                     "disk": c.get("checkpoint_bytes"), "kv_tok": (ev.get("model") or {}).get("kv_bytes_per_token_bf16")})
    for r in rows:
        r["kv"] = (r["kv_tok"] or 0) * KV_BUDGET_TOKENS
        r["need"] = (r["weights"] or 0) + r["kv"]
    return rows


def memory_table(rows: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(d)}</th>" for d, _ in DEVICES)
    out = [f"<tr><th class=l>candidate</th><th>on disk</th><th>weights</th><th>KV budget</th>"
           f"<th>needs</th>{head}</tr>"]
    for r in rows:
        cells = []
        for _, gb in DEVICES:
            cap = gb * GiB
            if r["need"] <= cap:
                cells.append(f"<td class=yes>fits ({100 * r['need'] / cap:.1f}% used)</td>")
            else:
                cells.append(f"<td class=no>does not fit ({r['need'] / cap:.2f}×)</td>")
        out.append(f"<tr><td class=l>{html.escape(r['name'])}</td><td>{_gb(r['disk'])}</td>"
                   f"<td>{_gb(r['weights'])}</td><td>{_gb(r['kv']) if r['kv_tok'] else 'unknown'}</td>"
                   f"<td>{_gb(r['need'])}</td>{''.join(cells)}</tr>")
    return "<table>" + "".join(out) + "</table>"


def memory_plot(rows: list[dict]) -> str:
    # Candidates keep their colours from the other plots; the original is grey.
    n_orig = sum(1 for r in rows if r.get("original"))
    colors = ["#999999"] * n_orig + [COLORS[i % len(COLORS)] for i in range(len(rows) - n_orig)]
    return bar_chart([r["name"] for r in rows], [r["need"] / GiB for r in rows],
                     f"Memory needed: weights + bf16 KV cache for {KV_BUDGET_TOKENS} tokens", "GiB",
                     hlines=[(gb, d) for d, gb in DEVICES] if max((r["need"] for r in rows), default=0) > 12 * GiB
                     else [], colors=colors)


def generations_table(cands: list[dict]) -> str:
    gens = [c["eval_json"].get("generations") or [] for c in cands]
    if not any(gens):
        return "<p class=note>No generations in these evaluations.</p>"
    head = "".join(f"<th class=l>{html.escape(c['name'])}</th>" for c in cands)
    rows = [f"<tr><th class=l>prompt</th><th class=l>original</th>{head}</tr>"]
    for i, g in enumerate(gens[0]):
        cells = []
        for gl in gens:
            q = gl[i] if i < len(gl) else {}
            mark = " (identical)" if q.get("identical") else ""
            cells.append(f"<td>{html.escape(q.get('quantized', ''))}<span class=note>{mark}</span></td>")
        rows.append(f"<tr><td>{html.escape(g['prompt'])}</td><td>{html.escape(g['reference'])}</td>{''.join(cells)}</tr>")
    return '<table class="gen">' + "".join(rows) + "</table>"


def build_report(candidates: list[dict], out_html: Path) -> Path:
    """candidates: [{name, eval_json, checkpoint_bytes, params?}] -> one HTML file."""
    if not candidates:
        raise ValueError("no candidates to report")
    first = candidates[0]["eval_json"]
    model = first.get("model") or {}
    params = candidates[0].get("params") or model.get("params")
    mem = memory_rows(candidates)
    subtitle = (f"reference {html.escape(str(first.get('reference', '?')))}"
                f"{f' ({params / 1e6:.1f} M parameters)' if params else ''}; text "
                f"{html.escape(str(first.get('text', '?')))}, {first.get('tokens')} scored tokens "
                f"({first.get('windows')} windows of {first.get('seq_len')}).")
    body = [
        "<h1>NVFP4 evaluation report</h1>", f"<p class=note>{subtitle}</p>",
        "<p class=note>The quantized models run through an exact float32 emulation of the engines' "
        "arithmetic (weights dequantized, W4A4 activations fake-quantized per 16-block with the "
        "static input scale); KL is KL(original || quantized) per predicted token, in nats.</p>",
        "<h2>Summary</h2>", metrics_table(candidates),
        "<h2>KL divergence</h2>", kl_bars(candidates),
        "<h2>Per-layer weight error</h2>", layer_plot(candidates),
        "<h2>Per-token KL distribution</h2>", kl_histogram(candidates),
        "<h2>Size and memory</h2>",
        f"<p class=note>Needs = weights as stored + a KV cache of {KV_BUDGET_TOKENS} tokens in bf16 "
        "(one 32k-token context, or 8 × 4k). Not counted: activations, CUDA context and allocator "
        "overhead (a few GiB), and on DGX Spark the operating system's share of the 128 GB unified "
        "memory. Capacities are taken as GiB.</p>",
        memory_table(mem), memory_plot(mem),
        "<h2>Greedy generations</h2>", generations_table(candidates),
    ]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>NVFP4 evaluation report</title>"
            f"<style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>")
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_html, page)  # a path the user named: never written through a link there
    return out_html


class _Typed(BaseModel):
    # strict: "0.03" stays a string and is refused (the page formats numbers); extra members pass
    model_config = ConfigDict(extra="allow", strict=True)


class _Histogram(_Typed):
    counts: list[float]
    edges: list[float]


class _KLPerToken(_Typed):
    quantiles: dict[str, float] = {}
    histogram: _Histogram | None = None


class _Layer(_Typed):
    name: str
    rel_error: float


class _Format(_Typed):
    quantized: bool = False
    activations: list[str] | None = None
    algo: str | None = "?"
    naming: str | None = "?"


class _ModelFacts(_Typed):
    params: int | None = None
    reference_bytes: int | None = None
    kv_bytes_per_token_bf16: int | None = None


class _Generation(_Typed):
    quantized: str = ""
    identical: bool = False


class EvalFile(_Typed):
    """The members of `launcher eval`'s JSON this page computes with, typed: an EVAL.json is a
    file anyone can hand over, and a wrong type is one line, not a traceback mid-page."""
    perplexity: float
    reference_perplexity: float
    kl_divergence: float
    top1_agreement: float
    tokens: int
    checkpoint: str | None = None
    checkpoint_bytes: int | None = None
    weights_bytes: int | None = None
    kl_per_token: _KLPerToken | None = None
    per_layer: list[_Layer] | None = None
    format: _Format | None = None
    model: _ModelFacts | None = None
    generations: list[_Generation] | None = None


def candidate(arg: str) -> dict:
    """EVAL.json[:NAME] (launcher report's argument) -> one candidate of the page."""
    path, name = arg, None
    if ":" in arg and not Path(arg).exists():
        path, name = arg.rsplit(":", 1)

    ev = parse(read_capped(Path(path), MAX_RESULT_BYTES, "evaluation file", follow_symlinks=True),
               "json", "evaluation file", path)
    try:
        EvalFile.model_validate(ev)   # (the dict itself goes on: the page reads it as written)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "file"
        raise ConfigError(f"evaluation file is not one `launcher eval` writes: {field}: {err['msg']}", where=path,
                          advice="pass JSON files written by `launcher eval --json`") from None
    name = name or Path(ev.get("checkpoint") or path).name
    return {"name": name, "eval_json": ev, "checkpoint_bytes": ev.get("checkpoint_bytes"),
            "params": (ev.get("model") or {}).get("params")}
