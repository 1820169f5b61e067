"""Tests of mtl_lm.losses: literal values, references, invariances, grads."""

import re

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtl_lm import losses

_LOG_3 = 1.0986122886681098
# logsumexp([1, 2, 3]) = 3 + log(1 + e**-1 + e**-2).
_LSE_123 = 3.40760596444438


# Test data comes from NumPy, because every new shape drawn with jax.random
# costs a compilation.
def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


def _uniform(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape),
                     jnp.float32)


def _integers(seed, shape, high):
  return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape),
                     jnp.int32)


def _random_problem(seed, *, batch_shape=(2, 3), embed=8, vocab=50,
                    dtype=jnp.float32, scale=1.0):
  """Returns hidden `[*batch_shape, embed]`, unembedding and int32 labels."""
  rng = np.random.default_rng(seed)
  hidden = scale * rng.standard_normal(batch_shape + (embed,))
  unembedding = rng.standard_normal((embed, vocab))
  labels = rng.integers(0, vocab, batch_shape)
  return (jnp.asarray(hidden, dtype), jnp.asarray(unembedding, dtype),
          jnp.asarray(labels, jnp.int32))


def _reference_cross_entropy(logits, labels, *, label_smoothing, z_loss):
  """Plain numpy cross-entropy against the smoothed one-hot target."""
  logits = np.asarray(logits, np.float64)
  vocab = logits.shape[-1]
  shifted = logits - logits.max(axis=-1, keepdims=True)
  lse = np.log(np.exp(shifted).sum(axis=-1)) + logits.max(axis=-1)
  log_probs = logits - lse[..., None]
  target = ((1 - label_smoothing) * np.eye(vocab)[labels] +
            label_smoothing / vocab)
  return -(target * log_probs).sum(axis=-1) + z_loss * lse**2


# ---------------------------------------------------------------------------
# token_cross_entropy
# ---------------------------------------------------------------------------


