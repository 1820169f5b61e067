"""Tests of the train step and the training loop on a tiny model."""

import filecmp
import functools
import json
import math
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from mtl_lm import checkpointing
from mtl_lm import losses
from mtl_lm import model as model_lib
from mtl_lm import objectives
from mtl_lm import sharding
from mtl_lm import tasks
from mtl_lm import train
from mtl_lm import weighting
import train_fixtures

_VOCAB = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  folder = tmp_path_factory.mktemp("corpus")
  return train_fixtures.write_corpus(str(folder / "corpus.txt"))


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _final_params(workdir):
  state, step = checkpointing.read_state(workdir)
  return step, state["params"]["model"]


def _single_device_trainer(config):
  mesh = sharding.make_mesh(config.mesh)
  return train.Trainer(config, vocab_size=_VOCAB, mesh=mesh)


def test_resume_matches_uninterrupted_run(corpus, tmp_path):
  config = train_fixtures.tiny_config(corpus, steps=6)
  straight = tmp_path / "straight"
  train.train_and_evaluate(config, str(straight))

  # An interrupted run: the same workdir as it was after step 4's checkpoint.
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  metrics_lines = (resumed / "metrics.jsonl").read_text().splitlines()
  (resumed / "metrics.jsonl").write_text("\n".join(metrics_lines[:2]) + "\n")
  train.train_and_evaluate(config, str(resumed))

  straight_step, straight_params = _final_params(str(straight))
  resumed_step, resumed_params = _final_params(str(resumed))
  assert straight_step == 6
  assert resumed_step == 6
  jax.tree.map(np.testing.assert_array_equal, straight_params, resumed_params)
  # The same batches after the restart: the step-6 metrics agree exactly.
  straight_last = _read_metrics(str(straight))[-1]
  resumed_last = _read_metrics(str(resumed))[-1]
  assert resumed_last["step"] == 6
  for name, value in straight_last.items():
    if name != "tokens_per_second":
      assert resumed_last[name] == value, name


def test_metrics_have_every_task_field(corpus, tmp_path):
  config = train_fixtures.tiny_config(corpus, steps=2)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)

  record = _read_metrics(workdir)[-1]
  assert record["step"] == 2
  for name in ("loss/total", "learning_rate", "tokens_per_second"):
    assert math.isfinite(record[name]), name
  for task in tasks.TASK_NAMES:
    for prefix in ("loss", "weight", "accuracy"):
      assert math.isfinite(record[f"{prefix}/{task}"]), f"{prefix}/{task}"
  assert record["tokens_per_second"] > 0


def test_resume_with_changed_data_warns(corpus, tmp_path, caplog):
  config = train_fixtures.tiny_config(corpus, steps=2)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["data"]["train_files"] == corpus

  moved = shutil.copy(corpus, tmp_path / "moved.txt")
  config.data.train_files = str(moved)
  config.train.steps = 4
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(config, workdir)
  warnings = [record.getMessage() for record in caplog.records
              if "data settings differ" in record.getMessage()]
  assert len(warnings) == 1
  assert f"config.data.train_files: {corpus!r} -> {str(moved)!r}" in (
      warnings[0])
  assert "seq_len" not in warnings[0]
  assert _final_params(workdir)[0] == 4


def test_rerun_after_last_step_does_nothing(corpus, tmp_path):
  config = train_fixtures.tiny_config(corpus, steps=2)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  lines_before = len(_read_metrics(workdir))

  assert train.train_and_evaluate(config, workdir) == {}
  assert len(_read_metrics(workdir)) == lines_before


def test_init_from_copies_params_and_tokenizer(corpus, tmp_path):
  stage1 = str(tmp_path / "stage1")
  config = train_fixtures.tiny_config(corpus, stage="stage1", steps=2)
  train.train_and_evaluate(config, stage1)

  stage2 = str(tmp_path / "stage2")
  config = train_fixtures.tiny_config(corpus, stage="stage2", steps=2)
  config.init_from = stage1
  # With a zero learning rate (which also scales weight decay) the second
  # stage's parameters stay those it started from.
  config.optimizer.learning_rate = 0.0
  train.train_and_evaluate(config, stage2)

  assert filecmp.cmp(os.path.join(stage1, "tokenizer.model"),
                     os.path.join(stage2, "tokenizer.model"), shallow=False)
  _, stage1_params = _final_params(stage1)
  _, stage2_params = _final_params(stage2)
  jax.tree.map(np.testing.assert_array_equal, stage1_params, stage2_params)


