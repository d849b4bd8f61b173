"""Our NVFP4 algorithms (container_payload/steps/algorithms.py) against slow direct references.

The host venv has no torch: each test runs one case of this same file in the ModelOpt
interpreter ($SPARK_NVFP4_REF_PYTHON, default .venv-mo/bin/python), i.e.
`REF_PY tests/test_algorithms.py CASE`, forked from one process of that interpreter that
imported torch, transformers and ModelOpt once (tests/fork_server.py; 5-10 s a case otherwise).
A missing interpreter skips the tests, or fails them under CI. Every case is small (tiny
matrices, a tiny random Llama), seconds each.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ["e2m1_and_fp8", "scale_search_never_worse", "gptq_vs_float64_reference", "fast_gptq_vs_reference", "hessian_block_scales", "cpu_float32_linears",
         "gptq_beats_rtn", "activation_aware", "export_keeps_our_grid", "mixed_precision_export",
         "smoothing", "smoothing_families", "sequential_vs_direct_reference", "seq_mp_recipe_export", "seq_mp_fp8_export", "recipe_names_agree",
         "gptq_memory", "chunked_kl_equals_full_logits", "chunked_kl_memory"]


# ---------------------------------------------------------------- host side (pytest)

def _ref_python() -> str | None:
    py = os.environ.get("SPARK_NVFP4_REF_PYTHON", str(REPO / ".venv-mo" / "bin" / "python"))
    return py if Path(py).exists() else None


_SERVERS: dict = {}


def _run_case(case: str) -> None:
    import pytest

    py = _ref_python()
    if py is None:
        msg = "no ModelOpt interpreter (set SPARK_NVFP4_REF_PYTHON or create .venv-mo)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    if py not in _SERVERS:  # torch, transformers and ModelOpt imported once (tests/fork_server.py)
        from fork_server import ForkServer

        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
               "PYTHONPATH": str(REPO)}
        _SERVERS[py] = ForkServer(py, "import torch, transformers, modelopt.torch.quantization", env)
    rc, out, err, _, _ = _SERVERS[py].run("path", Path(__file__).resolve(), case, timeout=900)
    assert rc == 0, f"case {case} failed:\n{out[-4000:]}\n{err[-6000:]}"
    assert f"OK {case}" in out, out[-2000:]


def test_e2m1_and_fp8():
    _run_case("e2m1_and_fp8")


def test_scale_search_never_worse_than_max():
    _run_case("scale_search_never_worse")


def test_gptq_matches_float64_reference():
    _run_case("gptq_vs_float64_reference")


def test_fast_gptq_matches_the_column_by_column_reference():
    _run_case("fast_gptq_vs_reference")


def test_hessian_block_scales_lower_gptq_objective():
    _run_case("hessian_block_scales")


def test_cpu_float32_linears_match_bf16_and_undo_in_order():
    _run_case("cpu_float32_linears")


def test_gptq_beats_round_to_nearest():
    _run_case("gptq_beats_rtn")


def test_activation_aware_correction():
    _run_case("activation_aware")


def test_export_keeps_our_grid_and_shared_global_scales():
    _run_case("export_keeps_our_grid")


def test_mixed_precision_export_is_standard():
    _run_case("mixed_precision_export")


def test_smoothing_keeps_the_function_and_narrows_activation_blocks():
    _run_case("smoothing")


def test_smoothing_folds_by_what_each_family_computes():
    _run_case("smoothing_families")


def test_sequential_gptq_matches_a_direct_rerun_and_beats_one_pass():
    _run_case("sequential_vs_direct_reference")


def test_seq_mp_recipe_exports_the_standard_format():
    _run_case("seq_mp_recipe_export")


def test_fp8_units_export_mixed_precision_and_emulate():
    _run_case("seq_mp_fp8_export")


def test_launcher_and_payload_know_the_same_recipes():
    _run_case("recipe_names_agree")


def test_gptq_unit_holds_few_squares_and_the_same_bits():
    _run_case("gptq_memory")


def test_chunked_kl_equals_the_full_logits_kl_softcap_included():
    _run_case("chunked_kl_equals_full_logits")


def test_chunked_kl_holds_a_few_chunks_of_logits_not_the_vocabulary():
    _run_case("chunked_kl_memory")


# ---------------------------------------------------------------- torch side (subprocess)

def _spec_e2m1(v: float) -> float:
    """Spec section 2 step 4, literally."""
    a = abs(v)
    if a <= 0.25: r = 0.0
    elif a < 0.75: r = 0.5
    elif a <= 1.25: r = 1.0
    elif a < 1.75: r = 1.5
    elif a <= 2.5: r = 2.0
    elif a < 3.5: r = 3.0
    elif a <= 5: r = 4.0
    else: r = 6.0
    return -r if v < 0 else r


def case_e2m1_and_fp8():
    import torch
    from container_payload.numerics import nvfp4 as nf
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    pts = [0, 0.1, 0.25, 0.26, 0.5, 0.74, 0.75, 0.76, 1.0, 1.25, 1.26, 1.5, 1.75, 2.0, 2.5, 2.6,
           3.0, 3.49, 3.5, 4.0, 5.0, 5.01, 6.0, 7.5, 100.0]
    xs = torch.tensor(pts + [-p for p in pts], dtype=torch.float32)
    got = nf.e2m1_round(xs)
    want = torch.tensor([_spec_e2m1(v) for v in xs.tolist()])
    assert torch.equal(got, want), (got, want)
    # same codes as ModelOpt's own packing cast on random data
    y = torch.randn(4096) * 3
    codes = NVFP4QTensor._cast_fp4(y.clone())
    mags = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])
    assert torch.equal(mags[codes.long()], nf.e2m1_round(y))
    # the FP8 table: 126 positive finite values, strictly increasing, 2**-9 .. 448
    t = nf._fp8_table("cpu")
    assert len(t) == 126 and t[0] == 2 ** -9 and t[-1] == 448 and bool((t[1:] > t[:-1]).all())
    s = torch.rand(1000) * 500
    assert torch.equal(nf.fp8_e4m3(s), s.clamp(2 ** -9, 448).to(torch.float8_e4m3fn).float())


def _slow_block_error(w, s, ws2, cw):
    err = 0.0
    for j in range(16):
        q = _spec_e2m1(float(w[j]) / (float(s) * float(ws2))) * float(s) * float(ws2)
        err += float(cw[j]) * (float(w[j]) - q) ** 2
    return err


def case_scale_search_never_worse():
    import torch
    from container_payload.numerics import nvfp4 as nf

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 16, generator=g)
    w[::7, 3] *= 20          # outliers
    w[::11] *= 1e-3          # tiny blocks
    w[5] = 0                 # an all-zero block
    ws2 = (w.abs().max() / 2688).float()
    for cw in (None, torch.rand(16, generator=g) + 0.1):
        cwv = torch.ones(16) if cw is None else cw
        s_max = nf.max_block_scales(w, ws2)
        s_opt = nf.search_block_scales(w, ws2, cw)
        better = 0
        for r in range(len(w)):
            e_max = _slow_block_error(w[r], s_max[r], ws2, cwv)
            e_opt = _slow_block_error(w[r], s_opt[r], ws2, cwv)
            assert e_opt <= e_max * (1 + 1e-6) + 1e-30, (r, e_opt, e_max)
            better += e_opt < e_max * (1 - 1e-6)
            # the chosen scale is an exact FP8 value
            assert float(nf.fp8_e4m3(s_opt[r:r + 1])[0]) == float(s_opt[r])
        assert better > len(w) // 4, better  # the search does find better scales
        # and the total error drops clearly
        tot = lambda s: sum(_slow_block_error(w[r], s[r], ws2, cwv) for r in range(len(w)))
        assert tot(s_opt) < 0.95 * tot(s_max)
    # rows searched in chunks (SEARCH_ROWS) give exactly the all-at-once scales, with either weighting
    w = torch.randn(1000, 16) * torch.rand(1000, 1) * 3
    cw_rows = torch.rand(1000, 16)
    whole = [nf.search_block_scales(w, ws2, c) for c in (None, cw_rows)]
    nf.SEARCH_ROWS = 96
    try:
        chunked = [nf.search_block_scales(w, ws2, c) for c in (None, cw_rows)]
    finally:
        nf.SEARCH_ROWS = 1 << 18
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def _reference_gptq_f64(w, h, ws2, damp=0.01, search=True):
    """Direct GPTQ / OBQ in float64: quantize column j, spread its error with the current
    inverse Hessian, then eliminate j from the inverse (Schur complement). A 16-column
    block's FP8 scale is chosen when the first of its columns is reached, from the updated
    weights, weighting column k's squared error by 1/d_k^2 with d_k the diagonal of the
    sequential elimination over the block (what GPTQ's Cholesky factor holds)."""
    import torch
    from container_payload.numerics import nvfp4 as nf

    w = w.double().clone()
    h = h.double().clone()
    n = h.shape[0]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(n, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    q = torch.zeros_like(w)
    scales = torch.zeros(w.shape[0], n // 16, dtype=torch.float64)
    for j in range(n):
        if j % 16 == 0:
            # diagonal of the next 16 sequential eliminations
            hb = hinv[j:j + 16, j:j + 16].clone()
            d2 = []
            for k in range(16):
                d2.append(float(hb[k, k]))
                hb = hb - torch.outer(hb[:, k], hb[k, :]) / hb[k, k]
            cw = 1.0 / torch.tensor(d2, dtype=torch.float64)
            blk = w[:, j:j + 16]
            if search:
                # exhaustive over the same candidate FP8 values, first minimum wins
                cand = nf.block_scale_candidates(blk.abs().amax(-1).float(), ws2, 8, 1).double()
                best = []
                for r in range(w.shape[0]):
                    errs = [sum(float(cw[k]) * (float(blk[r, k]) - _spec_e2m1(
                        float(blk[r, k]) / (float(c) * float(ws2))) * float(c) * float(ws2)) ** 2
                        for k in range(16)) for c in cand[r]]
                    best.append(float(cand[r][errs.index(min(errs))]))
                s = torch.tensor(best, dtype=torch.float64)
            else:
                s = nf.max_block_scales(blk.float(), ws2).double()
            scales[:, j // 16] = s
        step = scales[:, j // 16] * float(ws2)
        qc = torch.tensor([_spec_e2m1(float(v)) for v in (w[:, j] / step)], dtype=torch.float64) * step
        q[:, j] = qc
        err = (w[:, j] - qc) / hinv[j, j]
        w[:, j + 1:] -= torch.outer(err, hinv[j, j + 1:])
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return q, scales


def _problem(seed=0, out=12, n=64, tokens=256):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    x[:, 5] *= 8  # an outlier channel
    x = x @ (torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64))
    w = torch.randn(out, n, generator=g, dtype=torch.float64) * 0.05
    h = x.T @ x / tokens
    ws2 = (w.abs().max().float() / 2688)
    return x, w, h, ws2


def case_gptq_vs_float64_reference():
    import torch
    from container_payload.steps import gptq as gq
    from container_payload.numerics import nvfp4 as nf

    for search in (False, True):
        for block in (16, 32, 128):
            x, w, h, ws2 = _problem(seed=block)
            qr, sr = _reference_gptq_f64(w, h, ws2, search=search)
            # ours in float64: the same algorithm, lazy batched updates and Cholesky form
            q64, s64 = gq.gptq_nvfp4(w.clone(), h.clone(), ws2, block_size=block, search=search)
            assert torch.equal(s64.double(), sr), (search, block)
            assert torch.allclose(q64, qr, rtol=0, atol=1e-12), (search, block, (q64 - qr).abs().max())
            # ours in float32 (the payload's precision): the same decisions almost everywhere
            q32, s32 = gq.gptq_nvfp4(w.float(), h.float(), ws2, block_size=block, search=search)
            same = (q32.double() - qr).abs() <= 1e-6 * qr.abs().clamp_min(1e-6)
            assert same.float().mean() > 0.97, same.float().mean()
            e_ref = float(((w - qr) @ h * (w - qr)).sum())
            e_32 = float(((w - q32.double()) @ h * (w - q32.double())).sum())
            assert e_32 <= 1.05 * e_ref, (e_32, e_ref)
            # every output value sits on the NVFP4 grid of its own block scales
            regrid = nf.quantize_blocks(q32.reshape(-1, 16), s32.reshape(-1, 1), ws2).reshape(q32.shape)
            assert torch.equal(regrid, q32)


def case_fast_gptq_vs_reference():
    """fast_gptq (lazy batched updates, the 16-column step in one go, fused units stacked) against
    gptq.gptq_nvfp4, the column-by-column implementation it replaces: identical in float64,
    the same decisions within float32 rounding in float32. The Triton kernel is checked the same
    way when Triton is importable (TRITON_INTERPRET=1 runs it on the CPU)."""
    import torch
    from container_payload.steps import gptq as gq
    from container_payload.numerics import nvfp4 as nf
    from container_payload.steps import fast_gptq as fg

    g = torch.Generator().manual_seed(1)
    y = torch.cat([torch.randn(20000, generator=g) * 4,
                   torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 0.0])])
    y = torch.cat([y, -y])
    for dt in (torch.float32, torch.float64):
        assert torch.equal(fg.e2m1_round_fast(y.to(dt)), nf.e2m1_round(y.to(dt))), dt
    paths = [("torch", False)]
    if fg.triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
        paths.append(("triton", True))
    for search in (False, True):
        for block in (16, 128):
            _, w, h, ws2 = _problem(seed=block + search, out=40, n=256, tokens=1024)
            qr, sr = gq.gptq_nvfp4(w.clone(), h.clone(), ws2, block_size=block, search=search)
            qf, sf = fg.gptq_nvfp4_fast(w.clone(), h.clone(), ws2, block_size=block, search=search,
                                        use_triton=False)
            assert torch.equal(sf.double(), sr.double()), (search, block)
            assert torch.allclose(qf, qr, rtol=0, atol=1e-12), (search, block, (qf - qr).abs().max())
            w32, h32 = w.float(), h.float()
            qr, sr = gq.gptq_nvfp4(w32.clone(), h32.clone(), ws2, block_size=block, search=search)
            err = lambda q: float(((w - q.double()) @ h * (w - q.double())).sum())
            for name, tri in paths:
                qf, sf = fg.gptq_nvfp4_fast(w32.clone(), h32.clone(), ws2, block_size=block,
                                            search=search, use_triton=tri)
                same_s = (sf == sr).float().mean().item()
                same_q = torch.isclose(qf, qr, rtol=1e-5, atol=0).float().mean().item()
                assert same_s > 0.99 and same_q > 0.99, (name, search, block, same_s, same_q)
                assert err(qf) <= 1.01 * err(qr), (name, err(qf), err(qr))
                regrid = nf.quantize_blocks(qf.reshape(-1, 16), sf.reshape(-1, 1), ws2).reshape(qf.shape)
                assert torch.equal(regrid, qf), name
                print(name, "search" if search else "max", block, "scales", same_s, "values", same_q)
    # a fused unit in one call: the rows of q, k and v stacked give each member's own result
    _, w, h, ws2 = _problem(seed=5, out=48, n=128, tokens=512)
    parts = [w[:16], w[16:24], w[24:]]
    stacked, s_st = fg.gptq_nvfp4_fast(w.clone(), h.clone(), ws2, use_triton=False)
    r0 = 0
    for p in parts:
        qp, sp = gq.gptq_nvfp4(p.clone(), h.clone(), ws2)
        assert torch.allclose(stacked[r0:r0 + len(p)], qp, rtol=0, atol=1e-12)
        assert torch.equal(s_st[r0:r0 + len(p)].double(), sp.double())
        r0 += len(p)
    print("paths", [p for p, _ in paths])


def case_cpu_float32_linears():
    """linear_compute: a bf16 Linear computed in float32 on the CPU equals torch's bf16 product up
    to one bf16 rounding of the output; float32_linears and patch_forward put every forward back."""
    import torch
    from torch import nn
    from container_payload.numerics import linear_compute as lc

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g).bfloat16()
    lin = nn.Linear(256, 96).bfloat16()
    ref = lin(x).float()
    with lc.float32_linears(lin):
        assert "forward" in lin.__dict__
        got = lin(x).float()
        exact = nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert "forward" not in lin.__dict__
    # both round the same float32 sums to bf16: at most one bf16 step apart (2**-7 relative)
    assert torch.equal(got, exact.bfloat16().float())
    assert ((got - ref).abs() <= 2 ** -7 * ref.abs() + 1e-6).all(), (got - ref).abs().max()
    undo1 = lc.patch_forward(lin, lambda x: "first")
    undo2 = lc.patch_forward(lin, lambda x: "second")
    assert lin(x) == "second"
    undo2()
    assert lin(x) == "first"
    undo1()
    assert torch.equal(lin(x).float(), ref)


def case_gptq_beats_rtn():
    from container_payload.steps import gptq as gq
    from container_payload.numerics import nvfp4 as nf

    x, w, h, ws2 = _problem(seed=3, out=64, n=128, tokens=1024)
    w, h = w.float(), h.float()
    rtn = nf.quantize_blocks(w.reshape(-1, 16), nf.max_block_scales(w.reshape(-1, 16), ws2)[:, None],
                             ws2).reshape(w.shape)
    err = lambda q: float(((w - q) @ h * (w - q)).sum())
    q_max, _ = gq.gptq_nvfp4(w, h, ws2, search=False)
    q_search, _ = gq.gptq_nvfp4(w, h, ws2, search=True)
    assert err(q_max) < 0.8 * err(rtn), (err(q_max), err(rtn))
    assert err(q_search) < err(q_max), (err(q_search), err(q_max))


def case_activation_aware():
    """The corrected weight is the ridge least-squares solution (checked against a direct
    float64 normal-equation solve), and GPTQ on it gives a smaller full W4A4 output error
    ||X W^T - X_q Q^T|| than GPTQ on W with either Hessian."""
    import torch
    from container_payload.steps import gptq as gq
    from container_payload.numerics.emulate import fake_quant_nvfp4

    x, w, _, ws2 = _problem(seed=7, out=48, n=128, tokens=2048)
    x, w = x.float(), w.float()
    xq = fake_quant_nvfp4(x, x.abs().max() / 2688)
    n = len(x)
    h_qq, c_xq, h_xx = xq.T @ xq / n, x.T @ xq / n, x.T @ x / n
    v = gq.activation_corrected_weight(w, gq.Squares(h_qq, c_xq), damp=0.01)
    # direct: minimize ||X W^T - Xq V^T||^2/n + lam ||V - W||^2
    X, Xq, W = x.double(), xq.double(), w.double()
    lam = 0.01 * torch.diag(Xq.T @ Xq / n).mean()
    A = Xq.T @ Xq / n + lam * torch.eye(128, dtype=torch.float64)
    V = torch.linalg.solve(A, (Xq.T @ X / n) @ W.T + lam * W.T).T
    assert torch.allclose(v.double(), V, rtol=1e-4, atol=2e-5), (v.double() - V).abs().max()
    full = lambda q: float(((x @ w.T - xq @ q.T) ** 2).sum())
    g = (v.abs().max() / 2688).float()
    q_aa, _ = gq.gptq_nvfp4(v, h_qq, g)
    q_x, _ = gq.gptq_nvfp4(w, h_xx, ws2)
    q_q, _ = gq.gptq_nvfp4(w, h_qq, ws2)
    assert full(q_aa) < 0.9 * min(full(q_x), full(q_q)), (full(q_aa), full(q_x), full(q_q))


def _tiny_llama(tmp):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 256, (8, 32))
    batches = [ids[i:i + 2] for i in range(0, 8, 2)]

    def forward_loop(m):
        with torch.inference_mode():
            for b in batches:
                m.get_decoder()(input_ids=b, use_cache=False)
    return model, forward_loop, batches


