"""Containers left behind by a launcher that died (kill -9, a crash, a closed SSH).

Every launcher command starts by reaping them: a container carrying our run label
whose run's launcher process is gone is stopped and removed, and its run is marked
interrupted. Containers of live runs, and anything without our label, are left alone.
"""
from __future__ import annotations

import docker
from docker.errors import APIError, NotFound
from rich.console import Console

from . import runs
from .daemon import RUN_LABEL
from .errors import RunNotFound


def reap(client: docker.DockerClient, console: Console | None = None) -> list[str]:
    runs.mark_dead_runs()
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
                console.print(f"removed container {c.short_id} left by run {run_id}")
        except (NotFound, APIError):
            pass
    return removed
