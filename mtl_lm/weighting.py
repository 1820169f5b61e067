"""Task weighting: how the per-task losses are combined into one training loss.

Each strategy is a factory returning a `WeightingStrategy`, a tuple of pure
functions in the style of `optax.GradientTransformation`:

  strategy = dwa(temperature=2.0, window=20)
  state = strategy.init(("lm", "mlm"))
  # In the loss function, with the losses stop-gradient'ed:
  weights, state = strategy.update(state, task_losses, step,
                                   task_counts=task_counts)
  total = sum(weights[name] * task_losses[name] for name in weights)

`update` returns the weights for the current step and a state that has
recorded the current losses. The weights depend only on the losses of earlier
steps, with two exceptions: FAMO divides by the current loss, and uncertainty
weighting reads the trainable parameters passed as `params`. Every state is a
pytree of arrays, so Orbax can save it inside the train state, and a restored
state yields exactly the weights of an uninterrupted run. `update` and
`regularizer` run under `jax.jit` and trace once.

A task whose count in `task_counts` is zero is absent from the batch and
reports a loss of 0. Strategies that keep a loss history skip such entries.

Per-task values inside a state are dicts keyed by task name. Internally they
are stacked into `[num_tasks]` vectors in sorted name order, which is the order
in which JAX flattens dicts.

See docs/weighting.md for the formulas, their sources and the config fields.
"""

from collections.abc import Callable, Mapping, Sequence
import math
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_lm import tasks

PyTree = Any
State = PyTree
Weights = dict[str, jax.Array]


class WeightingStrategy(NamedTuple):
  """A task weighting rule as a tuple of pure functions.

  Attributes:
    init: Maps the task names to the initial state, a pytree of arrays.
    update: `update(state, task_losses, step, *, task_counts=None,
      params=None, task_grad_norms=None) -> (weights, new_state)`.
      `task_losses`, `task_counts`, `task_grad_norms` and the returned
      `weights` are dicts keyed by task name with scalar values. `weights` are
      float32 and multiply this step's losses.
    init_params: Maps the task names to the strategy's trainable parameters,
      which the main optimizer trains in the same step. None when the strategy
      has none.
    regularizer: `regularizer(params, *, task_counts=None) -> []` float32, a
      term added to the total loss. Tasks with a zero count are left out of it.
      None when the strategy has no parameters.
    needs_grad_norms: Whether `update` reads `task_grad_norms`: the L2 norm of
      the gradient of each task's unweighted loss with respect to the last
      shared layer, measured at the previous step.
  """

  init: Callable[[Sequence[str]], State]
  update: Callable[..., tuple[Weights, State]]
  init_params: Callable[[Sequence[str]], PyTree] | None = None
  regularizer: Callable[..., jax.Array] | None = None
  needs_grad_norms: bool = False


# Shared helpers: task names, per-task dicts and [num_tasks] vectors.


def _sorted_task_names(task_names: Sequence[str]) -> tuple[str, ...]:
  """Validates task names and returns them sorted."""
  if isinstance(task_names, str):
    raise ValueError(
        f"task_names={task_names!r} is a single string; pass a sequence of "
        "names such as ('lm', 'mlm').")
  names = tuple(task_names)
  if not names:
    raise ValueError("task_names is empty; pass at least one task name.")
  for name in names:
    if not isinstance(name, str):
      raise ValueError(
          f"Task name {name!r} in task_names is not a string; task names are "
          "strings such as 'lm'.")
  if len(set(names)) != len(names):
    raise ValueError(
        f"task_names={names!r} contains duplicates; list each task once.")
  return tuple(sorted(names))


def _check_task_keys(values: Mapping[str, Any], names: Sequence[str],
                     label: str) -> None:
  """Raises ValueError unless `values` has exactly the keys `names`."""
  if not isinstance(values, Mapping):
    raise ValueError(
        f"{label} is a {type(values).__name__}; pass a dict keyed by task "
        "name.")
  if set(values) != set(names):
    missing = sorted(set(names) - set(values))
    unknown = sorted(set(values) - set(names))
    raise ValueError(
        f"{label} has keys {sorted(values)} but the strategy was initialised "
        f"for tasks {sorted(names)} (missing: {missing}, unknown: {unknown}); "
        "pass one entry per task given to init.")


def _to_vector(values: Mapping[str, Any], names: Sequence[str],
               label: str) -> jax.Array:
  """Stacks per-task scalars into a `[num_tasks]` float32 vector."""
  _check_task_keys(values, names, label)
  entries = []
  for name in names:
    value = jnp.asarray(values[name], jnp.float32)
    if value.ndim != 0:
      raise ValueError(
          f"{label}[{name!r}] has shape {value.shape}; pass a scalar per task "
          "(reduce the loss, count or norm over the batch first).")
    entries.append(value)
  return jnp.stack(entries)


def _to_dict(vector: jax.Array, names: Sequence[str]) -> dict[str, jax.Array]:
  """Splits a `[num_tasks]` vector into a dict keyed by task name."""
  return {name: vector[index] for index, name in enumerate(names)}


def _presence(task_counts: Mapping[str, Any] | None,
              names: Sequence[str]) -> jax.Array:
  """Returns `[num_tasks]` bool: whether each task is in this step's batch."""
  if task_counts is None:
    return jnp.ones((len(names),), bool)
  return _to_vector(task_counts, names, "task_counts") > 0


def _check_optional_keys(task_counts: Mapping[str, Any] | None,
                         names: Sequence[str]) -> None:
  """Checks `task_counts` in strategies that do not otherwise read it."""
  if task_counts is not None:
    _check_task_keys(task_counts, names, "task_counts")


