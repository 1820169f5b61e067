"""Tests of the task weighting strategies in mtl_lm.weighting."""

import math

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import base
from mtl_lm import tasks
from mtl_lm import weighting


def _floats(weights):
  return {name: float(value) for name, value in weights.items()}


def _run(strategy, history, names=("a", "b"), counts=None, grad_norms=None):
  """Feeds `history` (a list of loss dicts) and returns the weights per step."""
  state = strategy.init(names)
  all_weights = []
  for step, losses in enumerate(history):
    weights, state = strategy.update(
        state, losses, jnp.int32(step),
        task_counts=None if counts is None else counts[step],
        task_grad_norms=None if grad_norms is None else grad_norms[step])
    all_weights.append(_floats(weights))
  return all_weights


def _assert_weights(actual, expected, atol=1e-6):
  assert set(actual) == set(expected)
  for name in expected:
    assert actual[name] == pytest.approx(expected[name], abs=atol), name


# Random histories shared by the restore and retracing tests.

_NAMES = ("lm", "mlm", "rtd")


def _random_history(num_steps, seed=0):
  """Returns per-step losses, counts (some zero) and gradient norms."""
  rng = np.random.default_rng(seed)
  history = []
  for step in range(num_steps):
    counts = {name: int(rng.integers(0, 3)) for name in _NAMES}
    counts["lm"] = 1  # Keep one task present at every step.
    losses = {
        name: float(rng.uniform(1.0, 3.0) * 0.97**step) if counts[name] else 0.
        for name in _NAMES
    }
    norms = {
        name: float(rng.uniform(0.5, 2.0)) if counts[name] else 0.
        for name in _NAMES
    }
    history.append((losses, counts, norms))
  return history


_STRATEGY_FACTORIES = {
    "static": lambda: weighting.static({"lm": 1.0, "mlm": 0.5, "rtd": 2.0}),
    "scheduled": lambda: weighting.scheduled({
        "lm": 1.0,
        "mlm": optax.linear_schedule(0.0, 1.0, 4, 2),
        "rtd": optax.constant_schedule(0.5),
    }),
    "dwa": lambda: weighting.dwa(temperature=2.0, window=2),
    "uncertainty": weighting.uncertainty,
    "famo": weighting.famo,
    "gradnorm": weighting.gradnorm,
    "relative_progress": lambda: weighting.relative_progress(
        max_change=0.05, temperature=0.5, ema_decay=0.5),
    "bounded_famo": lambda: weighting.with_bounds(
        weighting.famo(), floors=0.3, caps={"lm": 1.5}, normalize=True),
}


def _update_with(strategy, state, step, record, params):
  """Runs one update on a `_random_history` record, without norms at step 0."""
  losses, counts, norms = record
  use_norms = strategy.needs_grad_norms and step > 0
  return strategy.update(
      state, losses, jnp.int32(step), task_counts=counts, params=params,
      task_grad_norms=norms if use_norms else None)


def _params_for(strategy):
  if strategy.init_params is None:
    return None
  return strategy.init_params(_NAMES)


# Static and scheduled weights.


def test_static_returns_fixed_weights():
  strategy = weighting.static({"a": 1.0, "b": 0.25})
  history = [{"a": 3.0, "b": 1.0}, {"a": 0.0, "b": 7.0}]

  for weights in _run(strategy, history):
    assert weights == {"a": 1.0, "b": 0.25}


def test_static_rejects_bad_weights():
  with pytest.raises(ValueError, match="weights\\['a'\\]"):
    weighting.static({"a": -1.0})
  with pytest.raises(ValueError, match="missing: \\['c'\\]"):
    weighting.static({"a": 1.0, "b": 1.0}).init(["a", "b", "c"])


def test_scheduled_follows_step():
  strategy = weighting.scheduled({
      "a": 2.0,
      "b": optax.linear_schedule(0.0, 1.0, transition_steps=4,
                                 transition_begin=2),
  })
  state = strategy.init(["a", "b"])
  expected_b = {0: 0.0, 2: 0.0, 3: 0.25, 5: 0.75, 6: 1.0, 100: 1.0}

  for step, value in expected_b.items():
    weights, state = strategy.update(state, {"a": 1.0, "b": 1.0},
                                     jnp.int32(step))
    _assert_weights(weights, {"a": 2.0, "b": value})