def case_chunked_kl_equals_full_logits():
    """bf16_ranking.mean_kls (the ranking's KL, vocabulary in chunks, from the head's inputs that
    head_input records) equals the KL of the model's full logits, as kl_to computed it before, on a
    tiny Llama and a tiny Gemma 2 whose final_logit_softcapping changes the logits (vocabulary 1000
    in chunks of 128: 8 chunks, the last one partial); and a perturbed model's KL is not zero."""
    import copy
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM
    from container_payload.numerics.linear_compute import float32_linears
    from container_payload.steps import bf16_ranking as rk

    shape = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    configs = {"llama": (LlamaForCausalLM, LlamaConfig(**shape, tie_word_embeddings=False)),
               "gemma2": (Gemma2ForCausalLM, Gemma2Config(**shape, head_dim=16, final_logit_softcapping=0.5))}
    for name, (cls, cfg) in configs.items():
        torch.manual_seed(0)
        model = cls(cfg).to(torch.bfloat16).eval()
        with torch.no_grad():  # larger head rows: logits of a few units, where a softcap of 0.5 bites
            model.get_output_embeddings().weight.mul_(20)
        other = copy.deepcopy(model)
        with torch.no_grad():
            for p in other.model.layers.parameters():
                p.add_(0.02 * torch.randn_like(p))
        batches = [torch.randint(0, 1000, (2, 24)) for _ in range(2)]
        with torch.no_grad(), float32_linears(model), float32_linears(other):
            full = {m: [torch.log_softmax(x(input_ids=ids, use_cache=False).logits.float(), -1) for ids in batches]
                    for m, x in (("ref", model), ("other", other))}
            want = sum((lp.exp() * (lp - lq)).sum().item() for lp, lq in zip(full["ref"], full["other"])) / (2 * 2 * 24)
            ref = [rk.head_input(model, lambda: model(input_ids=ids, use_cache=False)) for ids in batches]
            got_other = [rk.head_input(other, lambda: other(input_ids=ids, use_cache=False)) for ids in batches]
            head, post = model.get_output_embeddings(), rk.logits_post(model)
            got, same = rk.mean_kls(head, post, ref, [got_other, ref], "cpu", chunk=128)
            unposted = rk.mean_kls(head, lambda z: z, ref, [got_other], "cpu", chunk=128)[0]
        assert want > 1e-4 and abs(got - want) <= 1e-5 * want, (name, got, want)
        assert same == 0.0, (name, same)
        if name == "gemma2":  # the softcap is applied, and matters here
            assert abs(unposted - want) > 0.1 * want, (unposted, want)