class TestTokenCrossEntropy:

  logits = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
  labels = jnp.array([2, 1])

  def test_hand_computed_values(self):
    loss = losses.token_cross_entropy(self.logits, self.labels)
    np.testing.assert_allclose(loss, [_LSE_123 - 3.0, _LOG_3], rtol=1e-6)

  def test_label_smoothing_hand_computed(self):
    # lse - 0.9 * logit[label] - 0.1 * mean(logits).
    loss = losses.token_cross_entropy(self.logits, self.labels,
                                      label_smoothing=0.1)
    np.testing.assert_allclose(loss, [_LSE_123 - 2.7 - 0.2, _LOG_3],
                               rtol=1e-6)

  def test_z_loss_hand_computed(self):
    loss = losses.token_cross_entropy(self.logits, self.labels, z_loss=0.01)
    np.testing.assert_allclose(
        loss, [_LSE_123 - 3.0 + 0.01 * _LSE_123**2, _LOG_3 + 0.01 * _LOG_3**2],
        rtol=1e-6)

  def test_output_is_float32_per_position(self):
    logits = jnp.zeros((2, 3, 5), jnp.bfloat16)
    loss = losses.token_cross_entropy(logits, jnp.zeros((2, 3), jnp.int32))
    assert loss.shape == (2, 3)
    assert loss.dtype == jnp.float32

  def test_matches_optax_integer_labels(self):
    logits = _normal(0, (4, 5, 11)) * 3.0
    labels = _integers(1, (4, 5), 11)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(losses.token_cross_entropy(logits, labels),
                               expected, rtol=1e-5, atol=1e-5)

  @pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
  def test_matches_optax_smooth_labels(self, label_smoothing):
    logits = _normal(2, (6, 13)) * 3.0
    labels = _integers(3, (6,), 13)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 13), label_smoothing)
    expected = optax.softmax_cross_entropy(logits, targets)
    loss = losses.token_cross_entropy(logits, labels,
                                      label_smoothing=label_smoothing)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-5)

  def test_matches_numpy_reference(self):
    logits = _normal(4, (3, 4, 17)) * 5.0
    labels = _integers(5, (3, 4), 17)
    loss = losses.token_cross_entropy(logits, labels, label_smoothing=0.2,
                                      z_loss=1e-3)
    expected = _reference_cross_entropy(logits, labels, label_smoothing=0.2,
                                        z_loss=1e-3)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-5)

  def test_large_logits_stay_finite(self):
    logits = jnp.array([[1e30, -1e30, 0.0], [1e4, 1e4 - 1.0, -1e4]])
    labels = jnp.array([0, 1])
    loss = losses.token_cross_entropy(logits, labels, label_smoothing=0.1)
    assert np.all(np.isfinite(loss))
    expected = _reference_cross_entropy(logits[1:], labels[1:],
                                        label_smoothing=0.1, z_loss=0.0)
    np.testing.assert_allclose(loss[1:], expected, rtol=1e-5)

  def test_bfloat16_matches_float32(self):
    logits = (_normal(6, (8, 32)) * 4.0
              ).astype(jnp.bfloat16)
    labels = _integers(7, (8,), 32)
    loss = losses.token_cross_entropy(logits, labels, label_smoothing=0.1,
                                      z_loss=1e-4)
    expected = losses.token_cross_entropy(logits.astype(jnp.float32), labels,
                                          label_smoothing=0.1, z_loss=1e-4)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)

  def test_bfloat16_gradient_dtype(self):
    logits = jnp.ones((4, 8), jnp.bfloat16)
    grad = jax.grad(lambda x: jnp.sum(losses.token_cross_entropy(
        x, jnp.zeros((4,), jnp.int32))))(logits)
    assert grad.dtype == jnp.bfloat16

  @pytest.mark.parametrize("label", [-1, 3, 100])
  def test_out_of_range_label_gives_nan(self, label):
    loss = losses.token_cross_entropy(self.logits, jnp.array([label, 1]))
    assert np.isnan(loss[0])
    np.testing.assert_allclose(loss[1], _LOG_3, rtol=1e-6)

  def test_gradients_numerically(self):
    labels = jnp.array([0, 3, 6])
    with jax.enable_x64(True):
      logits = jnp.asarray(np.random.default_rng(8).standard_normal((3, 7)))
      loss_fn = jax.jit(lambda x: losses.token_cross_entropy(
          x, labels, label_smoothing=0.1, z_loss=0.01))
      jtu.check_grads(loss_fn, (logits,), order=1, modes=["rev"], atol=1e-6,
                      rtol=1e-6)

  def test_gradient_hand_computed(self):
    # d loss / d logits = softmax - onehot for one position.
    grad = jax.grad(lambda x: losses.token_cross_entropy(x, jnp.array(2)))(
        jnp.array([1.0, 2.0, 3.0]))
    softmax = np.exp([1.0, 2.0, 3.0] - np.float64(_LSE_123))
    np.testing.assert_allclose(grad, softmax - [0.0, 0.0, 1.0], rtol=1e-5)

  @pytest.mark.parametrize("kwargs, match", [
      (dict(label_smoothing=1.0), "label_smoothing"),
      (dict(label_smoothing=-0.1), "label_smoothing"),
      (dict(z_loss=-1.0), "z_loss"),
  ])
  def test_invalid_hyperparameters_raise(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      losses.token_cross_entropy(self.logits, self.labels, **kwargs)

  def test_invalid_inputs_raise(self):
    with pytest.raises(ValueError, match="labels shape"):
      losses.token_cross_entropy(self.logits, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="logits must have a floating"):
      losses.token_cross_entropy(jnp.zeros((2, 3), jnp.int32), self.labels)
    with pytest.raises(ValueError, match="labels must have an integer"):
      losses.token_cross_entropy(self.logits, jnp.array([0.0, 1.0]))


# ---------------------------------------------------------------------------
# WeightedSum, weighted_sum, mean
# ---------------------------------------------------------------------------


class TestWeightedSum:

  def test_hand_computed(self):
    weighted = losses.weighted_sum(jnp.array([1.0, 2.0, 4.0]),
                                   jnp.array([1.0, 0.5, 0.0]))
    assert float(weighted.total) == 2.0
    assert float(weighted.count) == 1.5
    assert weighted.total.dtype == jnp.float32
    np.testing.assert_allclose(losses.mean(weighted), 2.0 / 1.5, rtol=1e-7)

  def test_no_weights_counts_every_value(self):
    weighted = losses.weighted_sum(jnp.array([[1.0, 2.0], [3.0, 6.0]]))
    assert float(weighted.count) == 4.0
    assert float(losses.mean(weighted)) == 3.0

  def test_fractional_count_is_not_clamped(self):
    weighted = losses.weighted_sum(jnp.array([3.0]), jnp.array([0.25]))
    np.testing.assert_allclose(losses.mean(weighted), 3.0, rtol=1e-7)

  def test_zero_weight_hides_nan_and_inf(self):
    values = jnp.array([1.0, jnp.nan, jnp.inf, -jnp.inf])
    weights = jnp.array([2.0, 0.0, 0.0, 0.0])
    weighted = losses.weighted_sum(values, weights)
    assert float(weighted.total) == 2.0
    grad_values, grad_weights = jax.grad(
        lambda v, w: losses.mean(losses.weighted_sum(v, w)), argnums=(0, 1))(
            values, weights)
    np.testing.assert_array_equal(grad_values, [1.0, 0.0, 0.0, 0.0])
    assert np.all(np.isfinite(grad_weights))

  def test_mean_of_empty_is_zero_with_zero_gradient(self):
    values = jnp.array([5.0, 7.0])
    weights = jnp.zeros(2)
    assert float(losses.mean(losses.weighted_sum(values, weights))) == 0.0
    grad = jax.grad(lambda v: losses.mean(losses.weighted_sum(v, weights)))(
        values)
    np.testing.assert_array_equal(grad, [0.0, 0.0])

  def test_addition_equals_whole_batch(self):
    values = _normal(0, (8,))
    weights = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    whole = losses.weighted_sum(values, weights)
    halves = (losses.weighted_sum(values[:4], weights[:4]) +
              losses.weighted_sum(values[4:], weights[4:]))
    np.testing.assert_allclose(halves.total, whole.total, rtol=1e-6)
    assert float(halves.count) == float(whole.count) == 4.0
    # Mean of means (0.5 * (mean(first) + mean(second))) would be wrong here.
    np.testing.assert_allclose(losses.mean(halves), losses.mean(whole),
                               rtol=1e-6)

  def test_psum_across_devices_equals_whole_batch(self):
    values = _normal(1, (4, 3))
    weights = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0],
                         [1.0, 1.0, 0.0]])
    per_device = jax.vmap(
        lambda v, w: jax.lax.psum(losses.weighted_sum(v, w), "devices"),
        axis_name="devices")(values, weights)
    whole = losses.weighted_sum(values, weights)
    np.testing.assert_allclose(losses.mean(per_device)[0], losses.mean(whole),
                               rtol=1e-6)

  def test_accumulated_gradients_equal_whole_batch(self):
    # Two tasks with different counts in each micro-batch: mlm on a few
    # selected positions, rtd on every real token. Accumulating each
    # micro-batch's gradient of its totals and dividing by the summed counts
    # gives the whole batch's gradient of the sum of the two task means.
    hidden, unembedding, labels = _random_problem(
        3, batch_shape=(4, 6), embed=8, vocab=40)
    mlm_weights = jnp.asarray(
        np.random.default_rng(4).integers(0, 2, (4, 6)), jnp.float32)
    rtd_weights = jnp.ones((4, 6)).at[1, 4:].set(0.0)
    rtd_labels = _integers(5, (4, 6), 2)
    rtd_kernel = _normal(6, (8,))

    def task_sums(params, rows):
      hidden_param, unembedding_param, kernel = params
      mlm, _ = losses.fused_masked_lm_loss(
          hidden_param[rows], unembedding_param, labels[rows],
          mlm_weights[rows], chunk_size=16)
      rtd = losses.weighted_sum(
          losses.replaced_token_detection_loss(hidden_param[rows] @ kernel,
                                               rtd_labels[rows]),
          rtd_weights[rows])
      return mlm, rtd

    params = (hidden, unembedding, rtd_kernel)

    def whole_loss(params):
      mlm, rtd = task_sums(params, slice(None))
      return losses.mean(mlm) + losses.mean(rtd)

    expected = jax.grad(whole_loss)(params)

    micro_batches = (slice(0, 1), slice(1, 4))
    counts = [task_sums(params, rows) for rows in micro_batches]
    mlm_count = sum(float(mlm.count) for mlm, _ in counts)
    rtd_count = sum(float(rtd.count) for _, rtd in counts)
    # The micro-batches differ in size and in each task's count, so an
    # average of per-micro-batch means would give a different gradient.
    assert [float(mlm.count) for mlm, _ in counts] != [mlm_count / 2] * 2

    def micro_batch_loss(params, rows):
      mlm, rtd = task_sums(params, rows)
      return mlm.total / mlm_count + rtd.total / rtd_count

    grads = [jax.grad(micro_batch_loss)(params, rows)
             for rows in micro_batches]
    accumulated = jax.tree.map(jnp.add, *grads)
    for got, want in zip(accumulated, expected):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  def test_means_maps_nested_dict(self):
    metrics = {"lm": {"loss": losses.WeightedSum(jnp.float32(3.0),
                                                 jnp.float32(2.0))},
               "sop": losses.WeightedSum(jnp.float32(1.0), jnp.float32(0.0))}
    ratios = losses.means(metrics)
    assert float(ratios["lm"]["loss"]) == 1.5
    assert float(ratios["sop"]) == 0.0

  def test_shape_mismatch_raises(self):
    with pytest.raises(ValueError, match="weights shape"):
      losses.weighted_sum(jnp.ones(3), jnp.ones(4))


