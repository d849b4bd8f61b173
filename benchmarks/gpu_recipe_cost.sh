#!/bin/bash
# Issue 14's (docs/decisions.md) GPU must-show in one device call, at 8B shapes (benchmarks/gpu_8b.py's random-weight
# R1-Distill-Llama-8B checkpoint), 128 x 512 calibration windows, the same for every flow:
#   llm-compressor 0.14 GPTQ oneshot (NVFP4), then our `default` and `smooth-gptq-seq-mp` recipes
#   (the latter also with H and C in float32: the recipe parameter gptq.hessian_tf32=false).
# Its run is kept as benchmarks/results/gpu_8b-recipe-cost-tf32-fp32-vs-llmc.{md,json} ($OUT/r/gpu_8b.*).
# Run from a folder holding this repo plus .bench (gpu_8b.py prepare), .whl (ModelOpt 0.47,
# llm-compressor 0.14.0.1 and what the device image lacks) and .whl-mo (transformers 5.14.1 and
# its tokenizers, for our payload; llm-compressor uses the image's transformers).
OUTDIR=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
pip_in() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$1" "${@:2}"; }
pip_in /tmp/site .whl/*.whl || exit 1
pip_in /tmp/site-mo .whl-mo/*.whl || exit 1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
PYTHONPATH=/tmp/site-mo:/tmp/site:$PWD timeout ${BENCH_TIMEOUT:-540} python3 benchmarks/gpu_8b.py run \
  --out "$OUTDIR/r" --samples 128 --disk-gib 1 --evict checkpoint --variants-only \
  --variant 'default={"recipe": "default"}' \
  --variant 'seqmp={"recipe": "smooth-gptq-seq-mp"}' \
  --variant 'seqmp_fp32={"recipe": "smooth-gptq-seq-mp", "recipe_params": {"gptq.hessian_tf32": false}}' \
  --llmc-gptq --llmc-first --llmc-pythonpath "/tmp/site:$PWD" "$@" 2>&1 | tee "$OUTDIR/run.log"
