"""Loading of config files by path, for configs that build on each other."""

import importlib.util
import os
import types


def load_sibling(config_file: str, name: str) -> types.ModuleType:
  """Imports the config module `name`.py from the folder of `config_file`.

  Stage configs call `load_sibling(__file__, "base")`: loading by path works
  wherever the config is read from (config flags, tests, notebooks) without
  the configs folder being an installed package.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)),
                      f"{name}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Config {path} not found next to {config_file}.")
  spec = importlib.util.spec_from_file_location(f"mtl_lm_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
