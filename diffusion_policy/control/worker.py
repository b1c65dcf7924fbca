"""Inference off the control loop: one request in flight at a time, on a thread or in virtual time.

    worker = make_worker(clock, latency=Latency(0.1, 0.02, seed=0))
    worker.submit(lambda: predict(window))       # returns at once
    ...
    done = worker.poll()                         # None while running, then a Result once

``ThreadWorker`` (wall clock) runs the request in a daemon thread while the loop keeps the robot
busy; it sets :attr:`event` when done, which wakes the loop's ``sleep_until``. The injected
``latency`` is slept after the computation: it models a slower computer or a network on top of
what this machine measures.

``SimWorker`` (simulated clock) computes the request at once, in the caller's thread, and makes
its result visible at ``submit time + latency`` of virtual time (:meth:`ready_at`). With no
injected latency the measured computation time is used instead (real but not reproducible); with
one, the computation takes no virtual time at all, so the loop's timeline depends on the injected
numbers only. A request that raises makes its exception the result, at the same virtual time.

:class:`Latency` draws ``base + U(0, jitter)`` seconds from its own seeded generator, or calls a
function ``f(call_index) -> seconds`` (a test's stall at one call).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np


class Latency:
    """Seconds of injected latency per call: ``base + U(0, jitter)`` or ``fn(call_index)``."""

    def __init__(self, base: float = 0.0, jitter: float = 0.0, seed: int = 0, fn=None):
        if base < 0 or jitter < 0:
            raise ValueError(f"Latency: base={base} and jitter={jitter} must be >= 0 s")
        self.base, self.jitter, self.fn = float(base), float(jitter), fn
        self._rng = np.random.default_rng(seed)
        self.calls = 0

    def __call__(self) -> float:
        i, self.calls = self.calls, self.calls + 1
        if self.fn is not None:
            return float(self.fn(i))
        return self.base + (float(self._rng.uniform(0.0, self.jitter)) if self.jitter else 0.0)

    @property
    def zero(self) -> bool:
        return self.fn is None and self.base == 0.0 and self.jitter == 0.0


@dataclass
class Result:
    value: object  # what the request returned, or the exception it raised
    error: bool
    submitted: float  # clock time of submit
    done: float  # clock time at which the result became visible
    compute_s: float  # measured computation time on this machine


class ThreadWorker:
    """Requests on a daemon thread; ``latency`` (None = none) is slept after each computation."""

    def __init__(self, clock, latency: Latency | None = None):
        self.clock, self.latency = clock, latency
        self.event = threading.Event()
        self._result: Result | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def ready_at(self) -> float:
        return math.inf  # unknown: the thread sets ``event``

    def submit(self, fn) -> None:
        if self.busy:
            raise RuntimeError("submit: a request is still in flight")
        self.event.clear()
        t_sub = self.clock.now()
        extra = self.latency() if self.latency is not None else 0.0

        def run():
            t0 = time.perf_counter()
            try:
                value, error = fn(), False
            except Exception as e:  # handed to the loop, which counts it as a fault
                value, error = e, True
            compute = time.perf_counter() - t0
            if extra > 0:
                time.sleep(extra)
            with self._lock:
                self._result = Result(value, error, t_sub, self.clock.now(), compute)
            self.event.set()

        self._thread = threading.Thread(target=run, name="inference", daemon=True)
        self._thread.start()

    def poll(self) -> Result | None:
        with self._lock:
            res, self._result = self._result, None
        if res is not None:
            self._thread = None
            self.event.clear()
        return res

    def close(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


class SimWorker:
    """Requests computed at submit, visible after their (virtual) latency."""

    def __init__(self, clock, latency: Latency | None = None):
        self.clock, self.latency = clock, latency
        self.event = None
        self._pending: Result | None = None

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def ready_at(self) -> float:
        return self._pending.done if self._pending is not None else math.inf

    def submit(self, fn) -> None:
        if self.busy:
            raise RuntimeError("submit: a request is still in flight")
        t_sub = self.clock.now()
        t0 = time.perf_counter()
        try:
            value, error = fn(), False
        except Exception as e:
            value, error = e, True
        compute = time.perf_counter() - t0
        delay = self.latency() if self.latency is not None else compute
        self._pending = Result(value, error, t_sub, t_sub + delay, compute)

    def poll(self) -> Result | None:
        res = self._pending
        if res is None or self.clock.now() < res.done:
            return None
        self._pending = None
        return res

    def close(self, timeout: float = 0.0) -> None:
        pass


def make_worker(clock, latency: Latency | None = None):
    """The worker that fits ``clock``: :class:`SimWorker` for simulated time, else a thread."""
    return SimWorker(clock, latency) if clock.simulated else ThreadWorker(clock, latency)
