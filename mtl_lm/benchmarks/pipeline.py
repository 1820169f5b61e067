"""Throughput of the stage-2 input pipeline in one process.

`run()` builds the tokenizer and the training iterator of `configs/stage2.py`
(all four tasks) on its default corpus, then times `next()` on the iterator
with `config.data.num_workers = 0`, i.e. one worker doing all the work. The
one-time startup (tokenizer training, reading and tokenizing the documents)
is timed separately and excluded from the rates.

In the same run, in alternating rounds with the pipeline, it times the
compiled stage-2 train step of the default model on this machine. The
headline `ratio` is the pipeline's tokens per second divided by the tokens
per second the train step consumes. Both count batch positions, padding
included. The goal is a ratio of at least 10.
"""

import collections
import os
import tempfile
import time

from absl import logging
import jax
import numpy as np

import mtl_lm
from mtl_lm import configs
from mtl_lm import sharding
from mtl_lm import tasks
from mtl_lm import tokenizer as tokenizer_lib
from mtl_lm import train
from mtl_lm.data import pipeline


def _stage2_config():
  config_dir = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(mtl_lm.__file__))), "configs")
  return configs.load_sibling(os.path.join(config_dir, "base.py"),
                              "stage2").get_config()


class _TrainStepTimer:
  """Times the compiled stage-2 train step of the default model."""

  def __init__(self, config, vocab_size: int):
    mesh = sharding.make_mesh(config.mesh)
    self._trainer = train.Trainer(config, vocab_size=vocab_size, mesh=mesh)
    self._state = self._trainer.init(config.seed)
    self._positions_per_step = config.data.batch_size * config.data.seq_len
    self._seconds = 0.0
    self._steps = 0
    self._compiled = False

  def time_steps(self, num_steps: int, batch) -> None:
    batch = pipeline.make_global_batch(batch, self._trainer.mesh,
                                       self._trainer.batch_sharding)
    if not self._compiled:
      self._state, _ = self._trainer.step(self._state, batch)
      jax.block_until_ready(self._state)
      self._compiled = True
    start = time.perf_counter()
    for _ in range(num_steps):
      self._state, _ = self._trainer.step(self._state, batch)
    jax.block_until_ready(self._state)
    self._seconds += time.perf_counter() - start
    self._steps += num_steps

  def seconds_per_step(self) -> float:
    return self._seconds / self._steps

  def tokens_per_second(self) -> float:
    return self._positions_per_step / self.seconds_per_step()


def run(*, num_batches: int = 300, warmup_batches: int = 20,
        num_rounds: int = 5, steps_per_round: int = 4,
        workdir: str | None = None) -> dict:
  """Measures batches, rows and tokens per second of the stage-2 pipeline.

  Args:
    num_batches: batches timed after the warm-up, over all rounds.
    warmup_batches: batches drawn, untimed, after the first one (first-fit
      packing and the per-task buffers fill up during these).
    num_rounds: alternations between timing the pipeline and the step.
    steps_per_round: train steps timed per round.
    workdir: where the tokenizer is trained or reused; default a temporary
      folder, so the tokenizer is trained afresh.

  Returns:
    `ratio` (pipeline over train-step tokens per second),
    `train_step_tokens_per_second`, `train_step_ms`, `tokens_per_second` (batch positions, padding included, as the train step
    consumes them), `real_tokens_per_second` (non-padding), `rows_per_second`,
    `batches_per_second`, `tokens_per_cpu_second` (positions per second of
    this process's CPU time), `padding_fraction`, the per-task padding fraction,
    `tokenizer_seconds` and `startup_seconds` (excluded from the rates), and
    the batch shape.
  """
  config = _stage2_config()
  config.data.num_workers = 0
  with tempfile.TemporaryDirectory() as temporary:
    start = time.perf_counter()
    tokenizer = tokenizer_lib.load_or_train_tokenizer(config.data,
                                                      workdir or temporary)
    tokenizer_seconds = time.perf_counter() - start

    start = time.perf_counter()
    iterator = pipeline.make_train_iterator(config, tokenizer,
                                            process_index=0, process_count=1)
    next(iterator)
    startup_seconds = time.perf_counter() - start
    for _ in range(warmup_batches):
      next(iterator)

    step_timer = _TrainStepTimer(config, tokenizer.vocab_size)
    real_tokens = collections.Counter()
    positions = collections.Counter()
    seconds = 0.0
    cpu_seconds = 0.0
    batches_per_round = max(num_batches // num_rounds, 1)
    for _ in range(num_rounds):
      start = time.perf_counter()
      start_cpu = time.process_time()
      for _ in range(batches_per_round):
        batch = next(iterator)
        for name, task_id in tasks.TASK_IDS.items():
          rows = batch["task_id"] == task_id
          positions[name] += int(np.count_nonzero(rows)) * config.data.seq_len
          real_tokens[name] += int(
              np.count_nonzero(batch["segment_ids"][rows]))
      seconds += time.perf_counter() - start
      cpu_seconds += time.process_time() - start_cpu
      step_timer.time_steps(steps_per_round, batch)
    num_batches = batches_per_round * num_rounds

  batch_size, seq_len = config.data.batch_size, config.data.seq_len
  total_positions = num_batches * batch_size * seq_len
  step_tokens_per_second = step_timer.tokens_per_second()
  result = {
      "ratio": (total_positions / seconds) / step_tokens_per_second,
      "train_step_tokens_per_second": step_tokens_per_second,
      "train_step_ms": 1000 * step_timer.seconds_per_step(),
      "tokens_per_second": total_positions / seconds,
      # On a shared machine, wall time includes waiting for other processes;
      # the rate per CPU second of this process is what one free core gives.
      "tokens_per_cpu_second": total_positions / cpu_seconds,
      "real_tokens_per_second": sum(real_tokens.values()) / seconds,
      "rows_per_second": num_batches * batch_size / seconds,
      "batches_per_second": num_batches / seconds,
      "padding_fraction": 1.0 - sum(real_tokens.values()) / total_positions,
      "padding_fraction_per_task": {
          name: 1.0 - real_tokens[name] / positions[name]
          for name in positions if positions[name]
      },
      "tokenizer_seconds": tokenizer_seconds,
      "startup_seconds": startup_seconds,
      "batch_size": batch_size,
      "seq_len": seq_len,
      "num_batches": num_batches,
  }
  logging.info("Pipeline benchmark: %s", result)
  return result
