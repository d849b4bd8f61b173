"""Peak RSS of the payload's fixed runtime: torch, transformers and ModelOpt imported, the
tokenizer loaded and the calibration text tokenized, the streamed mode's empty model skeleton
(meta device: modules, no weights). Prints bytes.

    python runtime_rss.py MODEL_DIR TEXT SAMPLES SEQ_LEN
"""
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from container_payload.pipelines import calibration, loading  # noqa: E402
from container_payload.core.contract import Calibration  # noqa: E402

model_dir, text, samples, seq_len = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tokenizer = loading.load_tokenizer(model_dir)
loading.import_modelopt()
import transformers  # noqa: E402,F401

calibration.calibration_windows(tokenizer, Calibration(source=text, samples=samples, seq_len=seq_len))
from container_payload.pipelines import streaming  # noqa: E402

streaming.skeleton(model_dir)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
