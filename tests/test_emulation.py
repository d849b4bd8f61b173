"""The evaluation payload against an independent float64 emulation.

evaluate.py (torch, float32, container_payload/numerics/emulate.py) runs in the ModelOpt venv on
a tiny random Llama that the real ModelOpt quantized (tests/tools/make_tiny_nvfp4.py).
This file re-derives the same numbers with nothing shared: its own safetensors reader,
its own E2M1 / E4M3 decoding from the bit layouts, its own round-to-nearest-even, and
its own Llama forward in numpy float64. The host venv has no torch and keeps it so.
"""
import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from float64_reference import Float64Llama, decode_e2m1, decode_e4m3, float64_metrics, round_e2m1, round_e4m3

REPO = Path(__file__).resolve().parents[1]
TOKENS, SEQ_LEN = 512, 64


def ref_python() -> str:
    py = Path(os.environ.get("SPARK_NVFP4_REF_PYTHON") or REPO / ".venv-mo" / "bin" / "python")
    if not py.exists():
        msg = f"no ModelOpt venv interpreter at {py} (set SPARK_NVFP4_REF_PYTHON)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return str(py)


def run_ref(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([ref_python(), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{args[:3]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


# ------------------------------------------------------------- fixtures (ModelOpt venv)

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ref_python()
    from launcher.sources import assets

    gguf, text = assets.embedded_gguf(), assets.texts().heldout_brown
    out = tmp_path_factory.mktemp("tiny")
    run_ref([str(REPO / "tests/tools/make_tiny_nvfp4.py"), str(out), "--gguf", str(gguf),
             "--text", str(text), "--tokens", str(TOKENS), "--seq-len", str(SEQ_LEN)])
    return out, text


VARIANTS = {"w4a4": "w4a4", "ct": "ct-w4a4", "w4a16": "w4a16", "fp8": "fp8", "self": "ref"}


@pytest.fixture(scope="module")
def evals(tiny):
    out, text = tiny
    jobs = {}
    for name, folder in VARIANTS.items():
        job = {"checkpoint": str(out / folder), "reference": str(out / "ref"), "text": str(text),
               "tokens": TOKENS, "seq_len": SEQ_LEN, "json_out": str(out / f"eval-{name}.json"),
               "device": "cpu", "generations": ["Name a colour."], "max_new_tokens": 6}
        if name == "w4a4":  # the defaults: three built-in prompts, 48 new tokens
            del job["generations"], job["max_new_tokens"]
        jobs[name] = out / f"job-{name}.json"
        jobs[name].write_text(json.dumps(job))
    # The CLI entry point once; the rest in one process, as importing torch dominates.
    cli = run_ref(["-m", "container_payload.evaluate", str(jobs.pop("w4a4"))])
    run_ref(["-c", "import sys; from container_payload.core import events; "
                   "sys.exit(max(events.run_command(['evaluate', j]) for j in sys.argv[1:]))", *map(str, jobs.values())])
    results = {name: json.loads((out / f"eval-{name}.json").read_text()) for name in VARIANTS}
    return results, cli.stdout


@pytest.fixture(scope="module")
def windows(tiny):
    return json.loads((tiny[0] / "tokens.json").read_text())


def rel(a, b):
    return abs(a - b) / abs(b)


# ------------------------------------------------------------- tests

@pytest.mark.parametrize("variant,folder,quant", [("w4a4", "w4a4", "nvfp4"), ("w4a16", "w4a16", "nvfp4"),
                                                  ("fp8", "fp8", "fp8")])
def test_matches_independent_float64_emulation(evals, tiny, windows, variant, folder, quant):
    got = evals[0][variant]
    ref = Float64Llama(tiny[0] / "ref", None)
    want = float64_metrics(ref, Float64Llama(tiny[0] / folder, quant), windows)
    assert got["tokens"] == want["tokens"] == len(windows) * (SEQ_LEN - 1)
    assert want["kl_divergence"] > 1e-3, "fixture too weak: KL is near rounding noise"
    for key in ("kl_divergence", "perplexity", "reference_perplexity"):
        assert rel(got[key], want[key]) < 0.01, (key, got[key], want[key])
    assert abs(got["top1_agreement"] - want["top1_agreement"]) < 0.02
    assert got["format"]["quantized"] and got["format"]["naming"] == "modelopt"
    want_act = {"w4a4": ["nvfp4"], "w4a16": ["none"], "fp8": ["fp8"]}[variant]
    assert got["format"]["activations"] == want_act


def test_per_layer_weight_error_matches(evals, tiny):
    ref, q = Float64Llama(tiny[0] / "ref", None), Float64Llama(tiny[0] / "w4a4", "nvfp4")
    rows = evals[0]["w4a4"]["per_layer"]
    assert len(rows) == 2 * 7
    for row in rows:
        w, wq = ref.w[row["name"]], q.w[row["name"]]
        want = np.linalg.norm(w - wq) / np.linalg.norm(w)
        assert 0.01 < want < 0.5
        assert rel(row["rel_error"], want) < 1e-5, row


def test_compressed_tensors_equals_modelopt(evals):
    mo, ct = evals[0]["w4a4"], evals[0]["ct"]
    assert ct["format"]["naming"] == "compressed-tensors" and ct["format"]["activations"] == ["nvfp4"]
    for key in ("kl_divergence", "perplexity", "top1_agreement"):
        assert rel(ct[key], mo[key]) < 1e-3, (key, ct[key], mo[key])


def test_reference_against_itself_is_exact(evals):
    r = evals[0]["self"]
    assert r["kl_divergence"] == 0.0
    assert r["top1_agreement"] == 1.0
    assert r["perplexity"] == r["reference_perplexity"]
    assert r["format"]["quantized"] is False and r["per_layer"] == []
    assert all(g["identical"] for g in r["generations"])


def test_output_contract(evals, windows):
    r, stdout = evals[0]["w4a4"], evals[1]
    h = hashlib.sha256()
    for w in windows:
        h.update(json.dumps(w).encode())
    assert r["windows_sha256"] == h.hexdigest() and r["windows"] == TOKENS // SEQ_LEN
    hist = r["kl_per_token"]["histogram"]
    assert len(hist["counts"]) == 50 and len(hist["edges"]) == 51 and sum(hist["counts"]) == r["tokens"]
    assert len(r["kl_per_token"]["per_window"]) == r["windows"]
    assert len(r["generations"]) == 3 and all(g["reference"] for g in r["generations"])
    assert r["generations"][0]["chat_template"] is True
    assert r["checkpoint_bytes"] > r["weights_bytes"] > 0 and r["model"]["kv_bytes_per_token_bf16"] == 2 * 2 * 2 * 16 * 2
    for k in ("load_s", "score_s", "generate_s", "total_s"):
        assert k in r["timings"]
    events = [json.loads(line.split(" ", 1)[1]) for line in stdout.splitlines()
              if line.startswith("@@spark-nvfp4 ")]
    prog = [e for e in events if e["event"] == "progress" and e["stage"] == "evaluate"]
    assert prog[-1]["done"] == prog[-1]["total"] == r["windows"]
    assert events[-1]["event"] == "done"


def test_rounding_rules_of_the_payload():
    snippet = """
import json, torch
from container_payload.numerics.emulate import e2m1_round, fp8_e4m3
ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 1e9]
ties = ties + [-t for t in ties]
g = torch.Generator().manual_seed(0)
r = (torch.rand(20000, generator=g) * 7).tolist()
s = (torch.rand(20000, generator=g) * 500).tolist() + (torch.rand(2000, generator=g) * 0.03).tolist()
print(json.dumps({"ties": e2m1_round(torch.tensor(ties)).tolist(), "r": r,
    "r_q": e2m1_round(torch.tensor(r)).tolist(), "s": s, "s_q": fp8_e4m3(torch.tensor(s)).tolist(),
    "fp8_cases": fp8_e4m3(torch.tensor([1.0625, 1.1875, 2**-10, 3 * 2**-10, 300.0, 464.0, 500.0, 0.0])).tolist()}))
"""
    got = json.loads(run_ref(["-c", snippet]).stdout.strip().splitlines()[-1])
    assert got["ties"][:9] == [0, 1, 1, 2, 2, 4, 4, 6, 6]
    assert got["ties"][9:] == [0, -1, -1, -2, -2, -4, -4, -6, -6]
    # ties to the even mantissa, subnormals, and saturation (no NaN) at 448
    assert got["fp8_cases"] == [1.0, 1.25, 0.0, 2**-8, 288.0, 448.0, 448.0, 0.0]
    # the payload (float32 ladder) against this file's nearest-level search
    r = np.array(got["r"], dtype=np.float32).astype(np.float64)
    assert np.array_equal(np.array(got["r_q"]), round_e2m1(r))
    s = np.array(got["s"], dtype=np.float32).astype(np.float64)
    assert np.array_equal(np.array(got["s_q"]), round_e4m3(s))


def test_e2m1_float32_path_every_bf16_value_and_signed_zeros():
    """The float32 rounding (emulate._e2m1_round_f32: add and subtract 2**22..2**24) on every
    finite bf16 value, scaled into and past the grid, and on float32 values of every binade,
    against this file's nearest-level search, bit for bit including the sign of zero (a -0 in
    place of a +0 would change no number but the checkpoint's bytes). And a block whose scale
    rounds to 0 quantizes to +0 (fake_quant_nvfp4 divides it by inf instead of a where)."""
    snippet = """
import json, torch
from container_payload.numerics.emulate import e2m1_round, fake_quant_nvfp4
bf = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
bf = bf[torch.isfinite(bf)]
g = torch.Generator().manual_seed(1)
wide = torch.randn(200000, generator=g) * torch.exp2(torch.randint(-140, 10, (200000,), generator=g).float())
ys = torch.cat([bf, bf * 2.0**-120, wide, torch.tensor([0.0, -0.0, 1e-45, -1e-45, 6.0, -6.0, 1e30, -1e30])])
q = e2m1_round(ys)
zero = fake_quant_nvfp4(torch.tensor([[1e-30] * 8 + [-1e-30] * 8], dtype=torch.float32), torch.tensor(1.0))
print(json.dumps({"y": ys.tolist(), "q": q.tolist(), "neg_zero": torch.signbit(q).logical_and(q == 0).nonzero().flatten().tolist(),
                  "zero_block": zero.tolist()[0], "zero_block_signbits": torch.signbit(zero).any().item()}))
"""
    got = json.loads(run_ref(["-c", snippet]).stdout.strip().splitlines()[-1])
    y = np.array(got["y"], dtype=np.float32).astype(np.float64)
    want = round_e2m1(y)
    assert np.array_equal(np.array(got["q"]), want)
    # -0 exactly where the reference's where(y < 0, -q, q) gives one: a negative y that rounds to 0
    assert set(got["neg_zero"]) == set(np.nonzero((y < 0) & (want == 0))[0].tolist())
    assert got["zero_block"] == [0.0] * 16 and got["zero_block_signbits"] is False


def test_float64_helpers_self_check():
    assert list(round_e2m1(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5]))) == [0, 1, 1, 2, 2, 4, 4, 6]
    assert list(decode_e2m1(np.arange(16, dtype=np.uint8))) == [0, .5, 1, 1.5, 2, 3, 4, 6,
                                                                 0, -.5, -1, -1.5, -2, -3, -4, -6]
    codes = np.arange(256, dtype=np.uint8)
    vals = decode_e4m3(codes[(codes & 0x7F) != 0x7F])  # 0x7F / 0xFF are NaN
    pos = vals[vals > 0]
    assert pos.max() == 448 and pos.min() == 2.0 ** -9
    assert np.array_equal(round_e4m3(pos), pos)  # every E4M3 value is a fixed point


def test_awq_pre_quant_scale_by_hand():
    # ModelOpt's NVFP4_AWQ export (model_calib.apply_pre_quant_scale_and_smooth): the weight is
    # stored divided by the AWQ scale, `pre_quant_scale` multiplies the input before the input
    # quantizer. Its NVFP4 fake quant needs CUDA, so the check here is by hand: the emulated
    # layer on x must equal the plain W4A4 layer on x * s, and differ from it on x.
    snippet = """
import json, torch
from container_payload.numerics.emulate import EmulatedLinear, detect_format, fake_quant_nvfp4
g = torch.Generator().manual_seed(0)
w, x = torch.randn(8, 32, generator=g), torch.randn(3, 32, generator=g)
s = torch.rand(32, generator=g) * 3 + 0.25
scale = torch.tensor(0.01)
awq = EmulatedLinear(w, None, "nvfp4", "nvfp4", scale, pre_quant_scale=s.to(torch.bfloat16))
plain = EmulatedLinear(w, None, "nvfp4", "nvfp4", scale)
hand = fake_quant_nvfp4(x * s.to(torch.bfloat16).float(), scale) @ w.T
fmt = detect_format({"quant_method": "modelopt", "quant_algo": "NVFP4_AWQ"})
print(json.dumps({"hand": (awq(x) - hand).abs().max().item(), "shifted": (awq(x) - plain(x * s.to(torch.bfloat16).float())).abs().max().item(),
    "unscaled": (awq(x) - plain(x)).abs().max().item(), "act": fmt.act_quant, "algo": fmt.algo}))
"""
    got = json.loads(run_ref(["-c", snippet]).stdout.strip().splitlines()[-1])
    assert got["hand"] == 0 and got["shifted"] == 0
    assert got["unscaled"] > 1e-3
    assert got["act"] is True and got["algo"] == "NVFP4_AWQ"
