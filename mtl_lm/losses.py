"""Losses and metrics of the pretraining objectives, as pure JAX functions.

The module depends only on JAX, Flax's `struct` and Optax, so a foreign Flax
model can import it without the rest of mtl_lm.

Per-position losses come back unreduced as float32 `[...]`. `weighted_sum`
turns them into a `WeightedSum` (a float32 total and a float32 count), and
`WeightedSum`s add exactly across micro-batches and devices. `mean` divides
only at the very end.
Every softmax, logsumexp and reduction runs in float32 whatever the input
dtype. The one exception is float64 input (with `jax_enable_x64`), which stays
float64 so that numerical gradient checks can be tight.

Objectives:
  * next-token and masked-LM cross-entropy with label smoothing and z-loss,
    either from logits (`token_cross_entropy`, `masked_lm_loss`) or fused with
    the unembedding matmul so that the `[tokens, vocab]` logits never exist
    (`fused_token_cross_entropy`, `fused_masked_lm_loss`);
  * replaced-token detection (`replaced_token_detection_loss`);
  * sentence-order prediction (`sentence_order_loss`).

Formulas and references are in docs/losses.md.
"""

import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

# Vocabulary columns per block of the fused loss. At 8192 tokens one block of
# float32 logits takes 8192 * 1024 * 4 bytes = 32 MiB. On a shared 2-core x86
# CPU (8192 tokens, embed 2048, vocab 16384, float32, loss and gradients),
# blocks of 1024 or 2048 columns took 6-9% less process CPU time than the
# plain loss, 512 the same, and 4096 8% more.
DEFAULT_CHUNK_SIZE = 1024


def _accumulation_dtype(*dtypes: Any) -> Any:
  """Returns float32, or float64 if any of `dtypes` is float64."""
  return jnp.result_type(jnp.float32, *dtypes)


# ---------------------------------------------------------------------------
# Exact reductions.
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class WeightedSum:
  """Float32 sum of weighted values and the sum of their weights.

  Two `WeightedSum`s add field by field, and `jax.lax.psum` sums one across
  devices, so a mean taken at the end with `mean` is exact however the batch
  was split.

  Attributes:
    total: float32 scalar, sum of `weight * value`.
    count: float32 scalar, sum of the weights.
  """

  total: jax.Array
  count: jax.Array

  def __add__(self, other: "WeightedSum") -> "WeightedSum":
    return WeightedSum(total=self.total + other.total,
                       count=self.count + other.count)


def weighted_sum(values: jax.Array,
                 weights: jax.Array | None = None) -> WeightedSum:
  """Sums `weights * values` and `weights` in float32.

  A position with weight 0 contributes nothing to the total and gets a zero
  gradient, even where its value is NaN or infinite, because the value is
  replaced before the multiplication.

  Args:
    values: `[...]` float, for example per-position losses.
    weights: `[...]` non-negative float, int or bool of the same shape, or None
      for weight 1 everywhere.

  Returns:
    A `WeightedSum` of float32 scalars.
  """
  values = jnp.asarray(values)
  if weights is None:
    weights = jnp.ones(values.shape, jnp.float32)
  weights = jnp.asarray(weights)
  if weights.shape != values.shape:
    raise ValueError(
        f"weights shape {weights.shape} differs from values shape "
        f"{values.shape}; pass one weight per value.")

  dtype = _accumulation_dtype(values.dtype)
  weights = weights.astype(dtype)
  selected = weights != 0
  safe_values = jnp.where(selected, values.astype(dtype), 0.0)
  return WeightedSum(total=jnp.sum(safe_values * weights),
                     count=jnp.sum(weights))


def mean(weighted: WeightedSum) -> jax.Array:
  """Returns `total / count`, or 0 with a zero gradient when `count == 0`."""
  nonempty = weighted.count > 0
  safe_count = jnp.where(nonempty, weighted.count, 1.0)
  return jnp.where(nonempty, weighted.total / safe_count, 0.0)


def means(tree: Any) -> Any:
  """Replaces every `WeightedSum` in a pytree (a metrics dict) by its mean."""
  return jax.tree.map(mean, tree,
                      is_leaf=lambda node: isinstance(node, WeightedSum))


# ---------------------------------------------------------------------------
# Input checks.
# ---------------------------------------------------------------------------


def _check_floating(name: str, array: jax.Array) -> None:
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise ValueError(f"{name} must have a floating dtype, got {array.dtype}; "
                     f"cast it with {name}.astype(jnp.float32).")


def _check_integer(name: str, array: jax.Array) -> None:
  if not jnp.issubdtype(array.dtype, jnp.integer):
    raise ValueError(f"{name} must have an integer dtype, got {array.dtype}; "
                     f"cast it with {name}.astype(jnp.int32).")


