"""`launcher quantize`: the run's sequence (QuantizeRun), its inputs' fingerprint, reuse of an
existing output, and the memory/disk preflight."""
