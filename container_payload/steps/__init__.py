"""The steps a recipe is made of, one concern a module: smoothing, GPTQ (reference and fast
kernel), layer-sequential GPTQ, the bf16 ranking, MoE layouts, ModelOpt's quantizers and config."""