def _check_smoothing_and_z_loss(label_smoothing: float, z_loss: float) -> None:
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing={label_smoothing} is outside [0, 1). "
                     "Use 0 to disable it or a small value such as 0.1.")
  if z_loss < 0.0:
    raise ValueError(f"z_loss={z_loss} is negative. Use 0 to disable it or a "
                     "small value such as 1e-4 (PaLM's).")


def _check_labels_match(labels: jax.Array, batch_shape: tuple[int, ...],
                        source: str) -> None:
  if labels.shape != batch_shape:
    raise ValueError(
        f"labels shape {labels.shape} differs from {source} shape without its "
        f"last axis {batch_shape}; pass one label per position.")


def _check_weights_match(weights: jax.Array, labels: jax.Array) -> None:
  if weights.shape != labels.shape:
    raise ValueError(
        f"weights shape {weights.shape} differs from labels shape "
        f"{labels.shape}; pass one weight per label.")


# ---------------------------------------------------------------------------
# Cross-entropy from logits.
# ---------------------------------------------------------------------------


def _smoothed_cross_entropy(log_normalizer: jax.Array, label_logit: jax.Array,
                            logit_mean: jax.Array | None, *,
                            label_smoothing: float | jax.Array,
                            z_loss: float) -> jax.Array:
  """Combines float32 per-position statistics into the loss.

  With target `(1 - eps) * onehot + eps / vocab`, the cross-entropy against
  `log_softmax(x) = x - lse` is `lse - (1 - eps) * x[label] - eps * mean(x)`.
  `eps` is a number or one value per position; `logit_mean` is None when
  `eps` is 0 everywhere.
  """
  loss = log_normalizer - (1.0 - label_smoothing) * label_logit
  if logit_mean is not None:
    loss = loss - label_smoothing * logit_mean
  if z_loss:
    loss = loss + z_loss * jnp.square(log_normalizer)
  return loss


