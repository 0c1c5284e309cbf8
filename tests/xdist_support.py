"""pytest-xdist's ``--dist loadfile`` with its recovery from a crashed worker repaired.

When a worker process dies (a segfault, the OOM killer, ``os._exit``), xdist 3.8.0, its newest
release, replaces it and goes on; with ``loadfile`` (and ``loadscope``) the run can then hang at
its end, idle, for ever. CI met this: a worker died 5% into the suite and the run sat at 98% until
CI's 90 minutes ran out, so neither the crash nor anything after it was reported. Three faults of
``LoadScopeScheduling``, each reported upstream and each repaired here:

* ``remove_node`` puts back on the queue every file the dead worker was ever given, finished ones
  included; a worker handed a finished file receives an empty batch, never reports back on it, and
  is never given more (pytest-dev/pytest-xdist#1378, #1323);
* a replacement worker is given one file, and a worker starts a test only once it holds the next
  one (or the shutdown signal): a one-test file never starts (#1327);
* the test the worker died in is queued again and run a second time after it was reported failed,
  and a test that kills its worker kills the replacement too (#1371).

Installed by tests/conftest.py (``pytest_xdist_make_scheduler``) for ``--dist loadfile``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from xdist.scheduler import LoadFileScheduling

#: A worker runs its current test once it holds this many (the next one tells it which fixtures to keep).
MIN_PENDING = 2


class RecoveringLoadFileScheduling(LoadFileScheduling):
    """``--dist loadfile``: a file's tests on one worker, in collection order; survives a worker's death."""

    def remove_node(self, node: Any) -> str | None:
        """Forget ``node``; if it died mid-file, requeue only the tests it never finished, ahead of the
        rest (they were started first), except the one it died in (reported failed by the caller)."""
        workload = self.assigned_work.pop(node)
        unfinished = [nodeid for unit in workload.values() for nodeid, done in unit.items() if not done]
        if not unfinished:
            return None
        crashed = unfinished[0]
        requeued: OrderedDict[str, dict[str, bool]] = OrderedDict()
        for scope, unit in workload.items():
            left = {nodeid: done or nodeid == crashed for nodeid, done in unit.items()}
            if not all(left.values()):
                requeued[scope] = left
        self.workqueue = OrderedDict([*requeued.items(), *self.workqueue.items()])
        for survivor in self.assigned_work:
            self._reschedule(survivor)
        return crashed

    def _reschedule(self, node: Any) -> None:
        """xdist's rule (one more file once the worker holds at most two tests), then more files until it
        holds two, so that it can start; the shutdown signal once nothing is left to hand out."""
        if node.shutting_down:
            return
        if self.workqueue and self._pending_of(self.assigned_work[node]) <= MIN_PENDING:
            self._assign_work_unit(node)
        while self.workqueue and self._pending_of(self.assigned_work[node]) < MIN_PENDING:
            self._assign_work_unit(node)
        if not self.workqueue:
            node.shutdown()
