"""Typed errors a caller can act on.

Every failure the user can do something about is a `LauncherError`: the CLI prints
it as one line (what went wrong, where, what to do) and exits with its code. Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

from dataclasses import dataclass


class LauncherError(Exception):
    exit_code = 1
    status_code: int | None = None  # Docker's HTTP status, when the error is Docker's answer

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


class DockerFailed(LauncherError):
    """Docker refused or failed a request about a container (create, start)."""
    exit_code = 1


class DockerConflict(DockerFailed):
    """Docker answered 409: the name or resource is taken by something else."""


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
    """Ctrl-C or SIGTERM: any container of the run was stopped and removed."""
    exit_code = 130


class InternalError(LauncherError):
    """A bug: an exception nobody expected. `where` names the file that holds its traceback."""
    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that both take one cleanup path
    (ending.catch_sigterm installs it for the whole command)."""


def as_launcher_error(e: BaseException, log: str | None = None) -> LauncherError:
    """Any ending as the LauncherError the user reads: Ctrl-C and SIGTERM are Interrupted, anything
    unexpected is an InternalError whose traceback is in `log`."""
    if isinstance(e, LauncherError):
        return e
    if isinstance(e, KeyboardInterrupt):
        return Interrupted(f"interrupted ({'SIGTERM' if isinstance(e, Terminated) else 'Ctrl-C'})")
    detail = (str(e).strip().splitlines() or [""])[0][:300]  # one line: the traceback is in `log`
    return InternalError(f"internal error: {type(e).__name__}" + (f": {detail}" if detail else ""), where=log,
                         advice="this is a bug; please report it with the traceback "
                                + ("in that file" if log else "printed above"))


# ---------------------------------------------------------------- Docker's answers, translated

@dataclass(frozen=True)
class Translation:
    error: type[LauncherError]
    what: str                  # str.format fields: detail (Docker's first line) and the caller's
    advice: str | None = None


NETWORK_ADVICE = ("check the network or proxy; or build the CPU stand-in with `make image` "
                  "and pass --image spark-nvfp4/trtllm-standin:cpu")

# (what we asked Docker, its APIError.status_code) -> the error the user reads. Status None is
# the fallback of an action: any other status, or no HTTP status at all (an error inside a
# pull's stream, a timeout). Only the status decides, never the wording of Docker's message,
# which changes between Docker versions and registries.
DOCKER_ERRORS: dict[tuple[str, int | None], Translation] = {
    ("pull", 401): Translation(ImageError, "registry refused the pull of {ref}", "{login}"),
    ("pull", 403): Translation(ImageError, "registry refused the pull of {ref}", "{login}"),
    ("pull", 404): Translation(ImageError, "image {ref} does not exist in the registry",
                               "check the image name and tag (a private image needs a login)"),
    # The daemon answers 500 when it could not talk to the registry (refused, DNS, TLS, timeout).
    ("pull", 500): Translation(ImageError, "registry unreachable while pulling {ref}: {detail}", NETWORK_ADVICE),
    ("pull", None): Translation(ImageError, "cannot pull {ref}: {detail}"),
    ("create", 404): Translation(ImageError, "image {ref} is not present: cannot create the {noun}",
                                 "pull or build it, then retry"),
    ("create", 409): Translation(DockerConflict, "cannot create the {noun}: the name is in use ({detail})",
                                 "remove the other container (`docker rm NAME`), then retry"),
    ("create", None): Translation(DockerFailed, "cannot create the {noun}: {detail}"),
    ("start", 404): Translation(DockerFailed, "the {noun} disappeared before it started",
                                "was it removed by someone else? run the command again"),
    ("start", None): Translation(DockerFailed, "cannot start the {noun}: {detail}"),
    # start failed, a GPU was asked for and Docker has no NVIDIA runtime (the caller checked)
    ("start-gpu", None): Translation(DockerFailed, "Docker cannot give the container a GPU: the NVIDIA "
                                     "container runtime is missing", "install nvidia-container-toolkit, or "
                                     "pass --gpus none to run on the CPU"),
    # start failed and the port we publish is taken now (the caller checked)
    ("publish", None): Translation(ConfigError, "port {port} on 127.0.0.1 was taken meanwhile",
                                   "pass another --port"),
    ("probe", None): Translation(ImageError, "the image probe did not finish: {detail}",
                                 "check that the image starts (`docker run --rm IMAGE python3 -V`)"),
}


def docker_detail(e: BaseException) -> str:
    """Docker's own explanation, first line (an APIError's str() wraps it in the HTTP status
    and URL); for any other exception its first line, or its type."""
    text = str(getattr(e, "explanation", None) or e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def docker_error(e: BaseException, action: str, *, where: str | None = None, **fields: str) -> LauncherError:
    """The LauncherError for Docker's failure `e` of `action` (a key of DOCKER_ERRORS)."""
    status = getattr(e, "status_code", None)
    t = DOCKER_ERRORS.get((action, status)) or DOCKER_ERRORS[(action, None)]
    values = {"detail": docker_detail(e), **fields}
    err = t.error(t.what.format(**values), where=where, advice=t.advice.format(**values) if t.advice else None)
    err.status_code = status
    return err
