r"""Trains a model on the objectives of one stage config.

  python launch/train.py --config=configs/stage2.py
  python launch/train.py --config=configs/stage2.py --workdir=runs/my_run \
      --config.train.steps=1000 --config.data.train_files='corpus/*.txt'

Running the same command again resumes from the latest checkpoint in the
workdir. The workdir defaults to `runs/<config file stem>`.
"""

import logging as logging_std
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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-process training without a cluster "
    "scheduler that JAX detects; needs --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes, with --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, with --coordinator_address.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() with the settings JAX detects (Cloud "
    "TPU pods, SLURM, Open MPI).")
flags.mark_flags_as_required(["config"])


def initialize_distributed() -> None:
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise app.UsageError(
          "--coordinator_address needs --num_processes and --process_id.")
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def default_workdir(config_path: str) -> str:
  stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", stem)


class _QuietLibraries(logging_std.Filter):
  """Drops the per-save INFO chatter of Orbax; its warnings still show."""

  def filter(self, record):
    return (record.levelno >= logging_std.WARNING
            or "/orbax/" not in record.pathname)


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  initialize_distributed()
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  workdir = _WORKDIR.value or default_workdir(config_path)
  logging.info("JAX devices: %s; workdir: %s", jax.devices(), workdir)
  try:
    train.train_and_evaluate(_CONFIG.value, workdir)
  except (ValueError, FileNotFoundError, FloatingPointError) as error:
    # Invalid settings or input: a one-line message, not a traceback.
    logging.debug("Traceback of the error below:", exc_info=True)
    raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
  app.run(main)
