"""Typed errors a caller can act on.

Every failure the user can do something about is a `LauncherError`: the CLI prints
it as one line (what went wrong, where, what to do) and exits with its code. Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations


class LauncherError(Exception):
    exit_code = 1

    def __init__(self, what: str, *, where: str | None = None, advice: str | None = None):
        super().__init__(what)
        self.what = what
        self.where = where
        self.advice = advice

    def __str__(self) -> str:
        line = self.what
        if self.where:
            line += f" [{self.where}]"
        if self.advice:
            line += f" -> {self.advice}"
        return line


class ConfigError(LauncherError):
    """A flag, environment variable or config-file value is invalid."""
    exit_code = 2


class DockerUnavailable(LauncherError):
    """The Docker daemon cannot be reached."""
    exit_code = 3


class ImageError(LauncherError):
    """The image is absent and cannot be pulled (registry unreachable, refused, unknown)."""
    exit_code = 4


class ModelError(LauncherError):
    """The model cannot be found, downloaded or accessed (missing path, gated, offline)."""
    exit_code = 5


class PreflightError(LauncherError):
    """The host cannot run the job (disk, memory, GPU runtime)."""
    exit_code = 6


class PayloadFailed(LauncherError):
    """The payload inside the container reported an error or exited non-zero."""
    exit_code = 7


class OutOfMemory(PayloadFailed):
    """The container was killed for memory (exit 137 / OOMKilled) or CUDA ran out."""
    exit_code = 8


class VerifyFailed(LauncherError):
    """The checkpoint does not meet what the serving engines require."""
    exit_code = 9


class LockHeld(LauncherError):
    """Another live run is writing the same output folder."""
    exit_code = 10


class RunNotFound(LauncherError):
    exit_code = 11


class RunDamaged(RunNotFound):
    """A run record exists but is not a record we can trust (broken JSON, wrong id, bad fields)."""


class Interrupted(LauncherError):
    """Ctrl-C or SIGTERM: the container was stopped and removed."""
    exit_code = 130