def case_chunked_kl_memory():
    """The ranking's KL holds a few chunks of float32 logits at a time (tests/live_bytes.LiveBytes:
    what torch.cuda.max_memory_allocated would say), not the vocabulary's: for N tokens, vocabulary
    V and chunk c, the peak is under 6 x N x c x 4 bytes plus the head chunk in float32 (c x H x 4)
    and one batch's hidden states in float32 (the CPU's float32 products), far under one full
    logits tensor (N x V x 4)."""
    import sys
    import torch
    from torch import nn
    from container_payload.steps import bf16_ranking as rk

    sys.path.insert(0, str(REPO / "tests"))
    from live_bytes import LiveBytes

    torch.manual_seed(0)
    V, H, c = 16384, 64, 128
    head = nn.Linear(H, V, bias=False).to(torch.bfloat16)
    batches = [2, 2]
    ref = [torch.randn(b, 32, H, dtype=torch.bfloat16) for b in batches]
    streams = [[h + 0.1 * torch.randn_like(h) for h in ref] for _ in range(6)]
    N = sum(h.shape[0] * h.shape[1] for h in ref)
    with LiveBytes() as m:
        kls = rk.mean_kls(head, lambda z: z, ref, streams, "cpu", chunk=c)
    bound = 6 * N * c * 4 + c * H * 4 + max(h.numel() for h in ref) * 4
    assert all(k > 0 for k in kls), kls
    assert m.peak < bound, (m.peak, bound)
    assert m.peak < N * V * 4 / 10, (m.peak, N * V * 4)


