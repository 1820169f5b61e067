"""Fused against plain token cross-entropy: peak temporary memory and time.

Both candidates compute the loss and its gradients with respect to the hidden
states and the unembedding, jitted:

  plain: token_cross_entropy(hidden @ unembedding, labels), full logits;
  fused: fused_token_cross_entropy(hidden, unembedding, labels), blockwise.

Memory is XLA's `temp_size_in_bytes` of each compiled function (buffers other
than arguments and outputs). Time is the median wall time of a few warm calls,
plain and fused alternating so that both run under similar machine load. The
process CPU time of the same calls (all threads) is recorded too. On a
machine shared with other jobs it varied less between repetitions than wall
time did.

  python launch/benchmark.py --suite=fused_ce
"""

import statistics
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mtl_lm import losses


def _make_inputs(*, vocab: int, embed: int, tokens: int, dtype: Any,
                 seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  hidden_key, unembedding_key, label_key = jax.random.split(
      jax.random.PRNGKey(seed), 3)
  hidden = jax.random.normal(hidden_key, (tokens, embed), dtype)
  # Scaled like an initialised unembedding, so logits have unit variance.
  unembedding = (jax.random.normal(unembedding_key, (embed, vocab), dtype) /
                 np.sqrt(embed).astype(dtype))
  labels = jax.random.randint(label_key, (tokens,), 0, vocab, jnp.int32)
  return hidden, unembedding, labels


def _time_call(function: Callable[..., Any], *args) -> tuple[float, float]:
  """Returns the wall and process CPU seconds of one call."""
  wall_start = time.perf_counter()
  cpu_start = time.process_time()
  jax.block_until_ready(function(*args))
  return time.perf_counter() - wall_start, time.process_time() - cpu_start


def _max_abs_difference(first: jax.Array, second: jax.Array) -> float:
  return float(jnp.max(jnp.abs(first.astype(jnp.float32) -
                               second.astype(jnp.float32))))


def run(vocab: int = 128256, embed: int = 2048, tokens: int = 8192, *,
        chunk_size: int = losses.DEFAULT_CHUNK_SIZE, repetitions: int = 3,
        dtype: str = "float32", label_smoothing: float = 0.1,
        z_loss: float = 1e-4, seed: int = 0) -> dict[str, Any]:
  """Measures both candidates side by side and returns the figures.

  The default shape is 8192 tokens, embed 2048 and Llama 3's vocabulary of
  128256 tokens. There the plain logits alone take 4 GiB in float32, and one
  plain forward and backward pass is about 13 TFLOP (three matmuls of
  2 * tokens * embed * vocab FLOP each).

  Args:
    vocab: vocabulary size.
    embed: embedding size.
    tokens: number of positions in the batch.
    chunk_size: vocabulary columns per block of the fused loss.
    repetitions: timed calls of each candidate after one warm-up call.
    dtype: dtype of hidden states and unembedding, e.g. "float32".
    label_smoothing: passed to both losses.
    z_loss: passed to both losses.
    seed: seed of the random inputs.

  Returns:
    Dict with "ratio" (plain / fused temporary bytes) and "speed_ratio"
    (plain / fused median wall seconds, above 1 when fused is faster). It also
    contains the raw bytes and seconds, the plain / fused ratio of each
    repetition, the same ratio of median process CPU seconds
    ("cpu_speed_ratio"), and the largest absolute differences between the two
    candidates' loss and gradients.
  """
  if repetitions < 1:
    raise ValueError(f"repetitions={repetitions} must be at least 1.")
  hidden, unembedding, labels = _make_inputs(
      vocab=vocab, embed=embed, tokens=tokens, dtype=jnp.dtype(dtype),
      seed=seed)

  def plain_loss(hidden, unembedding):
    logits = hidden @ unembedding  # [tokens, vocab]
    return jnp.mean(losses.token_cross_entropy(
        logits, labels, label_smoothing=label_smoothing, z_loss=z_loss))

  def fused_loss(hidden, unembedding):
    return jnp.mean(losses.fused_token_cross_entropy(
        hidden, unembedding, labels, label_smoothing=label_smoothing,
        z_loss=z_loss, chunk_size=chunk_size))

  compiled = {}
  for name, loss_fn in (("plain", plain_loss), ("fused", fused_loss)):
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    compiled[name] = step.lower(hidden, unembedding).compile()
  temp_bytes = {name: int(function.memory_analysis().temp_size_in_bytes)
                for name, function in compiled.items()}
  logging.info("Temporary bytes: plain %d, fused %d.", temp_bytes["plain"],
               temp_bytes["fused"])

  # Warm-up calls, which also check that both candidates agree.
  plain_loss_value, plain_grads = compiled["plain"](hidden, unembedding)
  fused_loss_value, fused_grads = compiled["fused"](hidden, unembedding)
  loss_difference = _max_abs_difference(plain_loss_value, fused_loss_value)
  hidden_grad_difference = _max_abs_difference(plain_grads[0], fused_grads[0])
  unembedding_grad_difference = _max_abs_difference(plain_grads[1],
                                                    fused_grads[1])
  del plain_grads, fused_grads

  seconds = {"plain": [], "fused": []}
  cpu_seconds = {"plain": [], "fused": []}
  for repetition in range(repetitions):
    # Alternate which candidate goes first, so neither always runs on a
    # machine just warmed (or slowed) by the other.
    order = ("plain", "fused") if repetition % 2 == 0 else ("fused", "plain")
    for name in order:
      wall, cpu = _time_call(compiled[name], hidden, unembedding)
      seconds[name].append(wall)
      cpu_seconds[name].append(cpu)
      logging.info("Repetition %d, %s: %.3f s wall, %.3f s CPU.", repetition,
                   name, wall, cpu)
  median_seconds = {name: statistics.median(times)
                    for name, times in seconds.items()}
  median_cpu_seconds = {name: statistics.median(times)
                        for name, times in cpu_seconds.items()}
  # Each repetition's plain / fused ratio, from two calls run back to back.
  paired_speed_ratios = [plain / fused for plain, fused in
                         zip(seconds["plain"], seconds["fused"])]

  return {
      "ratio": temp_bytes["plain"] / temp_bytes["fused"],
      "speed_ratio": median_seconds["plain"] / median_seconds["fused"],
      "plain_temp_bytes": temp_bytes["plain"],
      "fused_temp_bytes": temp_bytes["fused"],
      "plain_seconds": median_seconds["plain"],
      "fused_seconds": median_seconds["fused"],
      "plain_seconds_all": seconds["plain"],
      "fused_seconds_all": seconds["fused"],
      "paired_speed_ratios": paired_speed_ratios,
      "cpu_speed_ratio": (median_cpu_seconds["plain"] /
                          median_cpu_seconds["fused"]),
      "plain_cpu_seconds_all": cpu_seconds["plain"],
      "fused_cpu_seconds_all": cpu_seconds["fused"],
      "loss": float(plain_loss_value),
      "max_abs_loss_difference": loss_difference,
      "max_abs_hidden_grad_difference": hidden_grad_difference,
      "max_abs_unembedding_grad_difference": unembedding_grad_difference,
      "vocab": vocab,
      "embed": embed,
      "tokens": tokens,
      "chunk_size": chunk_size,
      "repetitions": repetitions,
      "dtype": dtype,
      "label_smoothing": label_smoothing,
      "z_loss": z_loss,
  }