def _zeros(names: Sequence[str], dtype=jnp.float32) -> dict[str, jax.Array]:
  return {name: jnp.zeros((), dtype) for name in names}


def _names_of(per_task: Mapping[str, Any]) -> tuple[str, ...]:
  return tuple(sorted(per_task))


def _positive_float(value: float, name: str) -> float:
  if not (isinstance(value, (int, float)) and math.isfinite(value)
          and value > 0):
    raise ValueError(f"{name}={value!r} is invalid; pass a finite number > 0.")
  return float(value)


# Fixed and scheduled weights.


def static(weights: Mapping[str, float]) -> WeightingStrategy:
  """Builds the fixed weighted sum `sum_k weights[k] * L_k`.

  Args:
    weights: Non-negative finite weight per task. `init` must receive exactly
      these task names.

  Returns:
    A stateless `WeightingStrategy`.
  """
  if not isinstance(weights, Mapping):
    raise ValueError(
        f"weights is a {type(weights).__name__}; pass a dict such as "
        "{'lm': 1.0, 'mlm': 0.5}.")
  for name, value in weights.items():
    if not (isinstance(value, (int, float)) and math.isfinite(value)
            and value >= 0):
      raise ValueError(
          f"weights[{name!r}]={value!r} is invalid; pass a finite number "
          ">= 0.")
  fixed = {name: float(value) for name, value in weights.items()}

  def init(task_names):
    _check_task_keys(fixed, _sorted_task_names(task_names), "weights")
    return optax.EmptyState()

  def update(state, task_losses, step, *, task_counts=None, params=None,
             task_grad_norms=None):
    del step, params, task_grad_norms
    _check_task_keys(task_losses, _names_of(fixed), "task_losses")
    _check_optional_keys(task_counts, _names_of(fixed))
    return {name: jnp.float32(value) for name, value in fixed.items()}, state

  return WeightingStrategy(init=init, update=update)


def scheduled(
    schedules: Mapping[str, optax.Schedule | float]) -> WeightingStrategy:
  """Builds weights that follow a schedule of the optimizer step.

  Args:
    schedules: Per task, an `optax.Schedule` (a function of the step) or a
      number, which is a constant schedule. For example, to bring rtd in
      linearly between steps 1000 and 2000:
      `{"lm": 1.0, "rtd": optax.linear_schedule(0.0, 1.0, 1000, 1000)}`.

  Returns:
    A stateless `WeightingStrategy` whose weights are `schedule(step)`.
  """
  if not isinstance(schedules, Mapping):
    raise ValueError(
        f"schedules is a {type(schedules).__name__}; pass a dict from task "
        "name to an optax schedule or a number.")
  functions = {}
  for name, schedule in schedules.items():
    if callable(schedule):
      functions[name] = schedule
    elif isinstance(schedule, (int, float)) and math.isfinite(schedule):
      functions[name] = optax.constant_schedule(float(schedule))
    else:
      raise ValueError(
          f"schedules[{name!r}]={schedule!r} is invalid; pass an optax "
          "schedule or a finite number.")

  def init(task_names):
    _check_task_keys(functions, _sorted_task_names(task_names), "schedules")
    return optax.EmptyState()

  def update(state, task_losses, step, *, task_counts=None, params=None,
             task_grad_norms=None):
    del params, task_grad_norms
    _check_task_keys(task_losses, _names_of(functions), "task_losses")
    _check_optional_keys(task_counts, _names_of(functions))
    weights = {
        name: jnp.asarray(schedule(step), jnp.float32).reshape(())
        for name, schedule in functions.items()
    }
    return weights, state

  return WeightingStrategy(init=init, update=update)


_SCHEDULE_KINDS = ("constant", "linear", "piecewise_constant")


def schedule_from_config(description: Any) -> optax.Schedule:
  """Builds an optax schedule from a config-friendly description.

  Accepted descriptions (dicts or ConfigDicts):
    * a number, or `{"kind": "constant", "value": v}`;
    * `{"kind": "linear", "init": a, "end": b, "begin": n, "steps": m}`: `a`
      until step `n`, then linear to `b` over `m` steps, then `b`;
    * `{"kind": "piecewise_constant", "values": [v0, v1, ...],
      "boundaries": [n1, ...]}`: `v0` before step `n1`, `v1` from `n1` on, and
      so on; `values` has one entry more than `boundaries`.

  Args:
    description: One of the descriptions above.

  Returns:
    An `optax.Schedule`.
  """
  if isinstance(description, (int, float)):
    return optax.constant_schedule(float(description))
  if hasattr(description, "to_dict"):
    description = description.to_dict()
  if not isinstance(description, Mapping) or "kind" not in description:
    raise ValueError(
        f"Schedule description {description!r} is invalid; pass a number or "
        f"a dict with a 'kind' among {_SCHEDULE_KINDS}.")
  fields = dict(description)
  kind = fields.pop("kind")
  expected = {
      "constant": {"value"},
      "linear": {"init", "end", "begin", "steps"},
      "piecewise_constant": {"values", "boundaries"},
  }
  if kind not in expected:
    raise ValueError(
        f"Schedule kind {kind!r} is unknown; use one of {_SCHEDULE_KINDS}.")
  if set(fields) != expected[kind]:
    raise ValueError(
        f"Schedule {kind!r} has fields {sorted(fields)}; it takes exactly "
        f"{sorted(expected[kind])} besides 'kind'.")

  if kind == "constant":
    return optax.constant_schedule(float(fields["value"]))
  if kind == "linear":
    if int(fields["steps"]) <= 0 or int(fields["begin"]) < 0:
      raise ValueError(
          f"Linear schedule has begin={fields['begin']} and "
          f"steps={fields['steps']}; pass begin >= 0 and steps >= 1.")
    return optax.linear_schedule(
        init_value=float(fields["init"]),
        end_value=float(fields["end"]),
        transition_steps=int(fields["steps"]),
        transition_begin=int(fields["begin"]))
  values = [float(value) for value in fields["values"]]
  boundaries = [int(boundary) for boundary in fields["boundaries"]]
  if len(values) != len(boundaries) + 1:
    raise ValueError(
        f"piecewise_constant schedule has {len(values)} values and "
        f"{len(boundaries)} boundaries; pass one value more than boundaries.")
  if any(later <= earlier
         for earlier, later in zip(boundaries, boundaries[1:])):
    raise ValueError(
        f"piecewise_constant boundaries {boundaries} are not strictly "
        "increasing; sort them and remove repeats.")
  return optax.join_schedules(
      [optax.constant_schedule(value) for value in values], boundaries)