def _read(out):
    import json
    from safetensors.torch import load_file
    t = load_file(str(Path(out) / "model.safetensors"))
    return t, json.loads((Path(out) / "hf_quant_config.json").read_text())


def case_export_keeps_our_grid():
    import copy
    import tempfile
    import torch
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from container_payload.steps import algorithms as al
    from container_payload.numerics import nvfp4 as nf
    from container_payload.numerics.emulate import dequantize_nvfp4

    model, fl, _ = _tiny_llama(None)
    model = mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), fl)
    linears, originals, _ = al.quantize_weights(model, fl, gptq=True, search=True)
    ongrid = {n: m.weight.detach().float().clone() for n, m in linears.items()}
    want_scales = {n: m.weight_quantizer.amax.float().reshape(m.weight.shape[0], -1) for n, m in linears.items()}
    gamax = {n: m.weight_quantizer.global_amax.float() for n, m in linears.items()}
    with tempfile.TemporaryDirectory() as out:
        with torch.inference_mode():
            export_hf_checkpoint(model, export_dir=out)
        t, qc = _read(out)
    assert qc["quantization"]["quant_algo"] == "NVFP4", qc
    # nothing but the (tied) embedding / lm_head left out, as in the default recipe
    assert set(qc["quantization"]["exclude_modules"]) <= {"lm_head", "model.embed_tokens"}, qc
    kinds = {k.rsplit(".", 1)[1] for k in t if ".layers." in k and "proj" in k}
    assert kinds == {"weight", "weight_scale", "weight_scale_2", "input_scale"}, kinds
    for n in linears:
        ws2 = t[n + ".weight_scale_2"].float()
        assert ws2.dim() == 0 and torch.equal(ws2, gamax[n] / 2688), n
        bs = t[n + ".weight_scale"]
        assert bs.dtype == torch.float8_e4m3fn
        # the block scales we stored, exactly (export: fp8(amax_b * 448 / global_amax))
        assert torch.equal(bs.float(), nf.fp8_e4m3(want_scales[n] * 448 / gamax[n])), n
        deq = dequantize_nvfp4(t[n + ".weight"], bs, ws2)
        # the exported codes dequantize to exactly the grid values GPTQ picked (up to the bf16
        # rounding of the weights held by the model, which never changes a code)
        assert torch.allclose(deq, ongrid[n], rtol=2 ** -8, atol=0), (n, (deq - ongrid[n]).abs().max())
        assert originals[n].shape == ongrid[n].shape
    for i in range(2):
        p = f"model.layers.{i}."
        for group in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]):
            for key in ("weight_scale_2", "input_scale"):
                vals = {float(t[p + g + "." + key]) for g in group}
                assert len(vals) == 1, (p, group, key, vals)


def case_mixed_precision_export():
    import copy
    import tempfile
    import torch
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from container_payload.steps import algorithms as al, bf16_ranking as rk

    model, fl, batches = _tiny_llama(None)
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), fl)
    linears, originals, kept_ids = al.quantize_weights(model, fl, gptq=True, keep_batches=2)
    assert len(kept_ids) == 2 and torch.equal(kept_ids[0], batches[0])
    # budget for one MLP gate/up unit (2 x 128 x 64) but not two
    unit_extra = 2 * (128 * 64 * 2 - rk._nvfp4_bytes(128 * 64))
    frac = 1.5 * unit_extra / rk.model_bytes_default(model, linears)
    chosen = rk.keep_sensitive_in_bf16(model, linears, originals, kept_ids, frac)
    assert chosen and {f for _, f in chosen} == {"bf16"}, chosen  # no FP8 unless asked (keep_bf16.fp8)
    kept = [u for u, _ in chosen]
    spent = sum(originals[n].numel() * 2 - rk._nvfp4_bytes(originals[n].numel()) for u in kept for n in u)
    assert spent <= frac * rk.model_bytes_default(model, linears)
    kept_names = {n for u in kept for n in u}
    for u in kept:  # whole fused groups only
        leaves = sorted(n.rsplit(".", 1)[1] for n in u)
        assert leaves in (["k_proj", "q_proj", "v_proj"], ["gate_proj", "up_proj"], ["o_proj"], ["down_proj"]), u
    with tempfile.TemporaryDirectory() as out:
        with torch.inference_mode():
            export_hf_checkpoint(model, export_dir=out)
        t, qc = _read(out)
    excl = set(qc["quantization"]["exclude_modules"])
    for n in kept_names:
        assert n in excl or any(n.startswith(e.rstrip("*")) for e in excl), (n, excl)
        assert t[n + ".weight"].dtype == torch.bfloat16 and n + ".weight_scale" not in t
        assert torch.equal(t[n + ".weight"], orig[n + ".weight"]), n
    for n in linears:
        if n not in kept_names:
            assert t[n + ".weight"].dtype == torch.uint8 and n + ".weight_scale" in t, n


