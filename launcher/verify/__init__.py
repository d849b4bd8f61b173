"""Check an NVFP4 checkpoint against what the serving engines require, on the host
(the CLI: `launcher verify CKPT [--json-out OUT]`).

Two formats, told apart by config.json: ModelOpt's unified Hugging Face checkpoint
(docs/nvfp4-format.md §5) and compressed-tensors, llm-compressor's output (docs/nvfp4-format.md §6).
Only safetensors headers and the small scale tensors are read, never the packed
weights' data, so an 8B checkpoint costs a few MB of reads. No torch: the host never
has it; numpy + ml_dtypes decode what little is read.

Every finding is a `Problem(tensor_or_file, message)`; the checkpoint passes only
when there is none. The modules, each importing only those above it:

  layouts            the formats' names, tensor layouts, fused groups
  findings           Problem, Report (and its deadline), the summary, printed and JSON reports
  checkpoint_files   the folder as hostile input: JSON files, safetensors headers, the index
  scales             F32 and FP8 E4M3 scale values and their checks
  excludes           the exclude/ignore list, its regexes under a timeout
  configs            each format's quantization config; which format a checkpoint is
  tensors            quantized Linears, fused scales, unquantized Linears, KV cache scales
  experts            the experts of each MoE layer
  mixed_precision    ModelOpt's MIXED_PRECISION (per-layer formats)
  checkpoint         verify_checkpoint: all of the above, in order
"""
from .checkpoint import verify_checkpoint
from .checkpoint_files import safetensors_header
from .findings import MAX_PRINTED, Problem, Report, print_report, summary, write_report

__all__ = ["MAX_PRINTED", "Problem", "Report", "print_report", "safetensors_header", "summary",
           "verify_checkpoint", "write_report"]
