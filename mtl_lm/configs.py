"""Loading of config files by path, for configs that build on each other."""

import importlib.util
import os
import types

import ml_collections


def load_module(path: str) -> types.ModuleType:
  """Imports the config file at `path` as a module."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Config file {path} not found.")
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"mtl_lm_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sibling(config_file: str, name: str) -> types.ModuleType:
  """Imports the config module `name`.py from the folder of `config_file`.

  Stage configs call `load_sibling(__file__, "base")`: loading by path works
  wherever the config is read from (config flags, tests, notebooks) without
  the configs folder being an installed package.
  """
  folder = os.path.dirname(os.path.abspath(config_file))
  return load_module(os.path.join(folder, f"{name}.py"))


def get_config(path: str) -> ml_collections.ConfigDict:
  """Returns `get_config()` of the config file at `path`."""
  return load_module(path).get_config()