def test_init_from_without_checkpoint_raises(corpus, tmp_path):
  config = train_fixtures.tiny_config(corpus)
  empty = tmp_path / "empty_run"
  empty.mkdir()
  config.init_from = str(empty)
  with pytest.raises(ValueError, match="has no checkpoints folder"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize("field, value, message", [
    ("data.task_rates.lm", 0.0, "nothing to train"),
    ("data.sop_num_segments", 7, "k must be 2 to 5"),
    ("rtd.replacements", "bert", "use 'random', 'unigram' or 'generator'"),
    ("init_from", "/no/such/run", "is not a directory"),
    ("mesh.data", 2, "mesh"),
    ("data.train_files", "/no/such/*.txt", "/no/such"),
    ("train.gradient_accumulation_steps", 0, "positive integer"),
    ("train.gradient_accumulation_steps", 3, "cannot be split into"),
])
def test_invalid_setting_raises_before_training(corpus, tmp_path, field,
                                                value, message):
  config = train_fixtures.tiny_config(corpus, stage="base")
  section, _, name = field.rpartition(".")
  target = config
  for part in filter(None, section.split(".")):
    target = target[part]
  target[name] = value
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(workdir))
  assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize("name", weighting.STRATEGY_NAMES)
def test_weighting_strategy_runs_in_jitted_step(corpus, name):
  config = train_fixtures.tiny_config(corpus)
  config.weighting.name = name
  trainer = _single_device_trainer(config)
  state = trainer.init(seed=0)

  for seed in range(3):
    batch = train_fixtures.synthetic_batch(config, vocab_size=_VOCAB,
                                           seed=seed)
    state, metrics = trainer.step(state, batch)

  assert int(state.step) == 3
  for task in tasks.TASK_NAMES:
    weight = float(metrics[f"weight/{task}"])
    assert math.isfinite(weight), (task, weight)
    assert weight >= 0, (task, weight)
  assert math.isfinite(float(metrics["loss/total"]))
  # Three steps, one compilation.
  assert trainer._step._cache_size() == 1  # pylint: disable=protected-access


def test_gradnorm_measures_task_gradient_norms(corpus):
  config = train_fixtures.tiny_config(corpus)
  config.weighting.name = "gradnorm"
  trainer = _single_device_trainer(config)
  state = trainer.init(seed=0)
  params = jax.device_get(state.params)
  batch = train_fixtures.synthetic_batch(config, vocab_size=_VOCAB)

  # Reference: the gradient of each task's mean loss w.r.t. the final
  # RMSNorm scale, one task at a time.
  def task_loss(scale, task):
    model_params = dict(params["model"], final_norm={"scale": scale})
    sums, _, _ = train.compute_losses(
        {**params, "model": model_params}, batch, state.rng,
        module=trainer.module, config=config, task_names=(task,))
    return losses.mean(sums[task])

  scale = params["model"]["final_norm"]["scale"]
  expected = {task: float(np.linalg.norm(jax.grad(task_loss)(scale, task)))
              for task in tasks.TASK_NAMES}

  new_state, _ = trainer.step(state, batch)
  for task in tasks.TASK_NAMES:
    assert expected[task] > 0, task
    np.testing.assert_allclose(float(new_state.task_grad_norms[task]),
                               expected[task], rtol=1e-4, err_msg=task)


def test_step_loss_matches_task_means(corpus):
  # loss/total is the weighted sum of the per-task means (static weights).
  config = train_fixtures.tiny_config(corpus)
  config.weighting.name = "static"
  config.weighting.weights.lm = 2.0
  config.weighting.weights.sop = 0.5
  trainer = _single_device_trainer(config)
  state = trainer.init(seed=0)
  batch = train_fixtures.synthetic_batch(config, vocab_size=_VOCAB)
  _, metrics = trainer.step(state, batch)

  expected = 0.0
  for task in tasks.TASK_NAMES:
    total, count = (float(value) for value in metrics[f"loss/{task}"])
    assert count > 0, task
    expected += float(metrics[f"weight/{task}"]) * total / count
  np.testing.assert_allclose(float(metrics["loss/total"]), expected,
                             rtol=1e-5)


def _sgd_steps(config, num_steps):
  """Runs `num_steps` jitted train steps with plain SGD; returns the results.

  With SGD the parameter change is the gradient itself, while Adam would
  amplify rounding differences in near-zero gradients.
  """
  trainer = _single_device_trainer(config)
  optimizer = optax.sgd(0.1)
  state = trainer.init(seed=0)
  state = state.replace(opt_state=optimizer.init(state.params))
  step = jax.jit(functools.partial(
      train.train_step, module=trainer.module, optimizer=optimizer,
      strategy=trainer.strategy, config=config,
      task_names=trainer.task_names,
      learning_rate_fn=trainer.learning_rate_fn))
  step_metrics = []
  for seed in range(num_steps):
    batch = train_fixtures.synthetic_batch(config, vocab_size=_VOCAB,
                                           seed=seed)
    state, metrics = step(state, batch)
    step_metrics.append(jax.device_get(metrics))
  return jax.device_get(state), step_metrics


@pytest.mark.parametrize("name", ["static", "uncertainty", "famo",
                                  "gradnorm"])
