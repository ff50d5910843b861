"""One deadline for all of a process's workers, however many are slow."""

from __future__ import annotations

import threading
import time

from shared.shutdown import Shutdown, start_workers, worker_name


def _stubborn(stop: threading.Event) -> None:
    stop.wait()
    time.sleep(3)  # busy with a call that does not look at the stop event


def _prompt(stop: threading.Event) -> None:
    stop.wait()


def test_slow_workers_cost_the_budget_once_not_once_each() -> None:
    shutdown = Shutdown(budget_s=0.5)
    threads = start_workers([_stubborn] * 5 + [_prompt], shutdown.stop)
    began = time.monotonic()
    stopped, running = shutdown.join(threads)
    assert time.monotonic() - began < 1.0
    assert stopped == ["tests.unit.test_shutdown:_prompt"]
    assert running == ["tests.unit.test_shutdown:_stubborn"] * 5
    assert all(t.daemon for t in threads)  # left behind, they do not hold the process


def test_the_clock_starts_at_the_signal_not_at_the_join() -> None:
    shutdown = Shutdown(budget_s=0.5)
    threads = start_workers([_stubborn], shutdown.stop)
    shutdown.begin(requests_in_flight=3)
    time.sleep(0.4)  # e.g. requests draining meanwhile
    began = time.monotonic()
    shutdown.join(threads)
    assert time.monotonic() - began < 0.3
    assert shutdown.notes == {"requests_in_flight": 3}


def test_worker_names_say_whose_worker() -> None:
    assert worker_name(_prompt) == "tests.unit.test_shutdown:_prompt"
