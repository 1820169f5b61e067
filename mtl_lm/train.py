"""Multi-objective training: the train step and the training loop.

The pure step functions come first; `train_and_evaluate(config, workdir)`,
the loop that reads as a recipe (mesh, tokenizer, data, model and optimizer,
restore, steps, checkpoints), comes last.
"""

import functools
import json
import math
import os
import shutil
import time
from typing import Any, Callable, Mapping

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mtl_lm import checkpointing
from mtl_lm import losses
from mtl_lm import metrics as metrics_lib
from mtl_lm import model as model_lib
from mtl_lm import objectives
from mtl_lm import sharding
from mtl_lm import tasks
from mtl_lm import tokenizer as tokenizer_lib
from mtl_lm import weighting
from mtl_lm.data import pipeline

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: `{"model": ..., "weighting": ...}`; the second contains the trainable
      parameters of the weighting strategy (empty for most strategies).
    opt_state: Optax state of `params`.
    weighting_state: state of the weighting strategy.
    task_grad_norms: per task, float32 norm of the gradient of its unweighted
      loss w.r.t. the final RMSNorm scale at the previous step (GradNorm's
      input; zeros for other strategies).
    rng: uint32 `[2]` key for on-device sampling (the ELECTRA generator).
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  weighting_state: PyTree
  task_grad_norms: PyTree
  rng: jax.Array


# ---------------------------------------------------------------------------
# Configuration checks, run before anything is compiled.


