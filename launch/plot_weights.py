r"""Trains stage 2 once per weighting strategy and plots the task weights.

  python launch/plot_weights.py --config=configs/stage2.py \
      --config.data.train_files=corpus.txt --config.train.steps=200 \
      --workdir=runs/weights --output=docs/weights.png

Each strategy trains in `WORKDIR/<strategy>` (rerunning resumes or skips
finished runs); the figure has one panel per strategy with `weight/<task>`
from metrics.jsonl over the steps. Needs matplotlib (`pip install -e
'.[plots]'`).
"""

import json
import logging as logging_std
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mtl_lm import train
from mtl_lm import weighting

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/stage2.py.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/weights",
                               "Folder with one run per strategy.")
_OUTPUT = flags.DEFINE_string("output", "docs/weights.png", "PNG to write.")
_STRATEGIES = flags.DEFINE_list("strategies", list(weighting.STRATEGY_NAMES),
                                "Strategies to train and plot.")
flags.mark_flags_as_required(["config"])


def read_weights(workdir: str) -> tuple[list[int], dict[str, list[float]]]:
  """Returns the logged steps and `weight/<task>` series of one run."""
  steps = []
  weights = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      steps.append(record["step"])
      for name, value in record.items():
        if name.startswith("weight/"):
          weights.setdefault(name.split("/", 1)[1], []).append(value)
  return steps, weights


def plot(runs: dict[str, tuple[list[int], dict[str, list[float]]]],
         output: str, *, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  columns = 4
  rows = -(-len(runs) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows),
                              sharex=True, squeeze=False)
  for axis, (name, (steps, weights)) in zip(axes.flat, runs.items()):
    for task, values in sorted(weights.items()):
      axis.plot(steps, values, label=task)
    axis.set_title(name)
    axis.set_xlabel("step")
    axis.set_ylabel("weight")
    axis.grid(alpha=0.3)
  for axis in list(axes.flat)[len(runs):]:
    axis.axis("off")
  axes.flat[0].legend()
  figure.suptitle(title)
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  figure.savefig(output, dpi=100)
  logging.info("Wrote %s.", output)


def main(argv):
  del argv
  logging.get_absl_handler().setLevel(logging_std.INFO)
  runs = {}
  for name in _STRATEGIES.value:
    config = _CONFIG.value.copy_and_resolve_references()
    config.weighting.name = name
    workdir = os.path.join(_WORKDIR.value, name)
    logging.info("Training with weighting %s in %s.", name, workdir)
    train.train_and_evaluate(config, workdir)
    runs[name] = read_weights(workdir)
  config = _CONFIG.value
  plot(runs, _OUTPUT.value,
       title=(f"Task weights, {os.path.basename(config.data.train_files)}, "
              f"{config.train.steps} steps"))


if __name__ == "__main__":
  app.run(main)
