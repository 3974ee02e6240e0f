"""Interpreter settings for aobd's processes (the daemon and its planes, ``aobd run``): the garbage collector
and the GIL's switch interval.

CPython's defaults, thresholds (700, 10, 10), start a young collection every 700 net container allocations and
a full one every 100 young ones (when the long-lived objects grew by a quarter). An engine allocates many
containers per node (events, steps, dicts of inputs and outputs) and keeps thousands of runs in memory, so a full
collection traverses a large heap often. Measured on in-process W6 (6,000 runs, concurrency 64, SQLite):
collections took 415 ms of 2.6 s (16%), six full ones at 49 ms each; with (20000, 20, 50) and the startup heap
frozen, 56 ms, and 2,800 workflows/s instead of 2,320 at the same peak RSS (docs/performance.md).

The switch interval is how long a thread waiting for the GIL waits before it asks the running one to drop it
(CPython's default: 5 ms). While the event loop's thread computes, every other Python thread of the process waits
that long each time it needs the GIL: the pure-Python SQLite writer (``AOBD_IMPL=python``), the log's reader pool,
the CAS's file writes. The C twin's writer thread no longer needs the GIL at all, so with the default build the
setting changes nothing measurable on in-process W6 (8,490-8,699 against 8,527-8,648 workflows/s, 5 ms against
1 ms, alternated); with the earlier writer, which took the GIL twice per group, 1 ms gave 1.07-1.14x
(docs/performance.md). Below 1 ms the extra switches cost CPU for no more throughput.

Library users who embed :class:`aobd.engine.driver.Engine` keep whatever settings their process has: only aobd's
own entry points call these.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence

DEFAULT_THRESHOLDS = (20_000, 20, 50)
DEFAULT_SWITCH_INTERVAL_MS = 1.0


def tune_gc(thresholds: Sequence[int] = DEFAULT_THRESHOLDS) -> None:
    """Move everything allocated so far (modules, configuration) out of the collector's sight for good, and
    collect less often. Empty ``thresholds`` leave CPython's own."""
    gc.freeze()
    if thresholds:
        gc.set_threshold(*thresholds)


def tune_switch_interval(milliseconds: float = DEFAULT_SWITCH_INTERVAL_MS) -> None:
    """Set the GIL's switch interval; 0 leaves CPython's."""
    if milliseconds > 0:
        sys.setswitchinterval(milliseconds / 1000.0)
