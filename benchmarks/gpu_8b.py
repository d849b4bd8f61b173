"""GPU benchmark: our payload vs the hf_ptq.py example flow on an 8B Llama (docs/decisions.md, issue 6).

Two steps:

  python3 benchmarks/gpu_8b.py prepare [--wheels]   # here, on the CPU: tokenizer + calibration text
      -> .bench/tokenizer/ (byte-level BPE, 32k vocab, trained with `tokenizers` on .bench/calib.txt)
      -> .bench/calib.txt  (~3 MB of text: enough for 512 x 512 tokens)
      -> .bench/whl/       (--wheels: what the device image lacks, ~36 MB; install there with
                            pip install --no-index --no-deps --target /tmp/site .bench/whl/*.whl)
  python3 benchmarks/gpu_8b.py run --out DIR [--tiny]   # on the device machine (carry .bench, .whl)
      1. disk speed: write a big file (fsync), evict it, read it back
      2. a random-weight checkpoint with DeepSeek-R1-Distill-Llama-8B's exact config (Llama-3.1-8B
         shapes, bf16, 4 safetensors shards, N(0, 0.02) weights with sparse outliers), made on the
         GPU shard by shard, plus the tokenizer
      3. our payload: python3 -m container_payload.quantize job.json (nvfp4, default recipe,
         512 x 512 calibration, batch auto)
      4. benchmarks/hf_ptq_flow.py on the same folder and the same calibration windows
      5. compare the two checkpoints tensor by tensor; write DIR/gpu_8b.json and DIR/gpu_8b.md

Before 3 and 4 the checkpoint's pages are evicted from the page cache (fsync + fadvise DONTNEED,
plus drop_caches when allowed) so both flows read it from disk. --tiny runs the same script with a
2-layer, narrow model on the CPU (a smoke test of the whole pipeline).
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench"

# DeepSeek-R1-Distill-Llama-8B's config.json (Llama-3.1-8B shapes); token ids are remapped to
# our stand-in tokenizer's special tokens.
R1_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
TINY_OVERRIDES = {"hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2}


# ----------------------------------------------------------------------------- prepare (CPU)

# What the device machine's image lacks (it has torch, safetensors, huggingface_hub, accelerate):
# ModelOpt and the transformers the stand-in image pins (docker/requirements-standin.txt), and
# the packages ModelOpt and our contract import that the image does not hold, at the versions
# the reference venv (.venv-mo) resolved.
DEVICE_WHEELS_FROM_STANDIN = ("nvidia-modelopt", "transformers", "tokenizers")
DEVICE_WHEELS = ("omegaconf==2.4.0", "pulp==3.3.2", "pydantic==2.14.4", "pydantic-core==2.50.5",
                 "annotated-types==0.8.0", "typing-inspection==0.4.5")


def device_wheels(dest: Path) -> None:
    """Downloads DEVICE_WHEELS (and the stand-in's pins of DEVICE_WHEELS_FROM_STANDIN) for the
    device's Python 3.12 on x86-64 into dest: nothing is fetched there."""
    pins = [line.split("#")[0].strip() for line in (REPO / "docker" / "requirements-standin.txt").read_text().splitlines()]
    wanted = [p for p in pins if p.split("==")[0] in DEVICE_WHEELS_FROM_STANDIN] + list(DEVICE_WHEELS)
    platforms = [a for n in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1")
                 for a in ("--platform", f"{n}_x86_64")]
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *wanted],
                   check=True)
    print(f"wheels: {len(list(dest.glob('*.whl')))} in {dest} "
          f"({sum(f.stat().st_size for f in dest.glob('*.whl')) / 2**20:.0f} MiB)")


