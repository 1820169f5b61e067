"""Random batches in the input pipeline's format, for benchmarks and tests.

They have the pipeline's fields, shapes and dtypes, so a train step compiled
for them is the one training compiles, without tokenizing a corpus first.
"""

import math

import numpy as np

from mtl_lm import tasks
from mtl_lm import tokenizer


def batch(config, *, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Returns a random batch in the pipeline's format, two rows per task.

  Rows hold two packed documents each; rtd rows carry `MASK_ID` at their
  selected positions, as the pipeline writes them for the generator.
  """
  rng = np.random.default_rng(seed)
  batch_size = config.data.batch_size
  length = config.data.seq_len
  first_id = tokenizer.NUM_RESERVED_IDS
  original = rng.integers(first_id, vocab_size, (batch_size, length))
  split = length // 2 + 3
  segment_ids = np.where(np.arange(length) < split, 1, 2)
  segment_ids = np.broadcast_to(segment_ids, (batch_size, length)).copy()
  segment_ids[:, -4:] = 0  # Padding at the end of every row.
  positions = np.where(np.arange(length) < split, np.arange(length),
                       np.arange(length) - split)
  positions = np.broadcast_to(positions, (batch_size, length)).copy()
  task_id = np.arange(batch_size) % len(tasks.TASK_NAMES)

  inputs = original.copy()
  targets = np.zeros_like(original)
  weights = (segment_ids != 0).astype(np.float32)
  selected = (rng.random((batch_size, length)) < 0.15) & (segment_ids != 0)
  for row in range(batch_size):
    task = tasks.TASK_NAMES[task_id[row]]
    if task == tasks.LM:
      targets[row, :-1] = original[row, 1:]
      same_document = segment_ids[row, :-1] == segment_ids[row, 1:]
      weights[row, :-1] *= same_document
      weights[row, -1] = 0
    elif task == tasks.MLM:
      inputs[row, selected[row]] = tokenizer.MASK_ID
      targets[row] = original[row]
      weights[row] = selected[row]
    elif task == tasks.RTD:
      inputs[row, selected[row]] = tokenizer.MASK_ID
    else:
      weights[row] = 0
  sop_classes = math.factorial(config.data.sop_num_segments)
  return {
      "input_ids": inputs.astype(np.int32),
      "original_ids": original.astype(np.int32),
      "targets": targets.astype(np.int32),
      "loss_weights": weights.astype(np.float32),
      "segment_ids": segment_ids.astype(np.int32),
      "positions": positions.astype(np.int32),
      "task_id": task_id.astype(np.int32),
      "sop_label": (np.arange(batch_size) % sop_classes).astype(np.int32),
  }
