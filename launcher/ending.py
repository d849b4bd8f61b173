"""How every command ends, in one place: any exception that leaves a command becomes its exit
code (README: Exit codes), one error line on stderr, and under --json exactly one JSON object on
stdout; every run the process started is ended, and its command's run keeps that object as
result.json.

    click usage error        -> ConfigError, exit 2 (click prints its usage help as usual)
    LauncherError            -> its own exit code
    Ctrl-C, SIGTERM          -> Interrupted, exit 130 (SIGTERM is raised like Ctrl-C: catch_sigterm)
    any other exception      -> InternalError, exit 1; its traceback goes to stderr and to a file
                                (the run's log, else crashes/ under the home) that `where` names

Light on purpose (click and the errors only): `python -m launcher` imports it before the rest,
so that a signal during the heavier imports still ends this way.
"""
from __future__ import annotations

import datetime as dt
import itertools
import os
import signal
import sys
import traceback

import click

from .common.errors import ConfigError, LauncherError, Terminated, as_launcher_error


def _terminate(signum, frame):
    raise Terminated()


def catch_sigterm() -> None:
    """SIGTERM (systemd, a CI runner's cancel, `kill`) takes Ctrl-C's path for the whole command:
    containers stopped and removed, records ended, exit 130."""
    signal.signal(signal.SIGTERM, _terminate)


def wants_json(args: list[str]) -> tuple[str | None, bool]:
    """The command the raw words name, and whether --json follows it: from the words themselves,
    since a usage error can come before click has parsed anything."""
    words = list(itertools.takewhile(lambda w: w != "--", args))
    command = next((w for w in words if not w.startswith("-")), None)
    return command, command is not None and "--json" in words[words.index(command) + 1:]


def conclude(e: BaseException, command: str | None, json_mode: bool) -> int:
    """End the command on `e`: the error line, the JSON object, the runs' records and result.json.
    Returns the exit code."""
    # a second Ctrl-C or SIGTERM must not cut the ending short: it is a few small writes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # light module (docstring): rich's console and the records load only when a command ends
    from .common.output import console, failure_result, markup, print_json
    from .records import runs

    shown_by_click = e if isinstance(e, click.ClickException) else None
    e = _unwrap_click(e, command)
    run = runs.started[0] if runs.started else None
    log = None
    if not _expected(e):
        log = _keep_traceback(e, run)
    err = as_launcher_error(e, log=log)
    result = failure_result(command, err)
    try:
        for rec in runs.started[1:]:  # nested runs (quantize's quick evaluation) cut short with it
            if rec.status == "running":
                rec.end(err)
        if run is not None:
            result = {**result, "run_id": run.id}  # should its folder refuse the writes below
            result = run.end(err)
    except (OSError, LauncherError) as write_error:  # a full disk or a broken home (RunRecord.save's
        # one line): the object is still printed
        console.print(markup("[yellow]warning:[/] the run's record and result.json could not be written: {}",
                             str(write_error)), highlight=False)
    if shown_by_click is not None:
        shown_by_click.show()  # click's own usage text, as without --json
    else:
        console.print(markup("[bold red]error:[/] {}", str(err)), highlight=False, soft_wrap=True)
    if json_mode:
        print_json(result)
    return err.exit_code


def _unwrap_click(e: BaseException, command: str | None) -> BaseException:
    """click's exceptions as ours: a usage error is a ConfigError (exit 2) with click's message;
    the Abort click raises for Ctrl-C is the KeyboardInterrupt it wraps."""
    if isinstance(e, click.Abort):
        cause = e.__cause__ or e.__context__
        return cause if isinstance(cause, KeyboardInterrupt) else LauncherError("aborted")
    if isinstance(e, click.UsageError):
        return ConfigError(e.format_message(), where=_usage_where(e),
                           advice=f"see `launcher {command + ' ' if command else ''}--help`")
    if isinstance(e, click.ClickException):
        err = LauncherError(e.format_message())
        err.exit_code = e.exit_code
        return err
    return e


def _usage_where(e) -> str | None:
    """The option or argument a usage error is about: `--calib-samples`, `CKPT`."""
    param = getattr(e, "param", None)
    if param is None:
        return getattr(e, "option_name", None)  # an unknown option
    if isinstance(param, click.Option) and param.opts:
        return param.opts[0]
    return param.human_readable_name


def _expected(e: BaseException) -> bool:
    return isinstance(e, (LauncherError, KeyboardInterrupt))


def _keep_traceback(e: BaseException, run) -> str | None:
    """A bug's traceback, on stderr and in a file (secrets scrubbed): the run's log, else a file of
    its own under the home. Returns that file's path (None: it could not be written)."""
    from .common import paths  # light module: loaded only for a bug's traceback

    text = _scrub("".join(traceback.format_exception(e)), run)
    sys.stderr.write(text)
    sys.stderr.flush()
    if run is not None:
        path = run.log_path
    else:
        path = paths.home() / "crashes" / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(f"\n--- launcher traceback ({dt.datetime.now().isoformat(timespec='seconds')}) ---\n{text}")
    except OSError:
        return None
    return str(path)


def _scrub(text: str, run) -> str:
    """The HF token and the NGC key never reach a log, even inside an exception's message."""
    from .sources.model_source import token_from  # light module: huggingface_hub only when scrubbing

    spec = run.spec if run is not None else {}
    hf_env, ngc_env = spec.get("hf_token_env") or "HF_TOKEN", spec.get("ngc_key_env") or "NGC_API_KEY"
    try:
        hf = token_from(hf_env)
    except Exception:  # noqa: BLE001 - a broken token store must not hide the bug being reported
        hf = os.environ.get(hf_env)
    for secret in (hf, os.environ.get(ngc_env)):
        if secret:
            text = text.replace(secret, "***")
    return text
