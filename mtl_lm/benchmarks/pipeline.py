"""Throughput of the stage-2 input pipeline in one process.

`run()` builds the tokenizer and the training iterator of `configs/stage2.py`
(all four tasks) on its default corpus, then times `next()` on the iterator
with `config.data.num_workers = 0`, i.e. one worker doing all the work. The
one-time startup (tokenizer training, reading and tokenizing the documents)
is timed separately and excluded from the rates.
"""

import collections
import os
import tempfile
import time

from absl import logging
import numpy as np

import mtl_lm
from mtl_lm import configs
from mtl_lm import tasks
from mtl_lm import tokenizer as tokenizer_lib
from mtl_lm.data import pipeline


def _stage2_config():
  config_dir = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(mtl_lm.__file__))), "configs")
  return configs.load_sibling(os.path.join(config_dir, "base.py"),
                              "stage2").get_config()


def run(*, num_batches: int = 300, warmup_batches: int = 20,
        workdir: str | None = None) -> dict:
  """Measures batches, rows and tokens per second of the stage-2 pipeline.

  Args:
    num_batches: batches timed after the warm-up.
    warmup_batches: batches drawn, untimed, after the first one (first-fit
      packing and the per-task buffers fill up during these).
    workdir: where the tokenizer is trained or reused; default a temporary
      folder, so the tokenizer is trained afresh.

  Returns:
    `tokens_per_second` (batch positions, padding included, as the train step
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

    real_tokens = collections.Counter()
    positions = collections.Counter()
    start = time.perf_counter()
    start_cpu = time.process_time()
    for _ in range(num_batches):
      batch = next(iterator)
      for name, task_id in tasks.TASK_IDS.items():
        rows = batch["task_id"] == task_id
        positions[name] += int(np.count_nonzero(rows)) * config.data.seq_len
        real_tokens[name] += int(np.count_nonzero(batch["segment_ids"][rows]))
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - start_cpu

  batch_size, seq_len = config.data.batch_size, config.data.seq_len
  total_positions = num_batches * batch_size * seq_len
  result = {
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