# Dynamic Weight Average.


class DwaState(NamedTuple):
  """State of `dwa`; per-task fields are dicts of scalars.

  Attributes:
    steps_in_window: int32, updates recorded in the open window.
    window_sum: float32, sum of the losses of the open window.
    window_count: float32, steps of the open window in which the task was
      present.
    last_mean: float32, mean loss of the task's latest closed window.
    previous_mean: float32, mean loss of the closed window before that.
    num_means: int32, how many of the two means above are set (0, 1 or 2).
  """

  steps_in_window: jax.Array
  window_sum: dict[str, jax.Array]
  window_count: dict[str, jax.Array]
  last_mean: dict[str, jax.Array]
  previous_mean: dict[str, jax.Array]
  num_means: dict[str, jax.Array]


def dwa(*, temperature: float = 2.0, window: int = 20) -> WeightingStrategy:
  """Builds Dynamic Weight Average.

  Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention",
  CVPR 2019, set `w_k = K * softmax_k(r_k / T)` with `r_k` the ratio of task
  k's mean loss over the last two epochs. Pretraining has no epochs, so here
  `r_k` is the task's mean loss over the latest closed window of `window`
  updates divided by its mean over the window before. A task gets `r_k = 1`
  until it has two closed windows with data, so all weights are 1 until then.
  The weights change only when a window closes.

  A task that is absent (zero count) for a whole window keeps its two earlier
  means. Cost per step: O(K).

  Args:
    temperature: T; larger values give weights closer to 1.
    window: Number of updates per window.

  Returns:
    A `WeightingStrategy` with a `DwaState`.
  """
  temperature = _positive_float(temperature, "temperature")
  if not isinstance(window, int) or window < 1:
    raise ValueError(f"window={window!r} is invalid; pass an integer >= 1.")

  def init(task_names):
    names = _sorted_task_names(task_names)
    return DwaState(
        steps_in_window=jnp.zeros((), jnp.int32),
        window_sum=_zeros(names),
        window_count=_zeros(names),
        last_mean=_zeros(names),
        previous_mean=_zeros(names),
        num_means=_zeros(names, jnp.int32))

  def update(state, task_losses, step, *, task_counts=None, params=None,
             task_grad_norms=None):
    del step, params, task_grad_norms
    names = _names_of(state.last_mean)
    losses = _to_vector(task_losses, names, "task_losses")
    present = _presence(task_counts, names)
    last_mean = _to_vector(state.last_mean, names, "last_mean")
    previous_mean = _to_vector(state.previous_mean, names, "previous_mean")
    num_means = jnp.stack([state.num_means[name] for name in names])

    # Weights from the closed windows only, so they are constant in a window.
    has_ratio = num_means >= 2
    ratio = jnp.where(
        has_ratio,
        last_mean / jnp.where(has_ratio, jnp.maximum(previous_mean, 1e-12), 1.),
        1.0)
    weights = len(names) * jax.nn.softmax(ratio / temperature)

    # Record this step, then close the window when it is full.
    window_sum = (_to_vector(state.window_sum, names, "window_sum")
                  + jnp.where(present, losses, 0.0))
    window_count = (_to_vector(state.window_count, names, "window_count")
                    + present.astype(jnp.float32))
    steps_in_window = state.steps_in_window + 1
    closes = steps_in_window >= window
    advances = closes & (window_count > 0)
    mean = window_sum / jnp.maximum(window_count, 1.0)
    new_state = DwaState(
        steps_in_window=jnp.where(closes, 0, steps_in_window),
        window_sum=_to_dict(jnp.where(closes, 0.0, window_sum), names),
        window_count=_to_dict(jnp.where(closes, 0.0, window_count), names),
        last_mean=_to_dict(jnp.where(advances, mean, last_mean), names),
        previous_mean=_to_dict(
            jnp.where(advances, last_mean, previous_mean), names),
        num_means=_to_dict(
            jnp.where(advances, jnp.minimum(num_means + 1, 2), num_means),
            names))
    return _to_dict(weights, names), new_state

  return WeightingStrategy(init=init, update=update)


# Homoscedastic uncertainty.