def active_tasks(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Returns the tasks with a positive mixing rate, in TASK_NAMES order."""
  rates = dict(config.data.task_rates)
  unknown = sorted(set(rates) - set(tasks.TASK_NAMES))
  if unknown:
    raise ValueError(
        f"config.data.task_rates has unknown task(s) {unknown}; the tasks are "
        f"{list(tasks.TASK_NAMES)}.")
  for task, rate in rates.items():
    if not rate >= 0:
      raise ValueError(
          f"config.data.task_rates.{task}={rate} is invalid; rates must be "
          "non-negative numbers.")
  names = tuple(task for task in tasks.TASK_NAMES if rates.get(task, 0) > 0)
  if not names:
    raise ValueError(
        "Every rate in config.data.task_rates is 0, so there is nothing to "
        "train. Set at least one, e.g. --config.data.task_rates.lm=1.0.")
  return names


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for settings that cannot work, naming the fix."""
  active_tasks(config)
  counts = {name: config.train[name]
            for name in ("steps", "log_every", "checkpoint_every")}
  counts["gradient_accumulation_steps"] = accumulation_steps(config)
  for name, value in counts.items():
    if not isinstance(value, int) or value <= 0:
      raise ValueError(
          f"config.train.{name}={value!r} is invalid; pass a positive integer.")
  if config.data.seq_len < 8:
    raise ValueError(
        f"config.data.seq_len={config.data.seq_len} is too short; use at "
        "least 8 tokens.")
  if config.data.sop_num_segments < 2 or config.data.sop_num_segments > 5:
    raise ValueError(
        f"config.data.sop_num_segments={config.data.sop_num_segments} is "
        "invalid; k must be 2 to 5 (the sop head has k! classes).")
  if not 0.0 <= config.loss.label_smoothing < 1.0:
    raise ValueError(
        f"config.loss.label_smoothing={config.loss.label_smoothing} must be "
        "in [0, 1).")
  if config.rtd.replacements not in ("random", "unigram", "generator"):
    raise ValueError(
        f"config.rtd.replacements={config.rtd.replacements!r} is invalid; "
        "use 'random', 'unigram' or 'generator'.")
  if not config.rtd.discriminator_weight > 0:
    raise ValueError(
        f"config.rtd.discriminator_weight={config.rtd.discriminator_weight} "
        "is invalid; it must be positive (ELECTRA uses 50).")
  if config.init_from and not os.path.isdir(config.init_from):
    raise ValueError(
        f"config.init_from={config.init_from!r} is not a directory. Pass the "
        "workdir of an earlier stage, e.g. --config.init_from=runs/stage1.")


# ---------------------------------------------------------------------------
# Model, optimizer and weighting from the config.


def make_model_config(config, vocab_size: int) -> model_lib.ModelConfig:
  return model_lib.ModelConfig.from_config(
      config.model,
      vocab_size=vocab_size,
      sop_classes=math.factorial(config.data.sop_num_segments),
      generator_width_fraction=(config.rtd.generator_width_fraction
                                if config.rtd.replacements == "generator"
                                else None),
  )


def make_learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup to the peak rate, then cosine decay to its end factor."""
  optimizer = config.optimizer
  peak = optimizer.learning_rate
  warmup_steps = min(optimizer.warmup_steps, config.train.steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup_steps,
      decay_steps=max(config.train.steps, warmup_steps + 1),
      end_value=peak * optimizer.end_learning_rate_factor,
  )


def _decay_mask(params: PyTree) -> PyTree:
  # Weight decay applies to matrices only, not to norm scales, biases or the
  # weighting strategy's parameters (as in Llama and most LM recipes).
  def decays(path, leaf):
    in_model = jax.tree_util.keystr(path[:1]) == "['model']"
    return in_model and leaf.ndim >= 2

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> optax.GradientTransformation:
  optimizer = config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(optimizer.clip_norm),
      optax.adamw(
          make_learning_rate_schedule(config),
          b1=optimizer.b1,
          b2=optimizer.b2,
          weight_decay=optimizer.weight_decay,
          mask=_decay_mask,
      ),
  )


# ---------------------------------------------------------------------------
# The train step.


def _batch_bidirectional(batch) -> jax.Array:
  return batch["task_id"] != tasks.TASK_IDS[tasks.LM]


def _with_gradient_taps(module, model_params, outputs, batch, taps):
  """Returns outputs recomputed from hidden states that carry gradient taps.

  Each row gets the tap of its own task: `hidden = normed * (scale + tap)`
  has the value of `normed * scale` because every tap is zero. A row feeds
  only its own task's loss, and nothing mixes rows after the final norm, so
  the gradient w.r.t. task k's tap is the gradient of `w_k * L_k` w.r.t. the
  final RMSNorm scale. All tasks' taps are measured in the one backward pass
  of the step, and lm and mlm rows still share one pass over the
  vocabulary. The rtd and sop heads run again on the tapped states; the lm
  and mlm losses read "hidden" directly.
  """
  scale = model_params["final_norm"]["scale"]
  row_taps = sum(
      jnp.where((batch["task_id"] == tasks.TASK_IDS[task])[:, None],
                tap[None, :], 0.0)
      for task, tap in taps.items())  # [batch, embed]
  hidden = outputs["normed"] * (scale + row_taps[:, None, :]).astype(
      jnp.float32)
  hidden = hidden.astype(outputs["hidden"].dtype)
  tapped = dict(outputs)
  tapped["hidden"] = hidden
  if tasks.RTD in taps or tasks.SOP in taps:
    tapped.update(module.apply({"params": model_params}, hidden,
                               batch["segment_ids"],
                               method=module.task_heads))
  return tapped


def uses_generator(config) -> bool:
  return config.rtd.replacements == "generator"


def compute_losses(params, batch, rng, *, module, config, task_names,
                   taps=None):
  """Runs the model and every active objective.

  Returns:
    `(task_losses, metrics, generator_loss)`: the first two as
    `objectives.compute_objectives` returns them, and the ELECTRA
    generator's mlm `WeightedSum` (None without a generator).
  """
  model_params = params["model"]
  unembedding = model_lib.unembedding_matrix(model_params, module.config)
  objective_kwargs = dict(
      label_smoothing=config.loss.label_smoothing,
      z_loss=config.loss.z_loss,
      chunk_size=config.loss.chunk_size,
  )

  generator_loss = None
  metrics = {}
  if uses_generator(config) and tasks.RTD in task_names:
    generator_hidden = module.apply(
        {"params": model_params}, batch["input_ids"],
        segment_ids=batch["segment_ids"], positions=batch["positions"],
        method=module.generator_hidden)
    generator_loss, generator_metrics, batch = (
        objectives.electra_generator_objective(
            generator_hidden, unembedding, batch, rng,
            z_loss=config.loss.z_loss, chunk_size=config.loss.chunk_size))
    metrics["accuracy/generator"] = generator_metrics["accuracy"]

  outputs = module.apply(
      {"params": model_params},
      batch["input_ids"],
      segment_ids=batch["segment_ids"],
      positions=batch["positions"],
      bidirectional=_batch_bidirectional(batch),
  )
  if taps is not None:
    outputs = _with_gradient_taps(module, model_params, outputs, batch, taps)
  task_losses, task_metrics = objectives.compute_objectives(
      outputs, unembedding, batch, active_tasks=task_names,
      **objective_kwargs)
  metrics.update(task_metrics)
  return task_losses, metrics, generator_loss


def _weighted_total(state: TrainState, task_losses, task_counts,
                    generator_loss, weighting_params, *, strategy, config,
                    task_names):
  """Weights the task losses; returns `(total, weights, weighting_state)`.

  `total` is differentiable in `task_losses` (with the weights held fixed),
  in `generator_loss` and in `weighting_params`.
  """
  weights, weighting_state = strategy.update(
      state.weighting_state,
      jax.lax.stop_gradient(task_losses),
      state.step,
      task_counts=task_counts,
      params=weighting_params,
      task_grad_norms=(state.task_grad_norms if strategy.needs_grad_norms
                       else None),
  )
  total = sum(weights[task] * task_losses[task] for task in task_names)
  if strategy.regularizer is not None:
    total = total + strategy.regularizer(weighting_params,
                                         task_counts=task_counts)
  if generator_loss is not None:
    # ELECTRA weights the discriminator `discriminator_weight` times the
    # generator; the discriminator's weight is the rtd task weight.
    generator_weight = weights[tasks.RTD] / config.rtd.discriminator_weight
    total = total + generator_weight * generator_loss
  return total, weights, weighting_state


def accumulation_steps(config) -> int:
  """Returns `config.train.gradient_accumulation_steps` (1 when unset)."""
  return config.train.get("gradient_accumulation_steps", 1)


def split_micro_batches(batch, num_micro_batches: int):
  """Splits `[batch, ...]` arrays into `[num_micro_batches, batch / n, ...]`.

  Micro-batch `m` takes rows `m, m + n, m + 2n, ...`, so each device's
  contiguous block of rows contains rows of every micro-batch and no
  micro-batch has to move between devices.
  """

  def split(array):
    rows = array.shape[0] // num_micro_batches
    array = array.reshape((rows, num_micro_batches) + array.shape[1:])
    array = jnp.swapaxes(array, 0, 1)
    names = (None, "batch") + (None,) * (array.ndim - 2)
    return nn.with_logical_constraint(array, names)

  return jax.tree.map(split, batch)


def _single_batch_gradients(state: TrainState, batch, sample_rng, taps, *,
                            compute, strategy, config, task_names):
  """Differentiates the weighted total of the whole batch in one pass."""

  def loss_fn(params, taps):
    task_sums, task_metrics, generator_sum = compute(params, batch,
                                                     sample_rng, taps=taps)
    task_losses = {task: losses.mean(task_sums[task]) for task in task_names}
    task_counts = {task: task_sums[task].count for task in task_names}
    generator_loss = (losses.mean(generator_sum)
                      if generator_sum is not None else None)
    total, weights, weighting_state = _weighted_total(
        state, task_losses, task_counts, generator_loss, params["weighting"],
        strategy=strategy, config=config, task_names=task_names)
    return total, (task_sums, task_metrics, generator_sum, weights,
                   weighting_state)

  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
  (total, aux), (grads, tap_grads) = grad_fn(state.params, taps)
  return (total, grads, tap_grads) + aux


def _accumulated_gradients(state: TrainState, batch, sample_rng, taps, *,
                           num_micro_batches, compute, strategy, config,
                           task_names):
  """Differentiates the weighted total of the whole batch in micro-batches.

  The weights depend on the whole batch's task losses, so a first scan over
  the micro-batches runs the forward pass only and adds up each task's
  `WeightedSum`. With the weights fixed, the gradient of the total is
  `sum_k w_k * grad(total_k) / count_k` over the whole batch, and a second
  scan adds up each micro-batch's `w_k * grad(total_k(micro)) / count_k`.
  Both scans use the same sampling key per micro-batch, so the ELECTRA
  generator draws the same replacements in each. The weighting parameters'
  gradient comes from the whole-batch losses directly. The price is one
  extra forward pass per micro-batch.
  """
  micro_batches = split_micro_batches(batch, num_micro_batches)
  keys = jax.random.split(sample_rng, num_micro_batches)
  inputs = (micro_batches, keys)

  def add(first, second):
    return jax.tree.map(jnp.add, first, second)

  def zeros_like_outputs(function, *args):
    shapes = jax.eval_shape(function, *args)
    return jax.tree.map(lambda shape: jnp.zeros(shape.shape, shape.dtype),
                        shapes)

  # Forward pass only: the whole batch's sums of every loss and metric.
  def forward(params, micro_batch, key):
    return compute(params, micro_batch, key, taps=None)

  def forward_step(sums, micro_inputs):
    return add(sums, forward(state.params, *micro_inputs)), None

  first = jax.tree.map(lambda array: array[0], inputs)
  sums = zeros_like_outputs(forward, state.params, *first)
  (task_sums, task_metrics, generator_sum), _ = jax.lax.scan(
      forward_step, sums, inputs)
  task_losses = {task: losses.mean(task_sums[task]) for task in task_names}
  task_counts = {task: task_sums[task].count for task in task_names}
  generator_loss = (losses.mean(generator_sum)
                    if generator_sum is not None else None)

  def weighting_objective(weighting_params):
    total, weights, weighting_state = _weighted_total(
        state, task_losses, task_counts, generator_loss, weighting_params,
        strategy=strategy, config=config, task_names=task_names)
    return total, (weights, weighting_state)

  (total, (weights, weighting_state)), weighting_grads = jax.value_and_grad(
      weighting_objective, has_aux=True)(state.params["weighting"])

  def scaled(weighted_sum, whole_count):
    # Dividing by the whole batch's count, not the micro-batch's, makes the
    # accumulated gradient that of the whole batch's mean.
    return weighted_sum.total / jnp.where(whole_count > 0, whole_count, 1.0)

  def micro_objective(model_params, taps, micro_batch, key):
    params = {"model": model_params, "weighting": state.params["weighting"]}
    micro_sums, _, micro_generator = compute(params, micro_batch, key,
                                             taps=taps)
    objective = sum(weights[task] * scaled(micro_sums[task],
                                           task_counts[task])
                    for task in task_names)
    if micro_generator is not None:
      generator_weight = weights[tasks.RTD] / config.rtd.discriminator_weight
      objective = objective + generator_weight * scaled(
          micro_generator, generator_sum.count)
    return objective

  micro_grad_fn = jax.grad(micro_objective, argnums=(0, 1))

  def backward_step(grads, micro_inputs):
    return add(grads, micro_grad_fn(state.params["model"], taps,
                                    *micro_inputs)), None

  zero_grads = jax.tree.map(jnp.zeros_like, (state.params["model"], taps))
  (model_grads, tap_grads), _ = jax.lax.scan(backward_step, zero_grads,
                                             inputs)
  grads = {"model": model_grads, "weighting": weighting_grads}
  return (total, grads, tap_grads, task_sums, task_metrics, generator_sum,
          weights, weighting_state)


def train_step(state: TrainState, batch, *, module, optimizer,
               strategy: weighting.WeightingStrategy, config,
               task_names: tuple[str, ...], learning_rate_fn):
  """Takes one optimizer step on the weighted sum of the task losses.

  With `config.train.gradient_accumulation_steps = n > 1` the batch is
  processed in `n` micro-batches and the step equals the one on the whole
  batch (see `_accumulated_gradients`).

  Args:
    state: the current `TrainState`.
    batch: dict of global `[batch, ...]` arrays (see `mtl_lm.data.pipeline`).
    module: the `model.Transformer`.
    optimizer: Optax transformation of `state.params`.
    strategy: the task weighting.
    config: the run's ConfigDict (read only for static settings).
    task_names: the tasks trained in this run.
    learning_rate_fn: the optimizer's schedule, for logging.

  Returns:
    `(new_state, metrics)` with metrics as `{name: (total, count)}` or float
    scalars, ready for `metrics.MetricsAccumulator`.
  """
  measure_grad_norms = strategy.needs_grad_norms
  scale_shape = state.params["model"]["final_norm"]["scale"].shape
  taps = ({task: jnp.zeros(scale_shape, jnp.float32) for task in task_names}
          if measure_grad_norms else None)

  rng, sample_rng = jax.random.split(state.rng)
  compute = functools.partial(compute_losses, module=module, config=config,
                              task_names=task_names)
  num_micro_batches = accumulation_steps(config)
  if num_micro_batches == 1:
    outputs = _single_batch_gradients(
        state, batch, sample_rng, taps, compute=compute, strategy=strategy,
        config=config, task_names=task_names)
  else:
    outputs = _accumulated_gradients(
        state, batch, sample_rng, taps, num_micro_batches=num_micro_batches,
        compute=compute, strategy=strategy, config=config,
        task_names=task_names)
  (total, grads, tap_grads, task_sums, task_metrics, generator_sum, weights,
   weighting_state) = outputs
  if generator_sum is not None:
    task_metrics["loss/generator"] = generator_sum

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  task_grad_norms = state.task_grad_norms
  if measure_grad_norms:
    # Tap gradients are of w_k * L_k; GradNorm wants the norm for L_k.
    task_grad_norms = {
        task: jnp.linalg.norm(tap_grads[task]) /
        jnp.maximum(jax.lax.stop_gradient(weights[task]), 1e-12)
        for task in task_names
    }

  new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      weighting_state=weighting_state,
      task_grad_norms=task_grad_norms,
      rng=rng,
  )

  step_metrics = {"loss/total": total,
                  "learning_rate": learning_rate_fn(state.step),
                  "grad_norm": optax.tree.norm(grads)}
  for task in task_names:
    step_metrics[f"loss/{task}"] = (task_sums[task].total,
                                    task_sums[task].count)
    step_metrics[f"weight/{task}"] = weights[task]
  for name, value in task_metrics.items():
    step_metrics[name] = (value.total, value.count)
  return new_state, step_metrics


# ---------------------------------------------------------------------------
# State creation and sharding.


def _init_state(rng, batch_shapes, *, module, optimizer, strategy,
                task_names) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  dummy = {name: jnp.zeros(shape.shape, shape.dtype)
           for name, shape in batch_shapes.items()}
  variables = module.init(
      init_rng,
      dummy["input_ids"],
      segment_ids=dummy["segment_ids"],
      positions=dummy["positions"],
      bidirectional=_batch_bidirectional(dummy),
  )
  weighting_params = (strategy.init_params(task_names)
                      if strategy.init_params is not None else {})
  params = {"model": variables["params"], "weighting": weighting_params}
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      weighting_state=strategy.init(task_names),
      task_grad_norms={task: jnp.zeros((), jnp.float32)
                       for task in task_names},
      rng=state_rng,
  )


def batch_shapes(config, local_batch_size: int | None = None):
  """Returns `jax.ShapeDtypeStruct`s of the global batch fields."""
  batch_size = config.data.batch_size
  length = config.data.seq_len
  token = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
  return {
      "input_ids": token,
      "original_ids": token,
      "targets": token,
      "loss_weights": jax.ShapeDtypeStruct((batch_size, length), jnp.float32),
      "segment_ids": token,
      "positions": token,
      "task_id": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
      "sop_label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
  }


class Trainer:
  """Builds the jitted init and step functions for one config and mesh."""

  def __init__(self, config, *, vocab_size: int, mesh):
    self.config = config
    self.mesh = mesh
    self.task_names = active_tasks(config)
    self.module = model_lib.Transformer(make_model_config(config, vocab_size))
    self.optimizer = make_optimizer(config)
    self.learning_rate_fn = make_learning_rate_schedule(config)
    self.strategy = weighting.from_config(config.weighting, self.task_names)
    self.batch_shapes = batch_shapes(config)
    self.batch_sharding = sharding.batch_sharding(mesh)

    init_fn = functools.partial(
        _init_state, batch_shapes=self.batch_shapes, module=self.module,
        optimizer=self.optimizer, strategy=self.strategy,
        task_names=self.task_names)
    with sharding.sharding_context(mesh):
      boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    self.state_shardings = sharding.params_shardings(boxed, mesh)
    self.abstract_state = jax.tree.map(
        lambda shape, sharding_: jax.ShapeDtypeStruct(
            shape.shape, shape.dtype, sharding=sharding_),
        nn.unbox(boxed), self.state_shardings)
    self._init = jax.jit(lambda rng: nn.unbox(init_fn(rng)),
                         out_shardings=self.state_shardings)

    step_fn = functools.partial(
        train_step, module=self.module, optimizer=self.optimizer,
        strategy=self.strategy, config=config, task_names=self.task_names,
        learning_rate_fn=self.learning_rate_fn)
    batch_shardings = {name: self.batch_sharding for name in self.batch_shapes}
    self._step = jax.jit(
        step_fn,
        in_shardings=(self.state_shardings, batch_shardings),
        out_shardings=(self.state_shardings, None),
        donate_argnums=(0,),
    )

  def init(self, seed: int) -> TrainState:
    with sharding.sharding_context(self.mesh):
      return self._init(jax.random.PRNGKey(seed))

  def step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    with sharding.sharding_context(self.mesh):
      return self._step(state, batch)


# ---------------------------------------------------------------------------
# The training loop.


def _resolve_tokenizer(config, workdir: str) -> tokenizer_lib.Tokenizer:
  """Loads or trains the tokenizer; a later stage reuses its parent's."""
  if not config.data.tokenizer and config.init_from:
    parent = os.path.join(config.init_from, "tokenizer.model")
    own = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(parent) and not os.path.exists(own):
      os.makedirs(workdir, exist_ok=True)
      shutil.copyfile(parent, own)
      logging.info("Using the tokenizer of %s.", config.init_from)
  tokenizer = tokenizer_lib.load_or_train_tokenizer(config.data, workdir)
  if tokenizer.vocab_size != config.data.vocab_size:
    logging.warning(
        "The tokenizer has %d pieces but config.data.vocab_size=%d; the "
        "model uses the tokenizer's size. Pass a new --workdir (or "
        "config.data.tokenizer) to train one of the configured size.",
        tokenizer.vocab_size, config.data.vocab_size)
  return tokenizer


def _restore_or_explain(manager, step, trainer, train_iter, workdir):
  try:
    return checkpointing.restore(manager, step, trainer.abstract_state,
                                 train_iter)
  except ValueError as error:
    raise ValueError(
        f"The checkpoint of step {step} in {workdir} does not fit this config "
        f"(a changed config.model, tokenizer or weighting?): {error}. Resume "
        "with the config that wrote it, or pass a new --workdir.") from error


def _data_settings(config) -> dict[str, Any]:
  """Returns `config.data` as plain JSON values, for comparing runs."""
  return json.loads(config.data.to_json_best_effort(sort_keys=True))


def record_config(config, workdir: str) -> None:
  """Compares the data settings with the last run's, then saves the config.

  `WORKDIR/config.json` contains the config of the last run in the workdir. A
  resumed run restores the data iterator's position, which refers to the
  documents and settings of that run, so a change there is logged as a
  warning that names each changed field.
  """
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f).get("data", {})
    current = _data_settings(config)
    changed = [f"config.data.{name}: {previous.get(name)!r} -> "
               f"{current.get(name)!r}"
               for name in sorted(set(previous) | set(current))
               if previous.get(name) != current.get(name)]
    if changed:
      logging.warning(
          "The data settings differ from the last run in %s: %s. The data "
          "iterator resumes at the position saved for the old settings, so "
          "documents may repeat or be skipped. To read the new data from "
          "its start, pass a new --workdir with --config.init_from=%s.",
          workdir, "; ".join(changed), workdir)
  if jax.process_index() == 0:
    # Written whole and then renamed, so another process never reads half.
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(sort_keys=True, indent=2) + "\n")
    os.replace(path + ".tmp", path)


