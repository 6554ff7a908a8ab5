"""Where metrics go: <workdir>/metrics.jsonl, TensorBoard, and a progress bar on the terminal."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np


def _scalar(value: Any) -> float | int:
    value = np.asarray(value)
    if value.size != 1:
        raise ValueError(f"metrics must be scalars, got shape {value.shape}")
    value = value.item()
    return value if isinstance(value, int) else float(value)


class MetricWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        self.samples_dir = os.path.join(workdir, "samples")
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.tensorboard_dir, flush_secs=30)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Records scalar metrics at `step`; returns them as python numbers."""
        values = {k: _scalar(v) for k, v in metrics.items()}
        if not self.enabled:
            return values
        record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        return values

    def write_samples(self, step: int, name: str, samples: list[dict]) -> str | None:
        """Writes an evaluator's examples (its generations beside their references) to
        <workdir>/samples/<name>_step<step>.jsonl, one JSON object per line; returns the path."""
        if not self.enabled:
            return None
        os.makedirs(self.samples_dir, exist_ok=True)
        path = os.path.join(self.samples_dir, f"{name}_step{int(step)}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(sample) + "\n" for sample in samples)
        return path

    def close(self) -> None:
        """Flushes TensorBoard."""
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of <workdir>/metrics.jsonl, in order."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A one-line progress bar: step, steps/s, examples/s, ETA and the latest loss."""

    def __init__(self, total: int, start: int, batch_size: int, *, enabled: bool = True):
        self.total, self.batch_size, self.enabled = total, batch_size, enabled
        self._start_step, self._t0 = start, None
        self._last = ""
        self.tty = sys.stderr.isatty()
        self.log_interval, self._printed = 10.0, 0.0

    def update(self, step: int, loss: float | None = None, *, force: bool = False) -> None:
        """Redraws the bar after `step` completed steps (timing starts at the first call)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._t0 is None:
            # The first step compiles; rates count from the end of it.
            self._t0, self._start_step = now, step
            return
        done = step - self._start_step
        elapsed = max(now - self._t0, 1e-9)
        rate = done / elapsed
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        frac = step / max(self.total, 1)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        loss_s = f" loss {loss:.4f}" if loss is not None else ""
        line = (
            f"[{bar}] {step}/{self.total} {rate:.2f} steps/s {rate * self.batch_size:.0f} ex/s "
            f"ETA {_fmt_time(eta)}{loss_s}"
        )
        if self.tty:
            sys.stderr.write("\r" + line.ljust(len(self._last)))
            sys.stderr.flush()
        elif force or step >= self.total or now - self._printed >= self.log_interval:
            # A log file gets a line every log_interval seconds, not a redraw per step.
            print(line, file=sys.stderr, flush=True)
            self._printed = now
        self._last = line

    def close(self) -> None:
        """Ends the bar's line."""
        if self.enabled and self.tty and self._last:
            sys.stderr.write("\n")


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
