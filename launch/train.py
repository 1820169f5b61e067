r"""Trains a model on the objectives of one stage config.

  python launch/train.py --config=configs/stage2.py
  python launch/train.py --config=configs/stage2.py --workdir=runs/my_run \
      --config.train.steps=1000 --config.data.train_files='corpus/*.txt'

Running the same command again resumes from the latest checkpoint in the
workdir. The workdir defaults to `runs/<config file stem>`.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mtl_lm import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/stage2.py.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Folder for checkpoints, metrics.jsonl and the tokenizer; default "
    "runs/<config file stem>.")
flags.mark_flags_as_required(["config"])


def default_workdir(config_path: str) -> str:
  stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", stem)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or default_workdir(config_path)
  logging.info("JAX devices: %s; workdir: %s", jax.devices(), workdir)
  try:
    train.train_and_evaluate(_CONFIG.value, workdir)
  except (ValueError, FileNotFoundError, FloatingPointError) as error:
    # Invalid settings or input: a one-line message, not a traceback.
    logging.debug("Traceback of the error below:", exc_info=True)
    logging.error("%s", error)
    raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
  app.run(main)