def _check_finite(step: int, summary: Mapping[str, float]) -> None:
  total = summary.get("loss/total", 0.0)
  if not math.isfinite(total):
    raise FloatingPointError(
        f"loss/total is {total} at step {step}. Lower "
        "config.optimizer.learning_rate or check the data; the last "
        "checkpoint before this step is intact.")


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Trains until `config.train.steps`, resuming from `workdir` if possible.

  Returns:
    The metrics of the last log step.
  """
  # Settings are checked before any data is read or anything compiled.
  validate_config(config)
  pipeline.validate_data_config(config, process_count=jax.process_count())
  weighting.from_config(config.weighting, active_tasks(config))
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.data.batch_size, mesh,
                            micro_batches=accumulation_steps(config))
  os.makedirs(workdir, exist_ok=True)
  logging.info("Training tasks %s on mesh %s.", active_tasks(config),
               dict(mesh.shape))

  # The tokenizer fixes the vocabulary, so it comes before the model.
  tokenizer = _resolve_tokenizer(config, workdir)
  train_iter = pipeline.make_train_iterator(config, tokenizer)

  trainer = Trainer(config, vocab_size=tokenizer.vocab_size, mesh=mesh)
  manager = checkpointing.make_manager(
      workdir, max_to_keep=config.train.max_checkpoints_to_keep)

  # Resume this run, or start it, from another run's parameters if asked.
  latest = manager.latest_step()
  if latest is not None:
    if config.init_from:
      logging.warning(
          "Ignoring config.init_from=%s: %s already has checkpoints, so this "
          "run resumes from them. Pass a new --workdir to start a stage from "
          "another run.", config.init_from, workdir)
    record_config(config, workdir)
    state = _restore_or_explain(manager, latest, trainer, train_iter, workdir)
    logging.info("Resuming at step %d.", latest)
  else:
    record_config(config, workdir)
    state = trainer.init(config.seed)
    if config.init_from:
      params, _ = checkpointing.restore_params(
          config.init_from, trainer.abstract_state.params["model"])
      state = state.replace(params={**state.params, "model": params})

  writer = metrics_lib.MetricsWriter(workdir)
  accumulator = metrics_lib.MetricsAccumulator()
  first_step = int(jax.device_get(state.step))
  if first_step >= config.train.steps:
    logging.info("Step %d already reached config.train.steps=%d; nothing to "
                 "do.", first_step, config.train.steps)
    manager.close()
    return {}

  summary = {}
  interval_start = time.perf_counter()
  interval_tokens = 0
  for step in range(first_step + 1, config.train.steps + 1):
    local_batch = next(train_iter)
    interval_tokens += int(np.count_nonzero(local_batch["segment_ids"]))
    batch = pipeline.make_global_batch(local_batch, mesh,
                                        trainer.batch_sharding)
    state, step_metrics = trainer.step(state, batch)
    accumulator.add(step_metrics)
    if step == first_step + 1:
      # The first step compiles; the throughput is measured from here on.
      jax.block_until_ready(state)
      interval_start = time.perf_counter()
      interval_tokens = 0

    if step % config.train.log_every == 0 or step == config.train.steps:
      summary = accumulator.summary()
      elapsed = time.perf_counter() - interval_start
      summary["tokens_per_second"] = (
          interval_tokens * jax.process_count() / max(elapsed, 1e-9))
      _check_finite(step, summary)
      writer.write(step, summary)
      interval_start = time.perf_counter()
      interval_tokens = 0

    if step % config.train.checkpoint_every == 0 or step == config.train.steps:
      # A non-finite state is never saved over the last good checkpoint.
      _check_finite(step, {"loss/total": float(step_metrics["loss/total"])})
      checkpointing.save(manager, step, state, train_iter)

  manager.wait_until_finished()
  manager.close()
  return summary
