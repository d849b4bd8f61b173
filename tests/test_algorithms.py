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
         "gptq_memory", "gptq_loop_memory", "ranking_in_row_chunks", "chunked_kl_equals_full_logits",
         "chunked_kl_memory", "factor_in_place", "factor_memory", "sequential_parking",
         "sequential_replay_on_host", "sequential_replay_in_place", "correction_without_c"]


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


def test_sequential_gptq_parks_the_layer_beside_the_widest_unit():
    _run_case("sequential_parking")


def test_sequential_gptq_replays_finished_modules_from_host_memory():
    _run_case("sequential_replay_on_host")


def test_sequential_gptq_replays_no_output_the_layer_changed_in_place():
    _run_case("sequential_replay_in_place")


def test_seq_mp_recipe_exports_the_standard_format():
    _run_case("seq_mp_recipe_export")


def test_fp8_units_export_mixed_precision_and_emulate():
    _run_case("seq_mp_fp8_export")


def test_launcher_and_payload_know_the_same_recipes():
    _run_case("recipe_names_agree")


def test_gptq_unit_holds_few_squares_and_the_same_bits():
    _run_case("gptq_memory")


def test_in_place_factorizations_match_torch_and_redamp():
    _run_case("factor_in_place")


def test_gptq_factor_holds_one_square_and_panels():
    _run_case("factor_memory")


def test_gptq_loop_holds_the_factor_and_one_weight():
    _run_case("gptq_loop_memory")


def test_ranking_rounds_and_emulates_in_row_chunks_with_the_same_bits():
    _run_case("ranking_in_row_chunks")


