"""How a recipe's steps run over a model: loading (direct GPU reads, the embedded GGUF),
calibration batches, and the two pipelines, whole-model and layer-streamed."""
