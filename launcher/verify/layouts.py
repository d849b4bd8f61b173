"""The checkpoint formats' names and layouts: what the checks of every module compare against."""
from __future__ import annotations

from dataclasses import dataclass

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"
GROUP_SIZE = 16
NVFP4_ALGOS = ("NVFP4", "W4A16_NVFP4")   # ModelOpt quant_algo: W4A4, weight-only
CT_FORMAT = "nvfp4-pack-quantized"
FLOAT_DTYPES = ("BF16", "F16", "F32")
# Engines fuse these into one GEMM, so the members must share their global scales.
FUSED = {"q_proj": "q_proj,k_proj,v_proj", "k_proj": "q_proj,k_proj,v_proj",
         "v_proj": "q_proj,k_proj,v_proj", "gate_proj": "gate_proj,up_proj",
         "up_proj": "gate_proj,up_proj", "w1": "w1,w3", "w3": "w1,w3"}  # w1/w3: Mixtral's expert gate/up


@dataclass(frozen=True)
class Layout:
    """The tensor names of one quantized Linear in one checkpoint format."""
    packed: str          # uint8 [out, in/2]
    global_scale: str    # float32, per tensor
    input_scale: str     # float32, per tensor, W4A4 only
    scalar_shape: tuple  # shape of the two per-tensor scales
    kv_owner: str        # where k_scale / v_scale hang: "proj" (k_proj.k_scale) or "attn"


LAYOUTS = {
    MODELOPT: Layout("weight", "weight_scale_2", "input_scale", (), "proj"),
    COMPRESSED_TENSORS: Layout("weight_packed", "weight_global_scale", "input_global_scale", (1,), "attn"),
}