def test_activation_correction_without_c_matches_the_float64_formula():
    _run_case("correction_without_c")


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
    from container_payload.steps.hessians import SquareSums
    from container_payload.numerics.emulate import fake_quant_nvfp4

    x, w, _, ws2 = _problem(seed=7, out=48, n=128, tokens=2048)
    x, w = x.float(), w.float()
    scale = x.abs().max() / 2688
    xq = fake_quant_nvfp4(x, scale)
    n = len(x)
    h_qq, h_xx = xq.T @ xq / n, x.T @ x / n
    sums = SquareSums()
    sums.add(x, scale, w=w)  # G = W (X - Xq)^T Xq, as collect_hessians makes it
    v = gq.activation_corrected_weight(w, gq.Squares(h_qq.clone(), sums.g / n), damp=0.01)
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
    H = Xq^T Xq, G = W (X - Xq)^T Xq in float64. The reference feeds the model the pieces the pass feeds
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
            w = qz.unit_weight([rl[n] for n in unit]).double()  # the unit's weights, not yet quantized
            h, g = (xq.T @ xq / len(xq)).float(), (w @ ((x - xq).T @ xq) / len(xq)).float()
            al.quantize_unit(unit, rl, {n: h for n in unit}, {n: g for n in unit}, {}, ridge=sequential.RIDGE)
            done.append(unit)
    for h in hooks:
        h.remove()
    # both handed every layer the same shapes (so the same kernels, whatever the CPU's bf16/AMX
    # paths): the pass its chunks, the reference its pieces, each once per unit and stream
    assert set(fed["pass"]) == set(fed["reference"]) == {(rows, batches[0].shape[1], 64)}, fed
    for n in linears:
        a, b = linears[n].weight.detach(), rl[n].weight.detach()
        # The one arithmetic that still differs: H and G in float32 summed piece by piece (the
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
    as at 8B where each is 0.8 GB in float32) in quantize_unit, H and G made inside the measured
    block as refine_layer makes them (hessians.SquareSums) and handed over, the original weights not
    kept (the streamed pass): the peak of live tensor bytes (tests/live_bytes.py) is what memory_plan
    counts, GPTQ_SQUARES squares (in x in x 4 bytes: H, whose storage takes A = H + lam I's factor
    and later GPTQ's inverse factor, and steps/factor.py's panels) + GPTQ_WEIGHTS weight-sized
    tensors (out x in x 4 bytes: G, which becomes V; the target; GPTQ's working copy), plus vectors
    (1/8 of a weight here), plus one square the GPU does not hold: H's copy during the correction,
    which waits in pinned host memory there (a clone here). The code from before f9ca6dc (H and C
    held by the caller throughout, the float64 solve and torch's factor chain: 6 squares) is
    swapped in to show the bound tells them apart; the results differ at rounding level only."""
    import copy
    import torch
    import modelopt.torch.quantization as mtq
    from transformers import LlamaConfig, LlamaForCausalLM
    from live_bytes import LiveBytes
    from container_payload.core import memory_plan
    from container_payload.steps import algorithms as al, factor, fast_gptq as fg, gptq as gq, hessians, quantizers as qz
    from container_payload.steps.hessians import SquareSums
    from container_payload.numerics.emulate import fake_quant_nvfp4

    # pieces as small against a square as at 8B (512 tokens of 14336 inputs): their temporaries
    # (piece x in, float32) are not what this bounds
    hessians.SQUARE_TOKENS = 32
    factor.PANEL = 64  # and panels (1024 of 14336 inputs at 8B, 64 of 1024 here)
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
    scale = x.abs().max() / 2688
    xq = fake_quant_nvfp4(x, scale)

    def run(m, old=False):
        lin = qz.quantized_linears(m)
        with LiveBytes() as live, torch.no_grad():
            if old:  # H and C, as refine_layer made them before
                h, g = (xq.T @ xq).div_(len(x)), (x.T @ xq).div_(len(x))
            else:
                sums = SquareSums()
                w_unit = qz.unit_weight([lin[unit[0]]])
                sums.add(x, scale, w=w_unit)
                del w_unit  # refine_layer lets go of it before quantize_unit
                h, g = sums.h.div_(len(x)), sums.g.div_(len(x))
                del sums
            hs, gs = {unit[0]: h}, {unit[0]: g}
            del h, g
            al.quantize_unit(unit, lin, hs, gs, None, ridge=1.0, kernel="torch")
        return live.peak, lin[unit[0]].weight.detach().clone(), lin[unit[0]].weight_quantizer.amax.clone()

    old_model = copy.deepcopy(model)
    # the code before: the float64 correction and torch's factor chain (steps/factor.py's in-place
    # factor changed that arithmetic too: case_factor_in_place)
    saved = al.activation_corrected_weight, fg.hessian_inverse_factor
    al.activation_corrected_weight = lambda w, sq, damp: _old_activation_corrected_weight(
        torch.cat([t.float() for t in w]), sq.h, sq.g, damp)  # quantize_unit hands the members' weights
    fg.hessian_inverse_factor = lambda h, w, damp, w_given=False: _old_hessian_inverse_factor(h.take_h(w), w, damp)
    try:
        old_peak, old_w, old_s = run(old_model, old=True)
    finally:
        al.activation_corrected_weight, fg.hessian_inverse_factor = saved
    peak, new_w, new_s = run(model)
    square, weight = n_in * n_in * 4, n_in * n_out * 4
    host_copy = square  # H's copy during the correction: in host memory on a GPU, counted here
    bound = (memory_plan.GPTQ_SQUARES * square + (memory_plan.GPTQ_WEIGHTS + 0.125) * weight) + host_copy
    print(f"peak {peak / square:.3f} squares (before: {old_peak / square:.3f}), a weight is {weight / square} square")
    assert peak <= bound, (peak / square, bound / square, old_peak / square)
    assert old_peak > bound + 2 * square, old_peak / square  # the bound tells the two apart
    # rounding-level change: the same codes nearly everywhere (a flip feeds GPTQ's error along its row)
    same = torch.isclose(new_w, old_w, rtol=1e-5, atol=0).float().mean().item()
    same_s = torch.isclose(new_s, old_s, rtol=1e-5, atol=0).float().mean().item()
    print(f"the same weights {same:.4f}, block scales {same_s:.4f}")
    assert same > 0.98 and same_s > 0.98, (same, same_s)
    # the pieces: the corrected weight against the old float64 code, H given back bit for bit,
    # the inverse-Hessian factor
    h, c = (xq.T @ xq).div_(len(x)), (x.T @ xq).div_(len(x))
    w = torch.randn(n_out, n_in) * 0.05
    sums = SquareSums()
    sums.add(x, scale, w=w)
    sq = gq.Squares(h.clone(), sums.g.div_(len(x)))
    v, v_old = gq.activation_corrected_weight(w, sq, 1.0), _old_activation_corrected_weight(w, h, c, 1.0)
    assert torch.allclose(v, v_old, rtol=0, atol=1e-5 * v_old.abs().max()), (v - v_old).abs().max()
    assert sq.g is None and torch.equal(sq.h, h)
    u_old, w_old = _old_hessian_inverse_factor(h, w)
    u_new, w_new = gq.hessian_inverse_factor(h, w)
    assert torch.allclose(u_new, u_old, rtol=0, atol=1e-4 * u_old.abs().max().item()) and torch.equal(w_new, w_old)
    u_sq, w_sq = gq.hessian_inverse_factor(gq.Squares(h.clone()), w)
    assert torch.equal(u_sq, u_new) and torch.equal(w_sq, w_new)


def _spd(n, dtype, seed=0):
    """A Hessian-like symmetric positive definite matrix X^T X / t (an outlier channel)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    x[:, n // 3] *= 8
    h = x.T @ x / (2 * n)
    h = h.tril() + h.tril(-1).T  # exactly symmetric (a matmul's transpose pairs may differ in the last bit)
    return h.to(dtype)


def case_factor_in_place():
    """steps/factor.py against torch's dense results: cholesky_, tri_inverse_, solve_right_ and
    gptq_factor_ (GPTQ's U, against torch's chain cholesky -> cholesky_inverse -> cholesky) in
    float64 (tight) and float32 (close), n a multiple of the panel, not one, and below it. A
    Hessian that is not positive definite: cholesky_ says where without raising, gptq_factor_ gives
    h back bit for bit, and hessian_inverse_factor re-damps to the same damping as the torch code
    before it (verbatim copy above)."""
    import torch
    from container_payload.steps import factor as fa, gptq as gq

    for dt, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        for n, block in ((192, 64), (200, 64), (50, 64)):
            h = _spd(n, dt, seed=n)
            d = 0.01 * h.diagonal().mean()
            l_ref = torch.linalg.cholesky(h)
            scale = lambda ref: ref.abs().max().item()  # noqa: E731
            a = h.clone()
            assert fa.cholesky_(a, block) == 0
            assert (a - l_ref).abs().max().item() <= tol * scale(l_ref), (dt, n)
            assert torch.equal(a.triu(1), torch.zeros_like(a).triu(1))
            li = l_ref.clone()
            fa.tri_inverse_(li, block)
            li_ref = torch.linalg.inv(l_ref)
            assert (li - li_ref).abs().max().item() <= tol * scale(li_ref), (dt, n)
            g = torch.Generator().manual_seed(1)
            b = torch.randn(40, n, generator=g, dtype=torch.float64).to(dt)
            x = b.clone()
            fa.solve_right_(x, l_ref, block)
            x_ref = torch.linalg.solve(h.double(), b.double().T).T
            assert (x.double() - x_ref).abs().max().item() <= 10 * tol * scale(x_ref), (dt, n)
            u = h.clone()
            assert fa.gptq_factor_(u, d, block) == 0
            hd = h.clone()
            hd.diagonal().add_(d)
            u_ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
            assert (u - u_ref).abs().max().item() <= tol * scale(u_ref), (dt, n, (u - u_ref).abs().max())
            f = h.clone()
            fa.flip_(f, 16)
            assert torch.equal(f, h.flip(0, 1))
    # not positive definite: the failing leading minor, and h given back as it came
    for dt in (torch.float64, torch.float32):
        h = _spd(200, dt, seed=3)
        h[150, 150] = -1.0
        a = h.clone()
        assert fa.cholesky_(a, 64) == 151
        a = h.clone()
        assert fa.gptq_factor_(a, 0.0, 64) == 200 - 150  # J H J: index 150 is the 50th from the end
        assert torch.equal(a, h)
        # a negative eigenvalue of 3% of the mean diagonal: damping 0.01 fails, 0.1 holds
        h = _spd(200, torch.float64, seed=4)
        h.diagonal().sub_(float(torch.linalg.eigvalsh(h)[0]) + 0.03 * float(h.diagonal().mean()))
        h = h.to(dt)
        fails = lambda f: int(torch.linalg.cholesky_ex(  # noqa: E731
            h + f * h.diagonal().mean() * torch.eye(200, dtype=dt))[1]) > 0
        assert fails(0.01) and not fails(0.1)
        w = torch.randn(8, 200, dtype=dt)
        u_old, _ = _old_hessian_inverse_factor(h, w)
        for hh in (h, gq.Squares(h.clone())):
            u, _ = gq.hessian_inverse_factor(hh, w)
            assert torch.allclose(u, u_old, rtol=0, atol=(1e-10 if dt == torch.float64 else 1e-4) * scale(u_old))
    try:
        gq.hessian_inverse_factor(-torch.eye(32), torch.ones(4, 32))
        raise AssertionError("a negative definite Hessian was accepted")
    except RuntimeError as e:
        assert "not positive definite" in str(e)


def case_factor_memory():
    """hessian_inverse_factor on a handed-over square (gptq.Squares, as quantize_unit calls it) holds
    that square and panel temporaries only: new tensor bytes (tests/live_bytes.py) at most two
    n x panel panels, four panel x panel tiles and some vectors. At n = 1024 with panels of 128 that
    is 0.3 of a square; the code before (h kept for a retry, L, then the inverse and U) allocated
    2.03 squares beyond the handed-over one (measured at n = 2048 with this file's LiveBytes), and
    the verbatim older copy above (_old_hessian_inverse_factor) 3: the bound tells them apart."""
    import torch
    from live_bytes import LiveBytes
    from container_payload.steps import factor as fa, gptq as gq

    n, panel = 1024, 128
    h = _spd(n, torch.float32, seed=5)
    w = torch.randn(64, n)
    square = n * n * 4
    bound = (2 * n * panel + 4 * panel * panel + 64 * n) * 4
    squares = gq.Squares(h.clone())
    storage = squares.h.untyped_storage().data_ptr()
    saved, fa.PANEL = fa.PANEL, panel
    try:
        with LiveBytes() as m:
            u, _ = gq.hessian_inverse_factor(squares, w)
    finally:
        fa.PANEL = saved
    hd = h.clone()
    hd.diagonal().add_(0.01 * h.diagonal().mean())
    u_ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    assert torch.allclose(u, u_ref, rtol=0, atol=2e-5 * u_ref.abs().max().item())
    assert u.untyped_storage().data_ptr() == storage  # U is in the handed-over square's storage
    with LiveBytes() as old:
        _old_hessian_inverse_factor(h, w)
    print(f"new {m.peak / square:.3f} squares beyond the handed-over one (bound {bound / square:.3f}),"
          f" old {old.peak / square:.3f}")
    assert m.peak <= bound, (m.peak / square, bound / square, "old code:", old.peak / square)
    assert old.peak > bound + square, old.peak / square


def _simulated_host(with_replay: bool):
    """A tiny NVFP4-calibrated Llama, its plain sequential_gptq result (the whole path: no placement,
    replay on), and a Fit subclass that simulates a streamed run's host memory on the CPU (there is no
    second device here): Fit.back hands back a NaN-filled stand-in (the values set aside) and Fit.on
    the values. Anything that used a tensor waiting "in host memory" without Fit.on would carry NaNs
    into the weights. Returns (model to run, plain state dict, the Fit subclass)."""
    import copy
    import weakref
    from dataclasses import dataclass

    import torch
    import modelopt.torch.quantization as mtq
    from transformers import LlamaConfig, LlamaForCausalLM
    from container_payload.steps.sequential import Fit, sequential_gptq

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    batches = [torch.randint(0, 256, (2, 32)) for _ in range(3)]

    def fl(m):
        with torch.inference_mode():
            for b in batches:
                m.get_decoder()(input_ids=b, use_cache=False)

    model = mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), fl)
    placed = copy.deepcopy(model)
    sequential_gptq(model, fl, kernel="torch")
    plain = {n: t.clone() for n, t in model.state_dict().items()}

    aside: dict = {}

    @dataclass(frozen=True)
    class SimulatedHost(Fit):
        replay: bool = with_replay
        device: str | None = "cpu"
        keep: str | None = "host"

        def on(self, t):  # by storage: a parameter's .data is a new alias each time; t may be a view
            real = aside.get(t.untyped_storage().data_ptr())
            return t if real is None else real.as_strided(t.shape, t.stride(), t.storage_offset())

        def back(self, t):
            kept = torch.full_like(t, float("nan"))
            key = kept.untyped_storage().data_ptr()
            aside[key] = t.clone()
            weakref.finalize(kept.untyped_storage(), aside.pop, key, None)
            return kept

    return placed, fl, plain, SimulatedHost


def _run_placed(placed, fl, host, **patches) -> dict:
    """sequential_gptq on `placed` with sequential.Fit = host and the given sequential names replaced."""
    from container_payload.steps import sequential

    patches["Fit"] = host
    saved = {k: getattr(sequential, k) for k in patches}
    for k, v in patches.items():
        setattr(sequential, k, v)
    try:
        sequential.sequential_gptq(placed, fl, kernel="torch")
    finally:
        for k, v in saved.items():
            setattr(sequential, k, v)
    return placed.state_dict()


def case_sequential_parking():
    """In a streamed run on a GPU, refine_layer moves the layer's other weights to host memory while a
    unit whose Hessian outweighs the layer (down_proj at 8B) is accumulated and solved (sequential._park),
    and its quantized-stream inputs wait there as the streams do, as gate/up's do (their sums are too
    big to build beside the layer's activations: sequential._sums_at_catch); q/k/v's and o's are summed
    where they are caught. Host memory simulated (_simulated_host), replay off: the weights must equal
    the run without placement bit for bit, down_proj must have been the unit that parked (not the narrow
    ones), gate/up's and down_proj's caught inputs must reach SquareSums as waiting stand-ins (on the
    GPU they grow with the calibration tokens) and the others' as live values, and every unit's
    original-stream inputs (x0) must wait."""
    import torch
    from container_payload.steps import sequential

    placed, fl, plain, host = _simulated_host(with_replay=False)
    parked_units = []
    park = sequential._park

    def watched(layer, unit, linears, fit):
        parked_units.append(unit[0].rsplit(".", 2)[-2:])
        out = park(layer, unit, linears, fit)
        assert out and all(p.isnan().all() for p in out)
        return out

    waited = []

    class Watched(sequential.SquareSums):
        def add(self, x, scale, x0=None, w=None, on=None):
            big = w[0].shape[1] + sum(m.shape[0] for m in w) >= 512  # gate/up (64 + 1024), down (512 + 64)
            waited.append((big, bool(x.isnan().all()), bool(x0.isnan().all())))
            return super().add(x, scale, x0, w, on)

    got = _run_placed(placed, fl, host, _park=watched, SquareSums=Watched)
    assert parked_units == [["mlp", "down_proj"]] * 2, parked_units
    # x waits exactly for gate/up and down_proj; x0 always waits
    assert waited and all(x_waits == big and x0_waits for big, x_waits, x0_waits in waited), waited
    assert {big for big, _, _ in waited} == {True, False}, waited
    for n, t in plain.items():
        assert torch.equal(t, got[n]), n


def case_sequential_replay_on_host():
    """The streamed pass replays finished submodules' outputs from host memory (sequential._Replay:
    recorded through Fit.back, handed out through Fit.on). Host memory simulated (_simulated_host),
    replay on, parking too: the weights must equal the plain run bit for bit; every replayed output
    waited as a NaN stand-in (so one used without Fit.on would have spoiled the weights); and the
    modules replayed are the finished ones, once per batch in each of the 2 layers: with
    replay_min_uses 1, q/k/v in the gate/up stage (pass 3), the attention block in the down stage
    and attention and gate/up in the last pass; with 2 (the streamed pass's), the attention block
    alone. A negative control (the cache handed out without Fit.on) must fail."""
    import copy
    from dataclasses import dataclass

    import torch
    from torch.utils._pytree import tree_leaves
    from container_payload.steps import sequential

    replayed = []

    class Counted(sequential._Replay):
        def __init__(self, layer, *a):
            super().__init__(layer, *a)
            self.names, self.passes = {id(m): n for n, m in layer.named_modules()}, 0

        def start(self, done, record=True):
            self.passes += 1
            super().start(done, record)

        def _replay(self, key):
            cached = self.cache[key][self.batch[0]]
            assert all(t.isnan().all() for t in tree_leaves(cached) if torch.is_tensor(t)), self.names[key]
            replayed.append((self.passes, self.names[key]))
            return super()._replay(key)

    placed, fl, plain, host = _simulated_host(with_replay=True)

    @dataclass(frozen=True)
    class Twice(host):
        replay_min_uses: int = 2

    batches, layers = 3, 2
    attention = {(4, "self_attn"), (5, "self_attn")}
    wants = {host: attention | {(3, "self_attn.q_proj"), (3, "self_attn.k_proj"), (3, "self_attn.v_proj"),
                                (5, "mlp.gate_proj"), (5, "mlp.up_proj")},
             Twice: attention}
    for fit, want in wants.items():
        replayed.clear()
        got = _run_placed(copy.deepcopy(placed), fl, fit, _Replay=Counted)
        for n, t in plain.items():
            assert torch.equal(t, got[n]), n
        assert set(replayed) == want, sorted(set(replayed))
        assert all(replayed.count(r) == batches * layers for r in want), replayed

    class Unmoved(sequential._Replay):  # the cached stand-in handed out as it waits
        def _replay(self, key):
            return self.cache[key][self.batch[0]]

    try:  # the NaNs reach the next unit's Hessian: GPTQ refuses it
        _run_placed(placed, fl, host, _Replay=Unmoved)
    except RuntimeError as e:
        assert "not positive definite" in str(e), e
    else:
        raise AssertionError("a cached output used without Fit.on went unnoticed")


def case_sequential_replay_in_place():
    """Where the cache keeps the very tensor a module returned (the whole path: no copy), a layer that
    changes that output in place must not have the changed values replayed: here the MLP's
    activation is an in-place SiLU on gate_proj's output. The weights with replay on must equal those
    with replay off bit for bit, and gate_proj must not have been replayed (the code before replayed
    SiLU(gate) as gate in the last pass)."""
    import copy
    from dataclasses import dataclass

    import torch
    from container_payload.steps import sequential

    model, fl, _, _ = _simulated_host(with_replay=False)
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.SiLU(inplace=True)
    runs, replayed = {}, []

    class Counted(sequential._Replay):
        def __init__(self, layer, *a):
            super().__init__(layer, *a)
            self.names = {id(m): n for n, m in layer.named_modules()}

        def _replay(self, key):
            replayed.append(self.names[key])
            return super()._replay(key)

    for replay_on in (False, True):
        @dataclass(frozen=True)
        class Whole(sequential.Fit):
            replay: bool = replay_on

        runs[replay_on] = _run_placed(copy.deepcopy(model), fl, Whole, _Replay=Counted)
    assert "self_attn" in replayed and "mlp.gate_proj" not in replayed, sorted(set(replayed))
    for n, t in runs[False].items():
        assert torch.equal(t, runs[True][n]), n


def case_gptq_loop_memory():
    """GPTQ's loop (fast_gptq and the reference) holds the inverse-Hessian factor U and its own copy
    of w, whose columns take the block's q as the loop passes them, plus a block's errors (and the
    reference's block copy) and the scales: no q [out, in] beside w, no out x in temporary for the
    trailing update (an in-place addmm_). Peak of live tensor bytes (tests/live_bytes.py), the
    Hessian handed over (gptq.Squares), max scaling (the search's trial tensors are the torch
    step's: the Triton kernel keeps them in registers). The code before held q too: over the bound."""
    import torch
    from live_bytes import LiveBytes
    from container_payload.steps import fast_gptq as fg, gptq as gq

    out, n, block = 2048, 512, 128
    _, w, h, ws2 = _problem(seed=4, out=out, n=n, tokens=2048)
    w, h = w.float(), h.float()
    square, weight, cols, scales = n * n * 4, out * n * 4, out * block * 4, out * (n // 16) * 4
    results = {}
    for name, f, blocks in (("fast", lambda *a: fg.gptq_nvfp4_fast(*a, use_triton=False), 1),
                            ("reference", gq.gptq_nvfp4, 4)):  # w1 and err1, and the last block's
        squares = gq.Squares(h.clone())  # handed over, as quantize_unit does
        with LiveBytes() as live, torch.no_grad():
            q, s = f(w, squares, ws2, block, 0.01, False)
        bound = square + weight + blocks * cols + scales + 8 * out * 16 * 4  # + a 16-column step's work
        print(f"{name}: peak {live.peak / 1e6:.2f} MB, bound {bound / 1e6:.2f} MB (U + w {(square + weight) / 1e6:.2f})")
        assert live.peak <= bound, (name, live.peak, bound)
        results[name] = q, s
    (qf, sf), (qr, sr) = results["fast"], results["reference"]
    # the same decisions up to float32 summation order (as case_fast_gptq_vs_reference: 3 of 65,536
    # scales differ here since the inverse factor is factor.gptq_factor_'s)
    assert (sf == sr).float().mean() > 0.999 and torch.isclose(qf, qr, rtol=1e-5, atol=0).float().mean() > 0.99
    # a kernel that fails after writing into the first block (where q now goes) leaves it as it
    # was for the torch step (a stand-in for Triton: none on the CPU here)
    def failing(wg, ug, ws2, search, down, up, q, e, s, hessian=False):
        q.fill_(float("nan"))
        raise RuntimeError("no kernel here")
    saved = fg.triton_ok, fg.group_step_triton
    fg.triton_ok, fg.group_step_triton = (lambda w: True), failing
    try:
        qn, sn = fg.gptq_nvfp4_fast(w, h.clone(), ws2, block, 0.01, False)
    finally:
        (fg.triton_ok, fg.group_step_triton), fg._TRITON_FAILED[:] = saved, []
    assert torch.equal(qn, qf) and torch.equal(sn, sf)


def case_ranking_in_row_chunks():
    """The ranking's elementwise work on weights and activations in row chunks (bf16_ranking.
    CHUNK_ELEMENTS): round_weights, fp8_weights and the emulation's fake-quantized inputs give the
    bits of the whole-tensor formulas they replace (written out below), and their peak of live
    tensor bytes (tests/live_bytes.py) is a chunk's work, not the whole tensor's (rounding a whole
    weight costs about 270 bytes an element: 1.23 GiB for a 14336 x 4096 weight on a GPU). The
    emulated Linear with its output error holds its input's fake-quantized copy (in the input's
    dtype), its output, the original weights' output and one float32 difference beside a chunk's
    work (before: the whole input's fake quantization in float32, and four float32 outputs)."""
    import types
    import torch
    from torch import nn
    from live_bytes import LiveBytes
    from container_payload.numerics.emulate import fake_quant_fp8, fake_quant_nvfp4, fp8_e4m3
    from container_payload.numerics.nvfp4 import round_to_grid
    from container_payload.steps import bf16_ranking as rk

    torch.manual_seed(0)
    chunk = rk.CHUNK_ELEMENTS = rk.ACTIVATION_CHUNK_ELEMENTS = 8192  # (the modules' constants: 2**19, 2**23)
    for dt in (torch.bfloat16, torch.float32):
        lin = {f"l.mlp.{n}": nn.Linear(320, 256, bias=False).to(dt) for n in ("gate_proj", "up_proj")}
        lin["l.mlp.down_proj"] = nn.Linear(256, 320, bias=False).to(dt)
        with torch.no_grad():
            for m in lin.values():
                m.weight.mul_(torch.rand(m.weight.shape[0], 1).to(dt) * 3)
        before = {n: m.weight.detach().clone() for n, m in lin.items()}
        with LiveBytes() as live:
            rk.round_weights(lin)
        assert live.peak < 300 * chunk + 65536, (dt, live.peak)
        for unit in (["l.mlp.gate_proj", "l.mlp.up_proj"], ["l.mlp.down_proj"]):
            ws2 = torch.stack([before[n].float().abs().amax() for n in unit]).amax() / 2688
            for n in unit:
                want = round_to_grid(before[n].float(), ws2)[0].to(dt)
                assert torch.equal(lin[n].weight.detach().view(torch.uint8), want.view(torch.uint8)), (dt, n)
        with LiveBytes() as whole:
            round_to_grid(before["l.mlp.gate_proj"].float(), ws2)
        assert whole.peak > 5 * live.peak, (whole.peak, live.peak)  # what the bound tells apart
        unit = ["l.mlp.gate_proj", "l.mlp.up_proj"]
        got = rk.fp8_weights(unit, before)
        scale = (torch.stack([before[n].float().abs().amax() for n in unit]).amax() / 448).clamp_min(1e-12)
        for n in unit:
            want = (fp8_e4m3(before[n].float() / scale) * scale).to(dt)
            assert torch.equal(got[n].view(torch.uint8), want.view(torch.uint8)), (dt, n)
        x = torch.randn(2, 150, 320).to(dt) * 3
        s = x.float().abs().max() / 2688
        for fq, sc in ((fake_quant_nvfp4, s), (fake_quant_fp8, s * 20)):
            assert torch.equal(rk.fake_quant_rows(fq, x, sc).view(torch.uint8), fq(x, sc).to(dt).view(torch.uint8))
    # one emulated Linear with its output error, float32 as on the CPU
    n_in, n_out, tokens = 2048, 64, 512
    m = nn.Linear(n_in, n_out, bias=False)
    x = torch.randn(1, tokens, n_in) * 2
    m.input_quantizer = types.SimpleNamespace(is_enabled=True, amax=x.abs().amax())
    orig = {"l.mlp.down_proj": m.weight.detach().clone()}
    with torch.no_grad():
        m.weight.mul_(1.01)
    emu = rk.Emulation({"l.mlp.down_proj": m}, [["l.mlp.down_proj"]], orig)
    try:
        with LiveBytes() as live, torch.no_grad():
            y = m(x)
            left = live.live  # (while the emulation stands: its hooks hold what they keep)
    finally:
        emu.remove()
    xq = fake_quant_nvfp4(x, x.abs().amax() / 2688)
    assert torch.equal(y, xq @ m.weight.detach().T)
    y0 = x @ orig["l.mlp.down_proj"].T
    want = ((y - y0) ** 2).sum().item() / max((y0 ** 2).sum().item(), 1e-30)
    assert emu.err["l.mlp.down_proj"] == want, (emu.err, want)
    out_bytes = tokens * n_out * 4
    bound = x.numel() * 4 + 3 * out_bytes + 60 * chunk  # xq; y, y0 and their difference; a chunk's fake quant
    assert live.peak <= bound, (live.peak, bound, x.numel() * 4)
    assert left == y.numel() * 4, left  # nothing kept for the next call (its xq was, before)
    # a fused unit's members share one fake-quantized input, let go after the last member
    unit = ["l.mlp.gate_proj", "l.mlp.up_proj"]
    mods = {n: nn.Linear(n_in, n_out, bias=False) for n in unit}
    for mm in mods.values():
        mm.input_quantizer = m.input_quantizer
    emu = rk.Emulation(mods, [unit])
    calls = []
    saved = rk.fake_quant_rows
    rk.fake_quant_rows = lambda *a: calls.append(1) or saved(*a)
    try:
        with LiveBytes() as live, torch.no_grad():
            ys = [mods[n](x) for n in unit]
            left = live.live
    finally:
        rk.fake_quant_rows = saved
        emu.remove()
    assert len(calls) == 1 and left == 2 * ys[0].numel() * 4, (calls, left)
    assert all(torch.equal(yy, xq @ mods[n].weight.detach().T) for yy, n in zip(ys, unit))


def case_correction_without_c():
    """The activation correction from G = W (C - H) (hessians.SquareSums: summed in pieces of
    SQUARE_TOKENS tokens, in float32, over calls of any size) and a float32 Cholesky of
    A = H + lam I equals the float64 formula it replaces, V = W + W (C - H) (H + lam I)^-1 with
    C = X^T Xq, H = Xq^T Xq: X from another stream than Xq (the sequential pass's case), a unit of
    two members stacked by rows, wide-ranging input channels (an ill-conditioned H). H comes back
    bit for bit (GPTQ needs it), V is in G's storage, and the float32 solve is within the float64
    one's distance of the float32 inputs' rounding."""
    import torch
    from container_payload.steps import gptq as gq, hessians
    from container_payload.numerics.emulate import fake_quant_nvfp4

    torch.manual_seed(11)
    n, tokens = 320, 3000
    x = torch.randn(tokens, n) * torch.logspace(-2, 1, n)[torch.randperm(n)]  # channels 1e-2 .. 10
    xt = x + 0.1 * torch.randn(tokens, n) * x.abs().mean(0)  # the quantized stream's input, drifted
    scale = xt.abs().max() / 2688
    w = torch.cat([torch.randn(40, n), torch.randn(24, n) * 3]) * 0.05  # two members, stacked
    X, Xq, W = x.double(), fake_quant_nvfp4(xt, scale).double(), w.double()
    H, C = Xq.T @ Xq / tokens, X.T @ Xq / tokens
    saved = hessians.SQUARE_TOKENS
    hessians.SQUARE_TOKENS = 128  # several pieces per call, the last one short
    try:
        sums = hessians.SquareSums()
        for a, b in ((0, 1000), (1000, 1100), (1100, tokens)):  # calls (chunks) of any size
            sums.add(xt[a:b], scale, x[a:b], w)
    finally:
        hessians.SQUARE_TOKENS = saved
    assert sums.count == tokens
    h, g = sums.h.div_(tokens), sums.g.div_(tokens)
    G = W @ (C - H)
    assert torch.allclose(h.double(), H, rtol=0, atol=1e-5 * H.abs().max()), (h.double() - H).abs().max()
    assert torch.allclose(g.double(), G, rtol=0, atol=1e-5 * G.abs().max()), (g.double() - G).abs().max()
    for damp in (0.01, 1.0):  # gptq-aa's and the sequential pass's ridge
        lam = damp * torch.diag(H).mean()
        V = W + W @ (C - H) @ torch.linalg.inv(H + lam * torch.eye(n, dtype=torch.float64))
        # the float64 formula on the float32 sums: how far the inputs' rounding alone moves V
        H32, G32 = h.double(), g.double()
        V_in = W + G32 @ torch.linalg.inv(H32 + damp * torch.diag(H32).mean() * torch.eye(n, dtype=torch.float64))
        sq = gq.Squares(h.clone(), g.clone())
        storage = sq.g.data_ptr()
        v = gq.activation_corrected_weight(w, sq, damp)
        assert v.dtype == torch.float32 and v.data_ptr() == storage and sq.g is None
        assert torch.equal(sq.h, h)
        err, err_in = (v.double() - V).abs().max().item(), (V_in - V).abs().max().item()
        corr = (V - W).abs().max().item()
        print(f"damp {damp}: |v - V| {err:.2e}, from the inputs' rounding {err_in:.2e}, |V - W| {corr:.2e}")
        assert err <= 1e-4 * corr + 2 * err_in, (err, err_in, corr)


if __name__ == "__main__":
    case = sys.argv[1]
    sys.path.insert(0, str(REPO))
    globals()["case_" + case]()
    print(f"OK {case}")