def case_smoothing():
    """Folding is exact (float32 logits unchanged), the scales follow SmoothQuant's rule computed
    here in float64 from the layer's own inputs, activation blocks quantize with less error, and
    an architecture with another norm is left alone."""
    import copy

    import torch
    from container_payload.steps import smoothing
    from container_payload.numerics.emulate import fake_quant_nvfp4

    model, forward_loop, batches = _tiny_llama(None)
    model = model.float()
    with torch.no_grad():  # outlier channels, as real residual streams have
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 30
            layer.post_attention_layernorm.weight[[5, 40]] *= 30
            layer.mlp.up_proj.weight[[7, 90]] *= 20
    before = copy.deepcopy(model)
    ids = torch.cat(batches)
    with torch.no_grad():
        ref = before(ids).logits
        # layer 0's q/k/v input and gate/up input, in float64, from the unsmoothed model
        cap = {}
        l0 = before.model.layers[0]
        h1 = l0.input_layernorm.register_forward_hook(lambda m, a, o: cap.__setitem__("qkv", o.double()))
        h2 = l0.post_attention_layernorm.register_forward_hook(lambda m, a, o: cap.__setitem__("mlp", o.double()))
        before.get_decoder()(input_ids=ids, use_cache=False)
        h1.remove(), h2.remove()

    alpha = 0.65
    assert smoothing.smooth(model, forward_loop, alpha).groups == 3 * len(model.model.layers)
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()), (got - ref).abs().max()

    b0, m0 = before.model.layers[0], model.model.layers[0]
    w = torch.cat([b0.self_attn.q_proj.weight, b0.self_attn.k_proj.weight, b0.self_attn.v_proj.weight]).double()
    x_max = cap["qkv"].reshape(-1, 64).abs().amax(0)
    s_ref = (x_max.pow(alpha) / w.abs().amax(0).pow(1 - alpha)).clamp(*smoothing.SCALE_RANGE)
    assert torch.allclose(m0.input_layernorm.weight.double(), b0.input_layernorm.weight.double() / s_ref, rtol=1e-5)
    assert torch.allclose(m0.self_attn.q_proj.weight.double(), b0.self_attn.q_proj.weight.double() * s_ref, rtol=1e-5)

    def a4_error(x, w):  # relative error of the gate projection when only its input is NVFP4
        x, w = x.float(), w.float()
        y = x @ w.T
        yq = fake_quant_nvfp4(x, x.abs().amax() / (6 * 448)) @ w.T
        return ((yq - y).pow(2).sum() / y.pow(2).sum()).item()

    with torch.no_grad():
        after = {}
        h = m0.post_attention_layernorm.register_forward_hook(lambda m, a, o: after.__setitem__("mlp", o))
        model.get_decoder()(input_ids=ids, use_cache=False)
        h.remove()
    # the gate/up input quantizes better once its outlier channels moved into the weights
    e_after = a4_error(after["mlp"], m0.mlp.gate_proj.weight)
    e_before = a4_error(cap["mlp"], b0.mlp.gate_proj.weight)
    assert e_after < 0.5 * e_before, (e_after, e_before)

    # a norm whose weight does not just scale its output (a LayerNorm: mean and bias) is left alone,
    # and the other groups of the layer are still smoothed
    other, loop2, _ = _tiny_llama(None)
    for layer in other.model.layers:
        layer.input_layernorm = torch.nn.LayerNorm(64).to(torch.bfloat16)
    untouched = copy.deepcopy(other.state_dict())
    done = smoothing.smooth(other, loop2, alpha)
    assert done.groups == 2 * len(other.model.layers) and "q/k/v input" not in done.parts, done.line()
    assert "q/k/v input (LayerNorm does not scale" in done.line(), done.line()
    changed = {k for k, v in untouched.items() if not torch.equal(v, other.state_dict()[k])}
    assert not any(".self_attn." in k or "input_layernorm" in k for k in changed), changed


def case_smoothing_families():
    """On tiny random models of each family (tests/tools/tiny_moe.py), smoothing keeps the bf16
    logits (relative error of the bf16 rounding only), folds a scale into Gemma's (1 + weight)
    norms as (1 + w) / s - 1, takes Gemma 2/3's pre_feedforward_layernorm (not the
    post_attention_layernorm) for gate/up, and on Qwen3-MoE smooths q/k/v only. The same models
    with every norm folded as Llama's (w / s) must fail the first check: that is the mistake
    this guards against."""
    import copy

    import torch
    sys.path.insert(0, str(REPO / "tests" / "tools"))
    from tiny_moe import random_model

    from container_payload.steps import smoothing

    ids = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(1))

    def smoothed(kind, fold=None):
        model = random_model(kind)
        before = copy.deepcopy(model)
        real = smoothing.norm_fold
        if fold is not None:
            smoothing.norm_fold = lambda m: fold if real(m) else None
        try:
            done = smoothing.smooth(model, lambda m: m(input_ids=ids), 0.5)
        finally:
            smoothing.norm_fold = real
        with torch.no_grad():
            a, b = before(input_ids=ids).logits.float(), model(input_ids=ids).logits.float()
        return before, model, done, ((a - b).norm() / a.norm()).item()

    for kind in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "qwen3_moe"):
        before, model, done, err = smoothed(kind)
        moe = kind == "qwen3_moe"
        assert done.groups == (1 if moe else 3) * 2, (kind, done.line())
        # bf16: each weight rounded once more (and in the MoE a few tokens change experts)
        assert err < 0.05, (kind, err)
        l0, b0 = model.model.layers[0], before.model.layers[0]
        gemma = kind.startswith("gemma")
        assert smoothing.norm_fold(l0.input_layernorm) == ("one_plus_weight" if gemma else "weight"), kind
        assert ("(1 + weight)" in done.line()) == gemma, done.line()
        if kind in ("gemma2", "gemma3_text"):
            assert torch.equal(l0.post_attention_layernorm.weight, b0.post_attention_layernorm.weight)
            assert not torch.equal(l0.pre_feedforward_layernorm.weight, b0.pre_feedforward_layernorm.weight)
        if moe:
            assert set(done.parts) == {"q/k/v input"} and "Qwen3MoeSparseMoeBlock has no gate_proj/up_proj" \
                in done.line(), done.line()
        if gemma:
            _, _, _, wrong = smoothed(kind, fold="weight")   # the Llama formula on Gemma's norms
            assert wrong > 0.15 and wrong > 5 * err, (kind, wrong, err)
    print("families ok")


