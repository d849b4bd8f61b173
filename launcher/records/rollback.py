"""Undo what runs created: plan first (what, where, how big), then remove exactly that.

Everything comes from run records and our Docker run label, never from name patterns:
a folder or image the launcher did not record is not ours, whatever it is called.
Each removed thing is struck from its record at once, so a second rollback (or one
after a crash half-way) finds only what is really left.

Kinds: containers, partial folders and stale locks always go (they are debris of a
run, never results). Finished outputs, images the run pulled itself, and cache folders
it downloaded or converted go only when asked (--outputs, --images, --cache).

Records are files anyone can edit, so each recorded path is accepted only if it is
one the run could have made: its own output (never `/`, a home folder or the
launcher's state), the partial folder and lock beside it named after its id, a
`models--`/`datasets--` folder of the hub cache, a folder of the launcher's models/.
Anything else is listed as kept, with why. A --dry-run writes nothing, records included.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
from docker.errors import APIError, ImageNotFound, NotFound
from rich.filesize import decimal
from rich.table import Table

from ..common import paths
from ..common.daemon import RUN_LABEL, connect
from ..common.errors import ConfigError, DockerUnavailable, LauncherError, RunNotFound, docker_detail
from ..common.output import markup, safe
from ..common.untrusted import read_json_object
from . import runs
from .destination import partial_path, replaced_path
from .locks import lock_path, read_info, remove_if_stale

ALWAYS = ("containers", "partials", "locks")
OPTIONAL = ("outputs", "images", "cache")


@dataclass
class Item:
    kind: str          # one of ALWAYS + OPTIONAL
    ref: str           # container id, image ref, or path
    run_id: str
    size: int | None = None
    note: str = ""

    @property
    def label(self) -> str:
        """What the user reads (plain text: output.markup escapes it when printed)."""
        return self.ref[:12] if self.kind == "containers" else self.ref


@dataclass
class Plan:
    runs: list[runs.RunRecord]
    kinds: tuple[str, ...]
    items: list[Item] = field(default_factory=list)
    refused: list[tuple[Item, str]] = field(default_factory=list)   # recorded, but we will not touch it
    left_out: list[Item] = field(default_factory=list)              # recorded, kind not asked for
    skipped_runs: list[tuple[str, str]] = field(default_factory=list)
    docker_error: str | None = None
    unchecked: list[Item] = field(default_factory=list)             # containers/images: Docker was down
    _gone: list[Item] = field(default_factory=list)                 # recorded but already gone: prune

    @property
    def empty(self) -> bool:
        return not self.items


@dataclass
class Outcome:
    removed: list[Item] = field(default_factory=list)
    failed: list[tuple[Item, str]] = field(default_factory=list)


# ---------------------------------------------------------------- planning

def select_runs(run_id: str | None, all_runs: bool, *, dry_run: bool = False
                ) -> tuple[list[runs.RunRecord], list[tuple[str, str]]]:
    """The records to roll back, and those left alone (still running, damaged) with why."""
    if not dry_run:  # marking dead runs rewrites records: not in a dry run
        runs.mark_dead_runs()
    if run_id:
        rec = runs.load(run_id)
        if rec.status == "running" and rec.owner_alive():
            raise LauncherError(f"run {rec.id} is still running (pid {rec.pid})", where=str(rec.folder),
                                advice="stop it first (Ctrl-C in its terminal, or kill the pid), then roll back")
        return [rec], []
    chosen, skipped = [], []
    records = runs.all_runs()
    skipped += [(name, why) for name, why in runs.damaged.items()]
    for rec in records:
        if rec.status == "running" and rec.owner_alive():
            skipped.append((rec.id, f"still running (pid {rec.pid})"))
        else:
            chosen.append(rec)
    return chosen, skipped


def plan(run_id: str | None = None, *, all_runs: bool = False, outputs: bool = False, images: bool = False,
         cache: bool = False, dry_run: bool = False) -> Plan:
    if bool(run_id) == bool(all_runs):
        raise ConfigError("name one RUN_ID or pass --all", where="rollback",
                          advice="`launcher list` shows the runs")
    chosen, skipped = select_runs(run_id, all_runs, dry_run=dry_run)
    kinds = ALWAYS + tuple(k for k, on in zip(OPTIONAL, (outputs, images, cache)) if on)
    p = Plan(chosen, kinds, skipped_runs=skipped)
    try:
        client = connect(timeout=10)
    except DockerUnavailable as e:
        client, p.docker_error = None, e.what
    ids = {r.id for r in chosen}
    others = [r for r in runs.all_runs() if r.id not in ids and r.status != "rolled-back"]
    for rec in chosen:
        _plan_files(p, rec, others)
        _plan_docker(p, rec, client, others, ids)
    return p


def run_output(rec: runs.RunRecord) -> tuple[Path | None, str]:
    """The output folder this run was given, if it is one a run may own: (path, "") or
    (None, why). The lock and the partial folder of a run are derived from it."""
    named = rec.output or str(rec.spec.get("output") or "")
    if not named or not os.path.isabs(named) or os.path.normpath(named) != named:
        return None, "the record names no absolute, normal output path"
    out = Path(named)
    state = [Path(os.path.abspath(q)) for q in (paths.home(), paths.hf_hub_cache())]
    protected = [Path("/"), Path.home(), *state]
    if any(out == q or out in q.parents for q in protected):
        return None, f"{out} is /, the home folder, or the launcher's state, or holds one of them"
    if any(q in out.parents for q in state):
        return None, f"{out} lies inside the launcher's state or the Hugging Face cache"
    return out, ""


def _expected(rec: runs.RunRecord, kind: str) -> set[str]:
    """The only paths of this kind the run could have created."""
    out, _ = run_output(rec)
    if out is None:
        return set()
    return {"outputs": {str(out)}, "partials": {str(partial_path(out, rec.id)), str(replaced_path(out, rec.id))},
            "locks": {str(lock_path(out))}}[kind]


def _cache_entry_ok(path: str) -> bool:
    """A hub download (`models--org--name`, `datasets--org--name` right under the hub cache), a
    conversion right under the launcher's models/, or lm-eval's wheels for an image right under
    its lm-eval/ (`eval --tasks`): never those folders themselves."""
    p = Path(os.path.abspath(path))
    if p.parent == Path(os.path.abspath(paths.hf_hub_cache())):
        return p.name.startswith(("models--", "datasets--")) and len(p.name) > len("datasets--")
    ours = (Path(os.path.abspath(paths.models_dir())), Path(os.path.abspath(paths.lm_eval_dir())))
    return p.parent in ours and not p.name.startswith(".")


def recorded_path_ok(rec: runs.RunRecord, kind: str, path: str) -> bool:
    """Could this run have created this path? (What `status` sizes and rollback considers.)"""
    if kind == "cache":
        return _cache_entry_ok(path)
    return kind in ("outputs", "partials", "locks") and path in _expected(rec, kind)


def _plan_files(p: Plan, rec: runs.RunRecord, others: list[runs.RunRecord]) -> None:
    _, why_not = run_output(rec)
    for kind in ("partials", "locks", "outputs"):
        for path in getattr(rec.created, kind):
            if path not in _expected(rec, kind):
                p.refused.append((Item(kind, path, rec.id), "not a path this run could have created"
                                  + (f" ({why_not})" if why_not else "") + ": left alone"))
    for path in [x for x in rec.created.partials if x in _expected(rec, "partials")]:
        item = Item("partials", path, rec.id)
        if not os.path.lexists(path):
            p._gone.append(item)
        elif Path(path).is_symlink() or not Path(path).is_dir():
            # the record names a partial of this run; anything else there is not what we made
            p.refused.append((item, "not a partial folder of this run (replaced?)"))
        else:
            item.size = tree_size(Path(path))
            p.items.append(item)
    # records older than `created.locks`: the lock of the output it named
    locks = [x for x in rec.created.locks if x in _expected(rec, "locks")]
    locks += [x for x in _expected(rec, "locks") if x not in locks and rec.command == "quantize"]
    for path in locks:
        item = Item("locks", path, rec.id)
        info = read_info(Path(path))  # never blocks: a FIFO there is not read
        if not os.path.lexists(path):
            p._gone.append(item)
        elif not info or info.get("run_id") != rec.id:
            p._gone.append(item)  # taken over by a later run, or not a lock: not ours any more
        else:
            item.size = Path(path).lstat().st_size
            p.items.append(item)
    for path in [x for x in rec.created.outputs if x in _expected(rec, "outputs")]:
        item = Item("outputs", path, rec.id)
        if not os.path.lexists(path):
            p._gone.append(item)
            continue
        owner = (_read_json(Path(path) / "result.json") or {}).get("run_id")
        if Path(path).is_symlink() or not Path(path).is_dir():
            p.refused.append((item, "no longer the folder this run wrote (replaced?)"))
        elif owner != rec.id:  # (any type: the file is anyone's to edit)
            named = f"run {owner:.40}" if isinstance(owner, str) and owner else "no run"
            p.refused.append((item, f"its result.json names {named}, "
                                    "not this one: it was replaced, so it is not ours to delete"))
        elif "outputs" not in p.kinds:
            item.size = tree_size(Path(path))
            p.left_out.append(item)
        else:
            item.size = tree_size(Path(path))
            p.items.append(item)
    live = [r for r in others if r.status == "running" and r.owner_alive()]
    for path in rec.created.cache:
        item = Item("cache", path, rec.id)
        if not _cache_entry_ok(path):
            p.refused.append((item, "not a cache entry the launcher makes (outside the launcher home's "
                                    "models/ and the Hugging Face cache's models--/datasets-- folders)"))
        elif not os.path.lexists(path):
            p._gone.append(item)
        elif Path(path).is_symlink():
            p.refused.append((item, "a symlink now, not the folder the run made"))
        elif "cache" not in p.kinds:
            item.size = tree_size(Path(path))
            p.left_out.append(item)
        elif live:
            p.refused.append((item, f"run {live[0].id} is running and may be reading it"))
        elif sharers := [r.id for r in others if path in r.created.cache]:
            p.refused.append((item, f"run {sharers[0]} also recorded it (roll that back too, or use --all)"))
        else:
            item.size = tree_size(Path(path))
            p.items.append(item)


def _plan_docker(p: Plan, rec: runs.RunRecord, client, others: list[runs.RunRecord], ids: set[str]) -> None:
    if client is None:
        p.unchecked += [Item("containers", cid, rec.id) for cid in rec.created.containers]
        p.unchecked += [Item("images", ref, rec.id) for ref in rec.created.images if "images" in p.kinds]
        p.refused += [(item, "Docker daemon unreachable: not checked") for item in p.unchecked if item.run_id == rec.id]
        return

    seen = set()
    found = {c.id: c for c in client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={rec.id}"})}
    for cid in rec.created.containers:
        if cid in found:
            continue
        try:
            found[cid] = client.containers.get(cid)
        except NotFound:
            p._gone.append(Item("containers", cid, rec.id))
    for cid, c in found.items():
        if c.id in seen:
            continue
        seen.add(c.id)
        item = Item("containers", c.id, rec.id, note=c.status)
        if c.labels.get(RUN_LABEL) != rec.id:
            p.refused.append((item, "does not carry this run's label"))
        else:
            p.items.append(item)

    for ref in rec.created.images:
        item = Item("images", ref, rec.id)
        try:
            img = client.images.get(ref)
        except ImageNotFound:
            p._gone.append(item)
            continue
        except APIError as e:
            p.refused.append((item, f"cannot inspect: {e}"))
            continue
        item.size = img.attrs.get("Size")
        users = [r.id for r in others if ref in r.created.images or r.image == ref]
        # Removing a ref that has other tags only untags it: no container can lose its image.
        foreign = [] if len(img.tags) > 1 else [
            c.short_id for c in client.containers.list(all=True)
            if c.attrs.get("Image") == img.id and c.labels.get(RUN_LABEL) not in ids]
        if "images" not in p.kinds:
            p.left_out.append(item)
        elif users:
            p.refused.append((item, f"run {users[0]} also uses it (roll that back too, or use --all)"))
        elif foreign:
            p.refused.append((item, f"container {foreign[0]} (not one we are removing) uses it"))
        else:
            p.items.append(item)


# ---------------------------------------------------------------- execution

def execute(p: Plan) -> Outcome:
    out = Outcome()
    client = None
    if any(i.kind in ("containers", "images") for i in p.items):
        try:
            client = connect(timeout=10)
        except DockerUnavailable as e:
            p.docker_error = e.what
    # containers before images: an image in use by a container cannot go
    order = {k: n for n, k in enumerate(("containers", "locks", "partials", "outputs", "cache", "images"))}
    for item in sorted(p.items, key=lambda i: order[i.kind]):
        try:
            _remove(item, client)
            out.removed.append(item)
        except Exception as e:  # noqa: BLE001 - each failure is reported, the rest still go
            out.failed.append((item, _reason(e)))
    _update_records(p, out)
    return out


def _remove(item: Item, client) -> None:
    if item.kind == "containers":
        if client is None:
            raise DockerUnavailable("Docker daemon unreachable")
        try:
            client.containers.get(item.ref).remove(force=True)
        except NotFound:
            pass
    elif item.kind == "images":
        if client is None:
            raise DockerUnavailable("Docker daemon unreachable")
        try:
            # never force: a tag the user added keeps the image, and one in use stays
            client.images.remove(item.ref, noprune=False)
        except ImageNotFound:
            pass
    elif item.kind == "locks":
        why = remove_if_stale(Path(item.ref), item.run_id)  # read again under its flock
        if why not in (None, "gone"):
            raise LauncherError(f"{why}; left alone")
    else:
        path = Path(item.ref)
        if path.is_symlink():  # checked again: it may have changed since the plan
            raise LauncherError("became a symlink since the plan; left alone")
        if item.kind == "outputs" and (_read_json(path / "result.json") or {}).get("run_id") != item.run_id:
            raise LauncherError("its result.json no longer names this run; left alone")
        if path.exists():
            shutil.rmtree(path)  # rmtree never follows symlinks inside the tree


def _update_records(p: Plan, out: Outcome) -> None:
    """Strike what went (or was already gone) from the records; mark runs rolled back.

    A run whose removal failed, or whose containers could not be checked, keeps its
    status: the next rollback retries exactly what is left."""
    struck = out.removed + p._gone
    unfinished = {i.run_id for i, _ in out.failed}
    unfinished |= {i.run_id for i in p.unchecked}
    for rec in p.runs:
        changed = False
        for item in struck:
            lst = getattr(rec.created, item.kind)
            if item.run_id == rec.id and item.ref in lst:
                lst.remove(item.ref)
                changed = True
        if rec.id not in unfinished and rec.status != "rolled-back":
            rec.status = "rolled-back"
            changed = True
        if changed:
            rec.save()


# ---------------------------------------------------------------- helpers

def tree_size(path: Path) -> int:
    """Bytes under path, counting links as links (never following them)."""
    total = 0
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
        for root, dirs, files in os.walk(path, followlinks=False):
            for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except OSError:
                    pass
    except OSError:
        pass
    return total


def human(n: int | None) -> str:
    """A size as rich writes it (decimal units: 1.5 GB, as disks are sold); "-" when unknown."""
    return "-" if n is None else decimal(n)


def _read_json(path: Path) -> dict | None:
    return read_json_object(path)


def _reason(e: Exception) -> str:
    if isinstance(e, LauncherError):
        return e.what
    return f"{type(e).__name__}: {docker_detail(e)}"


# ---------------------------------------------------------------- presentation

KIND_NAMES = {"containers": "container", "partials": "partial folder", "locks": "stale lock",
              "outputs": "output", "images": "image", "cache": "cache folder"}


def plan_table(p: Plan, title: str):
    t = Table(title=title, title_justify="left")
    for col in ("run", "kind", "what", "size"):
        t.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    for i in p.items:
        t.add_row(safe(i.run_id), KIND_NAMES[i.kind], safe(i.label + (f" ({i.note})" if i.note else "")),
                  human(i.size))
    t.add_row("", "", "[bold]total[/]", human(sum(i.size or 0 for i in p.items)))
    return t


def describe_rest(p: Plan, console) -> None:
    """What stays, and why: refused items, kinds not asked for, runs left alone."""
    for item, why in p.refused:
        console.print(markup("[yellow]kept[/] {} {} of run {}: {}", KIND_NAMES[item.kind], item.label,
                             item.run_id, why), highlight=False)
    flags = {"outputs": "--outputs", "images": "--images", "cache": "--cache"}
    left = sorted({i.kind for i in p.left_out})
    if left:
        what = ", ".join(f"{sum(1 for i in p.left_out if i.kind == k)} {KIND_NAMES[k]}(s) ({flags[k]})"
                         for k in left)
        console.print(f"not removed unless asked: {what}", highlight=False)
    for run_id, why in p.skipped_runs:
        console.print(markup("[yellow]left alone[/] run {}: {}", run_id, why),
                      highlight=False, soft_wrap=True)
    if p.docker_error:
        console.print(markup("[yellow]Docker:[/] {}; containers and images were not checked "
                             "(start Docker and roll back again to remove them)", p.docker_error), highlight=False)


def describe_outcome(out: Outcome, console) -> None:
    for item in out.removed:
        console.print(markup("removed {} {} ({})", KIND_NAMES[item.kind], item.label, human(item.size)),
                      highlight=False)
    for item, why in out.failed:
        console.print(markup("[red]could not remove[/] {} {}: {}", KIND_NAMES[item.kind], item.label, why),
                      highlight=False)


__all__ = ["Item", "Plan", "Outcome", "plan", "execute", "tree_size", "human", "RunNotFound"]


def run_rollback(run_id: str | None, *, all_runs: bool, outputs: bool, images: bool, cache: bool,
                 dry_run: bool, yes: bool, console) -> None:
    """`launcher rollback`: plan, show, confirm, execute, report; a LauncherError when anything
    recorded stays."""
    p = plan(run_id, all_runs=all_runs, outputs=outputs, images=images, cache=cache, dry_run=dry_run)
    if p.empty:
        describe_rest(p, console)
        console.print("nothing to roll back" + (markup(" for run {}", run_id) if run_id else ""))
        _unchecked(p)
        return
    console.print(plan_table(p, "would remove" if dry_run else "to remove"))
    describe_rest(p, console)
    if dry_run:
        return
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError("refusing to delete without confirmation: stdin is not a terminal",
                              where="rollback", advice="check the list with --dry-run, then pass --yes")
        click.confirm(f"remove these {len(p.items)} items?", abort=True, err=True)
    out = execute(p)
    describe_outcome(out, console)
    if out.failed:
        raise LauncherError(f"{len(out.failed)} of {len(p.items)} items could not be removed",
                            advice="fix what is reported above and run the same rollback again")
    _unchecked(p)


def _unchecked(p) -> None:
    """Without Docker the files go, but the rollback is not complete: say so in the exit code."""
    n = len(p.unchecked)
    if n:
        raise DockerUnavailable(f"{n} recorded container(s)/image(s) not removed: the Docker daemon is unreachable",
                                advice="start Docker and run the same rollback again")