# ---------------------------------------------------------------------------
# fused_token_cross_entropy
# ---------------------------------------------------------------------------


def _plain_loss(hidden, unembedding, labels, **kwargs):
  return losses.token_cross_entropy(hidden @ unembedding, labels, **kwargs)


def _value_and_grads(loss_fn, hidden, unembedding, labels, cotangent,
                     **kwargs):
  """Returns the cotangent-weighted loss sum and its gradients, jitted."""
  def total(hidden, unembedding, labels, cotangent):
    return jnp.sum(loss_fn(hidden, unembedding, labels, **kwargs) * cotangent)
  return jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(
      hidden, unembedding, labels, cotangent)


class TestFusedTokenCrossEntropy:

  # 50 columns: one column per block, a remainder of 1, a single block.
  @pytest.mark.parametrize("chunk_size", [1, 7, 64])
  def test_matches_plain_values_and_gradients(self, chunk_size):
    hidden, unembedding, labels = _random_problem(0, vocab=50)
    cotangent = _uniform(9, labels.shape)
    kwargs = dict(label_smoothing=0.1, z_loss=1e-3)
    expected_loss = _plain_loss(hidden, unembedding, labels, **kwargs)
    loss = losses.fused_token_cross_entropy(hidden, unembedding, labels,
                                            chunk_size=chunk_size, **kwargs)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-5)

    expected_total, expected_grads = _value_and_grads(
        _plain_loss, hidden, unembedding, labels, cotangent, **kwargs)
    total, grads = _value_and_grads(
        losses.fused_token_cross_entropy, hidden, unembedding, labels,
        cotangent, chunk_size=chunk_size, **kwargs)
    np.testing.assert_allclose(total, expected_total, rtol=1e-5)
    for grad, expected in zip(grads, expected_grads):
      np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)

  @pytest.mark.parametrize("label_smoothing, z_loss", [(0.0, 0.0), (0.2, 0.0),
                                                       (0.0, 1e-2)])
  def test_matches_plain_for_each_option(self, label_smoothing, z_loss):
    hidden, unembedding, labels = _random_problem(1, vocab=37)
    cotangent = _uniform(10, labels.shape)
    kwargs = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    expected_total, expected_grads = _value_and_grads(
        _plain_loss, hidden, unembedding, labels, cotangent, **kwargs)
    total, grads = _value_and_grads(
        losses.fused_token_cross_entropy, hidden, unembedding, labels,
        cotangent, chunk_size=8, **kwargs)
    np.testing.assert_allclose(total, expected_total, rtol=1e-5)
    for grad, expected in zip(grads, expected_grads):
      np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)

  def test_per_position_smoothing_matches_plain(self):
    # Row 0 smoothed with 0.2, row 1 not at all: each row equals the plain
    # loss with its own number, in value and gradients.
    hidden, unembedding, labels = _random_problem(11, vocab=37)
    cotangent = _uniform(12, labels.shape)
    smoothing = jnp.array([[0.2] * 3, [0.0] * 3])
    total, grads = _value_and_grads(
        losses.fused_token_cross_entropy, hidden, unembedding, labels,
        cotangent, chunk_size=8, label_smoothing=smoothing, z_loss=1e-2)

    expected_total = 0.0
    expected_grads = [jnp.zeros_like(hidden), jnp.zeros_like(unembedding)]
    for row, row_smoothing in enumerate((0.2, 0.0)):
      row_cotangent = cotangent.at[1 - row].set(0.0)
      row_total, row_grads = _value_and_grads(
          _plain_loss, hidden, unembedding, labels, row_cotangent,
          label_smoothing=row_smoothing, z_loss=1e-2)
      expected_total += row_total
      expected_grads = [a + b for a, b in zip(expected_grads, row_grads)]
    np.testing.assert_allclose(total, expected_total, rtol=1e-5)
    for grad, expected in zip(grads, expected_grads):
      np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)

  def test_per_position_smoothing_shape_mismatch_raises(self):
    hidden, unembedding, labels = _random_problem(11, vocab=37)
    with pytest.raises(ValueError, match=r"label_smoothing shape \(3,\)"):
      losses.fused_token_cross_entropy(hidden, unembedding, labels,
                                       label_smoothing=jnp.full((3,), 0.1))

  @pytest.mark.parametrize("scale", [1e2, 1e4])
  def test_extreme_logits_match_plain(self, scale):
    # Logits of order `scale`: the softmax is one-hot to float32 precision.
    hidden, unembedding, labels = _random_problem(2, vocab=30, scale=scale)
    cotangent = _uniform(11, labels.shape)
    kwargs = dict(label_smoothing=0.1, z_loss=1e-4)
    expected_total, expected_grads = _value_and_grads(
        _plain_loss, hidden, unembedding, labels, cotangent, **kwargs)
    total, grads = _value_and_grads(
        losses.fused_token_cross_entropy, hidden, unembedding, labels,
        cotangent, chunk_size=7, **kwargs)
    assert np.isfinite(total)
    np.testing.assert_allclose(total, expected_total, rtol=1e-4)
    for grad, expected in zip(grads, expected_grads):
      assert np.all(np.isfinite(grad))
      np.testing.assert_allclose(grad, expected, rtol=1e-4,
                                 atol=1e-4 * np.abs(expected).max())

  def test_huge_logits_stay_finite(self):
    hidden, unembedding, labels = _random_problem(3, vocab=30)
    hidden = hidden.at[0, 0].set(1e29)  # logits of order 1e29
    loss = losses.fused_token_cross_entropy(hidden, unembedding, labels,
                                            chunk_size=7, label_smoothing=0.1)
    assert np.all(np.isfinite(loss))

    # With z-loss, lse**2 overflows float32 at that position, but a zero
    # cotangent there still gives finite gradients and a zero row.
    cotangent = jnp.ones(labels.shape).at[0, 0].set(0.0)
    grads = jax.grad(
        lambda h, w: jnp.sum(cotangent * losses.fused_token_cross_entropy(
            h, w, labels, chunk_size=7, label_smoothing=0.1, z_loss=1e-4)),
        argnums=(0, 1))(hidden, unembedding)
    assert np.all(np.isfinite(grads[0]))
    assert np.all(np.isfinite(grads[1]))
    np.testing.assert_array_equal(grads[0][0, 0], 0.0)

  def test_zero_cotangent_gives_exactly_zero_gradient(self):
    hidden, unembedding, labels = _random_problem(4, batch_shape=(6,),
                                                  vocab=40)
    cotangent = jnp.array([1.0, 0.0, 0.5, 0.0, 0.0, 2.0])
    _, (hidden_grad, unembedding_grad) = _value_and_grads(
        losses.fused_token_cross_entropy, hidden, unembedding, labels,
        cotangent, chunk_size=9, label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_array_equal(hidden_grad[np.array([1, 3, 4])], 0.0)

    # Positions with zero cotangent add nothing to the unembedding gradient.
    kept = np.array([0, 2, 5])
    _, (_, kept_grad) = _value_and_grads(
        losses.fused_token_cross_entropy, hidden[kept], unembedding,
        labels[kept], cotangent[kept], chunk_size=9, label_smoothing=0.1,
        z_loss=1e-3)
    np.testing.assert_allclose(unembedding_grad, kept_grad, rtol=1e-6,
                               atol=1e-7)

  def test_gradients_numerically(self):
    with jax.enable_x64(True):
      hidden, unembedding, labels = _random_problem(
          5, batch_shape=(5,), embed=4, vocab=11, dtype=jnp.float64)
      loss_fn = jax.jit(lambda h, w: losses.fused_token_cross_entropy(
          h, w, labels, label_smoothing=0.1, z_loss=0.01, chunk_size=4))
      jtu.check_grads(loss_fn, (hidden, unembedding), order=1, modes=["rev"],
                      atol=1e-6, rtol=1e-6)

  def test_bfloat16_inputs_match_float32(self):
    hidden, unembedding, labels = _random_problem(6, vocab=50,
                                                  dtype=jnp.bfloat16)
    cotangent = _uniform(12, labels.shape)
    total, grads = _value_and_grads(
        losses.fused_token_cross_entropy, hidden, unembedding, labels,
        cotangent, chunk_size=16, label_smoothing=0.1)
    # The float32 reference gets the same bfloat16-rounded inputs.
    expected_total, expected_grads = _value_and_grads(
        _plain_loss, hidden.astype(jnp.float32),
        unembedding.astype(jnp.float32), labels, cotangent,
        label_smoothing=0.1)
    assert total.dtype == jnp.float32
    np.testing.assert_allclose(total, expected_total, rtol=1e-5)
    assert grads[0].dtype == jnp.bfloat16
    assert grads[1].dtype == jnp.bfloat16
    for grad, expected in zip(grads, expected_grads):
      # bfloat16 keeps 8 significant bits, a relative error up to 2**-8.
      np.testing.assert_allclose(grad.astype(jnp.float32), expected,
                                 rtol=2e-2, atol=2e-2 * np.abs(expected).max())

  def test_out_of_range_label_gives_nan(self):
    hidden, unembedding, labels = _random_problem(7, batch_shape=(3,),
                                                  vocab=20)
    labels = labels.at[1].set(20)
    loss = losses.fused_token_cross_entropy(hidden, unembedding, labels,
                                            chunk_size=6)
    assert np.isnan(loss[1])
    assert np.all(np.isfinite(loss[np.array([0, 2])]))

  def test_argmax_matches_plain_including_ties(self):
    hidden, unembedding, labels = _random_problem(8, vocab=45)
    # Columns 3 and 40 are equal, so rows whose maximum is there tie across
    # blocks, and an all-zero hidden row ties every column.
    unembedding = unembedding.at[:, 40].set(unembedding[:, 3] * 50.0)
    unembedding = unembedding.at[:, 3].set(unembedding[:, 40])
    hidden = hidden.at[0, 0].set(0.0)
    loss, predictions = losses.fused_token_cross_entropy_with_argmax(
        hidden, unembedding, labels, chunk_size=8)
    logits = hidden @ unembedding
    np.testing.assert_array_equal(predictions, jnp.argmax(logits, axis=-1))
    assert predictions[0, 0] == 0
    assert predictions.dtype == jnp.int32
    np.testing.assert_allclose(loss, losses.token_cross_entropy(logits, labels),
                               rtol=1e-5, atol=1e-5)

  def test_jit_traces_once(self):
    traces = []

    @jax.jit
    def step(hidden, unembedding, labels):
      traces.append(None)
      return jax.grad(lambda h, w: jnp.mean(losses.fused_token_cross_entropy(
          h, w, labels, chunk_size=16)), argnums=(0, 1))(hidden, unembedding)

    for seed in range(3):
      jax.block_until_ready(step(*_random_problem(seed, vocab=40)))
    assert len(traces) == 1

  def test_no_transposed_unembedding_in_compiled_code(self):
    embed, vocab, chunk_size = 24, 300, 64
    hidden = jax.ShapeDtypeStruct((40, embed), jnp.float32)
    unembedding = jax.ShapeDtypeStruct((embed, vocab), jnp.float32)
    labels = jax.ShapeDtypeStruct((40,), jnp.int32)
    loss_fn = lambda h, w, y: jnp.mean(losses.fused_token_cross_entropy(
        h, w, y, chunk_size=chunk_size))
    compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(
        hidden, unembedding, labels).compile()
    text = compiled.as_text()
    remainder = vocab % chunk_size
    for width in (vocab, chunk_size, remainder):
      assert not re.search(rf"f32\[{width},{embed}\]", text), width

  def test_temporary_memory_much_smaller_than_plain(self):
    tokens, embed, vocab = 512, 64, 32768
    hidden = jax.ShapeDtypeStruct((tokens, embed), jnp.float32)
    unembedding = jax.ShapeDtypeStruct((embed, vocab), jnp.float32)
    labels = jax.ShapeDtypeStruct((tokens,), jnp.int32)

    def temp_bytes(loss_fn):
      step = jax.jit(jax.value_and_grad(
          lambda h, w, y: jnp.mean(loss_fn(h, w, y, label_smoothing=0.1,
                                           z_loss=1e-4)), argnums=(0, 1)))
      compiled = step.lower(hidden, unembedding, labels).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    plain = temp_bytes(_plain_loss)
    fused = temp_bytes(losses.fused_token_cross_entropy)
    # The plain logits alone are 512 * 32768 * 4 bytes = 64 MiB.
    assert plain >= tokens * vocab * 4
    assert fused * 10 < plain, (fused, plain)

  @pytest.mark.parametrize("kwargs, match", [
      (dict(chunk_size=0), "chunk_size"),
      (dict(chunk_size=2.5), "chunk_size"),
      (dict(label_smoothing=1.5), "label_smoothing"),
      (dict(z_loss=-1e-4), "z_loss"),
  ])
  def test_invalid_hyperparameters_raise(self, kwargs, match):
    hidden, unembedding, labels = _random_problem(0)
    with pytest.raises(ValueError, match=match):
      losses.fused_token_cross_entropy(hidden, unembedding, labels, **kwargs)

  def test_invalid_shapes_raise(self):
    hidden, unembedding, labels = _random_problem(0, embed=8)
    with pytest.raises(ValueError, match="embed size 8"):
      losses.fused_token_cross_entropy(hidden, unembedding.T, labels)
    with pytest.raises(ValueError, match="labels shape"):
      losses.fused_token_cross_entropy(hidden, unembedding, labels[0])
    with pytest.raises(ValueError, match=r"\[embed, vocab\]"):
      losses.fused_token_cross_entropy(hidden, unembedding[None], labels)


# ---------------------------------------------------------------------------
# masked_lm_loss and fused_masked_lm_loss
# ---------------------------------------------------------------------------


class TestMaskedLmLoss:

  def test_hand_computed(self):
    logits = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
    labels = jnp.array([2, 1, 1])
    weights = jnp.array([1.0, 1.0, 0.0])
    loss, accuracy = losses.masked_lm_loss(logits, labels, weights)
    np.testing.assert_allclose(loss.total, _LSE_123 - 3.0 + _LOG_3, rtol=1e-6)
    assert float(loss.count) == 2.0
    # Row 0 is right (argmax 2); row 1 ties, argmax 0 != 1.
    assert float(accuracy.total) == 1.0
    assert float(accuracy.count) == 2.0

  def test_equals_slicing_away_unselected(self):
    logits = _normal(0, (10, 13))
    labels = _integers(1, (10,), 13)
    weights = jnp.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 1], jnp.float32)
    selected = np.flatnonzero(weights)
    loss, accuracy = losses.masked_lm_loss(logits, labels, weights,
                                           label_smoothing=0.1, z_loss=1e-3)
    sliced = losses.token_cross_entropy(logits[selected], labels[selected],
                                        label_smoothing=0.1, z_loss=1e-3)
    np.testing.assert_allclose(losses.mean(loss), jnp.mean(sliced), rtol=1e-6)
    np.testing.assert_allclose(
        losses.mean(accuracy),
        jnp.mean(jnp.argmax(logits[selected], -1) == labels[selected]))

  def test_unselected_logits_change_nothing(self):
    logits = _normal(2, (6, 9))
    labels = jnp.array([1, 2, -1, 3, 100, 4])
    weights = jnp.array([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])

    @jax.jit
    def value_and_grad(x):
      def mean_loss(x):
        loss, _ = losses.masked_lm_loss(x, labels, weights,
                                        label_smoothing=0.1, z_loss=1e-4)
        return losses.mean(loss)
      return jax.value_and_grad(mean_loss)(x)

    clean_value, clean_grad = value_and_grad(logits)
    for bad_value in (1e30, -1e30, np.inf, -np.inf, np.nan):
      corrupted = logits.at[np.array([2, 4])].set(bad_value)
      value, grad = value_and_grad(corrupted)
      assert float(value) == float(clean_value), bad_value
      np.testing.assert_array_equal(grad, clean_grad, err_msg=str(bad_value))
      np.testing.assert_array_equal(grad[np.array([2, 4])], 0.0)

  def test_fully_masked_batch_is_zero_with_zero_gradient(self):
    logits = _normal(3, (4, 5))
    weights = jnp.zeros(4)

    def mean_loss(x):
      return losses.mean(losses.masked_lm_loss(x, jnp.zeros(4, jnp.int32),
                                               weights)[0])

    value, grad = jax.value_and_grad(mean_loss)(logits)
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, 0.0)

  def test_fused_matches_plain(self):
    hidden, unembedding, labels = _random_problem(9, batch_shape=(3, 4),
                                                  vocab=33)
    weights = (_uniform(13, (3, 4)) > 0.5
               ).astype(jnp.float32)
    kwargs = dict(label_smoothing=0.1, z_loss=1e-3)

    def plain(h, w):
      loss, accuracy = losses.masked_lm_loss(h @ w, labels, weights, **kwargs)
      return losses.mean(loss), accuracy

    def fused(h, w):
      loss, accuracy = losses.fused_masked_lm_loss(h, w, labels, weights,
                                                   chunk_size=10, **kwargs)
      return losses.mean(loss), accuracy

    (expected, expected_accuracy), expected_grads = jax.jit(jax.value_and_grad(
        plain, argnums=(0, 1), has_aux=True))(hidden, unembedding)
    (value, accuracy), grads = jax.jit(jax.value_and_grad(
        fused, argnums=(0, 1), has_aux=True))(hidden, unembedding)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert float(accuracy.total) == float(expected_accuracy.total)
    assert float(accuracy.count) == float(expected_accuracy.count)
    for grad, expected_grad in zip(grads, expected_grads):
      np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)

  def test_fused_unselected_hidden_change_nothing(self):
    hidden, unembedding, labels = _random_problem(10, batch_shape=(6,),
                                                  vocab=21)
    labels = labels.at[2].set(-1)
    weights = jnp.array([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])

    @jax.jit
    def value_and_grads(h, w):
      def mean_loss(h, w):
        loss, _ = losses.fused_masked_lm_loss(h, w, labels, weights,
                                              chunk_size=8,
                                              label_smoothing=0.1, z_loss=1e-4)
        return losses.mean(loss)
      return jax.value_and_grad(mean_loss, (0, 1))(h, w)

    clean_value, clean_grads = value_and_grads(hidden, unembedding)
    for bad_value in (1e30, np.inf, np.nan):
      corrupted = hidden.at[np.array([2, 4])].set(bad_value)
      value, grads = value_and_grads(corrupted, unembedding)
      assert float(value) == float(clean_value), bad_value
      np.testing.assert_array_equal(grads[0], clean_grads[0])
      np.testing.assert_array_equal(grads[1], clean_grads[1])
      np.testing.assert_array_equal(grads[0][np.array([2, 4])], 0.0)

  def test_weights_shape_mismatch_raises(self):
    with pytest.raises(ValueError, match="weights shape"):
      losses.masked_lm_loss(jnp.zeros((3, 4)), jnp.zeros(3, jnp.int32),
                            jnp.ones(2))