def case_sequential_vs_direct_reference():
    """sequential_gptq keeps two streams of hidden states and runs one layer at a time. The
    reference runs the whole model again before every unit: once with the original weights
    (X), once with the units quantized so far, their inputs NVFP4-rounded (X~); then
    H = Xq^T Xq, C = X^T Xq in float64. The reference feeds the model the pieces the pass feeds
    each layer (CHUNK_TOKENS: one sequence a call), in the same order: the same shapes, so the
    same kernels and the same X (asserted). Same codes and scales, nearly everywhere; a unit
    kept in bf16 (quantizers off) is left alone; and on the calibration text the model's W4A4
    output is closer to the original's than with one-pass activation-aware GPTQ."""
    import copy

    import torch
    import modelopt.torch.quantization as mtq
    from container_payload.steps import algorithms as al, bf16_ranking as rk, quantizers as qz
    from container_payload.numerics.emulate import fake_quant_nvfp4
    from container_payload.steps import sequential
    from container_payload.steps.sequential import sequential_gptq

    model, fl, batches = _tiny_llama(None)
    model = mtq.quantize(model.float(), copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), fl)
    base = copy.deepcopy(model)
    keep = "model.layers.0.self_attn.o_proj"  # as if mixed precision kept it in bf16
    for m in (model, base):
        lin = dict(m.named_modules())[keep]
        lin.weight_quantizer.disable(), lin.input_quantizer.disable()
    ref, one_pass = copy.deepcopy(base), copy.deepcopy(base)
    kept_w = dict(model.named_modules())[keep].weight.detach().clone()

    sequential.CHUNK_TOKENS = 32  # one sequence a layer call: the pieces must add up to the batches
    fed = {"pass": [], "reference": []}  # the hidden-state shapes each decoder layer was handed

    def record(m, key):
        return [layer.register_forward_pre_hook(lambda mod, a, k, key=key: fed[key].append(tuple(
            (a[0] if a else k["hidden_states"]).shape)), with_kwargs=True) for layer in m.get_decoder().layers]

    hooks = record(model, "pass")
    linears, originals, _ = sequential_gptq(model, fl)
    for h in hooks:
        h.remove()
    assert keep not in linears and keep not in originals
    assert torch.equal(dict(model.named_modules())[keep].weight, kept_w)

    # the direct reference
    rl = qz.quantized_linears(ref)
    assert set(rl) == set(linears)
    orig = {n: m.weight.detach().clone() for n, m in rl.items()}

    # the batches cut as the pass cuts them (sequential.chunked: whole sequences, in order)
    rows = max(1, sequential.CHUNK_TOKENS // batches[0].shape[1])
    pieces = [b[i:i + rows] for b in batches for i in range(0, len(b), rows)]

    def capture(mod, emulated):
        xs = []
        h = mod.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
        emu = rk.Emulation(rl, emulated)
        try:
            with torch.inference_mode():
                for p in pieces:
                    ref.get_decoder()(input_ids=p, use_cache=False)
        finally:
            h.remove(), emu.remove()
        return torch.cat(xs)

    hooks = record(ref, "reference")

    done = []
    with qz.QuantizersOff(ref):
        for unit in qz.fused_units(rl):
            now = {n: m.weight.detach().clone() for n, m in rl.items()}
            for n, m in rl.items():
                m.weight.data.copy_(orig[n])
            x = capture(rl[unit[0]], [])
            for n, m in rl.items():
                m.weight.data.copy_(now[n])
            xt = capture(rl[unit[0]], done)
            scale = qz.unit_input_scale([rl[n] for n in unit])
            xq = fake_quant_nvfp4(xt.float(), scale).double()
            h, c = (xq.T @ xq / len(xq)).float(), (x.T @ xq / len(xq)).float()
            al.quantize_unit(unit, rl, {n: h for n in unit}, {n: c for n in unit}, {}, ridge=sequential.RIDGE)
            done.append(unit)
    for h in hooks:
        h.remove()
    # both handed every layer the same shapes (so the same kernels, whatever the CPU's bf16/AMX
    # paths): the pass its chunks, the reference its pieces, each once per unit and stream
    assert set(fed["pass"]) == set(fed["reference"]) == {(rows, batches[0].shape[1], 64)}, fed
    for n in linears:
        a, b = linears[n].weight.detach(), rl[n].weight.detach()
        # The one arithmetic that still differs: H and C in float32 summed chunk by chunk (the
        # pass) against float64 over all rows (the reference). Equal up to float32 ulps (the
        # global scale is a max over float32 sums), so the same code; where H's last bits decide
        # a code, GPTQ feeds the flip's error along its row. Measured on AVX-512 bf16 (no AMX):
        # every weight and block scale within rtol 1e-5 (docs/decisions.md).
        same = torch.isclose(a, b, rtol=1e-5, atol=0).float().mean().item()
        assert same > 0.99, (n, same)
        sa, sb = linears[n].weight_quantizer.amax, rl[n].weight_quantizer.amax
        assert torch.isclose(sa, sb, rtol=1e-5, atol=0).float().mean().item() > 0.98, n

    # the objective it is for: the W4A4 model's final hidden states on the calibration text
    al.quantize_weights(one_pass, fl, gptq=True, search=True, act_aware=True)

    def final_states(m, emulate):
        lin = qz.quantized_linears(m)
        out = []
        with qz.QuantizersOff(m), torch.no_grad():
            emu = rk.Emulation(lin, qz.fused_units(lin)) if emulate else None
            try:
                out = [m.get_decoder()(input_ids=b, use_cache=False).last_hidden_state for b in batches]
            finally:
                if emu:
                    emu.remove()
        return torch.cat(out)

    bf = copy.deepcopy(base)
    y0 = final_states(bf, False)
    err = lambda m: ((final_states(m, True) - y0).pow(2).sum() / y0.pow(2).sum()).item()
    e_seq, e_one = err(model), err(one_pass)
    assert e_seq < 0.95 * e_one, (e_seq, e_one)
    print("sequential", e_seq, "one pass", e_one)


def case_seq_mp_recipe_export():
    """The whole smooth-gptq-seq-mp refine step (bf16 units chosen first, then sequential GPTQ)
    on a tiny Llama, exported by ModelOpt: kept units are bf16 with their original weights and
    listed as excluded, every other Linear is NVFP4 with our static scales, fused groups share
    their global and input scales, and nothing kept was touched by the sequential pass."""
    import copy
    import tempfile
    import torch
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from container_payload.steps import bf16_ranking as rk, quantizers as qz

    from container_payload.steps import recipe_build, steps
    from container_payload.core import recipes

    model, fl, _ = _tiny_llama(None)
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    unit_extra = 2 * (128 * 64 * 2 - rk._nvfp4_bytes(128 * 64))  # one gate/up unit
    probe = mtq.quantize(copy.deepcopy(model), copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), fl)
    frac = 1.5 * unit_extra / rk.model_bytes_default(probe, qz.quantized_linears(probe))
    # the registry's recipe, its budget set as a recipe parameter (what --recipe-param does), bf16
    # units only (FP8 ones: case_seq_mp_fp8_export), and without its smoothing step, so that a
    # unit kept in bf16 must equal the original bit for bit
    assert recipes.RECIPES["smooth-gptq-seq-mp"].steps[2].fp8  # the recipe's default since the GPU table
    built = recipe_build.build("nvfp4", "smooth-gptq-seq-mp", "none", "cpu",
                               {"keep_bf16.budget": frac, "keep_bf16.fp8": False})
    assert [type(x) for x in built.steps] == [recipes.Smooth, recipes.Calibrate, recipes.KeepBf16, recipes.Gptq]
    assert built.steps[2].budget == frac and not built.steps[2].fp8
    built.steps = built.steps[1:]
    applied = []
    model = steps.run(model, built, fl, applied)
    # what each step did on this model, for the model card
    assert applied[0] == "calibrate: ModelOpt NVFP4_DEFAULT_CFG", applied
    assert applied[1].startswith("keep_bf16: ") and applied[1].endswith("fused units kept in bf16"), applied
    assert applied[2].startswith("gptq: ") and applied[2].endswith("quantized Linears"), applied
    linears = qz.quantized_linears(model)
    with tempfile.TemporaryDirectory() as out:
        with torch.inference_mode():
            export_hf_checkpoint(model, export_dir=out)
        t, qc = _read(out)
    assert qc["quantization"]["quant_algo"] == "NVFP4", qc
    excl = set(qc["quantization"]["exclude_modules"])
    kept = [n for n, m in model.named_modules() if hasattr(m, "weight_quantizer") and n + ".weight" in t
            and "proj" in n and n not in linears]
    assert kept, "nothing kept in bf16 within the budget"
    for n in kept:
        assert n in excl or any(n.startswith(e.rstrip("*")) for e in excl), (n, excl)
        assert t[n + ".weight"].dtype == torch.bfloat16 and torch.equal(t[n + ".weight"], orig[n + ".weight"]), n
    for n in linears:
        assert t[n + ".weight"].dtype == torch.uint8 and n + ".weight_scale" in t, n
        ws2 = t[n + ".weight_scale_2"].float()
        assert torch.equal(ws2, linears[n].weight_quantizer.global_amax.float() / 2688), n
    for i in range(2):
        p = f"model.layers.{i}."
        for group in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]):
            names = [p + g for g in group]
            if all(n in linears for n in names):
                for key in ("weight_scale_2", "input_scale"):
                    assert len({float(t[n + "." + key]) for n in names}) == 1, (p, group, key)


