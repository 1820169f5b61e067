"""Llama-3-style decoder with the heads of the four training objectives.

The layers follow the definition in Meta's Llama 3 reference code
(`llama/model.py` in github.com/meta-llama/llama3):

* RMSNorm `x * rsqrt(mean(x**2) + eps) * scale`, computed in float32.
* Rotary embeddings with base `rope_theta` on consecutive pairs
  `(x[2i], x[2i+1])`, as Meta's complex multiplication does. Hugging Face's
  port instead permutes the q/k weights and rotates the two halves of each
  head, so its checkpoints need that permutation undone before loading here.
* Grouped-query attention: query head `h` reads key/value head
  `h // (num_heads // num_kv_heads)`, as Meta's `repeat_kv` does.
* SwiGLU feed-forward `w2(silu(w1 x) * w3 x)`, no biases anywhere in the
  decoder, pre-norm residual blocks, a final RMSNorm and an unembedding that is
  separate from the token embedding unless `tie_embeddings` is set.

Differences from the reference:

* Meta rounds the normalised activations to the input dtype before multiplying
  by the RMSNorm weight. Here the product is taken in float32 and rounded
  after, which is identical in float32 and differs by bfloat16 rounding only.
* Attention is masked per packed document (`segment_ids`) and is either causal
  or bidirectional per example. Causality follows the token order in the row.
* Llama 3.1's rope frequency scaling and the decoding KV cache are not
  implemented.
* Meta's reference serves trained weights, so the initialisers here are this
  project's choice.
* The replaced-token-detection and sentence-order heads, and the optional
  ELECTRA generator, are additions of this project. Meta trained Llama 3 on
  next-token prediction alone.

NOTE: nothing here has been run against Meta's code or weights.
tests/test_model.py checks the module against a NumPy reimplementation of the
formulas listed above.

Parameter layout of `Transformer` (`params[...]`, scanned layers carry a
leading `[num_layers]` axis):

  embed/embedding                [vocab, embed]
  decoder/layers/attention/wq    [embed, heads, head_dim]   (wk, wv: kv_heads)
  decoder/layers/attention/wo    [heads, head_dim, embed]
  decoder/layers/feed_forward/w1 [embed, mlp]               (w3 alike)
  decoder/layers/feed_forward/w2 [mlp, embed]
  decoder/layers/{attention_norm,ffn_norm}/scale [embed]
  final_norm/scale               [embed]
  unembed/kernel                 [embed, vocab]   (absent when tied)
  rtd_head, sop_pooler, sop_classifier   Dense kernels and biases
  generator/...                  only with `generator_width_fraction`

Every parameter carries logical axis names (`nn.with_logical_partitioning`)
that `mtl_lm.sharding.LOGICAL_AXIS_RULES` maps onto the device mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

_DTYPES = ("float32", "bfloat16", "float16")

# Checkpointing policies for the decoder blocks: "full" recomputes the whole
# block in the backward pass, "dots" keeps the outputs of the weight matmuls.
_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Embedding initialiser scale, the default initializer_range of GPT-2 and of
# Hugging Face's LlamaConfig.
_EMBEDDING_STDDEV = 0.02


# ---------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Hyperparameters of the decoder and its heads.

  Attributes:
    vocab_size: Number of token ids, from the tokenizer.
    embed_dim: Width of the residual stream.
    num_layers: Number of decoder blocks.
    num_heads: Number of query heads.
    num_kv_heads: Number of key/value heads; must divide `num_heads`.
    head_dim: Width of one head; even, because rope rotates pairs.
    mlp_dim: Hidden width of the SwiGLU feed-forward layer.
    sop_classes: Number of sentence-order classes, k! for k segments.
    rope_theta: Base of the rotary frequencies (500000 in Llama 3).
    norm_eps: Epsilon added to the mean square in RMSNorm.
    tie_embeddings: Use the transposed token embedding as the unembedding.
    dtype: Compute dtype name ("float32", "bfloat16" or "float16").
    param_dtype: Parameter dtype name.
    scan_layers: Run the blocks with `nn.scan` (one compiled block, params
      stacked along a leading "layers" axis) instead of a Python loop.
    remat_policy: Activation checkpointing of each block: "none", "full"
      (recompute everything) or "dots" (keep the weight matmul outputs).
    generator_width_fraction: Width of the ELECTRA generator relative to this
      model, in (0, 1]; None builds no generator.
  """

  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  sop_classes: int
  rope_theta: float = 500_000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  generator_width_fraction: float | None = None

  def __post_init__(self):
    for name in ("vocab_size", "embed_dim", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "mlp_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(
            f"Invalid model {name}={value!r}: it must be a positive integer.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"Invalid num_kv_heads={self.num_kv_heads}: it must divide "
          f"num_heads={self.num_heads} for grouped-query attention. Choose a "
          "divisor of num_heads.")
    if self.head_dim % 2:
      raise ValueError(
          f"Invalid head_dim={self.head_dim}: rotary embeddings rotate pairs "
          "of features, so head_dim must be even.")
    if not isinstance(self.sop_classes, int) or self.sop_classes < 2:
      raise ValueError(
          f"Invalid sop_classes={self.sop_classes!r}: sentence-order "
          "prediction needs at least 2 classes (k! for k >= 2 segments).")
    if not self.rope_theta > 0:
      raise ValueError(
          f"Invalid rope_theta={self.rope_theta}: it must be positive "
          "(Llama 3 uses 500000).")
    if not self.norm_eps > 0:
      raise ValueError(
          f"Invalid norm_eps={self.norm_eps}: it must be positive "
          "(Llama 3 uses 1e-5).")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(
            f"Invalid model {name}={getattr(self, name)!r}: expected one of "
            f"{_DTYPES}.")
    if self.remat_policy not in _REMAT_POLICIES:
      raise ValueError(
          f"Invalid remat_policy={self.remat_policy!r}: expected one of "
          f"{tuple(_REMAT_POLICIES)}.")
    fraction = self.generator_width_fraction
    if fraction is not None and not 0 < fraction <= 1:
      raise ValueError(
          f"Invalid generator_width_fraction={fraction}: it must be in "
          "(0, 1], or None for no generator.")

  @classmethod
  def from_config(
      cls,
      model_config: Any,
      *,
      vocab_size: int,
      sop_classes: int,
      generator_width_fraction: float | None = None,
  ) -> ModelConfig:
    """Builds a ModelConfig from `config.model` of configs/base.py.

    Args:
      model_config: The `config.model` ConfigDict (or any mapping with its
        fields). `scan_layers` and `remat_policy` are optional there.
      vocab_size: Vocabulary size of the tokenizer.
      sop_classes: k! for `config.data.sop_num_segments` = k.
      generator_width_fraction: `config.rtd.generator_width_fraction` when
        `config.rtd.replacements == "generator"`, else None.

    Returns:
      The validated ModelConfig.
    """
    optional = {}
    for name in ("scan_layers", "remat_policy"):
      if name in model_config:
        optional[name] = model_config[name]
    return cls(
        vocab_size=int(vocab_size),
        embed_dim=model_config["embed_dim"],
        num_layers=model_config["num_layers"],
        num_heads=model_config["num_heads"],
        num_kv_heads=model_config["num_kv_heads"],
        head_dim=model_config["head_dim"],
        mlp_dim=model_config["mlp_dim"],
        sop_classes=int(sop_classes),
        rope_theta=float(model_config["rope_theta"]),
        norm_eps=float(model_config["norm_eps"]),
        tie_embeddings=bool(model_config["tie_embeddings"]),
        dtype=model_config["dtype"],
        param_dtype=model_config["param_dtype"],
        generator_width_fraction=generator_width_fraction,
        **optional,
    )

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def generator_config(self) -> ModelConfig:
    """Returns the config of the ELECTRA generator's blocks.

    The width (embed_dim, heads, kv heads, mlp_dim) is scaled by
    `generator_width_fraction` and rounded, with at least one head and the
    kv heads lowered until they divide the heads. Depth and head_dim are kept,
    as ELECTRA's generators keep the discriminator's depth.

    Raises:
      ValueError: if this config has no `generator_width_fraction`.
    """
    fraction = self.generator_width_fraction
    if fraction is None:
      raise ValueError(
          "This ModelConfig has generator_width_fraction=None, so it defines "
          "no generator. Set it to a value in (0, 1].")

    def scale(value: int) -> int:
      return max(1, round(value * fraction))

    num_heads = scale(self.num_heads)
    num_kv_heads = min(scale(self.num_kv_heads), num_heads)
    while num_heads % num_kv_heads:
      num_kv_heads -= 1
    return dataclasses.replace(
        self,
        embed_dim=scale(self.embed_dim),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        mlp_dim=scale(self.mlp_dim),
        generator_width_fraction=None,
    )