def prepare(args) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    BENCH.mkdir(exist_ok=True)
    calib = BENCH / "calib.txt"
    if not calib.exists():
        # Plain text that exists on any machine with our venv: transformers' modeling sources.
        import transformers
        root = Path(transformers.__file__).parent / "models"
        parts, size = [], 0
        for p in sorted(root.glob("*/modeling_*.py")):
            s = p.read_text(encoding="utf-8", errors="replace")
            parts.append(s)
            size += len(s)
            if size > args.text_bytes:
                break
        calib.write_text("\n\n".join(parts), encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train([str(calib)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[0], eos_token=special[1],
                                   model_max_length=131072)
    out = BENCH / "tokenizer"
    shutil.rmtree(out, ignore_errors=True)
    fast.save_pretrained(out)
    n = len(fast(calib.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    print(f"tokenizer: vocab {fast.vocab_size}, calib.txt {calib.stat().st_size} bytes = {n} tokens -> {out}")
    if args.wheels:
        device_wheels(BENCH / "whl")


# ----------------------------------------------------------------------------- helpers

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def evict(paths, everything: bool = True) -> dict:
    """Push the files' pages out of the page cache so the next read comes from the disk;
    `everything` also drops the rest of the cache (Python libraries included: a cold start)."""
    os.sync()
    n = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            n += 1
        except OSError:
            pass
    dropped = False
    if not everything:
        return {"fadvise_files": n, "drop_caches": dropped}
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        dropped = True
    except OSError:
        pass
    return {"fadvise_files": n, "drop_caches": dropped}


def disk_speed(folder: Path, gib: float) -> dict:
    """Sequential write (fsync'd) and cold read of one big file, in bytes per second."""
    path = folder / "disk-speed.bin"
    chunk = os.urandom(64 << 20)
    n = int(gib * (1 << 30)) // len(chunk)
    t = time.time()
    with open(path, "wb", buffering=0) as f:
        for _ in range(n):
            f.write(chunk)
        os.fsync(f.fileno())
    w = n * len(chunk) / (time.time() - t)
    ev = evict([path])
    t = time.time()
    got = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(64 << 20)
            if not b:
                break
            got += len(b)
    r = got / (time.time() - t)
    path.unlink()
    return {"bytes": got, "write_Bps": w, "read_Bps": r, "evict": ev}


def write_checkpoint(folder: Path, config: dict, device: str, shard_bytes: int, seed: int = 0) -> dict:
    """Random bf16 weights with the model's exact tensor names and shapes, shard by shard."""
    import torch
    from safetensors.torch import save_file

    H, I, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    nh, nkv, V = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    hd = H // nh
    names = [("model.embed_tokens.weight", (V, H), "w")]
    for i in range(L):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (H,), "n"),
                  (p + "self_attn.q_proj.weight", (nh * hd, H), "w"),
                  (p + "self_attn.k_proj.weight", (nkv * hd, H), "w"),
                  (p + "self_attn.v_proj.weight", (nkv * hd, H), "w"),
                  (p + "self_attn.o_proj.weight", (H, nh * hd), "w"),
                  (p + "post_attention_layernorm.weight", (H,), "n"),
                  (p + "mlp.gate_proj.weight", (I, H), "w"),
                  (p + "mlp.up_proj.weight", (I, H), "w"),
                  (p + "mlp.down_proj.weight", (H, I), "w")]
    names += [("model.norm.weight", (H,), "n"), ("lm_head.weight", (V, H), "w")]

    g = torch.Generator(device=device).manual_seed(seed)
    shards, cur, cur_bytes = [], [], 0
    for name, shape, kind in names:
        nbytes = 2
        for s in shape:
            nbytes *= s
        if cur and cur_bytes + nbytes > shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape, kind))
        cur_bytes += nbytes
    shards.append(cur)

    folder.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape, kind in shard:
            if kind == "n":
                t = 1.0 + 0.05 * torch.randn(shape, generator=g, device=device, dtype=torch.float32)
            else:
                t = 0.02 * torch.randn(shape, generator=g, device=device, dtype=torch.float32)
                # sparse outliers (~1e-5 of the entries at 5-25x the std), like real LLM weights
                m = t.numel()
                idx = torch.randint(0, m, (max(1, m // 100_000),), generator=g, device=device)
                sign = torch.randint(0, 2, idx.shape, generator=g, device=device) * 2 - 1
                mag = 0.1 + 0.4 * torch.rand(idx.shape, generator=g, device=device)
                t.view(-1)[idx] = sign * mag
            tensors[name] = t.to(torch.bfloat16).cpu()
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
         "do_sample": True, "temperature": 0.6, "top_p": 0.95}, indent=2))
    for p in (BENCH / "tokenizer").iterdir():
        shutil.copy(p, folder / p.name)
    return {"bytes": total, "shards": len(shards), "tensors": len(names)}


