"""A concise live status of the Tune run, in place of Ray's verbose tables: one line per change."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ray.tune import Callback

from pipeline.training.space import trial_label


class LiveStatus(Callback):
    """Prints `[train 0:42] 2 running, 3/9 done, 0 failed | best val_accuracy 0.912 (vit)` as things change.

    Results print at most every `every_s` seconds; starts, ends and failures always print.
    """

    def __init__(
        self,
        total: int,
        metric: str = "val_accuracy",
        every_s: float = 5.0,
        out: TextIO = sys.stdout,
        done_before: int = 0,
    ):
        self.total, self.metric, self.every_s, self.out = total, metric, every_s, out
        self.done_before = done_before  # trials a restored run had finished before
        self.started = time.monotonic()
        self.last_print = 0.0
        self.best: tuple[float, str] | None = None
        # Our own bookkeeping: callbacks fire before Tune updates a trial's status.
        self.running: set[str] = set()
        self.done: set[str] = set()
        self.failed: set[str] = set()

    def _line(self, event: str) -> None:
        running, done, failed = len(self.running), self.done_before + len(self.done), len(self.failed)
        elapsed = int(time.monotonic() - self.started)
        best = f" | best {self.metric} {self.best[0]:.3f} ({self.best[1]})" if self.best else ""
        print(
            f"[train {elapsed // 60}:{elapsed % 60:02d}] {running} running, {done}/{self.total} done, "
            f"{failed} failed{best}{' | ' + event if event else ''}",
            file=self.out,
            flush=True,
        )
        self.last_print = time.monotonic()

    @staticmethod
    def _name(trial) -> str:
        return trial_label(trial.config)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._line(f"started {self._name(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if isinstance(value, float) and (self.best is None or value > self.best[0]):
            self.best = (value, self._name(trial))
        if time.monotonic() - self.last_print >= self.every_s:
            self._line("")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done.add(trial.trial_id)
        self._line(f"finished {self._name(trial)}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)  # it starts again (on_trial_start) when retried
        self._line(f"{self._name(trial)} failed; retrying from its last checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.failed.add(trial.trial_id)
        self._line(f"{self._name(trial)} failed for good")