def case_seq_mp_fp8_export():
    """keep_bf16.fp8: within a budget too small for any gate/up unit in bf16, the ranking keeps
    units FP8; ModelOpt exports a MIXED_PRECISION checkpoint whose FP8 layers hold exactly the
    weights the ranking emulated (bf16_ranking.fp8_weights: one scale per fused unit), the
    sequential GPTQ leaves them alone, and the payload's emulation loads the checkpoint. The
    budget holds in bytes; and fp8 after a weight step is refused."""
    import copy
    import tempfile
    import torch
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from container_payload.steps import bf16_ranking as rk, quantizers as qz
    from container_payload.core import recipes
    from container_payload.steps import recipe_build, steps
    from container_payload.numerics.emulated_model import load_emulated

    try:
        recipes.with_params("gptq-mp", {"keep_bf16.fp8": True})
        raise AssertionError("keep_bf16.fp8 after gptq accepted")
    except ValueError as e:
        assert "keep_bf16.fp8" in str(e)
    model, fl, _ = _tiny_llama(None)
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    gate_up_fp8 = 2 * (rk._fp8_bytes(128 * 64) - rk._nvfp4_bytes(128 * 64))
    probe = mtq.quantize(copy.deepcopy(model), copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), fl)
    default = rk.model_bytes_default(probe, qz.quantized_linears(probe))
    frac = 2.5 * gate_up_fp8 / default
    # the recipe's default (keep_bf16.fp8 on)
    built = recipe_build.build("nvfp4", "smooth-gptq-seq-mp", "none", "cpu", {"keep_bf16.budget": frac})
    built.steps = built.steps[1:]
    applied = []
    model = steps.run(model, built, fl, applied)
    assert "in FP8" in applied[1], applied
    linears = qz.quantized_linears(model)
    fp8 = [n for n, m in model.named_modules() if hasattr(m, "weight_quantizer")
           and qz.is_fp8_per_tensor(m.weight_quantizer) and m.weight_quantizer.is_enabled]
    assert fp8 and not set(fp8) & set(linears), fp8
    with tempfile.TemporaryDirectory() as out:
        with torch.inference_mode():
            export_hf_checkpoint(model, export_dir=out)
        t, qc = _read(out)
        q = qc["quantization"]
        assert q["quant_algo"] == "MIXED_PRECISION", q
        layers = q["quantized_layers"]
        extra = 0.0
        for n in fp8:
            assert layers[n]["quant_algo"] == "FP8", (n, layers.get(n))
            assert t[n + ".weight"].dtype == torch.float8_e4m3fn, n
        for unit in qz.fused_units(fp8):
            want = rk.fp8_weights(unit, {n: orig[n + ".weight"] for n in unit})
            for n in unit:  # what export stores is what the ranking measured
                got = t[n + ".weight"].float() * t[n + ".weight_scale"].float()
                # (fp8_weights is in the model's bf16; export divides in bf16, so a value at a
                # rounding tie may land one FP8 step away)
                w = want[n].float()
                assert bool(((got - w).abs() <= w.abs() / 8 + 1e-12).all()), n
                assert (got.to(want[n].dtype).float() == w).float().mean().item() > 0.9, n
            extra += rk.unit_extra_bytes(unit, {n: orig[n + ".weight"] for n in unit}, "fp8")
        assert extra <= frac * default
        for n in linears:
            assert layers[n]["quant_algo"] == "NVFP4" and t[n + ".weight"].dtype == torch.uint8, n
        emulated, info = load_emulated(out)
        assert info["algo"] == "MIXED_PRECISION" and "fp8" in info["activations"], info


def case_recipe_names_agree():
    # The registry (recipes.py, what the launcher lists) and the implementations agree: every
    # recipe of ours has its steps, and every ModelOpt preset named exists in this ModelOpt.
    import modelopt.torch.quantization as mtq

    from container_payload.core import recipes
    from container_payload.steps import steps

    for r in recipes.RECIPES.values():
        assert r.preset in recipes.MOE_LAYOUTS or hasattr(mtq, r.preset), r.preset
        assert sum(isinstance(x, recipes.Calibrate) for x in r.steps) == 1, r.name
        for x in r.steps:  # every step has its whole-model runner (steps.RUNNERS, by key)
            assert x.key in steps.RUNNERS, (r.name, x)
    for preset in recipes.FORMAT_PRESETS.values():
        assert hasattr(mtq, preset), preset


def case_hessian_block_scales():
    """gptq.scales=hessian: each block's scale scored by the block's own GPTQ pass. Per block it
    never adds more to GPTQ's objective than max scaling (candidate 0), and over whole layers
    it ends below the plain search's output error ||X (W - Q)^T||^2 on these problems; its
    outputs stay on the grid of their own scales. The Triton kernel gives the same decisions
    where Triton runs (TRITON_INTERPRET=1)."""
    import torch
    from container_payload.numerics import nvfp4 as nf
    from container_payload.steps import fast_gptq as fg

    wins = 0
    for seed in range(6):
        _, w, h, ws2 = _problem(seed=seed, out=64, n=256, tokens=1024)
        w32, h32 = w.float(), h.float()
        err = lambda q: float(((w - q.double()) @ h * (w - q.double())).sum())
        qs, _ = fg.gptq_nvfp4_fast(w32.clone(), h32.clone(), ws2, use_triton=False)
        qh, sh = fg.gptq_nvfp4_fast(w32.clone(), h32.clone(), ws2, use_triton=False, hessian_scales=True)
        regrid = nf.quantize_blocks(qh.reshape(-1, 16), sh.reshape(-1, 1), ws2).reshape(qh.shape)
        assert torch.equal(regrid, qh)
        wins += err(qh) < err(qs)
        if fg.triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
            qt, st = fg.gptq_nvfp4_fast(w32.clone(), h32.clone(), ws2, use_triton=True, hessian_scales=True)
            assert (st == sh).float().mean().item() > 0.99
    assert wins >= 5, wins
    # one block: the chosen scale's in-block GPTQ cost is the minimum over the candidates, and
    # never above max scaling's
    _, w, h, ws2 = _problem(seed=9, out=200, n=16, tokens=512)
    u, _ = fg.hessian_inverse_factor(h.float(), w.float())
    wg = w.float()
    s = fg.hessian_block_scales(wg.clone(), u, ws2, 8, 1)

    def cost(scale):
        _, e, _ = _fixed_scale_block(wg.clone(), u, ws2, scale)
        return (e * e).sum(-1)
    c_best, c_max = cost(s), cost(nf.max_block_scales(wg, ws2))
    assert bool((c_best <= c_max).all()) and bool((c_best < c_max).any())


