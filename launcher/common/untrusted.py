"""Reading and showing what the launcher did not write itself: the --config file, a YAML
recipe, and everything under the launcher home (run records, logs, result.json, the
image-probe cache, locks), which anyone with access to it may have edited. Such a file may
be a FIFO or device (reading it would block or never end), a symlink (to /etc/shadow),
huge or sparse, nested past the recursion limit, or hold terminal control characters.

`open_regular` and `read_capped` are the one way to open and read such a file: regular
files only, opened without blocking and (by default) without following a symlink, and
never read past a cap the caller states for its kind of file. `parse` turns the bytes
into data, with every way hostile bytes fail (bad syntax, deep nesting, alias bombs) as
one line. Each failure is the caller's LauncherError (its exit code from errors.py).
"""
from __future__ import annotations

import errno
import json
import os
import stat
import unicodedata
from pathlib import Path
from typing import BinaryIO

import tomllib
import yaml

from .errors import ConfigError, LauncherError

# What a parsed file may hold: deeper than any config, record or cache entry ever is, far
# below Python's recursion limit; the node budget stops YAML alias bombs (a: &a [..],
# b: [*a, *a ...]) that are small on disk and exponential once walked.
MAX_DEPTH = 32
MAX_NODES = 200_000


def printable(text: str) -> str:
    """Control and format characters (ESC, CR, bidi overrides...) and line/paragraph
    separators (U+2028/9) escaped, so a name from a file cannot move the cursor, rewrite
    or split the line, or colour the terminal."""
    return "".join(c.encode("unicode_escape").decode("ascii") if _unsafe(unicodedata.category(c)) else c
                   for c in str(text))


def _unsafe(category: str) -> bool:
    return category[0] == "C" or category in ("Zl", "Zp")


def open_regular(path: Path, what: str, *, error: type[LauncherError] = ConfigError, advice: str | None = None,
                 follow_symlinks: bool = False, missing_ok: bool = False) -> BinaryIO | None:
    """`path` opened for reading if it is a regular file, else `error` in one line (`what`
    names the kind of file). O_NONBLOCK: opening a FIFO never waits for a writer; the fstat
    of the opened descriptor (not an lstat before it) decides, so nothing can be swapped in
    between. A symlink is refused unless `follow_symlinks`. None when absent and `missing_ok`."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(f"{what} not found", where=str(path), advice=advice) from None
    except OSError as e:
        reason = "is a symlink: not followed" if e.errno == errno.ELOOP else f"unreadable: {e.strerror}"
        raise error(f"{what} {reason}", where=str(path), advice=advice) from None
    except ValueError:  # a NUL byte in the name
        raise error(f"{what} has an invalid file name", where=repr(str(path))[:200], advice=advice) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{what} is not a regular file (a FIFO, device, socket or folder): not read",
                    where=str(path), advice=advice)
    return os.fdopen(fd, "rb")


def read_capped(path: Path, cap: int, what: str, *, error: type[LauncherError] = ConfigError,
                advice: str | None = None, follow_symlinks: bool = False, missing_ok: bool = False) -> bytes | None:
    """The bytes of the regular file `path`, refused unread when larger than `cap` (stated
    where each kind of file is declared); the same refusals as open_regular."""
    f = open_regular(path, what, error=error, advice=advice, follow_symlinks=follow_symlinks,
                     missing_ok=missing_ok)
    if f is None:
        return None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(cap + 1) if size <= cap else b""
        except OSError as e:
            raise error(f"{what} unreadable: {e.strerror}", where=str(path), advice=advice) from None
    if size > cap or len(raw) > cap:  # (a file growing while we read counts too)
        raise error(f"{what} is {max(size, len(raw)):,} bytes, more than the {cap:,} such a file may hold: not read",
                    where=str(path), advice=advice)
    return raw


def parse(raw: bytes, fmt: str, what: str, where: str, *, error: type[LauncherError] = ConfigError,
          advice: str | None = None):
    """JSON, YAML or TOML bytes as data, or `error` in one line: bad syntax or UTF-8, nesting
    deeper than MAX_DEPTH (also the RecursionError a parser hits first), more than MAX_NODES
    values once aliases are expanded."""
    try:
        text = raw.decode("utf-8")
        if fmt == "yaml":
            data = yaml.safe_load(text)
        elif fmt == "toml":
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except RecursionError:
        raise error(f"{what} is nested too deeply", where=where, advice=advice) from None
    except (ValueError, yaml.YAMLError) as e:  # JSONDecodeError, TOMLDecodeError, UnicodeDecodeError: ValueErrors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise error(f"{what} is not valid {fmt.upper()}: {printable(reason)}", where=where, advice=advice) from None
    try:
        _bounded(data, MAX_NODES if fmt == "yaml" else None)
    except ValueError as e:
        raise error(f"{what} is refused: {e}", where=where, advice=advice) from None
    return data


def _bounded(data, max_nodes: int | None) -> None:
    """ValueError when `data` nests deeper than MAX_DEPTH or holds more than `max_nodes` values
    (walked without recursion, counting a shared YAML alias each time it is reached; JSON and
    TOML have no aliases, so their size is already the file's cap)."""
    stack, nodes = [(data, 0)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        if max_nodes is not None and nodes > max_nodes:
            raise ValueError(f"more than {max_nodes:,} values (YAML aliases expanded)")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


class _Refused(LauncherError):
    """read_json_object's private signal: the file is refused, the caller gets None."""


def read_json_object(path: Path, limit: int = 1 << 20, *, follow_symlinks: bool = False) -> dict | None:
    """A JSON object from a regular file of at most `limit` bytes, else None (absent, refused,
    damaged, not an object): for files whose absence and damage mean the same, "not ours"."""
    try:
        raw = read_capped(path, limit, "file", error=_Refused, follow_symlinks=follow_symlinks, missing_ok=True)
        data = None if raw is None else parse(raw, "json", "file", str(path), error=_Refused)
    except _Refused:
        return None
    return data if isinstance(data, dict) else None


def link_out_of(path: Path, folder: Path | None = None) -> str | None:
    """Why `path`, a file of `folder` (default: its own folder, e.g. a checkpoint), must not be
    read: it is a symlink whose target lies outside that folder. None when it may be read.

    The one rule for reading a checkpoint or model folder: a link inside the folder is
    fine, and so is a Hugging Face cache snapshot's link into its own repo's blobs/
    (<repo>/snapshots/<rev>/f -> ../../blobs/<hash>), which huggingface_hub makes. Any other
    link (a tarball's or a clone's `config.json -> /etc/passwd`) is not followed."""
    path = Path(path)
    try:
        if not path.is_symlink():
            return None
        root = Path(folder if folder is not None else path.parent).resolve()
        target, link = path.resolve(), os.readlink(path)
    except (OSError, RuntimeError, ValueError):  # a loop, a name that vanished
        return "a symlink that cannot be resolved: not followed"
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if any(target.is_relative_to(a) for a in allowed):
        return None
    return f"a symlink to {printable(link)}, outside the folder: not followed"
