"""Orbax checkpoints of the train state and the data iterator.

A checkpoint directory `WORKDIR/checkpoints/<step>/` contains two items.
`state` is the whole `TrainState`: parameters, optimizer state, weighting
state and step. `data` is the Grain iterator state, one JSON file per
process. A resumed run therefore reads exactly the batches that the
uninterrupted run would have read.
"""

import os
from typing import Any

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

_STATE = "state"
_DATA = "data"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, max_to_keep: int,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """Creates the manager of `WORKDIR/checkpoints`."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=not read_only,
      read_only=read_only,
      # Saves overlap with the next training steps; `wait_until_finished`
      # runs before the process exits.
      enable_async_checkpointing=True,
  )
  return ocp.CheckpointManager(
      checkpoint_dir(workdir),
      options=options,
      item_handlers={
          _STATE: ocp.StandardCheckpointHandler(),
          _DATA: grain.checkpoint.CheckpointHandler(),
      },
  )


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_iterator: Any) -> None:
  """Saves `state` and the data iterator's position as checkpoint `step`."""
  manager.save(
      step,
      args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardSave(state),
          _DATA: grain.checkpoint.CheckpointSave(data_iterator),
      }),
      force=True,
  )
  logging.info("Saving checkpoint of step %d to %s.", step,
               manager.directory)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any) -> Any:
  """Restores checkpoint `step` into the shardings of `abstract_state`.

  The data iterator is restored in place; the state is returned.
  """
  restored = manager.restore(
      step,
      args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract_state),
          _DATA: grain.checkpoint.CheckpointRestore(data_iterator),
      }),
  )
  logging.info("Restored checkpoint of step %d from %s.", step,
               manager.directory)
  return restored[_STATE]


def read_state(workdir: str, step: int | None = None) -> tuple[Any, int]:
  """Reads a saved train state as host arrays, without a model or config.

  Args:
    workdir: the run's workdir.
    step: the checkpoint to read; None reads the latest.

  Returns:
    The state as nested dicts of numpy arrays, and its step.
  """
  manager = make_manager(workdir, max_to_keep=1, read_only=True)
  if step is None:
    step = manager.latest_step()
  if step is None:
    manager.close()
    raise ValueError(f"{checkpoint_dir(workdir)} contains no checkpoint.")
  restored = manager.restore(
      step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore()}))
  manager.close()
  return restored[_STATE], step


def restore_params(workdir: str, abstract_params: Any) -> tuple[Any, int]:
  """Reads the model parameters of the latest checkpoint of another run.

  Args:
    workdir: the other run's workdir (the folder holding `checkpoints/`).
    abstract_params: `jax.ShapeDtypeStruct` tree with shardings of the model
      parameters to read (`state.params["model"]`); it must match the saved
      model's shapes.

  Returns:
    The parameters and the step they were saved at.

  Raises:
    ValueError: `workdir` has no checkpoint, or the saved parameters do not
      match `abstract_params`.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise ValueError(
        f"config.init_from={workdir!r} has no checkpoints folder "
        f"({directory} not found). Pass the workdir of a finished run, e.g. "
        "--config.init_from=runs/stage1.")
  # The PyTree handler reads the Standard handler's format and can restore
  # a subtree (partial_restore), so the optimizer state is never loaded.
  manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_handlers={_STATE: ocp.PyTreeCheckpointHandler()},
  )
  step = manager.latest_step()
  if step is None:
    raise ValueError(
        f"config.init_from={workdir!r} contains no finished checkpoint in "
        f"{directory}. Run that stage to completion first.")
  metadata = manager.item_metadata(step)[_STATE]
  metadata = getattr(metadata, "tree", metadata)
  saved_params = metadata["params"]["model"]
  _check_same_shapes(saved_params, abstract_params, workdir)
  # Read only the model parameters, into the shardings of this run.
  abstract_state = {"params": {"model": abstract_params}}
  restored = manager.restore(
      step,
      args=ocp.args.Composite(**{
          _STATE: ocp.args.PyTreeRestore(
              item=abstract_state,
              restore_args=ocp.checkpoint_utils.construct_restore_args(
                  abstract_state),
              partial_restore=True,
          )
      }),
  )
  manager.close()
  logging.info("Initialised parameters from %s, step %d.", directory, step)
  return restored[_STATE]["params"]["model"], step


def _check_same_shapes(saved: Any, expected: Any, workdir: str) -> None:
  saved_shapes = {
      jax.tree_util.keystr(path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_leaves_with_path(saved)
  }
  expected_shapes = {
      jax.tree_util.keystr(path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_leaves_with_path(expected)
  }
  if saved_shapes == expected_shapes:
    return
  missing = sorted(set(expected_shapes) - set(saved_shapes))
  different = sorted(
      key for key in set(expected_shapes) & set(saved_shapes)
      if expected_shapes[key] != saved_shapes[key])
  details = []
  if missing:
    details.append(f"missing there: {missing[:5]}")
  if different:
    key = different[0]
    details.append(f"{len(different)} shape(s) differ, e.g. {key}: saved "
                   f"{saved_shapes[key]}, this model {expected_shapes[key]}")
  raise ValueError(
      f"The parameters saved in config.init_from={workdir!r} do not fit this "
      f"model ({'; '.join(details)}). Use the same config.model and "
      "tokenizer (config.data.tokenizer) as that run.")