def uncertainty() -> WeightingStrategy:
  """Builds uncertainty weighting with one learned log-variance per task.

  Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
  Losses for Scene Geometry and Semantics", CVPR 2018, learn a noise scale
  sigma_k per task. This strategy uses the common form
  `total = sum_k exp(-s_k) * L_k + s_k` with `s_k = log sigma_k^2`, whose
  minimum over s_k is at `exp(s_k) = L_k`. The paper's classification term
  `L_k / sigma_k^2 + log sigma_k` equals `exp(-s_k) * L_k + s_k / 2`, so this
  form doubles the log term.

  `init_params` returns `{task: s_k}` (zeros). The train step passes these
  parameters, without stop_gradient, as `update(..., params=...)`, which
  returns `exp(-s_k)`, and adds `regularizer(params, task_counts=...)`, the
  sum of `s_k` over the tasks present, to the total loss. Leaving absent tasks
  out of the regularizer keeps their `s_k` from drifting down while their
  loss is 0. Exclude the `s_k` from weight decay, which would pull them to 0.
  Cost per step: O(K).

  Returns:
    A stateless `WeightingStrategy` with trainable parameters.
  """

  def init(task_names):
    _sorted_task_names(task_names)
    return optax.EmptyState()

  def init_params(task_names):
    return _zeros(_sorted_task_names(task_names))

  def update(state, task_losses, step, *, task_counts=None, params=None,
             task_grad_norms=None):
    del step, task_grad_norms
    if params is None:
      raise ValueError(
          "uncertainty weighting needs params=, the log-variances returned "
          "by init_params and trained with the model.")
    names = _names_of(params)
    _check_task_keys(task_losses, names, "task_losses")
    _check_optional_keys(task_counts, names)
    log_variance = _to_vector(params, names, "params")
    return _to_dict(jnp.exp(-log_variance), names), state

  def regularizer(params, *, task_counts=None):
    names = _names_of(params)
    log_variance = _to_vector(params, names, "params")
    present = _presence(task_counts, names)
    return jnp.sum(jnp.where(present, log_variance, 0.0))

  return WeightingStrategy(init=init, update=update, init_params=init_params,
                           regularizer=regularizer)


# FAMO.


class FamoState(NamedTuple):
  """State of `famo`; per-task fields are dicts of scalars.

  Attributes:
    logits: float32, xi; the task distribution is softmax(xi).
    optimizer_state: Adam state of the logits.
    previous_log_loss: float32, log of the task's loss at the previous update.
    previous_present: bool, whether the task was present at the previous
      update.
  """

  logits: dict[str, jax.Array]
  optimizer_state: optax.OptState
  previous_log_loss: dict[str, jax.Array]
  previous_present: dict[str, jax.Array]


def famo(*, learning_rate: float = 0.025, gamma: float = 0.001,
         min_loss: float = 1e-8) -> WeightingStrategy:
  """Builds FAMO, Fast Adaptive Multitask Optimization.

  B. Liu, Y. Feng, P. Stone and Q. Liu, "FAMO: Fast Adaptive Multitask
  Optimization", NeurIPS 2023. With `z = softmax(xi)` the model step descends
  `sum_k z_k log L_k` rescaled by `c = 1 / sum_k (z_k / L_k)`, so the weights
  on the raw losses are `w_k = c * z_k / L_k` and sum to 1 (wrap the strategy
  in `with_bounds(..., normalize=True)` for a sum of K). They use this step's
  losses, which the train step passes stop-gradient'ed.

  The logits are then trained to equalise the rate at which the log-losses
  fall: with `delta_k = log L_k(t-1) - log L_k(t)` their gradient is
  `J_softmax(xi)^T delta`, plus `gamma * xi` as weight decay, stepped with Adam
  at `learning_rate`. The authors' implementation (github.com/Cranial-XIX/FAMO,
  famo.py) measures the losses again on the same batch after the model step,
  an extra forward pass. This strategy uses the next step's losses on the next
  batch instead, so the change also contains the noise between batches.
  `update` first steps the logits with the change from the previous update to
  this one, then returns the weights.

  Losses are clamped to at least `min_loss` before the log. A task absent at
  this update gets weight 0. `delta_k` exists only for tasks present at both
  updates, so the logit step is restricted to those tasks. Cost per step: O(K).

  Args:
    learning_rate: Adam learning rate of the logits.
    gamma: Weight decay of the logits.
    min_loss: Lower clamp of the losses, which keeps the log finite.

  Returns:
    A `WeightingStrategy` with a `FamoState`.
  """
  learning_rate = _positive_float(learning_rate, "learning_rate")
  min_loss = _positive_float(min_loss, "min_loss")
  if not (isinstance(gamma, (int, float)) and math.isfinite(gamma)
          and gamma >= 0):
    raise ValueError(f"gamma={gamma!r} is invalid; pass a finite number >= 0.")
  # Weight decay added to the gradient before Adam, as in torch's Adam.
  logit_optimizer = optax.chain(
      optax.add_decayed_weights(float(gamma)), optax.adam(learning_rate))

  def init(task_names):
    names = _sorted_task_names(task_names)
    logits = _zeros(names)
    return FamoState(
        logits=logits,
        optimizer_state=logit_optimizer.init(logits),
        previous_log_loss=_zeros(names),
        previous_present=_zeros(names, bool))

  def update(state, task_losses, step, *, task_counts=None, params=None,
             task_grad_norms=None):
    del step, params, task_grad_norms
    names = _names_of(state.logits)
    losses = jnp.maximum(_to_vector(task_losses, names, "task_losses"),
                         min_loss)
    log_loss = jnp.log(losses)
    present = _presence(task_counts, names)
    previous_present = jnp.stack(
        [state.previous_present[name] for name in names])
    previous_log_loss = _to_vector(
        state.previous_log_loss, names, "previous_log_loss")

    # Logit step from the change in log-loss since the previous update.
    # Tasks without a change get delta equal to the mean of the others, so
    # their component of J_softmax^T delta is 0 and they leave the rest as is.
    logits = _to_vector(state.logits, names, "logits")
    z = jax.nn.softmax(logits)
    has_delta = present & previous_present
    delta = jnp.where(has_delta, previous_log_loss - log_loss, 0.0)
    z_with_delta = jnp.where(has_delta, z, 0.0)
    mean_delta = (jnp.sum(z_with_delta * delta)
                  / jnp.maximum(jnp.sum(z_with_delta), 1e-30))
    logit_grad = jnp.where(has_delta, z * (delta - mean_delta), 0.0)
    updates, stepped_optimizer_state = logit_optimizer.update(
        _to_dict(logit_grad, names), state.optimizer_state, state.logits)
    stepped_logits = optax.apply_updates(state.logits, updates)
    # No step at all (not even weight decay) while no task has a change.
    any_delta = jnp.any(has_delta)
    new_logits, new_optimizer_state = jax.tree.map(
        lambda stepped, kept: jnp.where(any_delta, stepped, kept),
        (stepped_logits, stepped_optimizer_state),
        (state.logits, state.optimizer_state))

    z = jax.nn.softmax(_to_vector(new_logits, names, "logits"))
    scaled = jnp.where(present, z / losses, 0.0)
    weights = scaled / jnp.maximum(jnp.sum(scaled), 1e-30)
    new_state = FamoState(
        logits=new_logits,
        optimizer_state=new_optimizer_state,
        previous_log_loss=_to_dict(
            jnp.where(present, log_loss, previous_log_loss), names),
        previous_present=_to_dict(present, names))
    return _to_dict(weights, names), new_state

  return WeightingStrategy(init=init, update=update)