def _pick_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Returns `logits[..., label]` as `[...]`, 0 where no column matches.

  This is a masked sum rather than a gather. XLA fuses the comparison into
  the reduction, so the forward pass stores no `[..., vocab]` mask. Unlike a
  gather, it needs no output sharding when an Explicit mesh axis splits the
  vocabulary.
  """
  columns = jnp.arange(logits.shape[-1])
  return jnp.sum(jnp.where(columns == labels[..., None], logits, 0.0),
                 axis=-1)


def token_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                        label_smoothing: float = 0.0,
                        z_loss: float = 0.0) -> jax.Array:
  """Computes softmax cross-entropy per position with integer labels.

  The loss at one position is

    lse - (1 - eps) * logits[label] - eps * mean(logits) + z_loss * lse**2,

  with `lse = logsumexp(logits)`. This is the cross-entropy against the
  smoothed target `(1 - eps) * onehot(label) + eps / vocab` (label smoothing as
  in Szegedy et al. 2016, PyTorch and `optax.smooth_labels`), computed without
  a one-hot array, plus PaLM's auxiliary z-loss (Chowdhery et al. 2022) that
  keeps `lse` near 0.

  Args:
    logits: `[..., vocab]` any float dtype. Computed in float32. With label
      smoothing they must be finite, because `mean(logits)` enters the loss.
    labels: `[...]` int in `[0, vocab)`. A label outside that range gives NaN
      at its position (mask such positions with `weighted_sum` weights).
    label_smoothing: `eps` in `[0, 1)`.
    z_loss: coefficient of `lse**2`, >= 0.

  Returns:
    `[...]` float32 loss per position.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  _check_floating("logits", logits)
  _check_integer("labels", labels)
  _check_labels_match(labels, logits.shape[:-1], "logits")
  _check_smoothing_and_z_loss(label_smoothing, z_loss)

  vocab_size = logits.shape[-1]
  logits = logits.astype(_accumulation_dtype(logits.dtype))
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  valid = (labels >= 0) & (labels < vocab_size)
  spec = getattr(getattr(jax.typeof(logits), "sharding", None), "spec", ())
  if spec and spec[-1] is not None:
    # The vocabulary is split over an Explicit mesh axis, where a gather's
    # output sharding is ambiguous.
    label_logit = _pick_labels(logits, labels)
  else:
    # A gather, whose gradient needs one `[..., vocab]` buffer less than
    # the masked sum's.
    label_logit = jnp.take_along_axis(
        logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  logit_mean = jnp.mean(logits, axis=-1) if label_smoothing else None

  loss = _smoothed_cross_entropy(log_normalizer, label_logit, logit_mean,
                                 label_smoothing=label_smoothing,
                                 z_loss=z_loss)
  return jnp.where(valid, loss, jnp.nan)


def masked_lm_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, *,
                   label_smoothing: float = 0.0,
                   z_loss: float = 0.0) -> tuple[WeightedSum, WeightedSum]:
  """Computes the cross-entropy and token accuracy at the selected positions.

  This is BERT's masked-LM loss (Devlin et al. 2019): the original token is
  predicted only where the input was selected for masking. The same function
  serves next-token prediction with shifted targets as `labels` and weight 1
  wherever a next token exists in the same document.

  Logits and labels of positions with weight 0 do not reach the value or the
  gradient, even when they are huge, infinite or out of range.

  Args:
    logits: `[..., vocab]` any float dtype.
    labels: `[...]` int in `[0, vocab)` at the selected positions.
    weights: `[...]` non-negative, 0 at positions outside the loss.
    label_smoothing: see `token_cross_entropy`.
    z_loss: see `token_cross_entropy`.

  Returns:
    `(loss, accuracy)`: `WeightedSum`s of the per-position loss and of whether
    the argmax of the logits equals the label.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  weights = jnp.asarray(weights)
  _check_labels_match(labels, logits.shape[:-1], "logits")
  _check_weights_match(weights, labels)

  selected = weights != 0
  logits = jnp.where(selected[..., None], logits, jnp.zeros((), logits.dtype))
  labels = jnp.where(selected, labels, 0)
  per_position = token_cross_entropy(logits, labels,
                                     label_smoothing=label_smoothing,
                                     z_loss=z_loss)
  return (weighted_sum(per_position, weights),
          argmax_accuracy(logits, labels, weights))


# ---------------------------------------------------------------------------
# Cross-entropy fused with the unembedding matmul.
# ---------------------------------------------------------------------------


class _RunningStats(NamedTuple):
  """Per-token float32 statistics over the vocabulary blocks seen so far."""

  max_logit: jax.Array  # [tokens]
  sum_exp: jax.Array  # [tokens], sum of exp(logit - max_logit)
  label_logit: jax.Array  # [tokens]
  logit_sum: jax.Array  # [tokens], used only with label smoothing
  argmax: jax.Array  # [tokens] int32, used only when predictions are requested


def _unembedding_block(unembedding: jax.Array, start: Any, width: int,
                       dtype: Any) -> jax.Array:
  """Returns columns `[start, start + width)` as `[embed, width]` in `dtype`."""
  block = jax.lax.dynamic_slice_in_dim(unembedding, start, width, axis=1)
  return block.astype(dtype)


def _block_logits(hidden: jax.Array, unembedding: jax.Array, start: Any,
                  width: int) -> jax.Array:
  """Returns float32 logits `[tokens, width]` of the columns from `start`."""
  block = _unembedding_block(unembedding, start, width, hidden.dtype)
  # Contracting embed of both operands reads the unembedding in its stored
  # [embed, vocab] layout, so no transposed copy is made.
  return jax.lax.dot_general(
      hidden, block, (((1,), (0,)), ((), ())),
      preferred_element_type=_accumulation_dtype(hidden.dtype))


def _update_stats(stats: _RunningStats, logits: jax.Array, labels: jax.Array,
                  start: Any, *, smooth: bool,
                  with_argmax: bool) -> _RunningStats:
  """Folds one block of logits `[tokens, width]` into the running statistics."""
  width = logits.shape[-1]
  block_max = jnp.max(logits, axis=-1)
  max_logit = jnp.maximum(stats.max_logit, block_max)
  sum_exp = (stats.sum_exp * jnp.exp(stats.max_logit - max_logit) +
             jnp.sum(jnp.exp(logits - max_logit[:, None]), axis=-1))

  # A label outside this block matches no column and adds 0.
  label_logit = stats.label_logit + _pick_labels(logits, labels - start)

  logit_sum = stats.logit_sum
  if smooth:
    logit_sum = logit_sum + jnp.sum(logits, axis=-1)

  argmax = stats.argmax
  if with_argmax:
    # Strictly greater keeps the earlier block on ties, as jnp.argmax does.
    block_argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32) + start
    argmax = jnp.where(block_max > stats.max_logit, block_argmax, argmax)

  return _RunningStats(max_logit=max_logit, sum_exp=sum_exp,
                       label_logit=label_logit, logit_sum=logit_sum,
                       argmax=argmax)


def _vocab_blocks(vocab_size: int, chunk_size: int) -> tuple[int, int, int]:
  """Returns (block width, number of full blocks, width of the partial one).

  The remainder block gets its own static width instead of -inf padding, so
  no padded column is ever computed and no NaN can come from one.
  """
  width = min(chunk_size, vocab_size)
  num_full = vocab_size // width
  return width, num_full, vocab_size - num_full * width


def _vocab_shard(unembedding: jax.Array,
                 axis_name: str | None) -> tuple[Any, int]:
  """Returns (first column id of the local shard, whole vocabulary size).

  Without `axis_name` the shard is the whole `[embed, vocab]` matrix. With
  it, device `i` of that mesh axis has columns `[i * n, (i + 1) * n)` of
  the vocabulary, `n = unembedding.shape[1]`.
  """
  local_vocab = unembedding.shape[1]
  if axis_name is None:
    return 0, local_vocab
  offset = jax.lax.axis_index(axis_name) * local_vocab
  return offset, local_vocab * jax.lax.axis_size(axis_name)


def _varying_axes(array: jax.Array) -> set[Any]:
  """Returns the `shard_map` mesh axes over which `array` varies."""
  aval = jax.typeof(array)
  axis_type = getattr(aval, "manual_axis_type", None)
  if axis_type is not None:
    return set(axis_type.varying)
  return set(getattr(aval, "vma", ()))  # JAX releases before 0.10


def _varying_like(tree: Any, *arrays: jax.Array) -> Any:
  """Marks a loop's initial carry as varying wherever `arrays` vary.

  Inside `jax.shard_map`, a loop carry must vary over the same mesh axes on
  entry as after one iteration. Outside it nothing varies and `tree` comes
  back unchanged.
  """
  axes = set()
  for array in arrays:
    axes |= _varying_axes(array)

  def cast(leaf):
    missing = tuple(axes - _varying_axes(leaf))
    return jax.lax.pcast(leaf, missing, to="varying") if missing else leaf

  return jax.tree.map(cast, tree) if axes else tree


def _sum_like(gradient: jax.Array, primal: jax.Array) -> jax.Array:
  """Sums `gradient` over the `shard_map` axes along which `primal` is fixed."""
  extra = tuple(_varying_axes(gradient) - _varying_axes(primal))
  return jax.lax.psum(gradient, extra) if extra else gradient


def _combine_shards(stats: _RunningStats, offset: Any,
                    axis_name: str | None) -> _RunningStats:
  """Merges the per-shard statistics of a vocabulary split over devices.

  Only `[tokens]` vectors cross devices. The argmax becomes a global id;
  ties between shards go to the lowest id, as in `jnp.argmax`.
  """
  argmax = stats.argmax + offset
  if axis_name is None:
    return stats._replace(argmax=argmax)
  max_logit = jax.lax.pmax(stats.max_logit, axis_name)
  sum_exp = jax.lax.psum(stats.sum_exp * jnp.exp(stats.max_logit - max_logit),
                         axis_name)
  candidate = jnp.where(stats.max_logit == max_logit, argmax,
                        jnp.iinfo(jnp.int32).max)
  return _RunningStats(
      max_logit=max_logit, sum_exp=sum_exp,
      label_logit=jax.lax.psum(stats.label_logit, axis_name),
      logit_sum=jax.lax.psum(stats.logit_sum, axis_name),
      argmax=jax.lax.pmin(candidate, axis_name))


def _fused_forward(hidden: jax.Array, unembedding: jax.Array,
                   labels: jax.Array, smoothing: jax.Array | None, *,
                   z_loss: float, chunk_size: int, with_argmax: bool,
                   axis_name: str | None):
  """Returns float32 loss `[tokens]`, argmax `[tokens]` and lse `[tokens]`.

  `smoothing` is the label smoothing `[tokens]` of each position, or None
  for none at all.
  """
  num_tokens = hidden.shape[0]
  offset, vocab_size = _vocab_shard(unembedding, axis_name)
  dtype = _accumulation_dtype(hidden.dtype)
  width, num_full, remainder = _vocab_blocks(unembedding.shape[1], chunk_size)
  # Block statistics use ids local to this shard; argmax ids get the offset
  # back in `_combine_shards`.
  update = functools.partial(_update_stats, labels=labels - offset,
                             smooth=smoothing is not None,
                             with_argmax=with_argmax)

  def full_block(index, stats):
    start = index * width
    return update(stats, _block_logits(hidden, unembedding, start, width),
                  start=start)

  # The lowest finite float instead of -inf keeps exp(old_max - new_max) free
  # of inf - inf.
  stats = _RunningStats(
      max_logit=jnp.full((num_tokens,), jnp.finfo(dtype).min),
      sum_exp=jnp.zeros((num_tokens,), dtype),
      label_logit=jnp.zeros((num_tokens,), dtype),
      logit_sum=jnp.zeros((num_tokens,), dtype),
      argmax=jnp.zeros((num_tokens,), jnp.int32))
  stats = jax.lax.fori_loop(0, num_full, full_block,
                            _varying_like(stats, hidden, unembedding, labels))
  if remainder:
    start = num_full * width
    stats = update(stats,
                   _block_logits(hidden, unembedding, start, remainder),
                   start=start)
  stats = _combine_shards(stats, offset, axis_name)

  log_normalizer = stats.max_logit + jnp.log(stats.sum_exp)
  smooth = smoothing is not None
  loss = _smoothed_cross_entropy(
      log_normalizer, stats.label_logit,
      stats.logit_sum / vocab_size if smooth else None,
      label_smoothing=smoothing if smooth else 0.0, z_loss=z_loss)
  valid = (labels >= 0) & (labels < vocab_size)
  loss = jnp.where(valid, loss, jnp.nan)
  return loss, stats.argmax, log_normalizer


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused_cross_entropy(hidden, unembedding, labels, smoothing, z_loss,
                         chunk_size, with_argmax, axis_name):
  loss, argmax, _ = _fused_forward(
      hidden, unembedding, labels, smoothing, z_loss=z_loss,
      chunk_size=chunk_size, with_argmax=with_argmax, axis_name=axis_name)
  return (loss, argmax) if with_argmax else loss


def _fused_cross_entropy_fwd(hidden, unembedding, labels, smoothing, z_loss,
                             chunk_size, with_argmax, axis_name):
  loss, argmax, log_normalizer = _fused_forward(
      hidden, unembedding, labels, smoothing, z_loss=z_loss,
      chunk_size=chunk_size, with_argmax=with_argmax, axis_name=axis_name)
  outputs = (loss, argmax) if with_argmax else loss
  return outputs, (hidden, unembedding, labels, smoothing, log_normalizer)


def _fused_cross_entropy_bwd(z_loss, chunk_size, with_argmax, axis_name,
                             residuals, cotangents):
  """Recomputes each block of logits and accumulates both gradients.

  d loss / d logit_j = p_j * (1 + 2 z lse) - (1 - eps) [j == label] - eps / V,
  with p = softmax(logits). Every term is finite for finite inputs and is
  multiplied by the position's cotangent, so a zero cotangent gives exactly
  zero gradient. With a vocabulary split over `axis_name`, each device
  writes the gradient of its own columns, and the partial `d hidden` of the
  devices is summed once at the end.
  """
  hidden, unembedding, labels, smoothing, log_normalizer = residuals
  loss_cotangent = cotangents[0] if with_argmax else cotangents
  dtype = _accumulation_dtype(hidden.dtype)
  loss_cotangent = loss_cotangent.astype(dtype)  # [tokens]
  offset, vocab_size = _vocab_shard(unembedding, axis_name)
  labels = labels - offset  # ids local to this shard
  width, num_full, remainder = _vocab_blocks(unembedding.shape[1], chunk_size)

  softmax_scale = (loss_cotangent *
                   (1.0 + 2.0 * z_loss * log_normalizer))[:, None]
  label_smoothing = 0.0 if smoothing is None else smoothing.astype(dtype)
  label_scale = (loss_cotangent * (1.0 - label_smoothing))[:, None]
  uniform_scale = (loss_cotangent * (label_smoothing / vocab_size))[:, None]

  def block_gradients(start, block_width, grads):
    hidden_grad, unembedding_grad = grads
    logits = _block_logits(hidden, unembedding, start, block_width)
    columns = start + jnp.arange(block_width)
    logits_grad = jnp.exp(logits - log_normalizer[:, None]) * softmax_scale
    if smoothing is not None:
      logits_grad = logits_grad - uniform_scale
    logits_grad = jnp.where(columns[None, :] == labels[:, None],
                            logits_grad - label_scale, logits_grad)
    logits_grad = logits_grad.astype(hidden.dtype)  # [tokens, width]

    block = _unembedding_block(unembedding, start, block_width, hidden.dtype)
    # [tokens, width] x [embed, width] -> [tokens, embed]
    hidden_grad = hidden_grad + jax.lax.dot_general(
        logits_grad, block, (((1,), (1,)), ((), ())),
        preferred_element_type=dtype)
    # [tokens, embed] x [tokens, width] -> [embed, width]
    block_grad = jax.lax.dot_general(
        hidden, logits_grad, (((0,), (0,)), ((), ())),
        preferred_element_type=dtype)
    unembedding_grad = jax.lax.dynamic_update_slice_in_dim(
        unembedding_grad, block_grad.astype(unembedding.dtype), start, axis=1)
    return hidden_grad, unembedding_grad

  def full_block(index, grads):
    return block_gradients(index * width, width, grads)

  grads = (jnp.zeros(hidden.shape, dtype),
           jnp.zeros(unembedding.shape, unembedding.dtype))
  grads = jax.lax.fori_loop(
      0, num_full, full_block,
      _varying_like(grads, hidden, unembedding, labels, loss_cotangent))
  if remainder:
    grads = block_gradients(num_full * width, remainder, grads)
  # Inside shard_map, a gradient that varies over mesh axes its input does
  # not vary over (d hidden over the vocabulary axis, d unembedding over the
  # batch axes) is summed over them, once.
  hidden_grad = _sum_like(grads[0], hidden).astype(hidden.dtype)
  unembedding_grad = _sum_like(grads[1], unembedding)
  # Labels and label smoothing get no gradient.
  return hidden_grad, unembedding_grad, None, None


_fused_cross_entropy.defvjp(_fused_cross_entropy_fwd, _fused_cross_entropy_bwd)


def _check_fused_inputs(hidden: jax.Array, unembedding: jax.Array,
                        labels: jax.Array, *, z_loss: float,
                        chunk_size: int) -> None:
  _check_floating("hidden", hidden)
  _check_floating("unembedding", unembedding)
  _check_integer("labels", labels)
  if hidden.ndim < 1:
    raise ValueError("hidden must have shape [..., embed], got a scalar; add "
                     "an embed axis.")
  if unembedding.ndim != 2:
    raise ValueError(f"unembedding must have shape [embed, vocab], got shape "
                     f"{unembedding.shape}.")
  if unembedding.shape[0] != hidden.shape[-1]:
    raise ValueError(
        f"unembedding shape {unembedding.shape} does not start with the embed "
        f"size {hidden.shape[-1]} of hidden {hidden.shape}; pass the "
        "[embed, vocab] kernel (transpose a [vocab, embed] embedding table).")
  _check_labels_match(labels, hidden.shape[:-1], "hidden")
  _check_smoothing_and_z_loss(0.0, z_loss)
  for name, array in (("hidden", hidden), ("unembedding", unembedding),
                      ("labels", labels)):
    spec = getattr(getattr(jax.typeof(array), "sharding", None), "spec", ())
    if any(axis is not None for axis in spec):
      # Only arrays sharded over Explicit mesh axes carry a spec in their
      # type; under Auto axes and inside shard_map it is empty.
      raise ValueError(
          f"{name} is sharded over Explicit mesh axes ({spec}), which the "
          "fused loss does not support. Call it inside jax.shard_map over "
          "those axes (with vocab_axis_name for a split vocabulary, see "
          "docs/losses.md), or build the mesh with AxisType.Auto axes.")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r} must be a positive int, the "
                     "number of vocabulary columns per block.")


def _position_smoothing(label_smoothing: Any, labels: jax.Array,
                        dtype: Any) -> jax.Array | None:
  """Returns the label smoothing of each position as `[tokens]`, or None.

  None means no smoothing anywhere, so the fused loss skips its logit sums.
  A Python number is checked here. The values of an array cannot be
  checked under `jit`, so they must lie in `[0, 1)`.
  """
  if isinstance(label_smoothing, (int, float)):
    _check_smoothing_and_z_loss(label_smoothing, 0.0)
    if not label_smoothing:
      return None
    return jnp.full((labels.size,), label_smoothing, dtype)
  smoothing = jnp.asarray(label_smoothing)
  _check_floating("label_smoothing", smoothing)
  if smoothing.shape not in ((), labels.shape):
    raise ValueError(
        f"label_smoothing shape {smoothing.shape} differs from labels shape "
        f"{labels.shape}; pass a number or one value per label.")
  return jnp.broadcast_to(smoothing, labels.shape).reshape(-1).astype(dtype)


def _fused_cross_entropy_nd(hidden, unembedding, labels, *, label_smoothing,
                            z_loss, chunk_size, with_argmax, vocab_axis_name):
  """Flattens `[..., embed]` to tokens, runs the fused loss, restores shapes."""
  hidden = jnp.asarray(hidden)
  unembedding = jnp.asarray(unembedding)
  labels = jnp.asarray(labels)
  _check_fused_inputs(hidden, unembedding, labels, z_loss=z_loss,
                      chunk_size=chunk_size)

  batch_shape = labels.shape
  # [..., embed] -> [tokens, embed]
  hidden = hidden.reshape(-1, hidden.shape[-1])
  # Mixed inputs run in the wider dtype. Casting the (smaller) hidden states
  # here and each unembedding block inside the loop never copies the whole
  # unembedding, and autodiff casts the hidden gradient back.
  hidden = hidden.astype(jnp.result_type(hidden, unembedding))
  smoothing = _position_smoothing(label_smoothing, labels,
                                  _accumulation_dtype(hidden.dtype))
  labels = labels.reshape(-1)  # [...] -> [tokens]
  outputs = _fused_cross_entropy(hidden, unembedding, labels, smoothing,
                                 float(z_loss), chunk_size, with_argmax,
                                 vocab_axis_name)
  return jax.tree.map(lambda out: out.reshape(batch_shape), outputs)


def fused_token_cross_entropy(
    hidden: jax.Array, unembedding: jax.Array, labels: jax.Array, *,
    label_smoothing: float = 0.0, z_loss: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_axis_name: str | None = None) -> jax.Array:
  """Computes `token_cross_entropy(hidden @ unembedding, labels)` blockwise.

  The `[tokens, vocab]` logits never exist at once, in the forward or the
  backward pass. The forward pass loops over blocks of `chunk_size` vocabulary
  columns and keeps a running logsumexp per token. The backward pass
  (a `jax.custom_vjp`) recomputes each block of logits and accumulates the
  gradients of `hidden` and `unembedding` block by block. Peak temporary
  memory is a few float32 blocks of `tokens * chunk_size` values plus the
  gradient buffers, instead of several `tokens * vocab` arrays.

  Block logits are accumulated in float32 (`preferred_element_type`), so with
  bfloat16 inputs this is more precise than materialising bfloat16 logits.

  Vocabulary (tensor) parallelism: under plain `jax.jit`, a `unembedding`
  whose vocabulary axis is sharded gives the right values, but XLA gathers
  the whole matrix onto every device to slice its blocks. To keep each
  device on its own columns, call this inside `jax.shard_map` with the
  unembedding split as `P(None, name)` and `hidden` and `labels` the same on
  every device of mesh axis `name`, and pass `vocab_axis_name=name`. Then
  only `[tokens]` statistics and the `[tokens, embed]` hidden gradient cross
  devices (see docs/losses.md).

  Args:
    hidden: `[..., embed]` any float dtype, e.g. the final-normed hidden states
      `[batch, length, embed]`.
    unembedding: `[embed, vocab]` float, e.g. a Linen `nn.Dense` kernel.
    labels: `[...]` int in `[0, vocab)`. A label outside that range gives NaN.
    label_smoothing: as in `token_cross_entropy`, or an array of one value
      per position (the shape of `labels`, each in `[0, 1)`), for example
      to smooth the rows of one task and not another in the same pass.
    z_loss: see `token_cross_entropy`.
    chunk_size: vocabulary columns per block. `vocab` need not be a multiple.
    vocab_axis_name: inside `jax.shard_map`, the mesh axis that splits the
      vocabulary over `n` devices. `unembedding` is then this device's
      `[embed, vocab / n]` shard, device `i` having columns `[i * vocab / n,
      (i + 1) * vocab / n)`, and `labels` and the returned values use
      whole-vocabulary ids. None (the default) means `unembedding` has every
      column.

  Returns:
    `[...]` float32 loss per position. Gradients come back in the dtypes of
    `hidden` and `unembedding`. For finite inputs, a position whose cotangent
    is zero gets exactly zero gradient, so callers weight or mask the
    returned losses.
  """
  return _fused_cross_entropy_nd(hidden, unembedding, labels,
                                 label_smoothing=label_smoothing,
                                 z_loss=z_loss, chunk_size=chunk_size,
                                 with_argmax=False,
                                 vocab_axis_name=vocab_axis_name)


def fused_token_cross_entropy_with_argmax(
    hidden: jax.Array, unembedding: jax.Array, labels: jax.Array, *,
    label_smoothing: float = 0.0, z_loss: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Runs `fused_token_cross_entropy` and also returns the argmax of the logits.

  The argmax is found block by block in the same forward pass, so token
  accuracy costs no second pass over the vocabulary. Arguments are those of
  `fused_token_cross_entropy`.

  Returns:
    `(loss, predictions)`: float32 `[...]` loss as `fused_token_cross_entropy`
    returns it, and int32 `[...]` index of the largest logit (the lowest index
    on ties, as `jnp.argmax`).
  """
  return _fused_cross_entropy_nd(hidden, unembedding, labels,
                                 label_smoothing=label_smoothing,
                                 z_loss=z_loss, chunk_size=chunk_size,
                                 with_argmax=True,
                                 vocab_axis_name=vocab_axis_name)


