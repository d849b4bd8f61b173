"""Is a KL change real? Per-window KLs of two evaluations of the same text, paired.

    python3 benchmarks/kl_paired.py A.eval-brown.json B.eval-brown.json [A2.json B2.json ...]

Each file is container_payload.evaluate's json_out (kl_per_token.per_window: the mean KL of each
window). Prints, per pair: both means, the standard error of each mean across windows (how much
a mean moves with the text), and the mean paired difference B - A with its standard error (what
separates the two checkpoints beyond the text's own variation).
"""
import json
import math
import sys


def _se(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else float("nan")


def main(paths) -> int:
    if len(paths) % 2:
        raise SystemExit("give the files in pairs: A B [A B ...]")
    for a_path, b_path in zip(paths[::2], paths[1::2]):
        a, b = (json.load(open(p))["kl_per_token"]["per_window"] for p in (a_path, b_path))
        assert len(a) == len(b), "the two evaluations must use the same windows"
        d = [y - x for x, y in zip(a, b)]
        print(f"{a_path} vs {b_path}: {len(a)} windows; KL A {sum(a) / len(a):.4f} (SE {_se(a):.4f}), "
              f"B {sum(b) / len(b):.4f} (SE {_se(b):.4f}); B - A {sum(d) / len(d):+.4f} (paired SE {_se(d):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