# GradNorm.


class GradNormState(NamedTuple):
  """State of `gradnorm`; per-task fields are dicts of scalars.

  Attributes:
    weights: float32, the current task weights (they sum to K).
    optimizer_state: Adam state of the weights.
    initial_loss: float32, the task's first recorded loss.
    seen: bool, whether the task has recorded a loss.
    previous_loss: float32, the task's loss at the previous update.
    previous_present: bool, whether the task was present at the previous
      update (and so has an initial loss and a meaningful gradient norm).
  """

  weights: dict[str, jax.Array]
  optimizer_state: optax.OptState
  initial_loss: dict[str, jax.Array]
  seen: dict[str, jax.Array]
  previous_loss: dict[str, jax.Array]
  previous_present: dict[str, jax.Array]


# Keeps GradNorm's weights positive so the renormalisation stays defined; use
# with_bounds floors for a meaningful lower bound.
_GRADNORM_MIN_WEIGHT = 1e-6


def gradnorm(*, alpha: float = 1.5,
             learning_rate: float = 0.025) -> WeightingStrategy:
  """Builds GradNorm with the task weights as state.

  Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization
  for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018. With
  `g_k` the gradient norm of task k's unweighted loss on the last shared
  layer, `G_k = w_k g_k`, `G_mean` their mean, `Ltilde_k = L_k / L_k(0)` and
  `r_k = Ltilde_k / mean_j Ltilde_j`, the weights descend
  `sum_k |G_k - G_mean * r_k^alpha|` with the target held constant, so the
  gradient for `w_k` is `sign(G_k - G_mean r_k^alpha) * g_k`. The weights are
  stepped with Adam at `learning_rate` and kept positive. Then they are
  rescaled so that the updated tasks keep their previous sum. The weights start
  at 1, so they sum to K.

  The train step can only measure `g_k` after its backward pass, so `update`
  receives the norms of the previous step (`task_grad_norms`) and pairs them
  with the losses of that step, which the state keeps. The weights therefore
  lag one step. Without norms (`task_grad_norms=None`, as at the first step)
  the weights stay as they are. Tasks absent at the previous step are left out
  of the means and keep their weight. Cost per step: O(K) here, plus one
  gradient norm per task in the train step.

  Args:
    alpha: Restoring force towards equal training rates. With 0, the target
      is equal gradient norms.
    learning_rate: Adam learning rate of the weights.

  Returns:
    A `WeightingStrategy` with a `GradNormState` that needs gradient norms.
  """
  if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)
          and alpha >= 0):
    raise ValueError(f"alpha={alpha!r} is invalid; pass a finite number >= 0.")
  alpha = float(alpha)
  learning_rate = _positive_float(learning_rate, "learning_rate")
  weight_optimizer = optax.adam(learning_rate)

  def init(task_names):
    names = _sorted_task_names(task_names)
    weights = {name: jnp.ones((), jnp.float32) for name in names}
    return GradNormState(
        weights=weights,
        optimizer_state=weight_optimizer.init(weights),
        initial_loss=_zeros(names),
        seen=_zeros(names, bool),
        previous_loss=_zeros(names),
        previous_present=_zeros(names, bool))

  def step_weights(state, names, grad_norms):
    """Returns the weights and Adam state after one GradNorm step."""
    weights = _to_vector(state.weights, names, "weights")
    previous_present = jnp.stack(
        [state.previous_present[name] for name in names])
    valid = previous_present & jnp.isfinite(grad_norms)
    grad_norms = jnp.where(valid, grad_norms, 0.0)
    num_valid = jnp.maximum(jnp.sum(valid), 1)

    weighted_norms = weights * grad_norms
    mean_norm = jnp.sum(jnp.where(valid, weighted_norms, 0.0)) / num_valid
    loss_ratio = (_to_vector(state.previous_loss, names, "previous_loss")
                  / jnp.maximum(
                      _to_vector(state.initial_loss, names, "initial_loss"),
                      1e-12))
    loss_ratio = jnp.where(valid, loss_ratio, 0.0)
    relative_rate = loss_ratio / jnp.maximum(
        jnp.sum(loss_ratio) / num_valid, 1e-12)
    target = mean_norm * relative_rate**alpha
    weight_grad = jnp.where(
        valid, jnp.sign(weighted_norms - target) * grad_norms, 0.0)

    updates, optimizer_state = weight_optimizer.update(
        _to_dict(weight_grad, names), state.optimizer_state, state.weights)
    stepped = _to_vector(optax.apply_updates(state.weights, updates), names,
                         "weights")
    stepped = jnp.where(valid, jnp.maximum(stepped, _GRADNORM_MIN_WEIGHT),
                        weights)
    # The updated tasks share the sum they had before the step.
    old_sum = jnp.sum(jnp.where(valid, weights, 0.0))
    new_sum = jnp.sum(jnp.where(valid, stepped, 0.0))
    scale = old_sum / jnp.maximum(new_sum, 1e-30)
    return jnp.where(valid, stepped * scale, weights), optimizer_state

  def update(state, task_losses, step, *, task_counts=None, params=None,
             task_grad_norms=None):
    del step, params
    names = _names_of(state.weights)
    losses = _to_vector(task_losses, names, "task_losses")
    present = _presence(task_counts, names)
    if task_grad_norms is None:
      weights = _to_vector(state.weights, names, "weights")
      optimizer_state = state.optimizer_state
    else:
      grad_norms = _to_vector(task_grad_norms, names, "task_grad_norms")
      weights, optimizer_state = step_weights(state, names, grad_norms)

    initial_loss = _to_vector(state.initial_loss, names, "initial_loss")
    seen = jnp.stack([state.seen[name] for name in names])
    previous_loss = _to_vector(state.previous_loss, names, "previous_loss")
    new_state = GradNormState(
        weights=_to_dict(weights, names),
        optimizer_state=optimizer_state,
        initial_loss=_to_dict(
            jnp.where(present & ~seen, losses, initial_loss), names),
        seen=_to_dict(seen | present, names),
        previous_loss=_to_dict(
            jnp.where(present, losses, previous_loss), names),
        previous_present=_to_dict(present, names))
    return _to_dict(weights, names), new_state

  return WeightingStrategy(init=init, update=update, needs_grad_norms=True)


