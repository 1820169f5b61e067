"""The fused losses inside `jax.shard_map` on 8 simulated CPU devices.

With `vocab_axis_name`, each device has a quarter of the vocabulary
columns and two devices split the batch. The values, gradients and argmax
must equal the plain loss on the whole logits, and the compiled function
must not gather the unembedding. The device count is fixed when JAX
starts, so the checks run in a subprocess and report JSON.
"""

import textwrap

import pytest

import train_fixtures

_SCRIPT = textwrap.dedent("""
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from mtl_lm import losses, objectives

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "vocab"))
    # 200 columns: 50 per device, one block of 32 and a remainder of 18.
    tokens, embed, vocab, chunk = 64, 16, 200, 32
    options = dict(label_smoothing=0.1, z_loss=1e-3)
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((tokens, embed)), jnp.float32)
    unembedding = jnp.asarray(rng.standard_normal((embed, vocab)),
                              jnp.float32)
    labels = jnp.asarray(rng.integers(0, vocab, tokens), jnp.int32)
    # A cotangent that differs per position.
    scale = jnp.linspace(0.5, 1.5, tokens)
    results = {}

    def max_difference(first, second):
      return float(np.max(np.abs(np.asarray(first, np.float64) -
                                 np.asarray(second, np.float64))))

    def vocab_parallel(function):
      return jax.shard_map(
          function, mesh=mesh,
          in_specs=(P("data"), P(None, "vocab"), P("data")),
          out_specs=P("data"))

    def sharded_loss(hidden, unembedding, labels):
      per_position, predictions = vocab_parallel(
          lambda h, w, y: losses.fused_token_cross_entropy_with_argmax(
              h, w, y, chunk_size=chunk, vocab_axis_name="vocab",
              **options))(hidden, unembedding, labels)
      return jnp.sum(per_position * scale), (per_position, predictions)

    def plain_loss(hidden, unembedding, labels):
      logits = hidden @ unembedding
      per_position = losses.token_cross_entropy(logits, labels, **options)
      return (jnp.sum(per_position * scale),
              (per_position, jnp.argmax(logits, axis=-1)))

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1),
                                                has_aux=True))
    (_, (loss, predictions)), grads = grad(sharded_loss)(
        hidden, unembedding, labels)
    (_, (plain, plain_predictions)), plain_grads = grad(plain_loss)(
        hidden, unembedding, labels)
    results["loss"] = max_difference(loss, plain)
    results["hidden_grad"] = max_difference(grads[0], plain_grads[0])
    results["unembedding_grad"] = max_difference(grads[1], plain_grads[1])
    results["argmax_equal"] = bool(np.all(predictions == plain_predictions))

    # Ties across devices: every column repeated on each of the four
    # shards, with small integers so that all logits are exact.
    small = jnp.asarray(rng.integers(-2, 3, (tokens, embed)), jnp.float32)
    quarter = jnp.asarray(rng.integers(-2, 3, (embed, vocab // 4)),
                          jnp.float32)
    tied = jnp.tile(quarter, (1, 4))
    _, (_, tied_predictions) = sharded_loss(small, tied, labels)
    results["tied_argmax"] = np.asarray(tied_predictions).tolist()
    results["tied_expected"] = np.asarray(
        jnp.argmax(small @ tied, axis=-1)).tolist()

    # The compiled gradient gathers no [embed, vocab] matrix.
    text = grad(sharded_loss).lower(hidden, unembedding,
                                    labels).compile().as_text()
    results["all_gathers"] = text.count("all-gather")

    # Masked LM under shard_map: a weighted mean over the selected rows.
    weights = jnp.asarray(rng.integers(0, 2, tokens), jnp.float32)

    def masked(hidden, unembedding, labels, weights):
      loss, _ = losses.fused_masked_lm_loss(
          hidden, unembedding, labels, weights, chunk_size=chunk,
          vocab_axis_name="vocab")
      return (jax.lax.psum(loss.total, "data"),
              jax.lax.psum(loss.count, "data"))

    total, count = jax.shard_map(
        masked, mesh=mesh,
        in_specs=(P("data"), P(None, "vocab"), P("data"), P("data")),
        out_specs=P())(hidden, unembedding, labels, weights)
    plain_masked = losses.masked_lm_loss(hidden @ unembedding, labels,
                                         weights)[0]
    results["masked_total"] = max_difference(total, plain_masked.total)
    results["masked_count"] = max_difference(count, plain_masked.count)

    # Only the batch split over devices: the unembedding gradient is summed
    # over the batch devices.
    def data_parallel(hidden, unembedding, labels):
      per_position = jax.shard_map(
          lambda h, w, y: losses.fused_token_cross_entropy(
              h, w, y, chunk_size=chunk, **options),
          mesh=mesh, in_specs=(P(("data", "vocab")), P(), P(("data", "vocab"))),
          out_specs=P(("data", "vocab")))(hidden, unembedding, labels)
      return jnp.sum(per_position * scale), (per_position, None)

    (_, (loss, _)), grads = grad(data_parallel)(hidden, unembedding, labels)
    results["data_parallel_loss"] = max_difference(loss, plain)
    results["data_parallel_grad"] = max(
        max_difference(grads[0], plain_grads[0]),
        max_difference(grads[1], plain_grads[1]))

    # Sampling from a sharply peaked distribution returns its mode, never a
    # special token, whichever device has the mode's column.
    peaked = 50.0 * unembedding
    logits = hidden @ peaked
    allowed = jnp.arange(vocab) >= 6
    mode = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)

    def sample(hidden, unembedding, labels, vocab_axis_name):
      del labels
      key = jax.random.fold_in(jax.random.PRNGKey(0),
                               jax.lax.axis_index("data"))
      return objectives.sample_tokens(
          hidden[None], unembedding, key, chunk_size=chunk,
          first_allowed_id=6, vocab_axis_name=vocab_axis_name)[0]

    sampled = vocab_parallel(
        lambda h, w, y: sample(h, w, y, "vocab"))(hidden, peaked, labels)
    results["samples_are_modes"] = bool(np.all(sampled == mode))
    results["mode_shards"] = sorted(set((np.asarray(mode) // 50).tolist()))

    # Over Explicit mesh axes the plain loss works on vocabulary-sharded
    # logits. The fused one raises an error that names shard_map, rather
    # than failing deep inside JAX.
    explicit = jax.make_mesh((2, 4), ("data", "vocab"))
    place = lambda array, *spec: jax.device_put(
        array, jax.sharding.NamedSharding(explicit, P(*spec)))
    explicit_logits = place(hidden @ unembedding, "data", "vocab")
    explicit_plain = jax.jit(
        lambda logits, labels: losses.token_cross_entropy(
            logits, labels, **options))(explicit_logits,
                                        place(labels, "data"))
    results["explicit_plain"] = max_difference(explicit_plain, plain)
    try:
      jax.jit(losses.fused_token_cross_entropy)(
          place(hidden, "data"), place(unembedding, None, "vocab"),
          place(labels, "data"))
      results["explicit_fused_error"] = ""
    except ValueError as error:
      results["explicit_fused_error"] = str(error)
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def results():
  return train_fixtures.run_on_devices(_SCRIPT, device_count=8)


def test_vocab_parallel_matches_plain_values_and_gradients(results):
  assert results["loss"] < 1e-5
  assert results["hidden_grad"] < 1e-5
  assert results["unembedding_grad"] < 1e-5
  assert results["argmax_equal"]


def test_vocab_parallel_argmax_ties_go_to_the_lowest_id(results):
  assert results["tied_argmax"] == results["tied_expected"]
  # Every tie is between the four copies of a column, and the first copy
  # lies on the first device.
  assert max(results["tied_argmax"]) < 50


def test_vocab_parallel_gathers_no_unembedding(results):
  assert results["all_gathers"] == 0


def test_vocab_parallel_masked_lm_matches_plain(results):
  assert results["masked_total"] < 1e-4
  assert results["masked_count"] == 0.0


def test_data_parallel_shard_map_sums_the_unembedding_gradient(results):
  assert results["data_parallel_loss"] < 1e-5
  assert results["data_parallel_grad"] < 1e-5


def test_vocab_parallel_sampling_finds_the_mode_on_any_device(results):
  assert results["samples_are_modes"]
  # The modes fall on several devices, so the cross-device choice is used.
  assert len(results["mode_shards"]) > 1


def test_explicit_axes_plain_works_and_fused_explains(results):
  assert results["explicit_plain"] < 1e-5
  assert "Explicit mesh axes" in results["explicit_fused_error"]
  assert "shard_map" in results["explicit_fused_error"]
