"""How many threads a decode step uses on a machine that other programs share.

A decode step splits every matmul across threads that meet at barriers (about 8 per layer). On a quiet machine
all cores are faster than one; on a busy one the scheduler deschedules one thread for a time slice and the others
wait for it at every barrier, so two threads can be slower than one (measured here at load 14 on 2 cores:
SmolLM2 decode 407 ms a token with 2 threads, 316-378 ms with 1). The load changes while a server runs, so the
engine does not guess from the load average: it times the candidates now and then and keeps the fastest.

`ThreadTuner` is that policy, separate from the engine so it can be tested on synthetic timings: it asks for a
few trial steps at each candidate count (all cores, half, one), then uses the fastest per generated token for
`period` steps, and tries again. On a quiet machine the trials cost about 4% of the steps at a slower count.
"""
from __future__ import annotations

import statistics


class ThreadTuner:
    """Thread count for each decode step: `threads()` before the step, `record(seconds, rows)` after it."""

    def __init__(self, max_threads: int, period: int = 256, trial_steps: int = 5):
        if max_threads < 1 or period < 1 or trial_steps < 1:
            raise ValueError("max_threads, period and trial_steps must be >= 1")
        self.candidates = sorted({max_threads, max(1, max_threads // 2), 1}, reverse=True)
        self.period, self.trial_steps = period, trial_steps
        self.chosen = max_threads
        self._trials: dict[int, list[float]] = {}
        self._steps_left = 0 if len(self.candidates) > 1 else -1   # -1: nothing to choose from, never trial

    def _trying(self) -> int | None:
        """The candidate still owed trial steps in this round, or None outside a round."""
        for count in self.candidates:
            if len(self._trials.get(count, ())) < self.trial_steps:
                return count
        return None

    def threads(self) -> int:
        if self._steps_left == 0:
            trying = self._trying()
            if trying is not None:
                return trying
        return self.chosen

    def record(self, seconds: float, rows: int) -> None:
        """The step just run took `seconds` for `rows` tokens with the count `threads()` returned."""
        if self._steps_left < 0:
            return
        if self._steps_left > 0:
            self._steps_left -= 1
            return
        trying = self._trying()
        self._trials.setdefault(trying, []).append(seconds / max(rows, 1))
        if self._trying() is None:        # round complete: keep the fastest median time per token
            self.chosen = min(self.candidates, key=lambda c: (statistics.median(self._trials[c]), -c))
            self._trials = {}
            self._steps_left = self.period