# Relative progress.


class RelativeProgressState(NamedTuple):
  """State of `relative_progress`; per-task fields are dicts of scalars.

  Attributes:
    weights: float32, the current task weights (they sum to K).
    smoothed_loss: float32, exponential moving average of the task's loss.
    initial_loss: float32, the task's first recorded loss.
    seen: bool, whether the task has recorded a loss.
  """

  weights: dict[str, jax.Array]
  smoothed_loss: dict[str, jax.Array]
  initial_loss: dict[str, jax.Array]
  seen: dict[str, jax.Array]


def relative_progress(*, max_change: float = 0.01, temperature: float = 0.2,
                      ema_decay: float = 0.9) -> WeightingStrategy:
  """Builds weights that favour the task furthest behind its own start.

  A task's progress ratio is `p_k = EMA_k / L_k(0)`, its smoothed loss over its
  first recorded loss, with `p_k = 1` before the task has a loss. The target
  weights are `K * softmax(p / temperature)`, so the task that has reduced its
  loss least gets the most weight. Each update moves the weights towards the
  target by at most `max_change` per task: the step `target - w` is scaled
  down as a whole until its largest entry is `max_change`, which also keeps
  the sum at K. The weights start at 1, and those returned at a step use the
  losses of earlier steps only.

  The EMA starts at the task's first loss, `EMA <- d * EMA + (1 - d) * L`
  with `d = ema_decay`, and skips steps where the task is absent. Cost per
  step: O(K).

  Args:
    max_change: Largest change of any weight in one update.
    temperature: Softmax temperature; smaller values favour the lagging task
      more.
    ema_decay: Decay d of the loss average, in [0, 1).

  Returns:
    A `WeightingStrategy` with a `RelativeProgressState`.
  """
  max_change = _positive_float(max_change, "max_change")
  temperature = _positive_float(temperature, "temperature")
  if not (isinstance(ema_decay, (int, float)) and 0 <= ema_decay < 1):
    raise ValueError(
        f"ema_decay={ema_decay!r} is invalid; pass a number in [0, 1).")
  ema_decay = float(ema_decay)

  def init(task_names):
    names = _sorted_task_names(task_names)
    return RelativeProgressState(
        weights={name: jnp.ones((), jnp.float32) for name in names},
        smoothed_loss=_zeros(names),
        initial_loss=_zeros(names),
        seen=_zeros(names, bool))

  def update(state, task_losses, step, *, task_counts=None, params=None,
             task_grad_norms=None):
    del step, params, task_grad_norms
    names = _names_of(state.weights)
    losses = _to_vector(task_losses, names, "task_losses")
    present = _presence(task_counts, names)
    seen = jnp.stack([state.seen[name] for name in names])
    smoothed = _to_vector(state.smoothed_loss, names, "smoothed_loss")
    initial = _to_vector(state.initial_loss, names, "initial_loss")
    weights = _to_vector(state.weights, names, "weights")

    ratio = jnp.where(seen, smoothed / jnp.maximum(initial, 1e-12), 1.0)
    target = len(names) * jax.nn.softmax(ratio / temperature)
    change = target - weights
    largest = jnp.max(jnp.abs(change))
    scale = jnp.minimum(1.0, max_change / jnp.maximum(largest, 1e-30))
    weights = weights + scale * change

    recorded = jnp.where(
        seen, ema_decay * smoothed + (1.0 - ema_decay) * losses, losses)
    new_state = RelativeProgressState(
        weights=_to_dict(weights, names),
        smoothed_loss=_to_dict(jnp.where(present, recorded, smoothed), names),
        initial_loss=_to_dict(
            jnp.where(present & ~seen, losses, initial), names),
        seen=_to_dict(seen | present, names))
    return _to_dict(weights, names), new_state

  return WeightingStrategy(init=init, update=update)