def _fixed_scale_block(wg, ug, ws2, s):
    """The 16-column GPTQ step with given scales (fast_gptq.group_step_torch's loop)."""
    import torch
    from container_payload.steps import fast_gptq as fg

    d = torch.diagonal(ug)
    step = s * ws2
    q, e = torch.empty_like(wg), torch.empty_like(wg)
    for j in range(16):
        col = wg[:, j]
        qc = fg.e2m1_round_fast(col / step) * step
        q[:, j], e[:, j] = qc, (col - qc) / d[j]
        wg[:, j + 1:] -= e[:, j:j + 1] * ug[j, j + 1:]
    return q, e, s


def _old_hessian_inverse_factor(h, w, damp=0.01):
    """gptq.hessian_inverse_factor before the squares were freed early (commit f9ca6dc), verbatim."""
    import torch
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w = w.clone()
    w[:, dead] = 0
    d = damp * torch.mean(torch.diag(h))
    for tries in range(6):
        hd = h.clone()
        hd.diagonal().add_(d)
        try:
            l = torch.linalg.cholesky(hd)
            del hd
            hinv = torch.cholesky_inverse(l)
            del l
            u = torch.linalg.cholesky(hinv, upper=True)
            return u, w
        except torch.linalg.LinAlgError:
            d = d * 10 if d > 0 else 1e-6
    raise RuntimeError("GPTQ: Hessian not positive definite even with heavy damping")


def _old_activation_corrected_weight(w, h_qq, c_xq, damp=0.01):
    """gptq.activation_corrected_weight before the squares were freed early (commit f9ca6dc), verbatim."""
    import torch
    a = h_qq.double()
    lam = damp * torch.diag(a).mean().clamp_min(1e-12)
    d = c_xq.double()
    d.sub_(a)
    rhs = d.T @ w.double().T
    del d
    a.diagonal().add_(lam)
    corr = torch.linalg.solve(a, rhs).T
    return (w.double() + corr).to(w.dtype)


def case_gptq_memory():
    """The sequential GPTQ's widest unit (down_proj: a wide input, so its in x in squares dominate,
    as at 8B where each is 0.8 GB in float32) in quantize_unit, H and C made inside the measured
    block as refine_layer makes them and handed over, the original weights not kept (the streamed
    pass): the peak of live tensor bytes (tests/live_bytes.py; on a GPU what the unit costs the
    device: nothing here waits in host memory) is what memory_plan counts, GPTQ_SQUARES squares
    (in x in x 4 bytes) + GPTQ_WEIGHTS weight-sized tensors (out x in x 4 bytes), plus vectors (a
    diagonal, the pivots: 1/8 of a weight here). The squares: the activation correction's solve,
    A = H + lam I in float64 (2) and the LU copy it factors (2), H, C and every other square freed
    or not yet made. The weights: the solve's right-hand side and result in float64 (2 each), the
    float32 target (1). The code before (H and C held by the caller throughout) peaked at 6 squares
    + the same. The results are bit-identical to that code's (copies above, swapped in)."""
    import copy
    import torch
    import modelopt.torch.quantization as mtq
    from transformers import LlamaConfig, LlamaForCausalLM
    from live_bytes import LiveBytes
    from container_payload.core import memory_plan
    from container_payload.steps import algorithms as al, fast_gptq as fg, gptq as gq, quantizers as qz
    from container_payload.numerics.emulate import fake_quant_nvfp4

    torch.manual_seed(0)
    n_in, n_out = 1024, 64
    cfg = LlamaConfig(vocab_size=64, hidden_size=n_out, intermediate_size=n_in, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).float().eval()
    ids = torch.randint(0, 64, (2, 16))
    fl = lambda m: m(input_ids=ids)  # noqa: E731
    model = mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), fl)
    unit = ["model.layers.0.mlp.down_proj"]
    x, _, _, _ = _problem(seed=3, out=1, n=n_in, tokens=2048)
    x = x.float()
    xq = fake_quant_nvfp4(x, x.abs().max() / 2688)

    def run(m):
        lin = qz.quantized_linears(m)
        with LiveBytes() as live, torch.no_grad():
            h, c = (xq.T @ xq).div_(len(x)), (x.T @ xq).div_(len(x))
            hs, cs = {unit[0]: h}, {unit[0]: c}
            del h, c
            al.quantize_unit(unit, lin, hs, cs, None, ridge=1.0, kernel="torch")
        return live.peak, lin[unit[0]].weight.detach().clone(), lin[unit[0]].weight_quantizer.amax.clone()

    old_model = copy.deepcopy(model)
    saved = al.activation_corrected_weight, fg.hessian_inverse_factor
    al.activation_corrected_weight = lambda w, sq, damp: _old_activation_corrected_weight(w, sq.h, sq.c, damp)
    fg.hessian_inverse_factor = lambda h, w, damp: _old_hessian_inverse_factor(h.take_h(w), w, damp)
    try:
        old_peak, old_w, old_s = run(old_model)
    finally:
        al.activation_corrected_weight, fg.hessian_inverse_factor = saved
    peak, new_w, new_s = run(model)
    square, weight = n_in * n_in * 4, n_in * n_out * 4
    bound = memory_plan.GPTQ_SQUARES * square + (memory_plan.GPTQ_WEIGHTS + 0.125) * weight
    print(f"peak {peak / square:.3f} squares (before: {old_peak / square:.3f}), a weight is {weight / square} square")
    assert peak <= bound, (peak / square, bound / square, old_peak / square)
    assert old_peak > bound + square, old_peak / square  # the bound tells the two apart
    assert torch.equal(new_w, old_w) and torch.equal(new_s, old_s)
    # the pieces, bit for bit: the corrected weight, H given back, the inverse-Hessian factor
    h, c = (xq.T @ xq).div_(len(x)), (x.T @ xq).div_(len(x))
    w = torch.randn(n_out, n_in) * 0.05
    sq = gq.Squares(h.clone(), c.clone())
    assert torch.equal(gq.activation_corrected_weight(w, sq, 1.0), _old_activation_corrected_weight(w, h, c, 1.0))
    assert sq.c is None and torch.equal(sq.h, h)
    u_old, w_old = _old_hessian_inverse_factor(h, w)
    for hh in (h, gq.Squares(h.clone())):
        u_new, w_new = gq.hessian_inverse_factor(hh, w)
        assert torch.equal(u_new, u_old) and torch.equal(w_new, w_old)


if __name__ == "__main__":
    case = sys.argv[1]
    sys.path.insert(0, str(REPO))
    globals()["case_" + case]()
    print(f"OK {case}")
