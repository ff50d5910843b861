"""Stopping a process within one budget, however many workers it runs.

On SIGTERM (or Ctrl-C) a process stops taking work and its workers are told to stop at once,
while in-flight HTTP requests get `HTTP_DRAIN_S` to finish. Every worker thread is then joined
against one shared deadline, `STOP_BUDGET_S` after the signal, not a timeout per thread: ten
slow threads cost the budget once, not ten times. A worker still busy at the deadline is left
behind and its work handed back: it committed nothing it had not finished (one transaction per
batch, offsets and log positions committed after it), so the next start, or another replica,
takes the same events again and the inbox drops what was already applied. `HARD_EXIT_S` after
the signal the process exits whatever still runs (a call blocked in a driver, a request's
thread waiting for a lock), so a process always stops within 10 s with status 0; once its
workers are joined it leaves at once, without the interpreter's teardown (`exit_now`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import structlog

log = structlog.get_logger(__name__)

HTTP_DRAIN_S = 4  # in-flight requests may finish; then they are cancelled (clients retry)
STOP_BUDGET_S = 6.0  # from the signal to the last worker join
# From the signal to the process being gone: a cancelled request's thread can still be waiting
# for a lock, and the event loop waits for it when it closes; 2 s short of the 10 s promise.
HARD_EXIT_S = 8.0


def worker_name(worker: Callable[..., Any]) -> str:
    """A thread name that says whose worker it is, e.g. `billing.consumers:consume`."""
    module = getattr(worker, "__module__", "") or ""
    qualname = getattr(worker, "__qualname__", "worker").replace(".<locals>", "")
    return f"{module.removeprefix('services.')}:{qualname}" if module else qualname


class Shutdown:
    """One stop event and one deadline for all of a process's workers."""

    def __init__(self, budget_s: float = STOP_BUDGET_S) -> None:
        self.stop = threading.Event()
        self.budget_s = budget_s
        self.began: float | None = None
        self.notes: dict[str, Any] = {}
        self._lock = threading.Lock()

    def begin(self, **notes: Any) -> None:
        """Tell every worker to stop; the first call starts the clock, later ones only add
        notes for the final log line."""
        with self._lock:
            self.notes.update(notes)
            if self.began is None:
                self.began = time.monotonic()
        self.stop.set()

    def remaining(self) -> float:
        if self.began is None:
            return self.budget_s
        return max(0.0, self.began + self.budget_s - time.monotonic())

    def join(self, threads: Iterable[threading.Thread]) -> tuple[list[str], list[str]]:
        """Join every thread against the one deadline; (stopped, still running) by name."""
        self.begin()
        threads = list(threads)
        for t in threads:
            t.join(timeout=self.remaining())
        stopped = [t.name for t in threads if not t.is_alive()]
        running = [t.name for t in threads if t.is_alive()]
        return stopped, running

    def elapsed(self) -> float:
        return 0.0 if self.began is None else time.monotonic() - self.began


def start_workers(
    workers: Iterable[Callable[[threading.Event], None]], stop: threading.Event
) -> list[threading.Thread]:
    # Daemon threads: one left behind at the deadline must not keep the process alive.
    threads = [
        threading.Thread(target=w, args=(stop,), daemon=True, name=worker_name(w)) for w in workers
    ]
    for t in threads:
        t.start()
    return threads


def _tally(names: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(names).items()))


def log_stopped(shutdown: Shutdown, stopped: list[str], running: list[str], **extra: Any) -> None:
    """The one line a stopping process leaves: what stopped, what was handed back."""
    log.info(
        "process.stopped",
        took_s=round(shutdown.elapsed(), 2),
        workers_stopped=len(stopped),
        handed_back=_tally(running),
        **shutdown.notes,
        **extra,
    )


def exit_now() -> NoReturn:
    """Leave with status 0 without the interpreter's own teardown, once the workers were
    joined and the line logged. What the teardown would still do only delays the exit, and
    nothing of it matters to committed work: threads of cancelled requests waiting for a lock
    (the event loop waits for them as it closes), SQLite checkpointing a large write-ahead log
    as its last connection closes, exit hooks. Transactions left open roll back."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream must not stop the exit
            stream.flush()
    os._exit(0)


def arm_hard_exit(after_s: float = HARD_EXIT_S) -> None:
    """From now on the process is gone within `after_s`, whatever still runs. For the CLI
    only: never call it inside a test process."""

    def expire() -> None:
        time.sleep(after_s)
        me = threading.current_thread()
        left = _tally(t.name for t in threading.enumerate() if t is not me)
        log.warning("process.exit_forced", after_s=after_s, threads_left=left)
        exit_now()

    threading.Thread(target=expire, daemon=True, name="shutdown-deadline").start()