def fused_masked_lm_loss(
    hidden: jax.Array, unembedding: jax.Array, labels: jax.Array,
    weights: jax.Array, *, label_smoothing: float = 0.0, z_loss: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    vocab_axis_name: str | None = None) -> tuple[WeightedSum, WeightedSum]:
  """Computes `masked_lm_loss(hidden @ unembedding, ...)` without the logits.

  Hidden states and labels of positions with weight 0 are replaced by zeros
  before the fused loss, so they do not reach the value or the gradient even
  when they are huge, infinite or out of range.

  Args:
    hidden: `[..., embed]` any float dtype.
    unembedding: `[embed, vocab]` float.
    labels: `[...]` int in `[0, vocab)` at the selected positions.
    weights: `[...]` non-negative, 0 at positions outside the loss.
    label_smoothing: see `fused_token_cross_entropy`.
    z_loss: see `token_cross_entropy`.
    chunk_size: see `fused_token_cross_entropy`.
    vocab_axis_name: see `fused_token_cross_entropy`.

  Returns:
    `(loss, accuracy)` `WeightedSum`s, as `masked_lm_loss` returns them.
  """
  hidden = jnp.asarray(hidden)
  labels = jnp.asarray(labels)
  weights = jnp.asarray(weights)
  _check_labels_match(labels, hidden.shape[:-1], "hidden")
  _check_weights_match(weights, labels)

  selected = weights != 0
  hidden = jnp.where(selected[..., None], hidden, jnp.zeros((), hidden.dtype))
  labels = jnp.where(selected, labels, 0)
  per_position, predictions = fused_token_cross_entropy_with_argmax(
      hidden, unembedding, labels, label_smoothing=label_smoothing,
      z_loss=z_loss, chunk_size=chunk_size, vocab_axis_name=vocab_axis_name)
  return (weighted_sum(per_position, weights),
          accuracy(predictions, labels, weights))


