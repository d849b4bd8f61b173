# spark-nvfp4. Two commands for a newcomer:
#   make demo   set everything up and quantize the embedded model (CPU, no hub)
#   make test   run the test suite (sets up its own reference venvs first)
# The DGX Spark flow:  make quantize MODEL=deepseek-ai/DeepSeek-R1-Distill-Llama-8B

PYTHON   ?= python3
VENV     ?= .venv
LAUNCHER := $(VENV)/bin/launcher
MODEL    ?= embedded
OUTPUT   ?= out/$(notdir $(MODEL))-NVFP4
IMAGE    ?= auto
RECIPE   ?= smooth-gptq-seq-mp
CALIB    ?= builtin
SAMPLES  ?= 128
SEQ_LEN  ?= 512
EXTRA    ?=
PYTEST_ARGS ?=

.PHONY: bench-recipes demo setup bootstrap venv venvs image image-2025 quantize verify test clean-venvs

demo: setup image quantize

# make demo calibrates on 32 x 512 tokens, a quarter of the Spark default's 128 x 512 (make quantize),
# so that it ends within about 10 minutes on 2 CPU cores; what that costs in KL is measured in
# benchmarks/results/demo-calibration.md. `make demo DEMO_SAMPLES=128` runs the default's calibration.
DEMO_SAMPLES ?= 32
demo: SAMPLES = $(DEMO_SAMPLES)

setup: bootstrap venv
	$(VENV)/bin/python -c "from launcher.sources import assets; assets.fetch_all()"

bootstrap:
	scripts/bootstrap-host.sh

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

# Reference tools in their own venvs (tests and benchmarks): ModelOpt pinned like
# the stand-in image, and llm-compressor (it needs other transformers versions).
venvs: .venv-mo/.installed .venv-llmc/.installed
.venv-mo/.installed: docker/requirements-standin.txt
	$(PYTHON) -m venv .venv-mo
	.venv-mo/bin/pip install -q -r docker/requirements-standin.txt pytest
	touch $@
.venv-llmc/.installed:
	$(PYTHON) -m venv .venv-llmc
	.venv-llmc/bin/pip install -q torch==2.13.0 llmcompressor==0.14.0.1
	touch $@

image:
	docker/build.sh

# The 2025 stack of NVIDIA's images (ModelOpt 0.37, transformers 4.57): what users really have.
image-2025:
	docker/build.sh spark-nvfp4/trtllm-standin:2025 docker/requirements-standin-2025.txt

quantize: venv
	$(LAUNCHER) quantize --model $(MODEL) --output $(OUTPUT) --image $(IMAGE) --calib $(CALIB) \
	  --calib-samples $(SAMPLES) --calib-seq-len $(SEQ_LEN) $(if $(RECIPE),--recipe $(RECIPE)) $(EXTRA)
	$(LAUNCHER) verify $(OUTPUT)

verify: venv
	$(LAUNCHER) verify $(OUTPUT)

# The recipes table (benchmarks/results/recipes-table.md): the CPU recipes plus llm-compressor on
# the embedded model, same calibration windows as make quantize (36 min on 2 cores).
bench-recipes: venv venvs
	.venv-mo/bin/python benchmarks/recipes.py --samples $(SAMPLES) --seq-len $(SEQ_LEN) $(BENCH_ARGS)

test: venv venvs
	scripts/bootstrap-host.sh --test
	docker image inspect spark-nvfp4/trtllm-standin:cpu >/dev/null 2>&1 || $(MAKE) image
	docker image inspect spark-nvfp4/trtllm-standin:2025 >/dev/null 2>&1 || $(MAKE) image-2025
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean-venvs:
	rm -rf .venv .venv-mo .venv-llmc