# Floors, caps and normalisation around any strategy.


def _rescale_within_bounds(weights: jax.Array, *, floors: jax.Array,
                           caps: jax.Array, total: float) -> jax.Array:
  """Solves `sum_k clip(scale * w_k, floor_k, cap_k) = total` for scale >= 0.

  The left side is piecewise linear and non-decreasing in `scale`, with knots
  where a task reaches its floor or its cap, so the solution is found exactly
  by locating the segment that crosses `total` and interpolating. When no
  scale reaches `total` (all weights capped or zero), the largest sum is used.

  Args:
    weights: `[num_tasks]` float32, non-negative.
    floors: `[num_tasks]` float32.
    caps: `[num_tasks]` float32, `inf` for no cap.
    total: The sum to reach.

  Returns:
    `[num_tasks]` float32, the clipped and rescaled weights.
  """
  positive = weights > 0
  safe_weights = jnp.where(positive, weights, 1.0)
  finite_caps = jnp.isfinite(caps)
  floor_knots = jnp.where(positive, floors / safe_weights, 0.0)
  cap_knots = jnp.where(positive & finite_caps,
                        jnp.where(finite_caps, caps, 0.0) / safe_weights, 0.0)
  knots = jnp.sort(jnp.concatenate([jnp.zeros((1,)), floor_knots, cap_knots]))

  def bounded_sum(scale):
    return jnp.sum(jnp.clip(scale * weights, floors, caps))

  sums = jax.vmap(bounded_sum)(knots)  # [2 * num_tasks + 1]
  # The sums are sorted, so the knots with sum <= total form a prefix.
  index = jnp.maximum(jnp.sum(sums <= total) - 1, 0)
  last = knots.shape[0] - 1
  following = jnp.minimum(index + 1, last)
  rise = sums[following] - sums[index]
  inside = (index < last) & (rise > 0)
  inside_scale = knots[index] + (total - sums[index]) * (
      knots[following] - knots[index]) / jnp.where(inside, rise, 1.0)
  # Past the last knot only uncapped tasks with positive weight still grow.
  tail_slope = jnp.sum(jnp.where(positive & ~finite_caps, weights, 0.0))
  tail_scale = knots[last] + jnp.maximum(total - sums[last], 0.0) / jnp.where(
      tail_slope > 0, tail_slope, 1.0)
  tail_scale = jnp.where(tail_slope > 0, tail_scale, knots[last])
  scale = jnp.where(inside, inside_scale, tail_scale)
  return jnp.clip(scale * weights, floors, caps)


def _bounds_vector(bounds: float | Mapping[str, float] | None,
                   names: Sequence[str], default: float, label: str):
  """Expands a number or a partial per-task dict to a `[num_tasks]` vector."""
  if bounds is None:
    return np.full((len(names),), default, np.float32)
  if isinstance(bounds, (int, float)):
    return np.full((len(names),), float(bounds), np.float32)
  unknown = sorted(set(bounds) - set(names))
  if unknown:
    raise ValueError(
        f"{label} names tasks {unknown} that are not among {sorted(names)}; "
        "remove them or pass them to init.")
  return np.asarray([float(bounds.get(name, default)) for name in names],
                    np.float32)


def with_bounds(strategy: WeightingStrategy, *,
                floors: float | Mapping[str, float] | None = None,
                caps: float | Mapping[str, float] | None = None,
                normalize: bool = False) -> WeightingStrategy:
  """Wraps a strategy so its weights respect per-task floors and caps.

  Without `normalize` the weights are clipped to `[floor_k, cap_k]`. With
  `normalize` they are rescaled by one common factor and then clipped, the
  factor chosen so that the clipped weights sum to K, the number of tasks.
  The bounds therefore always hold, and the sum is K whenever the bounds allow
  it: `sum(floors) <= K <= sum(caps)`, which `init` checks. The relative sizes
  of the weights strictly between their bounds are kept. When every weight is
  zero or capped the sum stays below K.

  The wrapper passes `init_params`, `regularizer` and `needs_grad_norms`
  through, and gradients flow through the rescaling (uncertainty weighting
  can be bounded).

  Args:
    strategy: The strategy to wrap.
    floors: Lower bound for every task (a number) or per task (a dict; tasks
      left out get 0).
    caps: Upper bound for every task or per task (tasks left out get no cap).
    normalize: Whether to rescale the weights to sum to K.

  Returns:
    A `WeightingStrategy` with the same state as `strategy`.
  """
  for bounds, label in ((floors, "floors"), (caps, "caps")):
    if bounds is None:
      continue
    values = bounds.values() if isinstance(bounds, Mapping) else [bounds]
    for value in values:
      if not (isinstance(value, (int, float)) and value >= 0
              and not math.isnan(value)):
        raise ValueError(
            f"{label} contains {value!r}; bounds are numbers >= 0 (inf is "
            "allowed for caps).")
  bounds_by_names = {}

  def vectors(names):
    if names not in bounds_by_names:
      floor_vector = _bounds_vector(floors, names, 0.0, "floors")
      cap_vector = _bounds_vector(caps, names, math.inf, "caps")
      if not np.all(np.isfinite(floor_vector)):
        raise ValueError(f"floors={floors!r} contains inf; floors are finite.")
      if np.any(cap_vector < floor_vector):
        raise ValueError(
            f"caps={caps!r} are below floors={floors!r} for some task; make "
            "each cap at least its floor.")
      floor_sum = float(np.sum(floor_vector))
      cap_sum = float(np.sum(cap_vector))
      if normalize and not floor_sum <= len(names) <= cap_sum:
        raise ValueError(
            f"With normalize=True the weights must sum to {len(names)}, but "
            f"the floors sum to {floor_sum} and the caps to {cap_sum}; lower "
            "the floors or raise the caps.")
      bounds_by_names[names] = (floor_vector, cap_vector)
    return bounds_by_names[names]

  def init(task_names):
    vectors(_sorted_task_names(task_names))
    return strategy.init(task_names)

  def update(state, task_losses, step, **kwargs):
    weights, new_state = strategy.update(state, task_losses, step, **kwargs)
    names = _names_of(weights)
    floor_vector, cap_vector = vectors(names)
    vector = _to_vector(weights, names, "weights")
    if normalize:
      vector = _rescale_within_bounds(
          vector, floors=floor_vector, caps=cap_vector, total=len(names))
    else:
      vector = jnp.clip(vector, floor_vector, cap_vector)
    return _to_dict(vector, names), new_state

  return strategy._replace(init=init, update=update)