def dir_bytes(folder: Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix))


def run_logged(cmd, log_path: Path, env=None) -> tuple[int, float, str]:
    # streamed line by line, so a run cut short by a time limit still leaves its log
    t = time.time()
    lines = []
    with open(log_path, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in p.stdout:
            f.write(line)
            f.flush()
            lines.append(line)
        p.wait()
    return p.returncode, time.time() - t, "".join(lines)


def payload_stage_times(stdout: str) -> dict:
    """Calibration-loop time from the payload's own events (first to last calibrate progress)."""
    t0 = t1 = None
    for line in stdout.splitlines():
        if not line.startswith("@@spark-nvfp4 "):
            continue
        ev = json.loads(line[len("@@spark-nvfp4 "):])
        if ev.get("event") == "progress" and ev.get("stage") == "calibrate":
            if ev["done"] == 0 and t0 is None:
                t0 = ev["t"]
            if ev["done"] == ev["total"]:
                t1 = ev["t"]
    return {"calibrate_s": round(t1 - t0, 3)} if t0 is not None and t1 is not None else {}


def compare(a: Path, b: Path) -> dict:
    """Tensor by tensor: weight / weight_scale / weight_scale_2 (and everything else but
    input_scale) byte-identical; input_scale within 1%."""
    import torch
    from safetensors import safe_open

    def index(folder):
        out = {}
        for p in sorted(folder.glob("*.safetensors")):
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118
                    out[k] = p
        return out

    ia, ib = index(a), index(b)
    res = {"keys_a": len(ia), "keys_b": len(ib), "only_a": sorted(set(ia) - set(ib))[:10],
           "only_b": sorted(set(ib) - set(ia))[:10], "identical": {}, "different": {},
           "input_scale_max_rel_diff": 0.0, "input_scale_count": 0, "different_examples": []}
    handles = {}

    def get(idx, k):
        p = idx[k]
        if p not in handles:
            handles[p] = safe_open(str(p), framework="pt")
        return handles[p].get_tensor(k)

    for k in sorted(set(ia) & set(ib)):
        kind = k.rsplit(".", 1)[-1]
        ta, tb = get(ia, k), get(ib, k)
        if kind == "input_scale":
            d = ((ta.float() - tb.float()).abs() / tb.float().abs().clamp_min(1e-30)).max().item()
            res["input_scale_max_rel_diff"] = max(res["input_scale_max_rel_diff"], d)
            res["input_scale_count"] += 1
            continue
        same = ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(
            ta.contiguous().reshape(-1).view(torch.uint8), tb.contiguous().reshape(-1).view(torch.uint8))
        bucket = res["identical"] if same else res["different"]
        bucket[kind] = bucket.get(kind, 0) + 1
        if not same and len(res["different_examples"]) < 10:
            res["different_examples"].append(k)
    res["byte_identical"] = not res["different"] and not res["only_a"] and not res["only_b"]
    res["input_scale_within_1pct"] = res["input_scale_max_rel_diff"] <= 0.01
    return res


def card() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "host": platform.node(),
            "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_bytes=p.total_memory, cuda=torch.version.cuda)
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import modelopt
        import transformers
        info.update(modelopt=modelopt.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return info


# ----------------------------------------------------------------------------- run (device)

def run(args) -> int:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cuda = torch.cuda.is_available()
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name] + sys.argv), "card": card(),
           "tiny": args.tiny, "samples": args.samples, "seq_len": args.seq_len}

    def save():
        (out / "gpu_8b.json").write_text(json.dumps(res, indent=2, default=str))

    log(f"card: {res['card']}")
    save()

    # 1. disk speed
    res["disk"] = disk_speed(work, 0.25 if args.tiny else args.disk_gib)
    log(f"disk: write {res['disk']['write_Bps']/1e9:.2f} GB/s, read {res['disk']['read_Bps']/1e9:.2f} GB/s "
        f"(evict {res['disk']['evict']})")
    save()

    # 2. the random 8B checkpoint
    cfg = dict(R1_8B_CONFIG)
    if args.tiny:
        cfg.update(TINY_OVERRIDES)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(BENCH / "tokenizer")
    cfg["bos_token_id"], cfg["eos_token_id"] = tok.bos_token_id, tok.eos_token_id
    model_dir = work / "r1-distill-llama-8b-random"
    t = time.time()
    res["checkpoint"] = write_checkpoint(model_dir, cfg, "cuda" if cuda else "cpu",
                                         shard_bytes=(4_976_000_000 if not args.tiny else 40_000_000))
    res["checkpoint"]["write_s"] = round(time.time() - t, 3)
    log(f"checkpoint: {res['checkpoint']}")
    save()
    in_bytes = dir_bytes(model_dir, ".safetensors")

    calib = BENCH / "calib.txt"
    flows = {}
    # 3. our payload
    out_payload = work / "out-payload"
    job = {"model_dir": str(model_dir), "output_dir": str(out_payload), "format": "nvfp4",
           "recipe": "default", "kv_cache": "none", "device": "auto",
           "calibration": {"source": str(calib), "samples": args.samples, "seq_len": args.seq_len,
                           "batch_size": "auto"}}
    job.update(json.loads(args.job_extra))
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job, indent=2))
    res["evict"] = args.evict
    if args.evict == "checkpoint":  # software warm: what both flows import, imported once
        subprocess.run([sys.executable, "-c", "import torch, transformers.models.llama.modeling_llama, "
                        "modelopt.torch.quantization, modelopt.torch.export; torch.zeros(1, device='cuda')"
                        if cuda else "import torch, transformers, modelopt.torch.quantization"], check=True)
    order = ["payload", "hf_ptq"] if not args.baseline_first else ["hf_ptq", "payload"]
    if args.variants_only:
        order = []
    variants = dict(v.split("=", 1) for v in args.variant)
    if args.low_memory_variant:
        variants["lowmem"] = '{"low_memory": true}'
    order += [f"payload_{name}" for name in variants]
    def llmc_flow():
        # llm-compressor's GPTQ oneshot on the same folder and windows (docs/decisions.md, issue 14's peer)
        evict(list(model_dir.glob("*.safetensors")), everything=args.evict == "all")
        torch.cuda.empty_cache() if cuda else None
        log("llm-compressor GPTQ: start")
        env = dict(os.environ)
        if args.llmc_pythonpath is not None:  # its own packages (another transformers than ours)
            env["PYTHONPATH"] = args.llmc_pythonpath
        metrics = work / "llmc_gptq.json"
        rc, wall, stdout = run_logged(
            [args.llmc_python or sys.executable, str(REPO / "benchmarks" / "llmc_gptq.py"), str(model_dir), str(calib),
             str(args.samples), str(args.seq_len), str(metrics)], out / "llmc_gptq.log", env=env)
        m = json.loads(metrics.read_text()) if rc == 0 else {}
        res["llmc_gptq"] = {"rc": rc, "wall_s": round(wall, 3), **m}
        log(f"llm-compressor GPTQ: rc {rc}, wall {wall:.1f} s, {json.dumps(m)}")
        if rc != 0:
            log(stdout[-3000:])
        save()

    if args.llmc_gptq and args.llmc_first:
        llmc_flow()
    for flow in order:
        ev = evict(list(model_dir.glob("*.safetensors")), everything=args.evict == "all")
        torch.cuda.empty_cache() if cuda else None
        if flow.startswith("payload"):
            log(f"{flow}: start (evict {ev})")
            this_job, env = dict(job), None
            if flow != "payload":
                extra = json.loads(variants[flow[len("payload_"):]])
                if "env" in extra:  # a variant's environment, e.g. {"env": {"CUDA_LAUNCH_BLOCKING": "1"}}
                    env = {**os.environ, **extra.pop("env")}
                this_job.update(extra, output_dir=str(work / f"out-{flow}"))
            jp = work / f"job-{flow}.json"
            jp.write_text(json.dumps(this_job, indent=2))
            this_out = Path(this_job["output_dir"])
            rc, wall, stdout = run_logged([sys.executable, "-m", "container_payload.quantize", str(jp)],
                                          out / f"{flow}.log", env=env)
            r = json.loads((this_out / "result.json").read_text()) if rc == 0 else {}
            timings = dict(r.get("timings", {}))
            timings.update({k: v for k, v in payload_stage_times(stdout).items() if k not in timings})
            flows[flow] = {"rc": rc, "wall_s": round(wall, 3), "timings": timings,
                                "batch_size": r.get("calibration", {}).get("batch_size"),
                                "loader": r.get("loader"),
                                "windows_sha256": r.get("calibration", {}).get("windows_sha256"),
                                "gpu_peak_bytes": r.get("memory", {}).get("gpu_peak_bytes"),
                                "host_rss_peak_bytes": r.get("memory", {}).get("host_rss_peak_bytes"),
                                "out_bytes": dir_bytes(this_out, ".safetensors") if rc == 0 else None}
        else:
            out_ref = work / "out-hf_ptq"
            log(f"hf_ptq flow: start (evict {ev})")
            rc, wall, stdout = run_logged(
                [sys.executable, str(REPO / "benchmarks" / "hf_ptq_flow.py"), "--model", str(model_dir),
                 "--export", str(out_ref), "--calib", str(calib), "--samples", str(args.samples),
                 "--seq-len", str(args.seq_len), "--metrics", str(work / "hf_ptq_metrics.json")],
                out / "hf_ptq.log")
            m = json.loads((work / "hf_ptq_metrics.json").read_text()) if rc == 0 else {}
            flows["hf_ptq"] = {"rc": rc, "wall_s": round(wall, 3), **m,
                               "out_bytes": dir_bytes(out_ref, ".safetensors") if rc == 0 else None}
        log(f"{flow}: rc {rc}, wall {wall:.1f} s, {json.dumps(flows[flow].get('timings'))}")
        if rc != 0:
            log(stdout[-3000:])
        res["flows"] = flows
        save()

    if args.llmc_gptq and not args.llmc_first:
        llmc_flow()

    # 5. compare + I/O floor
    if "hf_ptq" in flows and all(f["rc"] == 0 for f in flows.values()):
        t = time.time()
        res["compare"] = compare(out_payload, work / "out-hf_ptq")
        res["compare"]["seconds"] = round(time.time() - t, 1)
        for flow in (f for f in flows if f.startswith("payload_")):
            key = "compare_" + flow[len("payload_"):]
            res[key] = compare(work / f"out-{flow}", work / "out-hf_ptq")
            log(f"{key}: byte_identical={res[key]['byte_identical']} "
                f"input_scale max rel diff {res[key]['input_scale_max_rel_diff']:.2e}")
        log(f"compare: byte_identical={res['compare']['byte_identical']} "
            f"input_scale max rel diff {res['compare']['input_scale_max_rel_diff']:.2e} "
            f"identical {res['compare']['identical']} different {res['compare']['different']}")
    out_b = flows.get("payload", {}).get("out_bytes") or 0
    d = res["disk"]
    res["io_floor"] = {"bytes_in": in_bytes, "bytes_out": out_b,
                       "seconds": round(in_bytes / d["read_Bps"] + out_b / d["write_Bps"], 3)}
    save()
    md = render_md(res) + recipe_cost_md(res)
    (out / "gpu_8b.md").write_text(md)
    print(md)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(f["rc"] == 0 for f in flows.values()) else 1


