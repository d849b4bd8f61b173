#!/bin/bash
# benchmarks/peers_gpu.py on the device machine, whose calls carry at most 64 MiB: the embedded
# GGUF (98 MB) travels in two halves, in two calls made back to back while the machine is warm
# (its /tmp persists between them). Run from this repo's root there:
#   call 1: bash benchmarks/peers_gpu.sh setup A_DIR    # A_DIR: whl-mo/, whl-llmc/, texts.tar.xz, tiny.tar.xz, gguf.part-a
#           bash benchmarks/peers_gpu.sh smoke          # every row on a 2-layer random model (tiny.tar.xz)
#   call 2: bash benchmarks/peers_gpu.sh full B_DIR     # B_DIR: gguf.part-b; then the whole table
# whl-mo: nvidia-modelopt 0.47.0, omegaconf, pulp (other platforms' solvers removed), gguf,
# transformers 5.14.1 + tokenizers 0.22.2 (the payload's pins); whl-pyd: pydantic 2.14.4, pydantic-core
# 2.50.5, annotated-types, typing-inspection (the device image has no pydantic; both sites need it); whl-llmc: llmcompressor 0.14.0.1,
# compressed-tensors 0.19.0, loguru, datasets, dill, multiprocess, auto-round (the image's
# transformers 5.17 serves it). Results go to $OUT.
set -e
S=/tmp/scratch
OUTDIR=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 SPARK_NVFP4_HOME=$S/home
GGUF=$S/home/assets/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
pip_in() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$1" "${@:2}"; }
run_peers() {  # ARGS... -> peers_gpu.py in the ModelOpt site, llm-compressor in its own
  PYTHONPATH=/tmp/site-mo:$PWD python3 benchmarks/peers_gpu.py --llmc-pythonpath /tmp/site-llmc "$@"
}
logs() {  # the run's logs and small JSON files (no weights, no tokenizers) -> $OUT/NAME-logs.tgz
  (cd $S/$1 && find . \( -name '*.log' -o -name '*.json' \) ! -name 'tokenizer*' ! -name 'model.safetensors*' \
    | tar czf "$OUTDIR/$1-logs.tgz" -T -) || true
}
case "$1" in
setup)
  mkdir -p $S/home/assets
  cp "$2/gguf.part-a" $S/
  tar xJf "$2/texts.tar.xz" -C $S/home/assets
  tar xJf "$2/tiny.tar.xz" -C $S
  pip_in /tmp/site-mo "$2"/whl-mo/*.whl
  pip_in /tmp/site-llmc "$2"/whl-llmc/*.whl "$2"/whl-pyd/*.whl
  pip_in /tmp/site-mo "$2"/whl-pyd/*.whl
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  PYTHONPATH=/tmp/site-mo python3 -c "import torch, transformers, modelopt, modelopt.torch.quantization; print('mo', torch.__version__, transformers.__version__, modelopt.__version__, torch.cuda.get_device_name())"
  PYTHONPATH=/tmp/site-llmc python3 -c "import transformers, llmcompressor, compressed_tensors; print('llmc', transformers.__version__, llmcompressor.__version__, compressed_tensors.__version__)"
  ;;
smoke)
  rm -rf $S/smoke && mkdir -p $S/smoke/smol-bf16 && cp $S/tiny/* $S/smoke/smol-bf16/
  run_peers --out $S/smoke --samples 8 --seq-len 128 --eval-tokens 1024 --jobs 4 --row-timeout 240 \
    --results "$OUTDIR/smoke" "${@:2}" 2>&1 | tee "$OUTDIR/smoke.log" | grep -v '^@@spark' || true
  logs smoke
  ;;
full)
  cat $S/gguf.part-a "$2/gguf.part-b" > $GGUF
  echo "$GGUF_SHA256  $GGUF" | sha256sum -c
  run_peers --out $S/full --jobs "${JOBS:-3}" --results "$OUTDIR/peers-gpu-embedded" "${@:3}" 2>&1 \
    | tee "$OUTDIR/full.log" | grep -v '^@@spark' || true
  logs full
  ;;
*)
  echo "usage: $0 setup A_DIR | smoke [ARGS] | full B_DIR [ARGS]" >&2; exit 2 ;;
esac
