r"""Stage 2: all four objectives.

Started from stage 1's parameters in the three-stage sequence:

  python launch/train.py --config=configs/stage2.py \
      --config.init_from=runs/stage1

On its own (random initialisation) it is the main job:

  python launch/train.py --config=configs/stage2.py

Only what differs from configs/base.py is set here.
"""

from mtl_lm import configs


def get_config():
  """Returns the stage-2 configuration."""
  config = configs.load_sibling(__file__, "base").get_config()
  # rtd and sop join; lm keeps the largest share because next-token
  # prediction stays the model's main use.
  config.data.task_rates.lm = 0.4
  config.data.task_rates.mlm = 0.2
  config.data.task_rates.rtd = 0.2
  config.data.task_rates.sop = 0.2
  # The new tasks are ramped in, so their untrained heads' first gradients
  # do not disturb the representation that stage 1 built: weight 0 at the
  # start, 1 after 100 steps.
  config.weighting.name = "scheduled"
  for task in ("rtd", "sop"):
    config.weighting.schedules[task] = {
        "kind": "linear", "init": 0.0, "end": 1.0, "begin": 0, "steps": 100}
  return config
