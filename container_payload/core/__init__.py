"""The standard-library core the host and the payload share: the job contract, the recipes as
typed steps, the memory plan, the tuning knobs and the event lines. Imports no torch (the
launcher imports it; tests/test_payload_layout.py checks)."""
