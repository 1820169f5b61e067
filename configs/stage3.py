r"""Stage 3: a final mix, mostly next-token prediction, at a lower rate.

  python launch/train.py --config=configs/stage3.py \
      --config.init_from=runs/stage2

Only what differs from configs/base.py is set here.
"""

from mtl_lm import configs


def get_config():
  """Returns the stage-3 configuration."""
  config = configs.load_sibling(__file__, "base").get_config()
  # The auxiliary tasks stay present so their heads do not drift, but lm
  # dominates: the released model is a causal decoder.
  config.data.task_rates.lm = 0.7
  config.data.task_rates.mlm = 0.1
  config.data.task_rates.rtd = 0.1
  config.data.task_rates.sop = 0.1
  # Annealing: a lower peak rate and shorter warmup on weights that are
  # already trained.
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 10
  return config
