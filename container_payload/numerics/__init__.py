"""NVFP4 arithmetic (E2M1 grid, FP8 block scales) and the exact emulation of quantized
checkpoints (dense and MoE layers, the loader), plus the float32 Linear products on a CPU."""
