"""Clocks for the real-time loop: real time with threads, or deterministic virtual time.

    clock = WallClock()                      # time.monotonic(), robot and inference in threads
    clock = SimClock()                       # virtual seconds, advanced only by sleep_until

Both offer the same four calls, so the loop, the simulated robot and the inference worker are
written once:

- ``now()``: seconds since the clock was made.
- ``sleep_until(t, wake=None)``: return at time ``t``, or earlier once the ``threading.Event``
  ``wake`` is set (wall clock; a result of the inference thread wakes the loop).
- ``every(period, fn)``: call ``fn(tick_time)`` at ``0, period, 2 period, ...`` from now on (the
  simulated robot's low-level control rate); returns a handle with ``stop()``.
- ``simulated``: whether time is virtual.

``SimClock`` runs no threads. ``sleep_until(t)`` runs every ``every`` callback whose tick time is
before ``t`` in time order (ties by registration order), setting ``now()`` to each tick's time
while it runs, and then sets ``now()`` to ``t``. A callback due exactly at ``t`` runs in the *next*
``sleep_until``: what the loop does at ``t`` (command an action stamped ``t``) happens before the
robot's tick at ``t``, as on a real robot whose servo reads its queue at the start of its period.
Inference latency is injected as virtual time by the worker (control/worker.py), so an episode's
timeline is an exact function of the injected latencies and seeds: tests compare exact counts.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time

EPS = 1e-9  # SimClock: a tick within this of ``t`` counts as at ``t`` (grid times computed two ways)


class _Timer:
    def __init__(self):
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


class WallClock:
    """Real time (``time.monotonic``); ``every`` runs its callback in a daemon thread."""

    simulated = False

    def __init__(self):
        self._origin = time.monotonic()
        self.overruns = 0  # ticks of ``every`` callbacks skipped because a callback ran late

    def now(self) -> float:
        return time.monotonic() - self._origin

    def sleep_until(self, t: float, wake: threading.Event | None = None) -> None:
        delay = t - self.now()
        if delay <= 0:
            return
        if wake is None:
            time.sleep(delay)
        else:
            wake.wait(delay)

    def every(self, period: float, fn, name: str = "clock-every") -> _Timer:
        if period <= 0:
            raise ValueError(f"every: period must be > 0 s, got {period}")
        timer = _Timer()
        start = self.now()

        def run():
            k = 0
            while not timer.stopped:
                t_k = start + k * period
                self.sleep_until(t_k)
                if timer.stopped:
                    break
                fn(t_k)
                k += 1
                late = int((self.now() - start) / period) - k  # whole periods already missed
                if late > 0:  # never run a backlog of stale ticks: skip to the current one
                    self.overruns += late
                    k += late

        thread = threading.Thread(target=run, name=name, daemon=True)
        timer.thread = thread
        thread.start()
        return timer


class SimClock:
    """Virtual time: nothing happens between calls, ``sleep_until`` advances it (module docstring)."""

    simulated = True

    def __init__(self, start: float = 0.0):
        self._t = float(start)
        self._heap: list = []  # (tick time, order, period, fn, timer)
        self._order = itertools.count()

    def now(self) -> float:
        return self._t

    def sleep_until(self, t: float, wake: threading.Event | None = None) -> None:
        while self._heap and self._heap[0][0] < t - EPS:
            due, order, period, fn, timer = heapq.heappop(self._heap)
            if timer.stopped:
                continue
            self._t = max(self._t, due)
            fn(due)
            if not timer.stopped:
                # the next tick from the start time and count, not by adding floats up
                k = timer.count = timer.count + 1
                heapq.heappush(self._heap, (timer.start + k * period, order, period, fn, timer))
        self._t = max(self._t, float(t))

    def every(self, period: float, fn, name: str = "") -> _Timer:
        if period <= 0:
            raise ValueError(f"every: period must be > 0 s, got {period}")
        timer = _Timer()
        timer.start, timer.count = self._t, 0
        heapq.heappush(self._heap, (self._t, next(self._order), period, fn, timer))
        return timer


def make_clock(name: str):
    """``"wall"`` -> :class:`WallClock`, ``"sim"`` -> :class:`SimClock`."""
    if name == "wall":
        return WallClock()
    if name == "sim":
        return SimClock()
    raise ValueError(f"clock={name!r}: expected 'wall' (real time) or 'sim' (virtual time)")
