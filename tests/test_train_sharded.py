"""The sharded train step on 8 simulated CPU devices equals the 1-device one.

The 8-device run happens in a subprocess, because the device count is fixed
when JAX starts and other tests in this process use one device.
"""

import os
import textwrap

import numpy as np

import train_fixtures

_VOCAB = 300

# Runs one step of the tiny config on a mesh and prints its metrics and the
# sum of every updated parameter as JSON.
_STEP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests_dir!r})
    from mtl_lm import sharding, train
    import train_fixtures

    config = train_fixtures.tiny_config({corpus!r})
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = {mesh}
    config.weighting.name = {weighting!r}
    config.train.gradient_accumulation_steps = {accumulation}
    mesh = sharding.make_mesh(config.mesh)
    trainer = train.Trainer(config, vocab_size={vocab}, mesh=mesh)
    state = trainer.init(seed=0)
    for seed in range(2):
      batch = train_fixtures.synthetic_batch(config, vocab_size={vocab},
                                             seed=seed)
      state, metrics = trainer.step(state, batch)
    sums = [float(np.sum(np.asarray(leaf, np.float64)))
            for leaf in jax.tree.leaves(jax.device_get(state.params))]
    metrics = {{name: np.asarray(value, np.float64).tolist()
               for name, value in jax.device_get(metrics).items()}}
    print(json.dumps({{"metrics": metrics, "param_sums": sums,
                      "devices": jax.device_count()}}))
""")


def _run_step(corpus, *, mesh, weighting, device_count, accumulation=1):
  script = _STEP_SCRIPT.format(
      tests_dir=os.path.dirname(os.path.abspath(__file__)), corpus=corpus,
      mesh=mesh, weighting=weighting, vocab=_VOCAB,
      accumulation=accumulation)
  return train_fixtures.run_on_devices(script, device_count=device_count)


def test_sharded_step_matches_single_device(tmp_path):
  corpus = train_fixtures.write_corpus(str(tmp_path / "corpus.txt"))
  single = _run_step(corpus, mesh=(1, 1, 1), weighting="gradnorm",
                     device_count=1)
  sharded = _run_step(corpus, mesh=(2, 2, 2), weighting="gradnorm",
                      device_count=8)

  assert single["devices"] == 1
  assert sharded["devices"] == 8
  for name, value in single["metrics"].items():
    np.testing.assert_allclose(sharded["metrics"][name], value, rtol=2e-5,
                               atol=1e-6, err_msg=name)
  np.testing.assert_allclose(sharded["param_sums"], single["param_sums"],
                             rtol=2e-5, atol=1e-5)


def test_sharded_accumulated_step_matches_single_device(tmp_path):
  # Two micro-batches of 4 rows, each split over the 4 batch devices.
  corpus = train_fixtures.write_corpus(str(tmp_path / "corpus.txt"))
  single = _run_step(corpus, mesh=(1, 1, 1), weighting="famo",
                     device_count=1)
  sharded = _run_step(corpus, mesh=(2, 2, 2), weighting="famo",
                      device_count=8, accumulation=2)

  for name, value in single["metrics"].items():
    np.testing.assert_allclose(sharded["metrics"][name], value, rtol=2e-5,
                               atol=1e-6, err_msg=name)
  np.testing.assert_allclose(sharded["param_sums"], single["param_sums"],
                             rtol=2e-5, atol=1e-5)


# Compiles the step on a mesh with the vocabulary split four ways and prints
# the all-gathers whose result has a vocabulary-sized dimension, then runs it.
_VOCAB_PARALLEL_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import jax, numpy as np
    sys.path.insert(0, {tests_dir!r})
    from mtl_lm import sharding, train
    import train_fixtures

    config = train_fixtures.tiny_config({corpus!r})
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 1, 4
    config.rtd.replacements = {replacements!r}
    mesh = sharding.make_mesh(config.mesh)
    trainer = train.Trainer(config, vocab_size={vocab}, mesh=mesh)
    state = trainer.init(seed=0)
    batch = train_fixtures.synthetic_batch(config, vocab_size={vocab})
    with sharding.sharding_context(mesh):
      text = trainer._step.lower(state, batch).compile().as_text()
    # The result shape comes before "all-gather(", e.g. "f32[32,300]{{0,1}}".
    gathers = [line.strip() for line in text.splitlines()
               if "all-gather(" in line and re.search(
                   r"[\\[,]{vocab}[\\],]", line.split("all-gather(")[0])]
    state, metrics = trainer.step(state, batch)
    totals = {{name: float(np.asarray(value[0] if isinstance(value, tuple)
                                      else value))
               for name, value in jax.device_get(metrics).items()}}
    print(json.dumps({{"gathers": gathers, "metrics": totals}}))
""")


def test_vocab_parallel_step_never_gathers_the_unembedding(tmp_path):
  corpus = train_fixtures.write_corpus(str(tmp_path / "corpus.txt"))
  for replacements in ("random", "generator"):
    script = _VOCAB_PARALLEL_SCRIPT.format(
        tests_dir=os.path.dirname(os.path.abspath(__file__)), corpus=corpus,
        vocab=_VOCAB, replacements=replacements)
    report = train_fixtures.run_on_devices(script, device_count=8)
    assert report["gathers"] == [], replacements
    assert all(np.isfinite(value) for value in report["metrics"].values())
    if replacements == "generator":
      assert report["metrics"]["loss/generator"] > 0