# ---------------------------------------------------------------------------
# Replaced-token detection
# ---------------------------------------------------------------------------


class TestReplacedTokenDetection:

  def test_hand_computed(self):
    logits = jnp.array([0.0, 0.0, 2.0, 2.0])
    labels = jnp.array([1, 0, 1, 0])
    # -log sigmoid(x) = log(1 + e**-x), -log sigmoid(-x) = log(1 + e**x).
    expected = [np.log(2.0), np.log(2.0), np.log1p(np.exp(-2.0)),
                np.log1p(np.exp(2.0))]
    np.testing.assert_allclose(
        losses.replaced_token_detection_loss(logits, labels), expected,
        rtol=1e-6)

  def test_matches_optax(self):
    logits = _normal(0, (4, 7)) * 5.0
    labels = _uniform(1, (4, 7)) < 0.3
    expected = optax.sigmoid_binary_cross_entropy(logits, labels)
    np.testing.assert_allclose(
        losses.replaced_token_detection_loss(logits, labels.astype(jnp.int32)),
        expected, rtol=1e-5, atol=1e-6)

  def test_extreme_logits_have_no_nan(self):
    logits = jnp.array([1e30, -1e30, jnp.inf, -jnp.inf, 1e30, -jnp.inf])
    labels = jnp.array([1, 0, 1, 0, 0, 1])
    loss = losses.replaced_token_detection_loss(logits, labels)
    np.testing.assert_array_equal(loss[:4], 0.0)
    np.testing.assert_allclose(loss[4], 1e30, rtol=1e-6)
    assert loss[5] == np.inf
    grad = jax.grad(lambda x: jnp.sum(
        losses.replaced_token_detection_loss(x, labels)))(logits)
    np.testing.assert_array_equal(grad, [0.0, 0.0, 0.0, 0.0, 1.0, -1.0])

  def test_gradient_is_sigmoid_minus_label(self):
    logits = jnp.array([-1.5, 0.3, 2.0])
    labels = jnp.array([1, 0, 1])
    grad = jax.grad(lambda x: jnp.sum(
        losses.replaced_token_detection_loss(x, labels)))(logits)
    np.testing.assert_allclose(grad, jax.nn.sigmoid(logits) - labels,
                               rtol=1e-6)

  def test_bfloat16_matches_float32(self):
    logits = jnp.array([-3.0, 0.5, 7.0], jnp.bfloat16)
    labels = jnp.array([0, 1, 1])
    loss = losses.replaced_token_detection_loss(logits, labels)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(
        loss,
        losses.replaced_token_detection_loss(logits.astype(jnp.float32),
                                             labels), rtol=1e-7)

  def test_metrics_hand_computed(self):
    logits = jnp.array([2.0, -1.0, 0.5, -3.0, 4.0])
    labels = jnp.array([1, 1, 0, 0, 1])
    weights = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])
    metrics = losses.replaced_token_detection_metrics(logits, labels, weights)
    # Predicted replaced: tokens 0 and 2 (token 4 has weight 0).
    assert float(metrics["accuracy"].total) == 2.0
    assert float(metrics["accuracy"].count) == 4.0
    assert float(metrics["precision"].total) == 1.0
    assert float(metrics["precision"].count) == 2.0
    assert float(metrics["recall"].total) == 1.0
    assert float(metrics["recall"].count) == 2.0

  def test_metrics_without_positives_are_zero(self):
    metrics = losses.replaced_token_detection_metrics(
        jnp.array([-1.0, -2.0]), jnp.array([0, 0]))
    ratios = losses.means(metrics)
    assert float(ratios["accuracy"]) == 1.0
    assert float(ratios["precision"]) == 0.0
    assert float(ratios["recall"]) == 0.0

  def test_shape_mismatch_raises(self):
    with pytest.raises(ValueError, match="labels shape"):
      losses.replaced_token_detection_loss(jnp.zeros(3), jnp.zeros(4))


