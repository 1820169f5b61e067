"""Training metrics: exact interval averages and one JSON line per log step."""

import json
import math
import os
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np


class MetricsAccumulator:
  """Sums per-step metric sums and counts on the host between two log steps.

  The train step returns `{name: (total, count)}` pairs so that an interval
  average is sum(totals) / sum(counts): each step counts with its number of
  tokens or examples, as in one big batch. Plain scalars (weights, learning
  rate) are averaged over steps.
  """

  def __init__(self):
    self._totals = {}
    self._counts = {}
    self._scalars = {}
    self._steps = 0

  def add(self, step_metrics: Mapping[str, Any]) -> None:
    step_metrics = jax.device_get(step_metrics)
    for name, value in step_metrics.items():
      if isinstance(value, tuple):
        total, count = value
        self._totals[name] = self._totals.get(name, 0.0) + float(total)
        self._counts[name] = self._counts.get(name, 0.0) + float(count)
      else:
        self._scalars[name] = self._scalars.get(name, 0.0) + float(value)
    self._steps += 1

  def summary(self) -> dict[str, float]:
    """Returns the interval averages and resets the accumulator."""
    result = {}
    for name, total in self._totals.items():
      count = self._counts[name]
      # A task absent from every step of the interval has no value.
      result[name] = total / count if count > 0 else math.nan
    for name, total in self._scalars.items():
      result[name] = total / max(self._steps, 1)
    self.__init__()
    return result


class MetricsWriter:
  """Appends metrics to `WORKDIR/metrics.jsonl` and logs them, on process 0."""

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if self._enabled:
      os.makedirs(workdir, exist_ok=True)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    record = {"step": int(step)}
    record.update({name: _json_number(value)
                   for name, value in sorted(metrics.items())})
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    logging.info("step %d: %s", step, _format_line(metrics))


def _json_number(value: float) -> float | None:
  value = float(np.asarray(value))
  # JSON has no NaN; an absent task's loss is written as null.
  return value if math.isfinite(value) else None


def _format_line(metrics: Mapping[str, float]) -> str:
  parts = []
  for name in sorted(metrics):
    value = float(metrics[name])
    if name == "tokens_per_second":
      parts.append(f"{name}={value:,.0f}")
    elif name == "learning_rate":
      parts.append(f"{name}={value:.2e}")
    else:
      parts.append(f"{name}={value:.4f}")
  return ", ".join(parts)
