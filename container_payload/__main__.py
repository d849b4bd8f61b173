"""The payload's one entry point: `python3 -m container_payload COMMAND [JOB.json]`.

COMMAND is a key of contract.JOBS. The job file is read into its typed job, and every
failure ends in one `error` event and exit 1 (events.run_command).
"""
import sys

from .core.events import run_command

if __name__ == "__main__":
    sys.exit(run_command(sys.argv[1:]))