def test_gradient_accumulation_matches_whole_batch(corpus, name):
  # Four micro-batches of 2 rows against one batch of 8, two steps each, so
  # that the weighting state carried into step two is compared as well.
  # uncertainty has trainable weighting parameters, famo weights from this
  # step's losses and gradnorm per-task gradient taps.
  runs = {}
  for micro_batches in (1, 4):
    config = train_fixtures.tiny_config(corpus)
    config.weighting.name = name
    config.train.gradient_accumulation_steps = micro_batches
    runs[micro_batches] = _sgd_steps(config, num_steps=2)

  (whole_state, whole_metrics), (state, metrics) = runs[1], runs[4]
  for step, (got, expected) in enumerate(zip(metrics, whole_metrics)):
    for metric, value in expected.items():
      np.testing.assert_allclose(got[metric], value, rtol=2e-5, atol=1e-6,
                                 err_msg=f"step {step}: {metric}")
  whole_params = jax.tree_util.tree_leaves_with_path(whole_state.params)
  for (path, expected), got in zip(whole_params,
                                   jax.tree.leaves(state.params)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  for task in tasks.TASK_NAMES:
    np.testing.assert_allclose(state.task_grad_norms[task],
                               whole_state.task_grad_norms[task], rtol=2e-5,
                               err_msg=task)


def test_gradient_accumulation_trains_the_generator(corpus):
  config = train_fixtures.tiny_config(corpus)
  config.rtd.replacements = "generator"
  config.train.gradient_accumulation_steps = 2
  trainer = _single_device_trainer(config)
  state = trainer.init(seed=0)
  batch = train_fixtures.synthetic_batch(config, vocab_size=_VOCAB)
  _, metrics = trainer.step(state, batch)

  total, count = (float(value) for value in metrics["loss/generator"])
  rtd_rows = batch["task_id"] == tasks.TASK_IDS[tasks.RTD]
  assert count == np.sum((batch["input_ids"] == 4) & rtd_rows[:, None])
  assert math.isfinite(total)
  assert total > 0


def test_generator_replacements_train_the_generator(corpus):
  config = train_fixtures.tiny_config(corpus)
  config.rtd.replacements = "generator"
  # Static weights and no warmup, so the first step already moves weights.
  config.weighting.name = "static"
  config.optimizer.warmup_steps = 0
  trainer = _single_device_trainer(config)
  state = trainer.init(seed=0)
  assert "generator" in state.params["model"]
  # The step donates its input state, so keep a host copy.
  before = jax.tree.leaves(jax.device_get(state.params["model"]["generator"]))
  batch = train_fixtures.synthetic_batch(config, vocab_size=_VOCAB)
  new_state, metrics = trainer.step(state, batch)

  total, count = (float(value) for value in metrics["loss/generator"])
  rtd_rows = batch["task_id"] == tasks.TASK_IDS[tasks.RTD]
  masked = np.sum((batch["input_ids"] == 4) & rtd_rows[:, None])
  assert count == masked
  assert math.isfinite(total)
  # The generator's parameters moved, so its loss reached them.
  after = jax.tree.leaves(new_state.params["model"]["generator"])
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_lm_loss_falls_on_small_corpus(corpus, tmp_path):
  config = train_fixtures.tiny_config(corpus, stage="base", steps=30)
  config.train.log_every = 5
  config.train.checkpoint_every = 30
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)

  records = _read_metrics(workdir)
  first, last = records[0]["loss/lm"], records[-1]["loss/lm"]
  assert last < 0.8 * first, (first, last)


def test_token_objectives_match_plain_cross_entropy(corpus):
  # One fused pass for lm and mlm, with per-position label smoothing on the
  # lm rows only, equals the plain cross-entropy on full logits.
  config = train_fixtures.tiny_config(corpus)
  trainer = _single_device_trainer(config)
  state = trainer.init(seed=0)
  params = jax.device_get(state.params["model"])
  batch = train_fixtures.synthetic_batch(config, vocab_size=_VOCAB)
  outputs = trainer.module.apply(
      {"params": params}, batch["input_ids"], segment_ids=batch["segment_ids"],
      positions=batch["positions"],
      bidirectional=batch["task_id"] != tasks.TASK_IDS[tasks.LM])
  unembedding = model_lib.unembedding_matrix(params, trainer.module.config)
  task_losses, _ = objectives.token_objectives(
      outputs, unembedding, batch, active_tasks=tasks.TASK_NAMES,
      label_smoothing=0.1, z_loss=1e-4, chunk_size=128)

  logits = np.asarray(outputs["hidden"], np.float64) @ np.asarray(
      unembedding, np.float64)
  for task, smoothing in ((tasks.LM, 0.1), (tasks.MLM, 0.0)):
    plain = losses.token_cross_entropy(
        logits.astype(np.float32), batch["targets"],
        label_smoothing=smoothing, z_loss=1e-4)
    weights = objectives.token_weights(batch, task)
    expected = float(np.sum(np.asarray(plain) * weights) / np.sum(weights))
    np.testing.assert_allclose(float(losses.mean(task_losses[task])),
                               expected, rtol=1e-5, err_msg=task)
