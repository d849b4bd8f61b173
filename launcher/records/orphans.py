"""Containers left behind by a launcher that died (kill -9, a crash, a closed SSH).

A quantize run also starts a small watcher (`guard`) in its own session: when the
launcher dies without finishing its record, the watcher reaps at once, so an orphan
does not keep burning the CPU until the next command. Every launcher command
starts by reaping them too: a container carrying our run label
whose run's launcher process is gone is stopped and removed, and its run is marked
interrupted. Containers of live runs, and anything without our label, are left alone.
"""
from __future__ import annotations

import subprocess
import sys
import time

from docker.errors import APIError, NotFound
from rich.console import Console

import docker

from ..common.daemon import RUN_LABEL, connect
from ..common.errors import DockerUnavailable, RunNotFound
from ..common.output import markup
from . import runs


def tidy(console: Console | None = None, records: list[runs.RunRecord] | None = None) -> None:
    """What read-only commands do first: mark runs whose launcher died as interrupted,
    and remove their containers when Docker is up (without Docker, just the records).
    `records`: the runs the caller read already (updated in place)."""
    try:
        client = connect(timeout=5)
    except DockerUnavailable:
        runs.mark_dead_runs(records)
        return
    reap(client, console, records)


def reap(client: docker.DockerClient, console: Console | None = None,
         records: list[runs.RunRecord] | None = None) -> list[str]:
    runs.mark_dead_runs(records)
    removed = []
    for c in client.containers.list(all=True, filters={"label": RUN_LABEL}):
        run_id = c.labels.get(RUN_LABEL, "")
        try:
            rec = runs.load(run_id)
        except RunNotFound:
            continue  # not a record of this home: another user's or another cache's run
        if rec.status != "interrupted":
            continue  # live runs, servers of `launcher serve`, --keep-container: not orphans
        try:
            c.remove(force=True)
            removed.append(c.id)
            if console:
                console.print(markup("removed container {} left by run {}", c.short_id, run_id))
        except (NotFound, APIError):
            pass
    return removed


def guard(rec: runs.RunRecord) -> None:
    """Start the watcher of this run; it survives a kill -9 of the launcher, not a reboot
    (then the next command reaps). It must not hold our stdout/stderr open."""
    try:
        subprocess.Popen([sys.executable, "-m", "launcher.records.orphans", rec.id], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                         close_fds=True)
    except OSError:
        pass  # no watcher: the next launcher command reaps instead


def _watch(run_id: str, poll: float = 1.0) -> None:
    while True:
        time.sleep(poll)
        try:
            rec = runs.load(run_id)
        except RunNotFound:
            return
        if rec.status != "running":
            return  # the launcher finished its record: nothing to do
        if not rec.owner_alive():
            break
    try:
        client = connect(timeout=10)
    except DockerUnavailable:
        runs.mark_dead_runs()
        return
    reap(client)


if __name__ == "__main__":
    _watch(sys.argv[1])