# ---------------------------------------------------------------------------
# Pure functions: normalisation, rotary embeddings, masks, logits.


def rms_normalize(x: jax.Array, *, eps: float) -> jax.Array:
  """Divides `x` by its root mean square over the last axis, in float32.

  Args:
    x: `[..., features]` of any float dtype.
    eps: Added to the mean square before the square root.

  Returns:
    `[..., features]` float32, `x * rsqrt(mean(x**2) + eps)`.
  """
  x = x.astype(jnp.float32)
  mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(mean_square + eps)


def rope_tables(
    positions: jax.Array, *, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
  """Computes the cosines and sines of the rotary angles.

  Pair `i` of a head at position `p` turns by `p * theta**(-2i / head_dim)`.

  Args:
    positions: `[batch, length]` integer position of each token inside its
      document.
    head_dim: Even width of one attention head.
    theta: Base of the frequencies.

  Returns:
    `(cos, sin)`, each `[batch, length, head_dim // 2]` float32.
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inverse_frequencies = 1.0 / (theta**exponents)  # [head_dim // 2]
  angles = positions.astype(jnp.float32)[..., None] * inverse_frequencies
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, *, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates consecutive feature pairs `(x[2i], x[2i+1])` of every head.

  This is Meta's pairing: each pair is one complex number multiplied by
  `exp(i * angle)`. The rotation is computed in float32.

  Args:
    x: `[batch, length, heads, head_dim]` queries or keys.
    cos: `[batch, length, head_dim // 2]` float32 from `rope_tables`.
    sin: `[batch, length, head_dim // 2]` float32 from `rope_tables`.

  Returns:
    `[batch, length, heads, head_dim]` in the dtype of `x`.
  """
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  real, imaginary = pairs[..., 0], pairs[..., 1]  # [batch, length, heads, d/2]
  cos = cos[:, :, None, :]
  sin = sin[:, :, None, :]
  rotated = jnp.stack(
      [real * cos - imaginary * sin, real * sin + imaginary * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


def attention_mask(
    segment_ids: jax.Array, bidirectional: jax.Array
) -> jax.Array:
  """Builds the boolean attention mask of packed rows.

  A query may attend to a key when both lie in the same document, the key is
  not padding, and the example is bidirectional or the key does not come
  after the query in the row. Padding queries attend to nothing.

  Args:
    segment_ids: `[batch, length]` int, 1..n per packed document, 0 for
      padding.
    bidirectional: `[batch]` bool, True for mlm, rtd and sop examples.

  Returns:
    `[batch, 1, length, length]` bool, True where attention is allowed, laid
    out as `[batch, heads, query, key]` for `jax.nn.dot_product_attention`.
  """
  length = segment_ids.shape[-1]
  same_document = segment_ids[:, :, None] == segment_ids[:, None, :]
  real_key = (segment_ids != 0)[:, None, :]
  index = jnp.arange(length)
  key_not_after_query = index[None, :, None] >= index[None, None, :]
  allowed = same_document & real_key & (
      bidirectional[:, None, None] | key_not_after_query)
  return allowed[:, None, :, :]  # [batch, 1, query, key]


def compute_logits(hidden: jax.Array, unembedding: jax.Array) -> jax.Array:
  """Projects hidden states onto the vocabulary.

  Training uses a fused cross-entropy over vocabulary blocks instead; this is
  for tests and inference, where full logits are affordable.

  Args:
    hidden: `[batch, length, embed]` final hidden states.
    unembedding: `[embed, vocab]` from `unembedding_matrix`.

  Returns:
    `[batch, length, vocab]` float32 logits.
  """
  return jnp.einsum(
      "ble,ev->blv", hidden, unembedding.astype(hidden.dtype),
      preferred_element_type=jnp.float32)


def unembedding_matrix(params: Any, config: ModelConfig) -> jax.Array:
  """Returns the `[embed, vocab]` unembedding shared by the lm and mlm heads.

  With `config.tie_embeddings` this is the transpose of the token embedding
  `params["embed"]["embedding"]` (stored `[vocab, embed]`); otherwise it is
  `params["unembed"]["kernel"]`, stored `[embed, vocab]`.

  Args:
    params: The "params" collection of a `Transformer`, boxed or unboxed.
    config: The model's config.

  Returns:
    `[embed, vocab]` in the parameter dtype.
  """
  if config.tie_embeddings:
    return nn.unbox(params["embed"]["embedding"]).T
  return nn.unbox(params["unembed"]["kernel"])


# ---------------------------------------------------------------------------
# Layers.


def _kernel_init(
    names: tuple[str | None, ...],
    *,
    in_axis: int | tuple[int, ...] = -2,
    out_axis: int | tuple[int, ...] = -1,
) -> Callable[..., Any]:
  """Fan-in scaled truncated normal, tagged with logical axis names."""
  init = nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)
  return nn.with_logical_partitioning(init, names)


def _zeros(names: tuple[str | None, ...]) -> Callable[..., Any]:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _constrain(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
  # A no-op unless a mesh and logical axis rules are active
  # (see mtl_lm.sharding.sharding_context).
  return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learned `scale [features]`."""

  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(
      self, x: jax.Array, *, return_normed: bool = False
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Normalises `x [..., features]`.

    Returns:
      `[..., features]` in `dtype`, equal to `(normed * scale).astype(dtype)`
      with `normed = rms_normalize(x)` in float32. With `return_normed`, the
      pair `(output, normed)`.
    """
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                              ("norm",)),
        (x.shape[-1],), self.param_dtype)
    normed = rms_normalize(x, eps=self.eps)
    output = (normed * scale.astype(jnp.float32)).astype(self.dtype)
    if return_normed:
      return output, normed
    return output


class Attention(nn.Module):
  """Grouped-query self-attention with rotary embeddings and no biases."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, mask, cos, sin):
    """Attends within the mask.

    Args:
      x: `[batch, length, embed]` normalised inputs.
      mask: `[batch, 1, length, length]` bool from `attention_mask`.
      cos: `[batch, length, head_dim // 2]` float32 from `rope_tables`.
      sin: `[batch, length, head_dim // 2]` float32 from `rope_tables`.

    Returns:
      `[batch, length, embed]` in the compute dtype.
    """
    config = self.config
    dtype = config.compute_dtype
    embed, heads, head_dim = config.embed_dim, config.num_heads, config.head_dim
    kv_heads = config.num_kv_heads

    def projection(name, num_heads, heads_axis):
      kernel = self.param(
          name,
          _kernel_init(("embed", heads_axis, "head_dim"), in_axis=0,
                       out_axis=(1, 2)),
          (embed, num_heads, head_dim), config.params_dtype)
      return jnp.einsum("ble,ehd->blhd", x, kernel.astype(dtype))

    x = x.astype(dtype)
    query = projection("wq", heads, "heads")  # [batch, length, heads, head_dim]
    key = projection("wk", kv_heads, "kv_heads")
    value = projection("wv", kv_heads, "kv_heads")
    query = apply_rope(query, cos=cos, sin=sin)
    key = apply_rope(key, cos=cos, sin=sin)

    # The XLA implementation computes the softmax in float32 and gives fully
    # masked (padding) query rows a finite uniform average instead of NaN.
    attended = jax.nn.dot_product_attention(
        query, key, value, mask=mask, implementation="xla")
    # attended: [batch, length, heads, head_dim]

    output_kernel = self.param(
        "wo",
        _kernel_init(("heads", "head_dim", "embed"), in_axis=(0, 1),
                     out_axis=2),
        (heads, head_dim, embed), config.params_dtype)
    return jnp.einsum("blhd,hde->ble", attended, output_kernel.astype(dtype))


class FeedForward(nn.Module):
  """SwiGLU feed-forward layer `w2(silu(w1 x) * w3 x)` without biases."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps `[batch, length, embed]` to `[batch, length, embed]`."""
    config = self.config
    dtype = config.compute_dtype
    shape_in = (config.embed_dim, config.mlp_dim)
    w1 = self.param("w1", _kernel_init(("embed", "mlp")), shape_in,
                    config.params_dtype)
    w3 = self.param("w3", _kernel_init(("embed", "mlp")), shape_in,
                    config.params_dtype)
    w2 = self.param("w2", _kernel_init(("mlp", "embed")),
                    (config.mlp_dim, config.embed_dim), config.params_dtype)
    x = x.astype(dtype)
    gate = jnp.einsum("ble,em->blm", x, w1.astype(dtype))
    up = jnp.einsum("ble,em->blm", x, w3.astype(dtype))
    hidden = _constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return jnp.einsum("blm,me->ble", hidden, w2.astype(dtype))


class DecoderBlock(nn.Module):
  """Pre-norm block: `h = x + attention(norm(x))`, `h + ffn(norm(h))`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, mask, cos, sin):
    """Returns `(output, None)`, the carry and output `nn.scan` expects.

    `x` and `output` are `[batch, length, embed]` in the compute dtype.
    """
    config = self.config
    norm_args = dict(eps=config.norm_eps, dtype=config.compute_dtype,
                     param_dtype=config.params_dtype)
    attended = Attention(config, name="attention")(
        RMSNorm(**norm_args, name="attention_norm")(x), mask, cos, sin)
    x = _constrain(x + attended, ("batch", "length", "embed"))
    fed = FeedForward(config, name="feed_forward")(
        RMSNorm(**norm_args, name="ffn_norm")(x))
    x = _constrain(x + fed, ("batch", "length", "embed"))
    return x, None


class DecoderStack(nn.Module):
  """`config.num_layers` decoder blocks, scanned or looped."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, mask, cos, sin):
    """Maps `[batch, length, embed]` to `[batch, length, embed]`."""
    config = self.config
    block = DecoderBlock
    policy = _REMAT_POLICIES[config.remat_policy]
    if config.remat_policy != "none":
      # Inside scan the loop already prevents CSE across the remat boundary.
      block = nn.remat(block, policy=policy,
                       prevent_cse=not config.scan_layers)
    if config.scan_layers:
      scanned = nn.scan(
          block,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
          length=config.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = scanned(config, name="layers")(x, mask, cos, sin)
      return x
    for index in range(config.num_layers):
      x, _ = block(config, name=f"layers_{index}")(x, mask, cos, sin)
    return x


class Generator(nn.Module):
  """ELECTRA-style generator that reads the discriminator's embeddings.

  It takes token embeddings already looked up in the discriminator's table
  and projects them to its own narrower width. Its decoder blocks attend
  bidirectionally, and a final RMSNorm and a projection bring the result back
  to the discriminator's width. There the discriminator's unembedding turns
  it into mlm logits. ELECTRA's generator and discriminator share token
  embeddings in the same way.

  Attributes:
    config: The generator's own config, from `ModelConfig.generator_config`.
    output_dim: The discriminator's `embed_dim`.
  """

  config: ModelConfig
  output_dim: int

  @nn.compact
  def __call__(self, embedded, *, segment_ids, positions):
    """Runs the generator.

    Args:
      embedded: `[batch, length, output_dim]` token embeddings from the
        discriminator's table.
      segment_ids: `[batch, length]` int, 0 for padding.
      positions: `[batch, length]` int position inside each document.

    Returns:
      `[batch, length, output_dim]` in the compute dtype.
    """
    config = self.config
    dtype = config.compute_dtype
    input_kernel = self.param(
        "input_projection", _kernel_init((None, "embed")),
        (self.output_dim, config.embed_dim), config.params_dtype)
    output_kernel = self.param(
        "output_projection", _kernel_init(("embed", None)),
        (config.embed_dim, self.output_dim), config.params_dtype)

    x = jnp.einsum("ble,eg->blg", embedded.astype(dtype),
                   input_kernel.astype(dtype))
    x = _constrain(x, ("batch", "length", "embed"))
    batch = segment_ids.shape[0]
    mask = attention_mask(segment_ids, jnp.ones((batch,), dtype=bool))
    cos, sin = rope_tables(positions, head_dim=config.head_dim,
                           theta=config.rope_theta)
    x = DecoderStack(config, name="decoder")(x, mask, cos, sin)
    x = RMSNorm(eps=config.norm_eps, dtype=dtype,
                param_dtype=config.params_dtype, name="final_norm")(x)
    output = jnp.einsum("blg,ge->ble", x, output_kernel.astype(dtype))
    return _constrain(output, ("batch", "length", "embed"))


class Unembed(nn.Module):
  """Holds the untied unembedding `kernel [embed, vocab]`."""

  embed_dim: int
  vocab_size: int
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param("kernel", _kernel_init(("embed", "vocab")),
                      (self.embed_dim, self.vocab_size), self.param_dtype)


# ---------------------------------------------------------------------------
# The model.


def _check_inputs(input_ids, segment_ids, positions, bidirectional) -> None:
  if input_ids.ndim != 2:
    raise ValueError(
        f"input_ids has shape {input_ids.shape}; expected [batch, length].")
  for name, array in (("segment_ids", segment_ids), ("positions", positions)):
    if array.shape != input_ids.shape:
      raise ValueError(
          f"{name} has shape {array.shape} but input_ids has "
          f"{input_ids.shape}; pass one value per token.")
  for name, array in (("input_ids", input_ids), ("segment_ids", segment_ids),
                      ("positions", positions)):
    if not jnp.issubdtype(array.dtype, jnp.integer):
      raise ValueError(f"{name} has dtype {array.dtype}; expected integers.")
  if bidirectional.shape != input_ids.shape[:1]:
    raise ValueError(
        f"bidirectional has shape {bidirectional.shape}; expected [batch] = "
        f"{input_ids.shape[:1]}, one flag per example.")
  if bidirectional.dtype != jnp.bool_:
    raise ValueError(
        f"bidirectional has dtype {bidirectional.dtype}; expected bool.")


class Transformer(nn.Module):
  """Llama-3-style decoder with rtd and sop heads and an optional generator.

  Methods:
    __call__: the discriminator forward pass shared by all objectives.
    logits: full vocabulary logits of hidden states (tests, inference).
    unembedding: the `[embed, vocab]` unembedding from inside `apply`.
    generator_hidden: the ELECTRA generator's hidden states, to be scored by
      the same unembedding. Only with `config.generator_width_fraction`.

  `init` creates every parameter, the generator's included. Outside `apply`,
  `unembedding_matrix(params, config)` gives the unembedding.
  """

  config: ModelConfig

  def setup(self):
    config = self.config
    # Only the table is used: _embed_tokens does the lookup itself so that it
    # can set the table's sharding first.
    self.embed = nn.Embed(
        num_embeddings=config.vocab_size,
        features=config.embed_dim,
        param_dtype=config.params_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=_EMBEDDING_STDDEV),
            ("vocab", "embed")),
    )
    self.decoder = DecoderStack(config)
    self.final_norm = RMSNorm(eps=config.norm_eps, dtype=config.compute_dtype,
                              param_dtype=config.params_dtype)
    if not config.tie_embeddings:
      self.unembed = Unembed(config.embed_dim, config.vocab_size,
                             config.params_dtype)

    # The heads are small, so they run in float32 whatever the compute dtype.
    def head(features, names):
      return nn.Dense(
          features, dtype=jnp.float32, param_dtype=config.params_dtype,
          kernel_init=_kernel_init(names), bias_init=_zeros((names[-1],)))

    self.rtd_head = head(1, ("embed", None))
    self.sop_pooler = head(config.embed_dim, ("embed", None))
    self.sop_classifier = head(config.sop_classes, ("embed", None))
    if config.generator_width_fraction is not None:
      self.generator = Generator(config.generator_config(),
                                 output_dim=config.embed_dim)

  def __call__(
      self,
      input_ids: jax.Array,
      *,
      segment_ids: jax.Array,
      positions: jax.Array,
      bidirectional: jax.Array,
      deterministic: bool = True,
  ) -> dict[str, jax.Array]:
    """Runs the decoder and the rtd and sop heads.

    Args:
      input_ids: `[batch, length]` int32 token ids in `[0, vocab_size)`. An id
        of vocab_size or more embeds as NaN (`jnp.take` fill mode), which
        shows up in the loss instead of reading another token's row.
      segment_ids: `[batch, length]` int32, 1..n per packed document, 0 for
        padding. No token attends across documents.
      positions: `[batch, length]` int32 position inside its document, the
        input of the rotary embeddings.
      bidirectional: `[batch]` bool, True for mlm, rtd and sop examples,
        False for causal lm examples.
      deterministic: Accepted for the training-step interface. The model has
        no dropout, so it changes nothing.

    Returns:
      A dict with
        "hidden": `[batch, length, embed]` compute dtype, the final-normed
          states, exactly `(normed * params["final_norm"]["scale"])` cast to
          the compute dtype.
        "normed": `[batch, length, embed]` float32, the same before the final
          RMSNorm scale.
        "rtd_logits": `[batch, length]` float32, replaced-token logits.
        "sop_logits": `[batch, sop_classes]` float32, from the mean of
          "hidden" over each row's non-padding tokens.
      Padding positions hold finite values that carry no meaning.
    """
    del deterministic
    input_ids = jnp.asarray(input_ids)
    segment_ids = jnp.asarray(segment_ids)
    positions = jnp.asarray(positions)
    bidirectional = jnp.asarray(bidirectional)
    _check_inputs(input_ids, segment_ids, positions, bidirectional)
    config = self.config

    x = self._embed_tokens(input_ids)
    mask = attention_mask(segment_ids, bidirectional)
    cos, sin = rope_tables(positions, head_dim=config.head_dim,
                           theta=config.rope_theta)
    x = self.decoder(x, mask, cos, sin)
    hidden, normed = self.final_norm(x, return_normed=True)

    heads = self.task_heads(hidden, segment_ids)

    if self.is_initializing():
      # Create the parameters that only the other methods use.
      self.unembedding()
      if config.generator_width_fraction is not None:
        self.generator_hidden(input_ids, segment_ids=segment_ids,
                              positions=positions)

    return {
        "hidden": hidden,
        "normed": normed,
        **heads,
    }

  def task_heads(self, hidden: jax.Array,
                 segment_ids: jax.Array) -> dict[str, jax.Array]:
    """Applies the rtd and sop heads to `[batch, length, embed]` states.

    `__call__` runs this on its own hidden states; the train step calls it
    (`method=`) again on a copy of them to measure per-task gradients.

    Returns:
      {"rtd_logits": `[batch, length]`, "sop_logits": `[batch, sop_classes]`},
      both float32.
    """
    rtd_logits = self.rtd_head(hidden)[..., 0]  # [batch, length, 1] -> [b, l]
    return {"rtd_logits": rtd_logits,
            "sop_logits": self._sop_logits(hidden, segment_ids)}

  def _embed_tokens(self, input_ids):
    """Looks up `[batch, length]` ids as `[batch, length, embed]`."""
    # Gather the table's fsdp-sharded embed axis before the lookup, as FSDP
    # does for every weight. Otherwise XLA reshards the lookup result from
    # embed-sharded to batch-sharded by replicating it.
    table = _constrain(self.embed.embedding, ("vocab", None))
    embedded = jnp.take(table, input_ids, axis=0)
    embedded = embedded.astype(self.config.compute_dtype)
    return _constrain(embedded, ("batch", "length", "embed"))

  def _sop_logits(self, hidden, segment_ids):
    """Pools `[batch, length, embed]` over real tokens into sop logits."""
    weights = (segment_ids != 0).astype(jnp.float32)[..., None]
    count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)  # [batch, 1]
    pooled = jnp.sum(hidden.astype(jnp.float32) * weights, axis=1) / count
    pooled = jnp.tanh(self.sop_pooler(pooled))  # [batch, embed]
    return self.sop_classifier(pooled)  # [batch, sop_classes]

  def unembedding(self) -> jax.Array:
    """Returns the `[embed, vocab]` unembedding (transposed table if tied)."""
    if self.config.tie_embeddings:
      return self.embed.embedding.T
    return self.unembed()

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Maps `[batch, length, embed]` hidden states to float32 vocab logits."""
    return compute_logits(hidden, self.unembedding())

  def generator_hidden(
      self,
      input_ids: jax.Array,
      *,
      segment_ids: jax.Array,
      positions: jax.Array,
  ) -> jax.Array:
    """Runs the ELECTRA generator on (usually masked) token ids.

    The generator looks its inputs up in this model's embedding table, and
    its outputs are meant for this model's unembedding, so both receive
    gradients from the generator's mlm loss.

    Args:
      input_ids: `[batch, length]` int32 token ids.
      segment_ids: `[batch, length]` int32, 0 for padding.
      positions: `[batch, length]` int32 position inside each document.

    Returns:
      `[batch, length, embed]` in the compute dtype, to be scored with
      `logits` or a fused cross-entropy against `unembedding_matrix`.

    Raises:
      ValueError: if the model was built without a generator.
    """
    if self.config.generator_width_fraction is None:
      raise ValueError(
          "This Transformer has no generator: build its ModelConfig with "
          "generator_width_fraction set (config.rtd.replacements='generator').")
    embedded = self._embed_tokens(jnp.asarray(input_ids))
    return self.generator(embedded, segment_ids=jnp.asarray(segment_ids),
                          positions=jnp.asarray(positions))