# ---------------------------------------------------------------------------
# Sentence order and accuracy
# ---------------------------------------------------------------------------


class TestSentenceOrder:

  def test_matches_optax(self):
    # Three segments give 3! = 6 permutation classes.
    logits = _normal(0, (5, 6)) * 2.0
    labels = jnp.array([0, 5, 2, 3, 1])
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = losses.sentence_order_loss(logits, labels)
    assert loss.shape == (5,)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)

  def test_two_classes_hand_computed(self):
    loss = losses.sentence_order_loss(jnp.array([[0.0, 0.0], [3.0, 1.0]]),
                                      jnp.array([1, 0]))
    np.testing.assert_allclose(loss, [np.log(2.0), np.log1p(np.exp(-2.0))],
                               rtol=1e-6)

  def test_accuracy_hand_computed(self):
    logits = jnp.array([[0.1, 0.9], [2.0, 1.0], [0.0, 5.0]])
    labels = jnp.array([1, 1, 1])
    accuracy = losses.argmax_accuracy(logits, labels)
    assert float(accuracy.total) == 2.0
    assert float(accuracy.count) == 3.0
    weighted = losses.argmax_accuracy(logits, labels, jnp.array([0, 1, 1]))
    assert float(losses.mean(weighted)) == 0.5

  def test_rejects_wrong_rank(self):
    with pytest.raises(ValueError, match="batch, num_classes"):
      losses.sentence_order_loss(jnp.zeros((2, 3, 6)), jnp.zeros((2, 3),
                                                                 jnp.int32))

  def test_accuracy_shape_mismatch_raises(self):
    with pytest.raises(ValueError, match="predictions shape"):
      losses.accuracy(jnp.zeros(3, jnp.int32), jnp.zeros(4, jnp.int32))


# ---------------------------------------------------------------------------
# Benchmark suite
# ---------------------------------------------------------------------------


def test_fused_ce_benchmark_reports_ratios():
  from mtl_lm.benchmarks import fused_ce  # pylint: disable=g-import-not-at-top

  result = fused_ce.run(vocab=300, embed=16, tokens=64, chunk_size=128,
                        repetitions=2)
  assert result["ratio"] == (result["plain_temp_bytes"] /
                             result["fused_temp_bytes"])
  assert result["speed_ratio"] == (result["plain_seconds"] /
                                   result["fused_seconds"])
  assert len(result["plain_seconds_all"]) == 2
  assert len(result["paired_speed_ratios"]) == 2
  assert len(result["fused_cpu_seconds_all"]) == 2
  assert result["cpu_speed_ratio"] > 0
  assert result["max_abs_loss_difference"] < 1e-5
  assert result["max_abs_hidden_grad_difference"] < 1e-6
  assert result["max_abs_unembedding_grad_difference"] < 1e-6
