r"""Stage 1: next-token prediction and masked LM from scratch.

  python launch/train.py --config=configs/stage1.py

Only what differs from configs/base.py is set here.
"""

from mtl_lm import configs


def get_config():
  """Returns the stage-1 configuration."""
  config = configs.load_sibling(__file__, "base").get_config()
  # Both token-level objectives from the start: lm teaches the causal decoder
  # its main job, mlm gives the same weights a bidirectional view of text.
  config.data.task_rates.lm = 0.5
  config.data.task_rates.mlm = 0.5
  return config
