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

Batch = Mapping[str, jax.Array]
Outputs = Mapping[str, jax.Array]


def task_rows(batch: Batch, task: str) -> jax.Array:
  """Returns `[batch]` float32, 1 on the rows of `task`."""
  return (batch["task_id"] == tasks.TASK_IDS[task]).astype(jnp.float32)


def token_weights(batch: Batch, task: str) -> jax.Array:
  """Returns `[batch, length]` float32 loss weights restricted to `task`."""
  return batch["loss_weights"] * task_rows(batch, task)[:, None]


def lm_objective(outputs: Outputs, unembedding: jax.Array, batch: Batch, *,
                 label_smoothing: float, z_loss: float, chunk_size: int):
  """Next-token cross-entropy with label smoothing and z-loss."""
  loss, accuracy = losses.fused_masked_lm_loss(
      outputs["hidden"], unembedding, batch["targets"],
      token_weights(batch, tasks.LM), label_smoothing=label_smoothing,
      z_loss=z_loss, chunk_size=chunk_size)
  return loss, {"accuracy": accuracy}


def mlm_objective(outputs: Outputs, unembedding: jax.Array, batch: Batch, *,
                  z_loss: float, chunk_size: int):
  """Cross-entropy of the original tokens at the selected positions."""
  loss, accuracy = losses.fused_masked_lm_loss(
      outputs["hidden"], unembedding, batch["targets"],
      token_weights(batch, tasks.MLM), z_loss=z_loss, chunk_size=chunk_size)
  return loss, {"accuracy": accuracy}


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


def compute_objectives(
    outputs: Outputs, unembedding: jax.Array, batch: Batch, *,
    active_tasks: tuple[str, ...], label_smoothing: float, z_loss: float,
    chunk_size: int) -> tuple[dict[str, losses.WeightedSum], dict[str, Any]]:
  """Runs the objectives of `active_tasks`.

  Returns:
    `(task_losses, metrics)`: a `WeightedSum` per task, and a dict
    `{f"{metric}/{task}": WeightedSum}`.
  """
  task_losses = {}
  metrics = {}
  for task in active_tasks:
    if task == tasks.LM:
      loss, task_metrics = lm_objective(
          outputs, unembedding, batch, label_smoothing=label_smoothing,
          z_loss=z_loss, chunk_size=chunk_size)
    elif task == tasks.MLM:
      loss, task_metrics = mlm_objective(
          outputs, unembedding, batch, z_loss=z_loss, chunk_size=chunk_size)
    elif task == tasks.RTD:
      loss, task_metrics = rtd_objective(outputs, batch)
    elif task == tasks.SOP:
      loss, task_metrics = sop_objective(outputs, batch)
    else:
      raise ValueError(f"Unknown task {task!r}; expected one of "
                       f"{tasks.TASK_NAMES}.")
    task_losses[task] = loss
    for name, value in task_metrics.items():
      metrics[f"{name}/{task}"] = value
  return task_losses, metrics