# Config.


def _config_dict(section: Any, label: str) -> dict[str, Any]:
  if hasattr(section, "to_dict"):
    return section.to_dict()
  if isinstance(section, Mapping):
    return dict(section)
  raise ValueError(
      f"config.weighting.{label} is a {type(section).__name__}; expected a "
      "dict keyed by task name.")


def _select_tasks(section: Any, task_names: Sequence[str],
                  label: str) -> dict[str, Any]:
  """Returns the entries of a per-task config section for `task_names`.

  Entries for other known tasks are dropped, so one config serves runs with
  any subset of tasks. Unknown names (typos) raise.
  """
  per_task = _config_dict(section, label)
  known = set(tasks.TASK_NAMES) | set(task_names)
  unknown = sorted(set(per_task) - known)
  if unknown:
    raise ValueError(
        f"config.weighting.{label} names unknown tasks {unknown}; task names "
        f"are {sorted(known)}.")
  return {name: value for name, value in per_task.items()
          if name in task_names}


STRATEGY_NAMES = ("static", "scheduled", "dwa", "uncertainty", "famo",
                  "gradnorm", "relative_progress")


def _strategy_from_config(config: Any,
                          task_names: Sequence[str]) -> WeightingStrategy:
  """Builds the unbounded strategy named by `config.name`."""
  name = config.name
  if name == "static":
    return static(_select_tasks(config.weights, task_names, "weights"))
  if name == "scheduled":
    descriptions = _select_tasks(config.schedules, task_names, "schedules")
    return scheduled({task: schedule_from_config(description)
                      for task, description in descriptions.items()})
  if name == "dwa":
    return dwa(temperature=config.dwa.temperature, window=config.dwa.window)
  if name == "uncertainty":
    return uncertainty()
  if name == "famo":
    return famo(learning_rate=config.famo.learning_rate,
                gamma=config.famo.gamma, min_loss=config.famo.min_loss)
  if name == "gradnorm":
    return gradnorm(alpha=config.gradnorm.alpha,
                    learning_rate=config.gradnorm.learning_rate)
  if name == "relative_progress":
    return relative_progress(
        max_change=config.relative_progress.max_change,
        temperature=config.relative_progress.temperature,
        ema_decay=config.relative_progress.ema_decay)
  raise ValueError(
      f"config.weighting.name={name!r} is unknown; use one of "
      f"{STRATEGY_NAMES}.")


def from_config(weighting_config: Any,
                task_names: Sequence[str]) -> WeightingStrategy:
  """Builds the strategy described by `config.weighting`.

  Reads `name`, the section of that name (`dwa`, `famo`, `gradnorm`,
  `relative_progress`), `weights` for static, `schedules` for scheduled (see
  `schedule_from_config`), and `floors`, `caps`, `normalize`. Per-task
  entries for tasks outside `task_names` are ignored. The strategy is wrapped
  in `with_bounds` when a floor is above 0, a cap is finite or `normalize` is
  set.

  Args:
    weighting_config: The `config.weighting` ConfigDict, or the whole config.
    task_names: The tasks trained in this run.

  Returns:
    A `WeightingStrategy`.
  """
  config = getattr(weighting_config, "weighting", weighting_config)
  names = _sorted_task_names(task_names)
  strategy = _strategy_from_config(config, names)

  floors = {name: float(value) for name, value in
            _select_tasks(config.floors, names, "floors").items()}
  caps = {name: float(value) for name, value in
          _select_tasks(config.caps, names, "caps").items()}
  normalize = bool(config.normalize)
  bounded = (normalize or any(value > 0 for value in floors.values())
             or any(math.isfinite(value) for value in caps.values()))
  if bounded:
    strategy = with_bounds(strategy, floors=floors, caps=caps,
                           normalize=normalize)
  logging.info(
      "Task weighting %s for tasks %s (floors %s, caps %s, normalize %s).",
      config.name, names, floors, caps, normalize)
  return strategy
