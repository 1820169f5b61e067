"""The four training objectives, each computed on its own examples of a batch.

A batch mixes examples of every task (`batch["task_id"] [batch]`). Each
objective below selects its rows, applies the matching loss from
`mtl_lm.losses` to the model outputs and returns a `WeightedSum` (so the task
mean is exact over devices and steps) plus its metrics as `WeightedSum`s.
Every task is normalised by its own count: predicted tokens for `lm`, masked
positions for `mlm`, real tokens for `rtd` and examples for `sop`.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mtl_lm import losses
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


def _label_smoothing_term(hidden: jax.Array, unembedding: jax.Array,
                          labels: jax.Array) -> jax.Array:
  """Returns `logits[label] - mean(logits)` per position, in float32.

  With `x = hidden @ unembedding`, the label-smoothed cross-entropy is the
  plain one plus `eps * (x[label] - mean(x))`, and both terms need only a
  gather of the label columns and the mean column of the unembedding, so
  the smoothing costs no second pass over the vocabulary.
  """
  hidden = hidden.astype(jnp.float32)
  unembedding = unembedding.astype(jnp.float32)
  label_columns = jnp.take(unembedding, labels, axis=1)  # [embed, b, l]
  label_logit = jnp.einsum("ble,ebl->bl", hidden, label_columns)
  mean_logit = hidden @ jnp.mean(unembedding, axis=1)  # [b, l]
  return label_logit - mean_logit


def token_objectives(outputs: Outputs, unembedding: jax.Array, batch: Batch,
                     *, active_tasks: tuple[str, ...], label_smoothing: float,
                     z_loss: float, chunk_size: int):
  """Next-token (lm) and masked-token (mlm) cross-entropy in one pass.

  lm and mlm rows are scored by one fused cross-entropy over the vocabulary;
  label smoothing is then added on the lm positions alone (see
  `_label_smoothing_term`). Hidden states and labels of positions outside
  both tasks are zeroed first, so they reach neither value nor gradient.

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
  hidden = jnp.where(selected[..., None], outputs["hidden"],
                     jnp.zeros((), outputs["hidden"].dtype))
  labels = jnp.where(selected, batch["targets"], 0)
  per_position, predictions = losses.fused_token_cross_entropy_with_argmax(
      hidden, unembedding, labels, z_loss=z_loss, chunk_size=chunk_size)

  task_losses = {}
  task_metrics = {}
  for task in token_tasks:
    task_loss = per_position
    if task == tasks.LM and label_smoothing:
      task_loss = per_position + label_smoothing * _label_smoothing_term(
          hidden, unembedding, labels)
    task_losses[task] = losses.weighted_sum(task_loss, weights[task])
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
                  *, chunk_size: int, first_allowed_id: int) -> jax.Array:
  """Samples one token per position from `softmax(hidden @ unembedding)`.

  Uses the Gumbel-max trick block by block over the vocabulary, so the full
  `[batch, length, vocab]` logits never exist; the noise and the running
  maximum are float32. Ids below `first_allowed_id` (the special tokens) are
  never drawn.

  Args:
    hidden: `[batch, length, embed]`.
    unembedding: `[embed, vocab]`.
    rng: PRNG key.
    chunk_size: vocabulary columns per block.
    first_allowed_id: the smallest id that may be drawn.

  Returns:
    `[batch, length]` int32 sampled ids.
  """
  vocab = unembedding.shape[1]
  num_blocks = -(-vocab // chunk_size)
  padded_vocab = num_blocks * chunk_size
  # [embed, vocab] -> [embed, num_blocks * chunk]; padded columns are masked.
  unembedding = jnp.pad(unembedding, ((0, 0), (0, padded_vocab - vocab)))
  hidden = jax.lax.stop_gradient(hidden)

  def scan_block(carry, index):
    best_score, best_id = carry
    start = index * chunk_size
    block = jax.lax.dynamic_slice_in_dim(unembedding, start, chunk_size, 1)
    logits = jnp.einsum("ble,ev->blv", hidden, block.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    ids = start + jnp.arange(chunk_size)
    allowed = (ids >= first_allowed_id) & (ids < vocab)
    gumbel = jax.random.gumbel(jax.random.fold_in(rng, index), logits.shape,
                               jnp.float32)
    score = jnp.where(allowed, logits + gumbel, -jnp.inf)
    block_best = jnp.argmax(score, axis=-1)
    block_score = jnp.max(score, axis=-1)
    better = block_score > best_score
    return (jnp.where(better, block_score, best_score),
            jnp.where(better, start + block_best, best_id)), None

  batch_shape = hidden.shape[:-1]
  init = (jnp.full(batch_shape, -jnp.inf, jnp.float32),
          jnp.full(batch_shape, first_allowed_id, jnp.int32))
  (_, sampled), _ = jax.lax.scan(scan_block, init, jnp.arange(num_blocks))
  return sampled.astype(jnp.int32)


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
  loss, accuracy = losses.fused_masked_lm_loss(
      generator_hidden, unembedding, batch["original_ids"],
      selected.astype(jnp.float32), z_loss=z_loss, chunk_size=chunk_size)

  sampled = sample_tokens(generator_hidden, unembedding, rng,
                          chunk_size=chunk_size,
                          first_allowed_id=tokenizer.NUM_RESERVED_IDS)
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
