"""Whether the process that owns something (a run record, an output lock) still runs.

A pid alone is reused by the kernel; pid plus the process's start time names one
process for good. Only this host's processes can be looked at: another host's owner
(a shared disk) is assumed alive, so nothing of a live run elsewhere is ever taken.
"""
from __future__ import annotations

import socket

import psutil


def me() -> dict:
    """This process, as records and locks store it."""
    me = psutil.Process()
    return {"pid": me.pid, "started": me.create_time(), "host": socket.gethostname()}


def alive(pid, started, host) -> bool:
    """Does the process (pid, started, host) still run? Values come from files anyone can
    edit: a wrong type or range reads as not alive, never as an exception."""
    if host != socket.gethostname():
        return True
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError, ValueError, OverflowError):
        return False
