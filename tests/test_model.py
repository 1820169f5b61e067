"""Tests of mtl_lm.model against a NumPy Llama and by invariances."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from configs import base
from mtl_lm import model as model_lib

VOCAB = 37
LENGTH = 12

TINY = model_lib.ModelConfig(
    vocab_size=VOCAB, embed_dim=16, num_layers=2, num_heads=4,
    num_kv_heads=2, head_dim=6, mlp_dim=24, sop_classes=6, rope_theta=100.0)


# ---------------------------------------------------------------------------
# Helpers.


def _inputs(batch=2, length=LENGTH, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, size=(batch, length)).astype(np.int32)
  segments = np.ones((batch, length), np.int32)
  positions = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
  return ids, segments, positions


def _init(config, seed=0):
  """Builds a model and random parameters of the shapes `init` creates.

  Compiling `init` on CPU costs seconds per random initialiser, so the values
  come from NumPy instead (test_init_creates_expected_params covers `init`).
  Norm scales differ from 1 and biases from 0 so that the reference
  comparison exercises them.
  """
  model = model_lib.Transformer(config)
  ids, segments, positions = _inputs()
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), ids, segment_ids=segments,
                         positions=positions,
                         bidirectional=np.array([False, True])))
  shapes = nn.unbox(shapes)["params"]
  rng = np.random.default_rng(seed)

  def sample(path, shape):
    noise = rng.normal(size=shape.shape).astype(shape.dtype)
    if path[-1].key == "scale":
      return jnp.asarray(1.0 + 0.1 * noise)
    return jnp.asarray(0.3 * noise)

  return model, jax.tree_util.tree_map_with_path(sample, shapes)


@functools.cache
def _jitted_apply(model, method=None):
  # Eager Linen runs op by op, which is slow on CPU, so compile once instead.
  def apply(params, *args, **kwargs):
    return model.apply({"params": params}, *args, method=method, **kwargs)
  return jax.jit(apply)


def _forward(model, params, ids, segments, positions, bidirectional):
  return _jitted_apply(model)(
      params, jnp.asarray(ids), segment_ids=jnp.asarray(segments),
      positions=jnp.asarray(positions),
      bidirectional=jnp.asarray(bidirectional))


@pytest.fixture(scope="module")
def tiny():
  return _init(TINY)


# ---------------------------------------------------------------------------
# A plain NumPy Llama (float64), one unpacked document at a time.


def _np_rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_rope(x, positions, theta):
  """Rotates x [length, heads, d] as Meta does, pairs as complex numbers."""
  head_dim = x.shape[-1]
  frequencies = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
  rotation = np.exp(1j * np.outer(positions, frequencies))  # [length, d/2]
  pairs = x[..., 0::2] + 1j * x[..., 1::2]
  rotated = pairs * rotation[:, None, :]
  out = np.empty_like(x)
  out[..., 0::2] = rotated.real
  out[..., 1::2] = rotated.imag
  return out


def _np_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def _np_layer(params, index):
  return jax.tree_util.tree_map(lambda p: np.asarray(p[index], np.float64),
                                params["decoder"]["layers"])


def _np_llama(params, config, ids, positions, causal):
  """Returns (hidden [length, embed], rtd [length], sop [classes])."""
  params64 = jax.tree_util.tree_map(lambda p: np.asarray(p, np.float64),
                                    params)
  x = params64["embed"]["embedding"][ids]
  length = len(ids)
  group = config.num_heads // config.num_kv_heads
  for index in range(config.num_layers):
    layer = _np_layer(params, index)
    attention = layer["attention"]
    h = _np_rms_norm(x, layer["attention_norm"]["scale"], config.norm_eps)
    q = np.einsum("le,ehd->lhd", h, attention["wq"])
    k = np.einsum("le,ehd->lhd", h, attention["wk"])
    v = np.einsum("le,ehd->lhd", h, attention["wv"])
    q = _np_rope(q, positions, config.rope_theta)
    k = _np_rope(k, positions, config.rope_theta)
    # Meta's repeat_kv: query head h reads kv head h // group.
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(config.head_dim)
    if causal:
      scores = np.where(np.tril(np.ones((length, length), bool)), scores,
                        -np.inf)
    attended = np.einsum("hqk,khd->qhd", _np_softmax(scores), v)
    x = x + np.einsum("qhd,hde->qe", attended, attention["wo"])

    feed = layer["feed_forward"]
    h = _np_rms_norm(x, layer["ffn_norm"]["scale"], config.norm_eps)
    gate = h @ feed["w1"]
    silu = gate / (1.0 + np.exp(-gate))
    x = x + (silu * (h @ feed["w3"])) @ feed["w2"]

  hidden = _np_rms_norm(x, params64["final_norm"]["scale"], config.norm_eps)
  rtd = hidden @ params64["rtd_head"]["kernel"][:, 0] + \
      params64["rtd_head"]["bias"][0]
  pooled = np.tanh(hidden.mean(axis=0) @ params64["sop_pooler"]["kernel"]
                   + params64["sop_pooler"]["bias"])
  sop = pooled @ params64["sop_classifier"]["kernel"] + \
      params64["sop_classifier"]["bias"]
  return hidden, rtd, sop


# ---------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize("overrides, message", [
    (dict(num_kv_heads=3), "num_kv_heads=3"),
    (dict(head_dim=5), "head_dim=5"),
    (dict(embed_dim=0), "embed_dim=0"),
    (dict(sop_classes=1), "sop_classes=1"),
    (dict(dtype="float8"), "dtype='float8'"),
    (dict(rope_theta=0.0), "rope_theta=0.0"),
    (dict(norm_eps=-1.0), "norm_eps=-1.0"),
    (dict(remat_policy="some"), "remat_policy='some'"),
    (dict(generator_width_fraction=1.5), "generator_width_fraction=1.5"),
])
def test_config_invalid_values_raise(overrides, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(TINY, **overrides)


def test_config_from_base_config():
  config = base.get_config()
  model_config = model_lib.ModelConfig.from_config(
      config.model, vocab_size=2048, sop_classes=2)
  assert model_config.embed_dim == config.model.embed_dim
  assert model_config.num_kv_heads == config.model.num_kv_heads
  assert model_config.rope_theta == 500_000.0
  assert model_config.vocab_size == 2048
  assert model_config.generator_width_fraction is None


def test_generator_config_scales_width():
  config = base.get_config()
  model_config = model_lib.ModelConfig.from_config(
      config.model, vocab_size=2048, sop_classes=2,
      generator_width_fraction=0.25)
  generator = model_config.generator_config()
  assert generator.embed_dim == 32
  assert generator.num_heads == 1
  assert generator.num_kv_heads == 1
  assert generator.mlp_dim == 96
  assert generator.num_layers == model_config.num_layers
  assert generator.head_dim == model_config.head_dim


@pytest.mark.parametrize("heads, kv_heads, fraction, expected", [
    (6, 6, 0.5, (3, 3)),
    (8, 4, 0.75, (6, 3)),
    # 8 * 0.375 = 3 heads; 4 * 0.375 = 1.5 rounds to 2, lowered to 1.
    (8, 4, 0.375, (3, 1)),
    # 12 * 0.75 = 9 heads; 6 * 0.75 = 4.5 rounds to 4, lowered to 3.
    (12, 6, 0.75, (9, 3)),
    (4, 2, 0.1, (1, 1)),
])
def test_generator_config_kv_heads_divide_heads(heads, kv_heads, fraction,
                                                expected):
  config = dataclasses.replace(TINY, num_heads=heads, num_kv_heads=kv_heads,
                               generator_width_fraction=fraction)
  generator = config.generator_config()
  assert (generator.num_heads, generator.num_kv_heads) == expected


def test_generator_config_without_fraction_raises():
  with pytest.raises(ValueError, match="generator_width_fraction=None"):
    TINY.generator_config()


# ---------------------------------------------------------------------------
# Pure functions.


def test_rope_rotates_consecutive_pairs():
  x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
  cos, sin = model_lib.rope_tables(jnp.array([[2]]), head_dim=4, theta=100.0)
  rotated = np.asarray(model_lib.apply_rope(x, cos=cos, sin=sin)).ravel()
  # Pair (1, 2) turns by 2 * 100**0 = 2 rad, pair (3, 4) by 2 * 100**-0.5.
  first, second = 2.0, 0.2
  expected = [
      1 * math.cos(first) - 2 * math.sin(first),
      1 * math.sin(first) + 2 * math.cos(first),
      3 * math.cos(second) - 4 * math.sin(second),
      3 * math.sin(second) + 4 * math.cos(second),
  ]
  np.testing.assert_allclose(rotated, expected, rtol=1e-6)


def test_rope_dot_product_depends_on_offset_only():
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

  def score(query_position, key_position):
    cos_q, sin_q = model_lib.rope_tables(
        jnp.array([[query_position]]), head_dim=8, theta=10_000.0)
    cos_k, sin_k = model_lib.rope_tables(
        jnp.array([[key_position]]), head_dim=8, theta=10_000.0)
    rotated_q = model_lib.apply_rope(q, cos=cos_q, sin=sin_q)
    rotated_k = model_lib.apply_rope(k, cos=cos_k, sin=sin_k)
    return float(jnp.sum(rotated_q * rotated_k))

  assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4)
  assert score(5, 2) == pytest.approx(score(3, 0), rel=1e-4)
  assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-2)


def test_rope_gradients():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(1, 3, 2, 4)), jnp.float32)
  cos, sin = model_lib.rope_tables(jnp.array([[0, 1, 7]]), head_dim=4,
                                   theta=10.0)
  check_grads(jax.jit(lambda y: model_lib.apply_rope(y, cos=cos, sin=sin)),
              (x,),
              order=1, modes=("fwd", "rev"))


def test_rms_normalize_values_and_gradients():
  x = jnp.array([[3.0, 4.0]])
  # The mean square is 12.5, so the outputs are 3 / sqrt(13), 4 / sqrt(13).
  np.testing.assert_allclose(model_lib.rms_normalize(x, eps=0.5),
                             [[3 / math.sqrt(13), 4 / math.sqrt(13)]],
                             rtol=1e-6)
  assert model_lib.rms_normalize(x.astype(jnp.bfloat16),
                                 eps=0.5).dtype == jnp.float32
  check_grads(jax.jit(lambda y: model_lib.rms_normalize(y, eps=1e-5)),
              (jnp.array([[0.5, -1.0, 2.0]]),), order=2)


def test_attention_mask_values():
  segments = jnp.array([[1, 1, 2, 0], [1, 1, 2, 0]])
  mask = model_lib.attention_mask(segments, jnp.array([False, True]))
  assert mask.shape == (2, 1, 4, 4)
  causal = np.array([
      [1, 0, 0, 0],
      [1, 1, 0, 0],
      [0, 0, 1, 0],
      [0, 0, 0, 0],
  ], bool)
  bidirectional = np.array([
      [1, 1, 0, 0],
      [1, 1, 0, 0],
      [0, 0, 1, 0],
      [0, 0, 0, 0],
  ], bool)
  np.testing.assert_array_equal(mask[0, 0], causal)
  np.testing.assert_array_equal(mask[1, 0], bidirectional)


# ---------------------------------------------------------------------------
# The model against the reference.


@pytest.mark.parametrize("causal", [True, False])
def test_forward_matches_numpy_llama(tiny, causal):
  model, params = tiny
  ids, segments, positions = _inputs()
  out = _forward(model, params, ids, segments, positions,
                 np.array([not causal, not causal]))
  for row in range(2):
    hidden, rtd, sop = _np_llama(params, TINY, ids[row], positions[row],
                                 causal)
    np.testing.assert_allclose(out["hidden"][row], hidden, atol=1e-5)
    np.testing.assert_allclose(out["rtd_logits"][row], rtd, atol=1e-5)
    np.testing.assert_allclose(out["sop_logits"][row], sop, atol=1e-5)


def test_init_creates_expected_params():
  config = dataclasses.replace(TINY, num_layers=1)
  model = model_lib.Transformer(config)
  ids, segments, positions = _inputs()
  variables = jax.jit(
      lambda rng: model.init(rng, ids, segment_ids=segments,
                             positions=positions,
                             bidirectional=np.array([False, True])))(
                                 jax.random.key(0))
  boxed = variables["params"]
  wq = boxed["decoder"]["layers"]["attention"]["wq"]
  assert wq.names == ("layers", "embed", "heads", "head_dim")
  assert wq.value.shape == (1, 16, 4, 6)
  assert boxed["embed"]["embedding"].names == ("vocab", "embed")
  assert boxed["unembed"]["kernel"].names == ("embed", "vocab")
  params = nn.unbox(boxed)
  np.testing.assert_array_equal(params["final_norm"]["scale"], np.ones(16))
  np.testing.assert_array_equal(params["rtd_head"]["bias"], np.zeros(1))
  # Embedding: normal with stddev 0.02. Kernels: fan-in scaled, so the
  # stddev of wq is 1 / sqrt(embed_dim) = 0.25.
  assert 0.015 < float(np.std(params["embed"]["embedding"])) < 0.025
  assert 0.2 < float(np.std(wq.value)) < 0.3


def test_output_shapes_and_dtypes(tiny):
  model, params = tiny
  ids, segments, positions = _inputs()
  out = _forward(model, params, ids, segments, positions,
                 np.array([False, True]))
  assert out["hidden"].shape == (2, LENGTH, TINY.embed_dim)
  assert out["normed"].dtype == jnp.float32
  assert out["rtd_logits"].shape == (2, LENGTH)
  assert out["rtd_logits"].dtype == jnp.float32
  assert out["sop_logits"].shape == (2, TINY.sop_classes)
  assert out["sop_logits"].dtype == jnp.float32


def test_hidden_equals_normed_times_scale(tiny):
  model, params = tiny
  ids, segments, positions = _inputs()
  out = _forward(model, params, ids, segments, positions,
                 np.array([False, True]))
  scale = params["final_norm"]["scale"]
  np.testing.assert_array_equal(out["hidden"], out["normed"] * scale)


def test_unscanned_layers_match_scanned(tiny):
  model, params = tiny
  unscanned_model = model_lib.Transformer(
      dataclasses.replace(TINY, scan_layers=False))
  unscanned = dict(params)
  unscanned["decoder"] = {
      f"layers_{index}": _np_layer(params, index)
      for index in range(TINY.num_layers)}
  ids, segments, positions = _inputs()
  bidirectional = np.array([False, True])
  expected = _forward(model, params, ids, segments, positions, bidirectional)
  out = _forward(unscanned_model, unscanned, ids, segments, positions,
                 bidirectional)
  np.testing.assert_allclose(out["hidden"], expected["hidden"], atol=1e-5)


def _padded_batch():
  """Returns inputs with trailing padding and an all-padding row."""
  ids, segments, positions = _inputs(batch=3)
  segments[0, 6:] = 0
  positions[0, 6:] = 0
  segments[2] = 0
  positions[2] = 0
  bidirectional = np.array([False, True, True])
  return ids, segments, positions, bidirectional


def _sum_loss(model, batch, params):
  """Sums every output over real tokens, as the training losses do."""
  ids, segments, positions, bidirectional = batch
  out = _forward(model, params, ids, segments, positions, bidirectional)
  real = jnp.asarray(segments != 0, jnp.float32)
  return (jnp.sum(out["hidden"] ** 2 * real[..., None])
          + jnp.sum(out["rtd_logits"] * real) + jnp.sum(out["sop_logits"]))


@pytest.fixture(scope="module")
def padded_gradients(tiny):
  """Returns `{remat_policy: (loss, grads)}` on `_padded_batch()`."""
  _, params = tiny
  results = {}
  for policy in ("none", "full"):
    model = model_lib.Transformer(
        dataclasses.replace(TINY, remat_policy=policy))
    loss = functools.partial(_sum_loss, model, _padded_batch())
    results[policy] = jax.jit(jax.value_and_grad(loss))(params)
  return results


def test_remat_keeps_values_and_gradients(padded_gradients):
  expected_value, expected_grads = padded_gradients["none"]
  value, grads = padded_gradients["full"]
  assert float(value) == pytest.approx(float(expected_value), rel=1e-6)
  leaves = jax.tree_util.tree_leaves(grads)
  for (path, expected), leaf in zip(
      jax.tree_util.tree_leaves_with_path(expected_grads), leaves):
    np.testing.assert_allclose(leaf, expected, rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def _remat_policies(jaxpr):
  """Returns the `policy` of every remat equation, nested ones included."""
  policies = []
  for equation in jaxpr.eqns:
    if equation.primitive.name in ("remat2", "checkpoint"):
      policies.append(equation.params["policy"])
    for value in equation.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        policies.extend(_remat_policies(inner))
  return policies


@pytest.mark.parametrize("policy, expected", [
    ("none", []),
    ("full", [jax.checkpoint_policies.nothing_saveable]),
    ("dots", [jax.checkpoint_policies.dots_with_no_batch_dims_saveable]),
])
def test_remat_policy_wraps_blocks(tiny, policy, expected):
  _, params = tiny
  model = model_lib.Transformer(
      dataclasses.replace(TINY, remat_policy=policy))
  loss = functools.partial(_sum_loss, model, _padded_batch())
  assert _remat_policies(jax.make_jaxpr(loss)(params).jaxpr) == expected


def test_gqa_equals_mha_with_repeated_kv(tiny):
  model, params = tiny
  group = TINY.num_heads // TINY.num_kv_heads
  mha_model = model_lib.Transformer(
      dataclasses.replace(TINY, num_kv_heads=TINY.num_heads))
  mha = jax.tree_util.tree_map(lambda p: p, params)
  attention = dict(mha["decoder"]["layers"]["attention"])
  # wk, wv: [layers, embed, kv_heads, head_dim]. Head h reads kv h // group.
  attention["wk"] = jnp.repeat(attention["wk"], group, axis=2)
  attention["wv"] = jnp.repeat(attention["wv"], group, axis=2)
  mha["decoder"] = {"layers": dict(mha["decoder"]["layers"],
                                   attention=attention)}
  ids, segments, positions = _inputs()
  bidirectional = np.array([False, True])
  expected = _forward(model, params, ids, segments, positions, bidirectional)
  out = _forward(mha_model, mha, ids, segments, positions, bidirectional)
  # The grouped and repeated layouts run different float32 matmul kernels,
  # which differ by about 1e-6 on hidden values near 1.
  np.testing.assert_allclose(out["hidden"], expected["hidden"], rtol=1e-5,
                             atol=1e-5)


# ---------------------------------------------------------------------------
# Masking invariances.


def test_causal_rows_ignore_later_tokens(tiny):
  model, params = tiny
  ids, segments, positions = _inputs()
  changed = ids.copy()
  changed[:, 8] = (changed[:, 8] + 1) % VOCAB
  bidirectional = np.array([False, True])
  before = _forward(model, params, ids, segments, positions, bidirectional)
  after = _forward(model, params, changed, segments, positions, bidirectional)
  # Causal row 0: positions before 8 are unchanged, position 8 changes.
  np.testing.assert_array_equal(after["hidden"][0, :8], before["hidden"][0, :8])
  assert not np.allclose(after["hidden"][0, 8], before["hidden"][0, 8])
  # Bidirectional row 1: earlier positions see the change.
  assert not np.allclose(after["hidden"][1, :8], before["hidden"][1, :8])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_documents_match_separate(tiny, bidirectional):
  model, params = tiny
  rng = np.random.default_rng(7)
  first = rng.integers(0, VOCAB, size=5).astype(np.int32)
  second = rng.integers(0, VOCAB, size=7).astype(np.int32)
  padding = 4
  ids = np.concatenate([first, second, np.zeros(padding, np.int32)])[None]
  segments = np.array([[1] * 5 + [2] * 7 + [0] * padding], np.int32)
  positions = np.array([list(range(5)) + list(range(7)) + [0] * padding],
                       np.int32)
  flags = np.array([bidirectional])
  packed = _forward(model, params, ids, segments, positions, flags)["hidden"]
  for document, start in ((first, 0), (second, 5)):
    n = len(document)
    alone = _forward(model, params, document[None], np.ones((1, n), np.int32),
                     np.arange(n, dtype=np.int32)[None], flags)["hidden"]
    np.testing.assert_allclose(packed[0, start:start + n], alone[0],
                               atol=1e-5)


def test_padding_rows_are_finite(tiny, padded_gradients):
  model, params = tiny
  out = _forward(model, params, *_padded_batch())
  for name, value in out.items():
    assert np.all(np.isfinite(value)), name
  _, grads = padded_gradients["none"]
  for path, value in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(value)), jax.tree_util.keystr(path)


def test_position_offset_leaves_hidden_unchanged(tiny):
  model, params = tiny
  ids, segments, positions = _inputs()
  bidirectional = np.array([False, True])
  expected = _forward(model, params, ids, segments, positions, bidirectional)
  shifted = _forward(model, params, ids, segments, positions + 9,
                     bidirectional)
  np.testing.assert_allclose(shifted["hidden"], expected["hidden"],
                             atol=1e-4)


def test_padding_tokens_do_not_leak(tiny):
  model, params = tiny
  ids, segments, positions = _inputs()
  segments[:, 8:] = 0
  positions[:, 8:] = 0
  flags = np.array([False, True])
  changed = ids.copy()
  changed[:, 8:] = (changed[:, 8:] + 1) % VOCAB
  before = _forward(model, params, ids, segments, positions, flags)
  after = _forward(model, params, changed, segments, positions, flags)
  # The padding states themselves change with the padding ids ...
  assert not np.allclose(after["hidden"][:, 8:], before["hidden"][:, 8:])
  # ... but neither real tokens nor the sop pooling see them.
  np.testing.assert_array_equal(after["hidden"][:, :8],
                                before["hidden"][:, :8])
  np.testing.assert_allclose(after["sop_logits"], before["sop_logits"],
                             atol=1e-6)


# ---------------------------------------------------------------------------
# Gradients, tracing, dtypes, inputs.


def test_forward_gradients_match_finite_differences(tiny):
  model, params = tiny
  ids, segments, positions = _inputs(batch=1, length=5)
  rng = np.random.default_rng(5)
  weights = jnp.asarray(rng.normal(size=(1, 5, TINY.embed_dim)), jnp.float32)

  def project(wq):
    layers = dict(params["decoder"]["layers"])
    layers["attention"] = dict(layers["attention"], wq=wq)
    p = dict(params, decoder={"layers": layers})
    out = _forward(model, p, ids, segments, positions, np.array([False]))
    return jnp.sum(out["hidden"] * weights)

  wq = params["decoder"]["layers"]["attention"]["wq"]
  # Central differences with step 1e-3 agree to about 1e-4 relative here in
  # float32. Larger steps add curvature error, smaller ones rounding error.
  check_grads(jax.jit(project), (wq,), order=1, modes=("rev",), eps=1e-3,
              atol=5e-3, rtol=5e-3)


def test_jitted_forward_traces_once(tiny):
  model, params = tiny
  traces = []

  @jax.jit
  def forward(p, ids, segments, positions, bidirectional):
    traces.append(None)
    return model.apply({"params": p}, ids, segment_ids=segments,
                       positions=positions, bidirectional=bidirectional)

  ids, segments, positions = _inputs()
  forward(params, ids, segments, positions, np.array([False, True]))
  forward(params, (ids + 1) % VOCAB, segments, positions,
          np.array([True, False]))
  assert len(traces) == 1


def test_bfloat16_compute(tiny):
  _, params = tiny
  config = dataclasses.replace(TINY, dtype="bfloat16")
  model = model_lib.Transformer(config)
  ids, segments, positions = _inputs()
  bidirectional = np.array([False, True])
  out = _forward(model, params, ids, segments, positions, bidirectional)
  reference = _forward(model_lib.Transformer(TINY), params, ids, segments,
                       positions, bidirectional)
  assert out["hidden"].dtype == jnp.bfloat16
  assert out["normed"].dtype == jnp.float32
  assert out["rtd_logits"].dtype == jnp.float32
  scale = params["final_norm"]["scale"]
  np.testing.assert_array_equal(
      out["hidden"], (out["normed"] * scale).astype(jnp.bfloat16))
  # bfloat16 keeps 8 bits of mantissa, so expect about 1% relative error.
  error = np.linalg.norm(out["hidden"].astype(jnp.float32)
                         - reference["hidden"])
  assert error / np.linalg.norm(reference["hidden"]) < 0.03


def test_invalid_inputs_raise(tiny):
  model, params = tiny
  ids, segments, positions = _inputs()
  with pytest.raises(ValueError, match="bidirectional has shape"):
    _forward(model, params, ids, segments, positions, np.array([True]))
  with pytest.raises(ValueError, match="positions has shape"):
    _forward(model, params, ids, segments, positions[:, :5],
             np.array([True, True]))
  with pytest.raises(ValueError, match="bidirectional has dtype"):
    _forward(model, params, ids, segments, positions, np.array([0, 1]))


# ---------------------------------------------------------------------------
# Unembedding and logits.


def test_logits_use_untied_unembedding(tiny):
  model, params = tiny
  ids, segments, positions = _inputs()
  out = _forward(model, params, ids, segments, positions,
                 np.array([False, True]))
  logits = _jitted_apply(model, model_lib.Transformer.logits)(
      params, out["hidden"])
  matrix = model_lib.unembedding_matrix(params, TINY)
  assert matrix.shape == (TINY.embed_dim, VOCAB)
  np.testing.assert_array_equal(matrix, params["unembed"]["kernel"])
  np.testing.assert_allclose(logits, np.einsum("ble,ev->blv", out["hidden"],
                                               matrix), atol=1e-5)


def test_tied_unembedding_is_transposed_embedding():
  config = dataclasses.replace(TINY, tie_embeddings=True)
  model, params = _init(config)
  assert "unembed" not in params
  matrix = model_lib.unembedding_matrix(params, config)
  np.testing.assert_array_equal(matrix, params["embed"]["embedding"].T)
  hidden = jnp.ones((1, 2, TINY.embed_dim))
  logits = _jitted_apply(model, model_lib.Transformer.logits)(params, hidden)
  np.testing.assert_allclose(
      logits[0, 0], params["embed"]["embedding"].sum(axis=1), rtol=1e-5)


# ---------------------------------------------------------------------------
# Generator.


@pytest.fixture(scope="module")
def with_generator():
  config = dataclasses.replace(TINY, generator_width_fraction=0.5)
  return config, *_init(config)


def test_generator_shares_embeddings(with_generator):
  config, _, params = with_generator
  generator = params["generator"]
  assert "embed" not in generator
  assert "unembed" not in generator
  generator_config = config.generator_config()
  assert generator["input_projection"].shape == (
      config.embed_dim, generator_config.embed_dim)
  assert generator["decoder"]["layers"]["attention"]["wq"].shape == (
      config.num_layers, generator_config.embed_dim,
      generator_config.num_heads, config.head_dim)


def test_generator_loss_trains_shared_tables(with_generator):
  _, model, params = with_generator
  ids, segments, positions = _inputs()

  def generator_loss(p):
    hidden = model.apply({"params": p}, ids, segment_ids=segments,
                         positions=positions,
                         method=model_lib.Transformer.generator_hidden)
    logits = model.apply({"params": p}, hidden,
                         method=model_lib.Transformer.logits)
    return -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(logits), ids[..., None], axis=-1))

  grads = jax.jit(jax.grad(generator_loss))(params)
  assert np.any(grads["embed"]["embedding"] != 0)
  assert np.any(grads["unembed"]["kernel"] != 0)
  assert np.any(grads["generator"]["input_projection"] != 0)
  assert np.all(grads["rtd_head"]["kernel"] == 0)
  assert np.all(grads["decoder"]["layers"]["attention"]["wq"] == 0)


def test_generator_attends_bidirectionally(with_generator):
  _, model, params = with_generator
  ids, segments, positions = _inputs()
  changed = ids.copy()
  changed[:, -1] = (changed[:, -1] + 1) % VOCAB

  def run(token_ids):
    return _jitted_apply(model, model_lib.Transformer.generator_hidden)(
        params, token_ids, segment_ids=segments, positions=positions)

  before, after = run(ids), run(changed)
  assert before.shape == (2, LENGTH, TINY.embed_dim)
  assert not np.allclose(before[:, 0], after[:, 0])


def test_generator_hidden_without_generator_raises(tiny):
  model, params = tiny
  ids, segments, positions = _inputs()
  with pytest.raises(ValueError, match="has no generator"):
    model.apply({"params": params}, ids, segment_ids=segments,
                positions=positions,
                method=model_lib.Transformer.generator_hidden)
