"""A progress bar over the sampling steps, fed by the compiled loop's per-step host callback."""

from __future__ import annotations

import sys
import threading
import time


class StepProgress:
    """Host side of the sampling loop's per-step callback: a progress bar over the steps.

    The compiled loop calls it once per step (``jax.debug.callback``: a host call per step, no
    change to the loop's arithmetic). The bar appears only once the remaining steps are expected to
    take more than ``after_s`` seconds, so short edits print nothing. ``positions`` lists what the
    bar was given (its step count after each update, the last one at ``finish``), empty when no
    bar was shown: what it draws depends on when the terminal is redrawn, what it is given does not.
    """

    def __init__(self, after_s: float = 3.0, stream=None):
        self.after_s = after_s
        self.stream = stream
        self._lock = threading.Lock()
        self.start(0)

    def start(self, steps: int, desc: str = "sampling") -> None:
        with self._lock:
            self.steps, self.desc, self.calls, self.t0, self.bar = steps, desc, 0, None, None
            self.positions: list[int] = []

    def __call__(self, *_operands) -> None:
        with self._lock:
            self.calls += 1
            done = self.calls - 1                 # called as each step begins
            now = time.monotonic()
            if self.t0 is None:
                self.t0 = now
            elif self.bar is None and self.steps and done < self.steps:
                remaining = (now - self.t0) / done * (self.steps - done)
                if remaining > self.after_s:
                    from tqdm import tqdm

                    self.bar = tqdm(total=self.steps, initial=done, desc=self.desc, unit="step", leave=False,
                                    file=self.stream or sys.stderr)
            if self.bar is not None:
                self.bar.update(min(done, self.steps) - self.bar.n)
                self.positions.append(self.bar.n)

    def finish(self) -> None:
        with self._lock:
            if self.bar is not None:
                self.bar.update(self.steps - self.bar.n)
                self.positions.append(self.bar.n)
                self.bar.close()
                self.bar = None