def render_md(res: dict) -> str:
    f = res.get("flows", {})
    names = [n for n in ("payload", "hf_ptq") if n in f] + [n for n in f if n.startswith("payload_")]
    heads = {"payload": "payload", "hf_ptq": "hf_ptq flow", "payload_lowmem": "payload, low_memory"}
    heads.update({n: "payload, " + n[len("payload_"):] for n in names if n not in heads})
    floor = res.get("io_floor", {}).get("seconds")
    gib = 1 << 30

    def tm(key):
        out = []
        for n in names:
            v = f[n].get("timings", {}).get(key)
            out.append("-" if v is None else f"{v:.1f}")
        return out

    def other(fn):
        return [fn(f[n]) for n in names]

    def mem(v):
        return "-" if not v else f"{v / gib:.1f} GiB"

    rows = [("python start + imports before the first stage",
             other(lambda x: f"{x['wall_s'] - x.get('timings', {}).get('total_s', 0):.1f}" if "import_s" not in x.get("timings", {})
                   else f"{x['wall_s'] - x['timings']['total_s'] + x['timings']['import_s']:.1f}")),
            ("payload: tokenizer + transformers + ModelOpt imports (weights read meanwhile)", tm("imports_s")),
            ("load (weights to GPU; payload: what remains after its imports)", tm("load_s")),
            ("tokenize (payload: what remains after its imports)", tm("tokenize_s")),
            ("batch-size probe", tm("batch_probe_s")),
            ("preview before", tm("preview_before_s")),
            ("quantize (mtq.quantize, total)", tm("quantize_s")),
            ("  of which calibration forward loop", tm("calibrate_s")),
            ("summary + preview after", tm("preview_after_s")),
            ("export", tm("export_s")),
            ("wall, process start to exit", other(lambda x: f"{x.get('wall_s', 0):.1f}")),
            ("calibration batch size", other(lambda x: str(x.get("batch_size")))),
            ("peak GPU memory (max_memory_allocated)", other(lambda x: mem(x.get("gpu_peak_bytes")))),
            ("peak host RSS (ru_maxrss, mapped file pages included)", other(lambda x: mem(x.get("host_rss_peak_bytes")))),
            ("checkpoint written", other(lambda x: mem(x.get("out_bytes"))))]
    # The payload's timeline: when each step was done, in seconds from the start of its run().
    marks = []
    for n in names:
        for k in f[n].get("timings", {}).get("timeline", {}):
            if k not in marks:
                marks.append(k)
    rows += [(f"timeline: {k} at (s)", other(lambda x, k=k: "-" if k not in x.get("timings", {}).get("timeline", {})
                                                else f"{x['timings']['timeline'][k]:.1f}")) for k in marks]
    c = res.get("card", {})
    d = res.get("disk", {})
    p, h = f.get("payload", {}), f.get("hf_ptq", {})
    lines = ["# GPU benchmark: payload vs hf_ptq.py flow, random-weight R1-Distill-Llama-8B",
             "",
             f"- card: {c.get('gpu', 'cpu')} ({c.get('nvidia_smi', '')}), {c.get('cpus')} CPUs; "
             f"torch {c.get('torch')}, transformers {c.get('transformers')}, modelopt {c.get('modelopt')}",
             f"- date: {res.get('date')}; command: `{res.get('command')}`",
             "- before each flow: " + ("only the checkpoint's pages evicted; Python libraries warm (imported once)"
                                       if res.get("evict") == "checkpoint" else
                                       "the whole page cache dropped (cold start: checkpoint and libraries from disk)"),
             f"- calibration: {res.get('samples')} x {res.get('seq_len')} tokens, identical windows "
             f"(sha256 equal: {p.get('windows_sha256') == h.get('windows_sha256')})",
             f"- disk: write {d.get('write_Bps', 0)/1e9:.2f} GB/s (fsync), read {d.get('read_Bps', 0)/1e9:.2f} GB/s "
             f"(after eviction {d.get('evict')})",
             f"- I/O floor: {res.get('io_floor', {}).get('bytes_in', 0)/1e9:.2f} GB in / read speed + "
             f"{res.get('io_floor', {}).get('bytes_out', 0)/1e9:.2f} GB out / write speed = {floor} s",
             "", "| stage (seconds) | " + " | ".join(heads[n] for n in names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {a} | " + " | ".join(vals) + " |" for a, vals in rows]
    if p.get("wall_s") and h.get("wall_s") and floor:
        lines += ["", f"Speedup end to end (wall): {h['wall_s'] / p['wall_s']:.2f}x; "
                      f"payload wall / I/O floor: {p['wall_s'] / floor:.1f}x; "
                      f"hf_ptq wall / I/O floor: {h['wall_s'] / floor:.1f}x"]
    compares = [("compare", "payload")] + [(k, "payload, " + k[len("compare_"):]) for k in res
                                            if k.startswith("compare_")]
    for key, label in compares:
        cmp_ = res.get(key)
        if cmp_:
            lines += ["", f"Outputs ({label} vs hf_ptq): byte-identical (all tensors but input_scale): "
                          f"{cmp_['byte_identical']}; identical {cmp_['identical']}, different {cmp_['different']}; "
                          f"input_scale max relative difference {cmp_['input_scale_max_rel_diff']:.2e} over "
                          f"{cmp_['input_scale_count']} tensors (within 1%: {cmp_['input_scale_within_1pct']})"]
    return "\n".join(lines) + "\n"


def recipe_cost_md(res: dict) -> str:
    """Issue 14's ratios, when their flows ran: a variant's wall against the `default` variant's,
    and its quantize stage against llm-compressor's GPTQ oneshot."""
    flows, llmc = res.get("flows", {}), res.get("llmc_gptq")
    base = flows.get("payload_default")
    lines = []
    for name, f in flows.items():
        if name in ("payload_default", "hf_ptq") or f.get("rc") != 0:
            continue
        q = f.get("timings", {}).get("quantize_s")
        if base and base.get("rc") == 0:
            lines.append(f"- {name}: wall {f['wall_s']:.1f} s = {f['wall_s'] / base['wall_s']:.2f}x "
                         f"the default recipe's {base['wall_s']:.1f} s")
        if llmc and llmc.get("rc") == 0 and q is not None:
            lines.append(f"- {name}: quantize stage {q:.1f} s against llm-compressor GPTQ oneshot "
                         f"{llmc['quantize_s']:.1f} s ({q / llmc['quantize_s']:.2f}x)")
    if llmc:
        lines.append(f"- llm-compressor GPTQ: {json.dumps(llmc)}")
    return ("\n## Recipe cost (issue 14)\n\n" + "\n".join(lines) + "\n") if lines else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--vocab", type=int, default=32000)
    pp.add_argument("--wheels", action="store_true", help="also download the device's wheels into .bench/whl")
    pp.add_argument("--text-bytes", type=int, default=3_000_000)
    rp = sub.add_parser("run")
    rp.add_argument("--out", required=True)
    rp.add_argument("--work", default="/tmp/gpu8b")
    rp.add_argument("--tiny", action="store_true")
    rp.add_argument("--samples", type=int, default=512)
    rp.add_argument("--seq-len", type=int, default=512)
    rp.add_argument("--disk-gib", type=float, default=8.0)
    rp.add_argument("--job-extra", default="{}", help="JSON merged into the payload's job file")
    rp.add_argument("--baseline-first", action="store_true")
    rp.add_argument("--evict", choices=["all", "checkpoint"], default="all",
                    help="before each flow: drop the whole page cache (cold start, libraries too) or only "
                         "the checkpoint's pages (software warm: each flow's imports are run once first)")
    rp.add_argument("--keep", action="store_true")
    rp.add_argument("--llmc-gptq", action="store_true",
                    help="also run llm-compressor's GPTQ oneshot (benchmarks/llmc_gptq.py) on the same windows")
    rp.add_argument("--llmc-first", action="store_true", help="run llm-compressor before the payload flows")
    rp.add_argument("--llmc-python", default=None, help="interpreter for the llm-compressor run (default: this one)")
    rp.add_argument("--llmc-pythonpath", default=None,
                    help="PYTHONPATH for the llm-compressor run (its packages, when they differ from ours)")
    rp.add_argument("--variants-only", action="store_true",
                    help="run only the --variant payload columns (no default payload, no hf_ptq flow)")
    rp.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="also run the payload with JSON merged into its job (a column per variant)")
    rp.add_argument("--low-memory-variant", action="store_true",
                    help="also run the payload with low_memory: true (third column)")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