def test_schedule_from_config_linear():
  schedule = weighting.schedule_from_config(
      {"kind": "linear", "init": 0.0, "end": 1.0, "begin": 100, "steps": 100})

  assert float(schedule(0)) == 0.0
  assert float(schedule(100)) == 0.0
  assert float(schedule(150)) == pytest.approx(0.5)
  assert float(schedule(200)) == 1.0
  assert float(schedule(1000)) == 1.0


def test_schedule_from_config_piecewise_and_constant():
  piecewise = weighting.schedule_from_config(
      ml_collections.ConfigDict({
          "kind": "piecewise_constant",
          "values": [0.0, 0.5, 1.0],
          "boundaries": [10, 20],
      }))
  constant = weighting.schedule_from_config({"kind": "constant", "value": 3.})

  assert [float(piecewise(step)) for step in (0, 9, 10, 19, 20, 99)] == [
      0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
  assert float(constant(12345)) == 3.0
  assert float(weighting.schedule_from_config(0.5)(7)) == 0.5


@pytest.mark.parametrize("description, message", [
    ({"kind": "cosine"}, "unknown"),
    ({"kind": "linear", "init": 0.0, "end": 1.0}, "takes exactly"),
    ({"kind": "linear", "init": 0., "end": 1., "begin": 0, "steps": 0},
     "steps >= 1"),
    ({"kind": "piecewise_constant", "values": [1.0], "boundaries": [3]},
     "one value more"),
    ({"kind": "piecewise_constant", "values": [1., 2., 3.],
      "boundaries": [5, 5]}, "strictly increasing"),
    ("linear", "invalid"),
])
def test_schedule_from_config_rejects(description, message):
  with pytest.raises(ValueError, match=message):
    weighting.schedule_from_config(description)


# Dynamic Weight Average.


def test_dwa_acceptance_example():
  strategy = weighting.dwa(temperature=2.0, window=1)
  history = [{"a": 1.0, "b": 2.0}, {"a": 0.5, "b": 2.0},
             {"a": 9.0, "b": 0.1}]

  weights = _run(strategy, history)

  assert weights[0] == {"a": 1.0, "b": 1.0}
  assert weights[1] == {"a": 1.0, "b": 1.0}
  # r_a = 0.5 / 1.0, r_b = 2.0 / 2.0; w = 2 * softmax(r / 2).
  exp_a, exp_b = math.exp(0.5 / 2.0), math.exp(1.0 / 2.0)
  _assert_weights(weights[2], {"a": 2 * exp_a / (exp_a + exp_b),
                               "b": 2 * exp_b / (exp_a + exp_b)})
  _assert_weights(weights[2], {"a": 0.875647, "b": 1.124353})


def test_dwa_window_means_and_constant_within_window():
  strategy = weighting.dwa(temperature=1.0, window=2)
  history = [
      {"a": 4.0, "b": 2.0}, {"a": 2.0, "b": 2.0},  # Means a=3, b=2.
      {"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 1.0},  # Means a=1, b=1.5.
      {"a": 5.0, "b": 5.0}, {"a": 7.0, "b": 0.5},
  ]

  weights = _run(strategy, history)

  for step in range(4):
    assert weights[step] == {"a": 1.0, "b": 1.0}, step
  # r_a = 1 / 3, r_b = 1.5 / 2; w = 2 * softmax(r).
  exp_a, exp_b = math.exp(1.0 / 3.0), math.exp(0.75)
  expected = {"a": 2 * exp_a / (exp_a + exp_b),
              "b": 2 * exp_b / (exp_a + exp_b)}
  _assert_weights(weights[4], expected)
  assert weights[5] == weights[4]


def test_dwa_skips_absent_task():
  strategy = weighting.dwa(temperature=2.0, window=1)
  history = [{"a": 1.0, "b": 2.0}, {"a": 0.5, "b": 0.0},
             {"a": 0.25, "b": 1.0}, {"a": 1.0, "b": 1.0}]
  counts = [{"a": 1, "b": 1}, {"a": 1, "b": 0}, {"a": 1, "b": 1},
            {"a": 1, "b": 1}]

  weights = _run(strategy, history, counts=counts)

  # Step 2: a has means 1.0 and 0.5 (r_a = 0.5); b has one mean (r_b = 1).
  exp_a, exp_b = math.exp(0.5 / 2.0), math.exp(1.0 / 2.0)
  _assert_weights(weights[2], {"a": 2 * exp_a / (exp_a + exp_b),
                               "b": 2 * exp_b / (exp_a + exp_b)})
  # Step 3: r_a = 0.25 / 0.5, r_b = 1.0 / 2.0 from b's two present windows.
  _assert_weights(weights[3], {"a": 1.0, "b": 1.0})


# Uncertainty weighting.


def test_uncertainty_weights_and_gradient():
  strategy = weighting.uncertainty()
  params = {"a": jnp.float32(0.0), "b": jnp.float32(math.log(2.0))}
  losses = {"a": jnp.float32(3.0), "b": jnp.float32(1.0)}
  state = strategy.init(["a", "b"])

  def total_loss(params):
    weights, _ = strategy.update(state, losses, jnp.int32(0), params=params)
    weighted = sum(weights[name] * losses[name] for name in weights)
    return weighted + strategy.regularizer(params)

  weights, _ = strategy.update(state, losses, jnp.int32(0), params=params)
  _assert_weights(weights, {"a": 1.0, "b": 0.5})
  # d/ds_k [exp(-s_k) L_k + s_k] = 1 - L_k exp(-s_k).
  _assert_weights(jax.grad(total_loss)(params), {"a": -2.0, "b": 0.5})
  jtu.check_grads(jax.jit(total_loss), (params,), order=2, modes=["rev"])


def test_uncertainty_converges_to_constant_losses():
  strategy = weighting.uncertainty()
  losses = {"a": jnp.float32(0.2), "b": jnp.float32(5.0)}
  state = strategy.init(["a", "b"])
  optimizer = optax.sgd(0.5)

  def total_loss(params):
    weights, _ = strategy.update(state, losses, jnp.int32(0), params=params)
    weighted = sum(weights[name] * losses[name] for name in weights)
    return weighted + strategy.regularizer(params)

  def train_step(carry, _):
    params, opt_state = carry
    grads = jax.grad(total_loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), None

  params = strategy.init_params(["a", "b"])
  (params, _), _ = jax.lax.scan(
      train_step, (params, optimizer.init(params)), length=200)

  assert math.exp(float(params["a"])) == pytest.approx(0.2, rel=1e-3)
  assert math.exp(float(params["b"])) == pytest.approx(5.0, rel=1e-3)


def test_uncertainty_toy_regression_two_noise_levels():
  # Two regression heads on one shared slope; their noise variances are
  # 0.01 and 1.0, so each learned exp(s_k) should match its residual MSE.
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(512,)).astype(np.float32)
  targets = {
      "a": 2.0 * inputs + rng.normal(scale=0.1, size=512).astype(np.float32),
      "b": 2.0 * inputs + rng.normal(scale=1.0, size=512).astype(np.float32),
  }
  strategy = weighting.uncertainty()
  state = strategy.init(["a", "b"])
  optimizer = optax.adam(0.05)

  def task_losses(model):
    return {name: jnp.mean((model["slope"] * inputs - target)**2)
            for name, target in targets.items()}

  def total_loss(all_params):
    losses = task_losses(all_params["model"])
    weights, _ = strategy.update(state, jax.lax.stop_gradient(losses),
                                 jnp.int32(0), params=all_params["weighting"])
    weighted = sum(weights[name] * losses[name] for name in weights)
    return weighted + strategy.regularizer(all_params["weighting"])

  def train_step(carry, _):
    all_params, opt_state = carry
    grads = jax.grad(total_loss)(all_params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return (optax.apply_updates(all_params, updates), opt_state), None

  all_params = {"model": {"slope": jnp.float32(0.0)},
                "weighting": strategy.init_params(["a", "b"])}
  (all_params, _), _ = jax.lax.scan(
      train_step, (all_params, optimizer.init(all_params)), length=600)

  final_losses = task_losses(all_params["model"])
  for name, noise_variance in (("a", 0.01), ("b", 1.0)):
    learned_variance = math.exp(float(all_params["weighting"][name]))
    assert learned_variance == pytest.approx(float(final_losses[name]),
                                             rel=0.02), name
    assert learned_variance == pytest.approx(noise_variance, rel=0.2), name


def test_uncertainty_regularizer_skips_absent_task():
  strategy = weighting.uncertainty()
  params = {"a": jnp.float32(0.5), "b": jnp.float32(-2.0)}

  assert float(strategy.regularizer(params)) == pytest.approx(-1.5)
  assert float(strategy.regularizer(
      params, task_counts={"a": 3, "b": 0})) == pytest.approx(0.5)
  grads = jax.grad(lambda p: strategy.regularizer(
      p, task_counts={"a": 3, "b": 0}))(params)
  assert _floats(grads) == {"a": 1.0, "b": 0.0}


def test_uncertainty_requires_params():
  strategy = weighting.uncertainty()
  state = strategy.init(["a"])
  with pytest.raises(ValueError, match="params="):
    strategy.update(state, {"a": 1.0}, jnp.int32(0))


# FAMO.


def test_famo_hand_values():
  strategy = weighting.famo(learning_rate=0.025, gamma=0.0)
  history = [{"a": 2.0, "b": 4.0}, {"a": 1.0, "b": 3.6}]

  weights = _run(strategy, history)

  # Step 0: z = (0.5, 0.5); w_k = (z_k / L_k) / sum_j (z_j / L_j).
  _assert_weights(weights[0], {"a": 2.0 / 3.0, "b": 1.0 / 3.0})
  # Step 1: a's log-loss fell more, so its logit gradient is positive and
  # Adam's first step moves the logits by -+0.025: xi = (-0.025, 0.025).
  z_a = 1.0 / (1.0 + math.exp(0.05))
  scaled_a, scaled_b = z_a / 1.0, (1.0 - z_a) / 3.6
  _assert_weights(weights[1], {"a": scaled_a / (scaled_a + scaled_b),
                               "b": scaled_b / (scaled_a + scaled_b)},
                  atol=1e-5)
  _assert_weights(weights[1], {"a": 0.773982, "b": 0.226018}, atol=1e-5)


def test_famo_weight_decay_pulls_logits_to_zero():
  strategy = weighting.famo(learning_rate=0.1, gamma=0.5)
  state = strategy.init(["a", "b"])
  state = state._replace(logits={"a": jnp.float32(1.0),
                                 "b": jnp.float32(-1.0)})
  # Equal relative progress gives a zero logit gradient, leaving the decay.
  for step, losses in enumerate([{"a": 2.0, "b": 4.0},
                                 {"a": 1.0, "b": 2.0}]):
    _, state = strategy.update(state, losses, jnp.int32(step))

  assert float(state.logits["a"]) == pytest.approx(0.9, abs=1e-5)
  assert float(state.logits["b"]) == pytest.approx(-0.9, abs=1e-5)


def test_famo_absent_task():
  strategy = weighting.famo()
  history = [{"a": 2.0, "b": 4.0}, {"a": 1.0, "b": 0.0},
             {"a": 0.5, "b": 2.0}]
  counts = [{"a": 1, "b": 1}, {"a": 1, "b": 0}, {"a": 1, "b": 1}]
  state = strategy.init(["a", "b"])

  all_weights = []
  for step, losses in enumerate(history):
    weights, state = strategy.update(state, losses, jnp.int32(step),
                                     task_counts=counts[step])
    all_weights.append(_floats(weights))
    # Only a has a change in log-loss at steps 1 and 2, and a change of one
    # task alone leaves the logits where they are.
    assert _floats(state.logits) == {"a": 0.0, "b": 0.0}, step

  assert all_weights[1] == {"a": 1.0, "b": 0.0}
  _assert_weights(all_weights[2], {"a": 0.8, "b": 0.2})


# GradNorm.


def _gradnorm_reference(history, grad_norms, *, alpha, learning_rate):
  """Plain NumPy GradNorm with Adam, all tasks present at every step."""
  num_tasks = len(history[0])
  weights = np.ones(num_tasks)
  first_moment = np.zeros(num_tasks)
  second_moment = np.zeros(num_tasks)
  initial = np.asarray(history[0], np.float64)
  outputs = []
  for step, losses in enumerate(history):
    if step > 0:
      norms = np.asarray(grad_norms[step])
      weighted_norms = weights * norms
      ratio = np.asarray(history[step - 1]) / initial
      target = weighted_norms.mean() * (ratio / ratio.mean())**alpha
      grad = np.sign(weighted_norms - target) * norms
      first_moment = 0.9 * first_moment + 0.1 * grad
      second_moment = 0.999 * second_moment + 0.001 * grad**2
      unbiased_first = first_moment / (1 - 0.9**step)
      unbiased_second = second_moment / (1 - 0.999**step)
      stepped = weights - learning_rate * unbiased_first / (
          np.sqrt(unbiased_second) + 1e-8)
      weights = stepped * weights.sum() / stepped.sum()
    outputs.append(weights.copy())
  return outputs


def test_gradnorm_hand_values():
  strategy = weighting.gradnorm(alpha=1.5, learning_rate=0.025)
  history = [{"a": 2.0, "b": 4.0}, {"a": 1.0, "b": 3.6},
             {"a": 0.5, "b": 3.0}]
  grad_norms = [None, {"a": 1.0, "b": 3.0}, {"a": 1.0, "b": 3.0}]

  weights = _run(strategy, history, grad_norms=grad_norms)

  assert weights[0] == {"a": 1.0, "b": 1.0}
  # Step 1 pairs the norms with the step-0 losses: equal loss ratios, so the
  # target is mean(G) = 2 for both; G = (1, 3) moves a up and b down by the
  # learning rate (Adam's first step has size lr).
  _assert_weights(weights[1], {"a": 1.025, "b": 0.975}, atol=1e-5)
  # Step 2: loss ratios (0.5, 0.9) give r = (5/7, 9/7) and targets
  # 1.975 * r**1.5 = (1.192, 2.879) against G = (1.025, 2.925).
  _assert_weights(weights[2], {"a": 1.05, "b": 0.95}, atol=1e-5)


def test_gradnorm_matches_numpy_reference():
  rng = np.random.default_rng(3)
  names = ("a", "b", "c")
  history = [rng.uniform(0.5, 3.0, size=3) for _ in range(8)]
  norms = [rng.uniform(0.1, 5.0, size=3) for _ in range(8)]
  strategy = weighting.gradnorm(alpha=0.7, learning_rate=0.1)

  weights = _run(
      strategy, [dict(zip(names, losses)) for losses in history], names=names,
      grad_norms=[None] + [dict(zip(names, n)) for n in norms[1:]])
  expected = _gradnorm_reference(history, norms, alpha=0.7, learning_rate=0.1)

  for step in range(8):
    np.testing.assert_allclose([weights[step][name] for name in names],
                               expected[step], rtol=1e-4, atol=1e-5)
    assert sum(weights[step].values()) == pytest.approx(3.0, abs=1e-5)


def test_gradnorm_absent_task():
  strategy = weighting.gradnorm(alpha=1.5, learning_rate=0.025)
  history = [{"a": 2.0, "b": 4.0, "c": 0.0}, {"a": 1.0, "b": 3.6, "c": 1.0},
             {"a": 0.5, "b": 3.0, "c": 0.8}]
  counts = [{"a": 1, "b": 1, "c": 0}, None, None]
  # c's step-1 norm belongs to step 0, where c was absent, so it is ignored.
  grad_norms = [None, {"a": 1.0, "b": 3.0, "c": 5.0},
                {"a": 1.0, "b": 3.0, "c": 2.0}]

  weights = _run(strategy, history, names=("a", "b", "c"), counts=counts,
                 grad_norms=grad_norms)

  # Only a and b move at step 1.
  _assert_weights(weights[1], {"a": 1.025, "b": 0.975, "c": 1.0}, atol=1e-5)
  # Step 2: c's first loss is 1.0 (step 1), so the loss ratios are
  # (0.5, 0.9, 1.0) and r = (0.625, 1.125, 1.25). With G = (1.025, 2.925, 2)
  # and mean 1.9833 the targets are (0.980, 2.367, 2.772), giving gradients
  # (+1, +3, -2). Adam's second step moves a by -0.025 * 0.01 / 0.19 because
  # its gradient changed sign. It moves b by -0.025 and c by
  # +0.025 * (0.2 / 0.19) / sqrt(0.004 / (1 - 0.999**2)). Then the sum is
  # rescaled to 3.
  _assert_weights(weights[2], {"a": 1.026323, "b": 0.952449, "c": 1.021229},
                  atol=2e-6)


def test_gradnorm_without_norms_keeps_weights():
  strategy = weighting.gradnorm()
  history = [{"a": 2.0, "b": 4.0}, {"a": 1.0, "b": 3.6}]

  weights = _run(strategy, history, grad_norms=[None, None])

  assert weights == [{"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0}]


# Relative progress.


def test_relative_progress_hand_values():
  strategy = weighting.relative_progress(max_change=0.1, temperature=0.5,
                                         ema_decay=0.5)
  history = [{"a": 2.0, "b": 4.0}, {"a": 1.0, "b": 4.0}, {"a": 1.5, "b": 4.0},
             {"a": 1.5, "b": 4.0}, {"a": 1.5, "b": 4.0}]

  weights = _run(strategy, history)

  assert weights[0] == {"a": 1.0, "b": 1.0}
  _assert_weights(weights[1], {"a": 1.0, "b": 1.0})
  # From step 2 on the progress ratios are (1.5 / 2, 4 / 4), so the target is
  # 2 * softmax((0.75, 1.0) / 0.5) = (0.755081, 1.244919), reached in steps of
  # at most 0.1.
  _assert_weights(weights[2], {"a": 0.9, "b": 1.1})
  _assert_weights(weights[3], {"a": 0.8, "b": 1.2})
  target_a = 2.0 / (1.0 + math.exp(0.5))
  _assert_weights(weights[4], {"a": target_a, "b": 2.0 - target_a})


def test_relative_progress_skips_absent_task():
  strategy = weighting.relative_progress(max_change=1.0, temperature=0.5,
                                         ema_decay=0.5)
  history = [{"a": 0.0, "b": 4.0}, {"a": 2.0, "b": 4.0},
             {"a": 0.0, "b": 4.0}, {"a": 1.0, "b": 4.0}]
  counts = [{"a": 0, "b": 1}, {"a": 1, "b": 1}, {"a": 0, "b": 1},
            {"a": 1, "b": 1}]

  weights = _run(strategy, history, counts=counts)

  # a's first loss is 2.0, from step 1. The zero losses of steps 0 and 2 are
  # not recorded, so both ratios are 1 through step 3.
  for step in range(4):
    _assert_weights(weights[step], {"a": 1.0, "b": 1.0})


# Bounds and normalisation.


def _bounded_weights(strategy, names, losses=None):
  state = strategy.init(names)
  losses = losses or {name: 1.0 for name in names}
  weights, _ = strategy.update(state, losses, jnp.int32(0))
  return _floats(weights)


def test_with_bounds_clips_without_normalize():
  inner = weighting.static({"a": 3.0, "b": 1.0, "c": 0.0})
  strategy = weighting.with_bounds(inner, floors={"c": 0.2}, caps={"a": 1.5})

  _assert_weights(_bounded_weights(strategy, ["a", "b", "c"]),
                  {"a": 1.5, "b": 1.0, "c": 0.2})


def test_with_bounds_normalize_alone():
  inner = weighting.static({"a": 3.0, "b": 1.0, "c": 0.0})
  strategy = weighting.with_bounds(inner, normalize=True)

  _assert_weights(_bounded_weights(strategy, ["a", "b", "c"]),
                  {"a": 2.25, "b": 0.75, "c": 0.0})


def test_with_bounds_normalize_then_clip():
  inner = weighting.static({"a": 3.0, "b": 1.0, "c": 0.0})
  strategy = weighting.with_bounds(inner, floors={"c": 0.2}, caps={"a": 1.5},
                                   normalize=True)

  # a sits at its cap and c at its floor; b takes the rest of the sum 3.
  _assert_weights(_bounded_weights(strategy, ["a", "b", "c"]),
                  {"a": 1.5, "b": 1.3, "c": 0.2})


def test_with_bounds_normalize_random_cases():
  rng = np.random.default_rng(0)
  names = ("a", "b", "c", "d")
  for case in range(20):
    raw = rng.uniform(0.0, 2.0, size=4) * (rng.uniform(size=4) > 0.2)
    if not raw.any():
      continue
    floors = dict(zip(names, rng.uniform(0.0, 0.5, size=4)))
    caps = dict(zip(names, rng.uniform(1.0, 3.0, size=4)))
    strategy = weighting.with_bounds(
        weighting.static(dict(zip(names, raw))), floors=floors, caps=caps,
        normalize=True)

    weights = _bounded_weights(strategy, names)

    # When the positive weights all reach their caps the sum stays below 4.
    largest_sum = sum(caps[name] if value > 0 else floors[name]
                      for name, value in zip(names, raw))
    assert sum(weights.values()) == pytest.approx(min(4.0, largest_sum),
                                                  abs=1e-4), case
    for name in names:
      assert floors[name] - 1e-6 <= weights[name] <= caps[name] + 1e-6, case
    # Weights strictly inside their bounds keep the ratios of the input.
    inside = [index for index, name in enumerate(names)
              if floors[name] + 1e-4 < weights[name] < caps[name] - 1e-4]
    for first, second in zip(inside, inside[1:]):
      assert (weights[names[first]] * raw[second] == pytest.approx(
          weights[names[second]] * raw[first], abs=1e-4)), case


def test_with_bounds_normalize_gradient():
  floors = np.asarray([0.0, 0.5, 0.0], np.float32)
  caps = np.asarray([1.2, np.inf, np.inf], np.float32)

  def rescale(raw):
    return weighting._rescale_within_bounds(raw, floors=floors, caps=caps,
                                            total=3.0)

  # At this point a is capped, b is free above its floor and c is free.
  raw = jnp.asarray([2.0, 1.0, 0.5], jnp.float32)
  np.testing.assert_allclose(rescale(raw), [1.2, 1.2, 0.6], rtol=1e-6)
  jtu.check_grads(jax.jit(rescale), (raw,), order=1, modes=["rev"], atol=1e-2,
                  rtol=1e-2)


def test_with_bounds_rejects_infeasible_bounds():
  inner = weighting.static({"a": 1.0, "b": 1.0})
  with pytest.raises(ValueError, match="floors sum to 2.5"):
    weighting.with_bounds(inner, floors={"a": 1.5, "b": 1.0},
                          normalize=True).init(["a", "b"])
  with pytest.raises(ValueError, match="caps to 1.5"):
    weighting.with_bounds(inner, caps=0.75, normalize=True).init(["a", "b"])
  with pytest.raises(ValueError, match="below floors"):
    weighting.with_bounds(inner, floors=0.5, caps={"a": 0.25}).init(
        ["a", "b"])
  with pytest.raises(ValueError, match="not among"):
    weighting.with_bounds(inner, floors={"z": 0.5}).init(["a", "b"])


def test_with_bounds_keeps_uncertainty_trainable():
  strategy = weighting.with_bounds(weighting.uncertainty(), floors=0.5,
                                   caps=2.0)
  assert strategy.init_params is not None
  state = strategy.init(["a", "b"])
  params = {"a": jnp.float32(-3.0), "b": jnp.float32(0.0)}
  losses = {"a": 1.0, "b": 1.0}

  def total_weight(params):
    weights, _ = strategy.update(state, losses, jnp.int32(0), params=params)
    return weights["a"] + weights["b"]

  weights, _ = strategy.update(state, losses, jnp.int32(0), params=params)
  # exp(3) is capped at 2; exp(0) = 1 is inside the bounds.
  _assert_weights(weights, {"a": 2.0, "b": 1.0})
  _assert_weights(jax.grad(total_weight)(params), {"a": 0.0, "b": -1.0})


# Contract shared by every strategy: keys, resume and tracing.


def test_update_rejects_wrong_task_keys():
  for name, factory in _STRATEGY_FACTORIES.items():
    strategy = factory()
    state = strategy.init(_NAMES)
    with pytest.raises(ValueError, match="missing"):
      strategy.update(state, {"lm": 1.0}, jnp.int32(0),
                      params=_params_for(strategy))
    with pytest.raises(ValueError, match="task_counts"):
      strategy.update(state, {task: 1.0 for task in _NAMES}, jnp.int32(0),
                      task_counts={"lm": 1}, params=_params_for(strategy))


@pytest.mark.parametrize("name", sorted(_STRATEGY_FACTORIES))
def test_restored_state_gives_same_weights(name):
  strategy = _STRATEGY_FACTORIES[name]()
  params = _params_for(strategy)
  history = _random_history(12)

  @jax.jit
  def update(state, step, losses, counts, norms):
    return strategy.update(state, losses, step, task_counts=counts,
                           params=params, task_grad_norms=norms)

  def update_at(state, step, record):
    losses, counts, norms = record
    use_norms = strategy.needs_grad_norms and step > 0
    return update(state, jnp.int32(step), losses, counts,
                  norms if use_norms else None)

  state = strategy.init(_NAMES)
  uninterrupted = []
  saved = None
  for step, record in enumerate(history):
    if step == 5:
      saved = jax.tree.map(np.array, state)
    weights, state = update_at(state, step, record)
    uninterrupted.append(_floats(weights))

  state = jax.tree.map(jnp.asarray, saved)
  for step, record in enumerate(history[5:], start=5):
    weights, state = update_at(state, step, record)
    assert _floats(weights) == uninterrupted[step], step


def test_orbax_round_trip_gives_same_weights(tmp_path):
  strategy = weighting.gradnorm()
  history = _random_history(6)
  state = strategy.init(_NAMES)
  for step, record in enumerate(history[:3]):
    _, state = _update_with(strategy, state, step, record, None)
  # A weighting state travels inside the train state; Orbax rejects a
  # checkpoint whose whole tree is empty, which a stateless strategy has.
  train_state = {"step": jnp.int32(3), "weighting": state}

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "checkpoint", train_state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(
      tmp_path / "checkpoint",
      jax.tree.map(ocp.utils.to_shape_dtype_struct, train_state))["weighting"]

  assert isinstance(restored, weighting.GradNormState)
  for step, record in enumerate(history[3:], start=3):
    expected, state = _update_with(strategy, state, step, record, None)
    weights, restored = _update_with(strategy, restored, step, record, None)
    assert _floats(weights) == _floats(expected), step


@pytest.mark.parametrize("name", sorted(_STRATEGY_FACTORIES))
def test_update_traces_once(name):
  strategy = _STRATEGY_FACTORIES[name]()
  params = _params_for(strategy)
  history = _random_history(5)
  num_traces = 0

  def update(state, step, losses, counts, norms):
    nonlocal num_traces
    num_traces += 1
    return strategy.update(
        state, losses, step, task_counts=counts, params=params,
        task_grad_norms=norms if strategy.needs_grad_norms else None)

  jitted = jax.jit(update)
  state = strategy.init(_NAMES)
  initial_shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  for step, (losses, counts, norms) in enumerate(history):
    weights, state = jitted(state, jnp.int32(step), losses, counts, norms)
    for value in weights.values():
      assert value.shape == ()
      assert value.dtype == jnp.float32
      assert np.isfinite(float(value))

  assert num_traces == 1
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == initial_shapes


# Config.


def _weighting_config(name, **changes):
  config = base.get_config().weighting
  config.name = name
  for field, value in changes.items():
    config[field] = value
  return config


@pytest.mark.parametrize("name", weighting.STRATEGY_NAMES)
def test_from_config_builds_every_strategy(name):
  config = _weighting_config(name)
  strategy = weighting.from_config(config, tasks.TASK_NAMES)
  params = (None if strategy.init_params is None
            else strategy.init_params(tasks.TASK_NAMES))

  state = strategy.init(tasks.TASK_NAMES)
  weights, _ = strategy.update(
      state, {task: 1.0 for task in tasks.TASK_NAMES}, jnp.int32(0),
      params=params)

  assert set(weights) == set(tasks.TASK_NAMES)
  assert strategy.needs_grad_norms == (name == "gradnorm")


def test_from_config_scheduled_ramp():
  config = _weighting_config("scheduled")
  config.schedules.rtd = {"kind": "linear", "init": 0.0, "end": 1.0,
                          "begin": 100, "steps": 100}
  strategy = weighting.from_config(config, ("lm", "rtd"))
  state = strategy.init(("lm", "rtd"))

  weights, _ = strategy.update(state, {"lm": 1.0, "rtd": 1.0}, jnp.int32(150))

  _assert_weights(weights, {"lm": 1.0, "rtd": 0.5})


def test_from_config_applies_bounds():
  config = base.get_config()  # The whole config is accepted too.
  config.weighting.weights.lm = 3.0
  config.weighting.caps.lm = 1.5
  config.weighting.floors.sop = 0.2
  config.weighting.normalize = True
  strategy = weighting.from_config(config, ("lm", "mlm", "sop"))
  state = strategy.init(("lm", "mlm", "sop"))

  weights, _ = strategy.update(
      state, {"lm": 1.0, "mlm": 1.0, "sop": 1.0}, jnp.int32(0))

  # Raw (3, 1, 1): lm capped at 1.5, the others share 1.5 equally.
  _assert_weights(weights, {"lm": 1.5, "mlm": 0.75, "sop": 0.75})


def test_from_config_rejects_unknown_names():
  with pytest.raises(ValueError, match="unknown"):
    weighting.from_config(_weighting_config("mgda"), tasks.TASK_NAMES)
  config = _weighting_config("static")
  config.weights = ml_collections.ConfigDict({"lm": 1.0, "mlmm": 1.0})
  with pytest.raises(ValueError, match="mlmm"):
    weighting.from_config(config, ("lm",))