# ---------------------------------------------------------------------------
# Replaced-token detection and sentence order.
# ---------------------------------------------------------------------------


def replaced_token_detection_loss(logits: jax.Array,
                                  labels: jax.Array) -> jax.Array:
  """Computes ELECTRA's per-token sigmoid cross-entropy (Clark et al. 2020).

  The loss is `-log sigmoid(x)` where the token was replaced and
  `-log sigmoid(-x)` where it is original. Selecting one of the two log-sigmoid
  terms (rather than weighting both by the label) keeps the loss and its
  gradient free of NaN for logits of any size, infinite ones included. The
  loss is infinite only for an infinite logit of the wrong sign.

  Args:
    logits: `[...]` any float dtype, the discriminator's score for "replaced".
    labels: `[...]` int or bool, 1 where the token was replaced, else 0.

  Returns:
    `[...]` float32 loss per token.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  _check_floating("logits", logits)
  if labels.shape != logits.shape:
    raise ValueError(f"labels shape {labels.shape} differs from logits shape "
                     f"{logits.shape}; pass one 0/1 label per token.")

  logits = logits.astype(_accumulation_dtype(logits.dtype))
  replaced = labels.astype(jnp.int32) == 1
  return -jax.nn.log_sigmoid(jnp.where(replaced, logits, -logits))


def sentence_order_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Computes the sentence-order softmax cross-entropy per example.

  ALBERT's sentence-order prediction (Lan et al. 2020) classifies whether two
  segments were swapped. Here k segments are shuffled and the head predicts
  which of the k! permutations was applied.

  Args:
    logits: `[batch, num_classes]` any float dtype, with `num_classes = k!`.
    labels: `[batch]` int in `[0, num_classes)`, the permutation index.

  Returns:
    `[batch]` float32 loss.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim != 2:
    raise ValueError(f"logits must have shape [batch, num_classes], got "
                     f"{logits.shape}.")
  return token_cross_entropy(logits, labels)


# ---------------------------------------------------------------------------
# Metrics, as exact sums.
# ---------------------------------------------------------------------------


def accuracy(predictions: jax.Array, labels: jax.Array,
             weights: jax.Array | None = None) -> WeightedSum:
  """Counts the positions where `predictions == labels`, weighted.

  Args:
    predictions: `[...]` int, predicted class per position.
    labels: `[...]` int of the same shape.
    weights: `[...]` non-negative or None for weight 1 everywhere.

  Returns:
    A `WeightedSum` whose `mean` is the accuracy.
  """
  predictions = jnp.asarray(predictions)
  labels = jnp.asarray(labels)
  if predictions.shape != labels.shape:
    raise ValueError(f"predictions shape {predictions.shape} differs from "
                     f"labels shape {labels.shape}.")
  return weighted_sum(predictions == labels, weights)


def argmax_accuracy(logits: jax.Array, labels: jax.Array,
                    weights: jax.Array | None = None) -> WeightedSum:
  """Returns `accuracy` of `argmax(logits, -1)`, for lm, mlm or sop logits.

  Args:
    logits: `[..., num_classes]` float.
    labels: `[...]` int.
    weights: `[...]` non-negative or None for weight 1 everywhere.
  """
  logits = jnp.asarray(logits)
  _check_floating("logits", logits)
  return accuracy(jnp.argmax(logits, axis=-1), labels, weights)


def replaced_token_detection_metrics(
    logits: jax.Array, labels: jax.Array,
    weights: jax.Array | None = None) -> dict[str, WeightedSum]:
  """Counts accuracy, precision and recall of the "replaced" class.

  A token is predicted as replaced where its logit is > 0 (probability > 0.5).
  Precision divides true positives by predicted positives, recall divides
  them by actual positives. With no predicted (or actual) positives the count
  is 0 and `mean` returns 0.

  Args:
    logits: `[...]` float.
    labels: `[...]` int or bool, 1 where the token was replaced.
    weights: `[...]` non-negative or None for weight 1 everywhere.

  Returns:
    Dict with `WeightedSum`s "accuracy", "precision" and "recall".
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if labels.shape != logits.shape:
    raise ValueError(f"labels shape {labels.shape} differs from logits shape "
                     f"{logits.shape}; pass one 0/1 label per token.")
  if weights is None:
    weights = jnp.ones(labels.shape, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)

  predicted = logits > 0
  replaced = labels.astype(jnp.int32) == 1
  return {
      "accuracy": weighted_sum(predicted == replaced, weights),
      "precision": weighted_sum(replaced, jnp.where(predicted, weights, 0.0)),
      "recall": weighted_sum(predicted, jnp.where(replaced, weights, 0.0)),
  }
