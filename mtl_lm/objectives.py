"""The four training objectives, each computed on its own examples of a batch.

A batch mixes examples of every task (`batch["task_id"] [batch]`). Each
objective below selects its rows, applies the matching loss from
`mtl_lm.losses` to the model outputs and returns a `WeightedSum` (so the task
mean is exact over devices and steps) plus its metrics as `WeightedSum`s.
Every task is normalised by its own count: predicted tokens for `lm`, masked
positions for `mlm`, real tokens for `rtd` and examples for `sop`.
"""

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mtl_lm import losses
from mtl_lm import sharding
from mtl_lm import tasks
from mtl_lm import tokenizer

Batch = Mapping[str, jax.Array]
Outputs = Mapping[str, jax.Array]


def task_rows(batch: Batch, task: str) -> jax.Array:
  """Returns `[batch]` float32, 1 on the rows of `task`."""
  return (batch["task_id"] == tasks.TASK_IDS[task]).astype(jnp.float32)


def token_weights(batch: Batch, task: str) -> jax.Array:
  """Returns `[batch, length]` float32 loss weights restricted to `task`."""
  return batch["loss_weights"] * task_rows(batch, task)[:, None]


def _zero_unselected(hidden: jax.Array, labels: jax.Array,
                     selected: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Zeroes hidden `[batch, length, embed]` and labels outside `selected`.

  Such positions then reach neither the value nor the gradient of a fused
  loss, even when their states are huge or their labels out of range.
  """
  hidden = jnp.where(selected[..., None], hidden,
                     jnp.zeros((), hidden.dtype))
  return hidden, jnp.where(selected, labels, 0)


def _vocab_parallel(function, unembedding: jax.Array, inputs: dict[str, Any]):
  """Runs `function(unembedding, inputs, vocab_axis_name)`.

  When the active mesh splits the vocabulary (`sharding.vocab_parallel_axis`),
  the call runs under `jax.shard_map` with each device on its own columns of
  `unembedding` and its own rows of the batch, so the `[embed, vocab]` matrix
  is never gathered. Otherwise it runs as is with `vocab_axis_name=None`.
  Every array in `inputs` (None entries are allowed) and in the outputs must
  have the batch as its leading axis.
  """
  axis = sharding.vocab_parallel_axis(unembedding.shape[1])
  if axis is None:
    return function(unembedding, inputs, vocab_axis_name=None)
  batch = PartitionSpec(sharding.BATCH_AXES)
  return jax.shard_map(
      functools.partial(function, vocab_axis_name=axis),
      in_specs=(PartitionSpec(None, axis), batch),
      out_specs=batch)(unembedding, inputs)


def token_objectives(outputs: Outputs, unembedding: jax.Array, batch: Batch,
                     *, active_tasks: tuple[str, ...], label_smoothing: float,
                     z_loss: float, chunk_size: int):
  """Next-token (lm) and masked-token (mlm) cross-entropy in one pass.

  lm and mlm rows are scored by one fused cross-entropy over the vocabulary,
  with label smoothing on the lm rows alone. Hidden states and labels of
  positions outside both tasks are zeroed first, so they reach neither value
  nor gradient.

  Returns:
    `(task_losses, task_metrics)` for the token tasks among `active_tasks`:
    a `WeightedSum` per task and `{task: {"accuracy": WeightedSum}}`.
  """
  token_tasks = [task for task in (tasks.LM, tasks.MLM)
                 if task in active_tasks]
  if not token_tasks:
    return {}, {}
  weights = {task: token_weights(batch, task) for task in token_tasks}
  selected = sum(weights.values()) != 0  # [batch, length]
  hidden, labels = _zero_unselected(outputs["hidden"], batch["targets"],
                                    selected)
  smoothing = None
  if tasks.LM in token_tasks and label_smoothing:
    lm_rows = task_rows(batch, tasks.LM)[:, None]  # [batch, 1]
    smoothing = jnp.broadcast_to(label_smoothing * lm_rows, labels.shape)

  def score(unembedding, inputs, vocab_axis_name):
    smoothing = inputs["smoothing"]
    return losses.fused_token_cross_entropy_with_argmax(
        inputs["hidden"], unembedding, inputs["labels"],
        label_smoothing=0.0 if smoothing is None else smoothing,
        z_loss=z_loss, chunk_size=chunk_size,
        vocab_axis_name=vocab_axis_name)

  per_position, predictions = _vocab_parallel(
      score, unembedding,
      {"hidden": hidden, "labels": labels, "smoothing": smoothing})

  task_losses = {}
  task_metrics = {}
  for task in token_tasks:
    task_losses[task] = losses.weighted_sum(per_position, weights[task])
    task_metrics[task] = {
        "accuracy": losses.accuracy(predictions, labels, weights[task])}
  return task_losses, task_metrics


def rtd_objective(outputs: Outputs, batch: Batch):
  """Per-token sigmoid cross-entropy of "replaced" against "original"."""
  weights = token_weights(batch, tasks.RTD)
  labels = batch["targets"]
  per_token = losses.replaced_token_detection_loss(outputs["rtd_logits"],
                                                   labels)
  metrics = losses.replaced_token_detection_metrics(outputs["rtd_logits"],
                                                    labels, weights)
  return losses.weighted_sum(per_token, weights), metrics


def sop_objective(outputs: Outputs, batch: Batch):
  """Softmax cross-entropy over the k! segment orders, one per example."""
  weights = task_rows(batch, tasks.SOP)
  per_example = losses.sentence_order_loss(outputs["sop_logits"],
                                           batch["sop_label"])
  accuracy = losses.argmax_accuracy(outputs["sop_logits"],
                                    batch["sop_label"], weights)
  return losses.weighted_sum(per_example, weights), {"accuracy": accuracy}


def sample_tokens(hidden: jax.Array, unembedding: jax.Array, rng: jax.Array,
                  *, chunk_size: int, first_allowed_id: int,
                  vocab_axis_name: str | None = None) -> jax.Array:
  """Samples one token per position from `softmax(hidden @ unembedding)`.

  Uses the Gumbel-max trick block by block over the vocabulary, so the full
  `[batch, length, vocab]` logits never exist; the noise and the scores are
  float32. Ids below `first_allowed_id` (the special tokens) are never
  drawn.

  Args:
    hidden: `[batch, length, embed]`.
    unembedding: `[embed, vocab]`, or this device's `[embed, vocab / n]`
      columns with `vocab_axis_name` (see `losses.fused_token_cross_entropy`).
    rng: PRNG key. Under `shard_map`, fold in the batch shard's index first,
      so that different rows draw different noise.
    chunk_size: vocabulary columns per block.
    first_allowed_id: the smallest id that may be drawn.
    vocab_axis_name: the mesh axis that splits the vocabulary, or None.

  Returns:
    `[batch, length]` int32 sampled whole-vocabulary ids.
  """
  local_vocab = unembedding.shape[1]
  offset = 0
  if vocab_axis_name is not None:
    shard = jax.lax.axis_index(vocab_axis_name)
    offset = shard * local_vocab
    rng = jax.random.fold_in(rng, shard)
  num_blocks = -(-local_vocab // chunk_size)
  padded_vocab = num_blocks * chunk_size
  # [embed, vocab] -> [embed, num_blocks * chunk]; padded columns are masked.
  unembedding = jnp.pad(jax.lax.stop_gradient(unembedding),
                        ((0, 0), (0, padded_vocab - local_vocab)))
  hidden = jax.lax.stop_gradient(hidden)

  def block_best(_, index):
    start = index * chunk_size
    block = jax.lax.dynamic_slice_in_dim(unembedding, start, chunk_size, 1)
    logits = jnp.einsum("ble,ev->blv", hidden, block.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    ids = offset + start + jnp.arange(chunk_size)
    allowed = ((ids >= first_allowed_id) &
               (start + jnp.arange(chunk_size) < local_vocab))
    gumbel = jax.random.gumbel(jax.random.fold_in(rng, index), logits.shape,
                               jnp.float32)
    score = jnp.where(allowed, logits + gumbel, -jnp.inf)
    best = jnp.argmax(score, axis=-1)
    return None, (jnp.max(score, axis=-1), offset + start + best)

  # The best score and id of each block, [num_blocks, batch, length]. A
  # scan without a carry needs no loop state across blocks.
  _, (scores, ids) = jax.lax.scan(block_best, None, jnp.arange(num_blocks))
  best_block = jnp.argmax(scores, axis=0)
  score = jnp.max(scores, axis=0)
  sampled = jnp.take_along_axis(ids, best_block[None], axis=0)[0]
  if vocab_axis_name is not None:
    best_score = jax.lax.pmax(score, vocab_axis_name)
    sampled = jax.lax.pmin(
        jnp.where(score == best_score, sampled, jnp.iinfo(jnp.int32).max),
        vocab_axis_name)
  return jnp.maximum(sampled, first_allowed_id).astype(jnp.int32)


def electra_generator_objective(generator_hidden: jax.Array,
                                unembedding: jax.Array, batch: Batch,
                                rng: jax.Array, *, z_loss: float,
                                chunk_size: int):
  """Trains the ELECTRA generator and builds the discriminator's inputs.

  On rtd rows the pipeline put `MASK_ID` at the selected positions. The
  generator predicts the original tokens there (its mlm loss), and a token
  sampled from its distribution replaces each mask. A sample equal to the
  original is labelled original. The discrete samples carry no gradient, so
  the discriminator's loss never reaches the generator.

  Args:
    generator_hidden: `[batch, length, embed]` generator outputs for
      `batch["input_ids"]`.
    unembedding: `[embed, vocab]`, shared with the discriminator.
    batch: the batch from the pipeline.
    rng: PRNG key for sampling.
    z_loss: z-loss coefficient of the generator's mlm loss.
    chunk_size: vocabulary block of the fused loss and the sampler.

  Returns:
    `(loss, metrics, rtd_batch)`: the generator's mlm `WeightedSum`, its
    accuracy, and `batch` with sampled replacements in `input_ids` and the
    "replaced" labels in `targets` of the rtd rows.
  """
  rtd_rows = task_rows(batch, tasks.RTD)[:, None] > 0
  selected = rtd_rows & (batch["input_ids"] == tokenizer.MASK_ID)
  # The samples at unselected positions are discarded below.
  hidden, labels = _zero_unselected(generator_hidden, batch["original_ids"],
                                    selected)

  def generate(unembedding, inputs, vocab_axis_name):
    hidden = inputs["hidden"]
    per_position, predictions = losses.fused_token_cross_entropy_with_argmax(
        hidden, unembedding, inputs["labels"], z_loss=z_loss,
        chunk_size=chunk_size, vocab_axis_name=vocab_axis_name)
    sample_rng = rng
    if vocab_axis_name is not None:
      sample_rng = jax.random.fold_in(
          rng, jax.lax.axis_index(sharding.BATCH_AXES))
    sampled = sample_tokens(hidden, unembedding, sample_rng,
                            chunk_size=chunk_size,
                            first_allowed_id=tokenizer.NUM_RESERVED_IDS,
                            vocab_axis_name=vocab_axis_name)
    return per_position, predictions, sampled

  per_position, predictions, sampled = _vocab_parallel(
      generate, unembedding, {"hidden": hidden, "labels": labels})
  weights = selected.astype(jnp.float32)
  loss = losses.weighted_sum(per_position, weights)
  accuracy = losses.accuracy(predictions, labels, weights)

  input_ids = jnp.where(selected, sampled, batch["input_ids"])
  replaced = (input_ids != batch["original_ids"]).astype(jnp.int32)
  rtd_batch = dict(batch)
  rtd_batch["input_ids"] = input_ids
  rtd_batch["targets"] = jnp.where(rtd_rows, replaced, batch["targets"])
  return loss, {"accuracy": accuracy}, rtd_batch


def compute_objectives(
    outputs: Outputs, unembedding: jax.Array, batch: Batch, *,
    active_tasks: tuple[str, ...], label_smoothing: float, z_loss: float,
    chunk_size: int) -> tuple[dict[str, losses.WeightedSum], dict[str, Any]]:
  """Runs the objectives of `active_tasks`.

  Returns:
    `(task_losses, metrics)`: a `WeightedSum` per task, and a dict
    `{f"{metric}/{task}": WeightedSum}`.
  """
  task_losses, task_metrics = token_objectives(
      outputs, unembedding, batch, active_tasks=active_tasks,
      label_smoothing=label_smoothing, z_loss=z_loss, chunk_size=chunk_size)
  for task in active_tasks:
    if task == tasks.RTD:
      task_losses[task], task_metrics[task] = rtd_objective(outputs, batch)
    elif task == tasks.SOP:
      task_losses[task], task_metrics[task] = sop_objective(outputs, batch)
    elif task not in (tasks.LM, tasks.MLM):
      raise ValueError(f"Unknown task {task!r}; expected one of "
                       f"{tasks.TASK_NAMES}.")
  metrics = {f"{name}/{task}": value
             for task, named in task_metrics.items()
             for name, value in named.items()}
  return task_losses, metrics
