"""A config's exclude/ignore list as a membership test, safe against the checkpoint's own
regular expressions (each under a timeout, all under one budget)."""
from __future__ import annotations

import fnmatch
import re
import time

import regex

from .findings import Report, short

MAX_PATTERNS = 1024        # exclude/ignore entries: real lists are tens
REGEX_TIMEOUT = 0.2        # seconds per match of a `re:` exclude pattern before it is refused
REGEX_BUDGET = 2.0         # seconds for all `re:` matches of one verification


class Excludes:
    """The exclude/ignore list of a config: fnmatch patterns, module prefixes, and
    compressed-tensors' `re:` regular expressions. The regexes come from the checkpoint,
    so they run under the `regex` module's timeout: one that backtracks for longer than
    REGEX_TIMEOUT is reported once and dropped, and all of them together get
    REGEX_BUDGET seconds, so many modules times a slow pattern cannot add up to a hang.
    The globs and prefixes are compiled into one regular expression (fnmatch's own
    translation), so a long list costs one match per module, not one per pattern."""

    def __init__(self, patterns: list[str], report: Report, where: str):
        self.report, self.where = report, where
        if len(patterns) > MAX_PATTERNS:
            report.add(where, f"{len(patterns)} exclude/ignore entries: more than {MAX_PATTERNS}, only "
                              f"the first {MAX_PATTERNS} are used")
            patterns = patterns[:MAX_PATTERNS]
        globs = [p for p in patterns if not p.startswith("re:")]
        # a glob matches the module itself; the plain name also matches its submodules
        alternatives = [fnmatch.translate(p) for p in globs] + [rf"(?s:{re.escape(p)}\..*)\Z" for p in globs]
        # stdlib re: fnmatch's translations need no timeout (atomic groups, no backtracking
        # blow-up), and re compiles a thousand of them in a fraction of regex's time
        self.globs = re.compile("|".join(alternatives)) if alternatives else None
        self.budget = REGEX_BUDGET
        self.regexes = {}
        for p in patterns:
            if p.startswith("re:"):
                try:
                    self.regexes[p] = regex.compile(p[3:], flags=regex.V0)
                except (regex.error, RecursionError, ValueError, OverflowError) as e:
                    report.add(where, f"exclude pattern {short(p)} is not a valid regular expression "
                                      f"({short(str(e))}): ignored")

    def __contains__(self, module: str) -> bool:
        if self.globs is not None and self.globs.match(module):
            return True
        for p, rx in list(self.regexes.items()):
            start = time.monotonic()
            try:
                if rx.match(module, timeout=min(REGEX_TIMEOUT, max(self.budget, 0.001))):
                    return True
            except TimeoutError:
                del self.regexes[p]
                self.report.add(self.where, f"exclude pattern {short(p)} takes over {REGEX_TIMEOUT} s to match "
                                            f"{short(module)}: refused (it would hang the engines' loaders too)")
            finally:
                self.budget -= time.monotonic() - start
            if self.budget <= 0 and self.regexes:
                self.report.add(self.where, f"the {len(self.regexes)} `re:` exclude pattern(s) took over "
                                            f"{REGEX_BUDGET} s in all: refused")
                self.regexes.clear()
        return False
