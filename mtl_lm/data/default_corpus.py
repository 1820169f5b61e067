"""English training text that every CPython ships: its documentation.

The corpus is the `pydoc_data.topics` help texts followed by the docstrings
of the public modules, classes, functions and methods of the standard library,
one document each, deduplicated, in sorted (deterministic) order. It is built
once per Python version into a JSONL cache file with records
`{"text": ..., "origin": "module.Class.method" or "topic:NAME"}`.

Importing every standard-library module has side effects (`antigravity` opens
a browser, `this` prints) and leaves modules loaded, so the builder runs in a
separate, isolated interpreter (`python -I this_file OUTPUT`) with its
standard streams captured. Modules that fail to import or print while
importing are skipped.
"""

import contextlib
import inspect
import io
import json
import os
import pkgutil
import subprocess
import sys
import time
import warnings

# Overrides the cache directory (default ~/.cache/mtl_lm).
CACHE_ENV_VAR = "MTL_LM_CACHE"

# Documents shorter than this carry little text ("Return self==value.").
_MIN_DOCUMENT_CHARS = 40
_BUILD_TIMEOUT_S = 600

# Modules whose import opens windows or browsers, starts a GUI toolkit, prints,
# or that hold tests and tools rather than library documentation.
_SKIPPED_MODULES = frozenset({
    "__main__", "__hello__", "__phello__", "antigravity", "this", "idlelib",
    "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
    "pydoc_data", "xxsubtype", "xxlimited", "xxlimited_35", "_tkinter",
})
_SKIPPED_SUBMODULE_PARTS = frozenset({"test", "tests", "idle_test",
                                      "__main__"})


def cache_path() -> str:
  """Path of the cache file for the running Python version."""
  directory = os.environ.get(CACHE_ENV_VAR) or os.path.join(
      os.path.expanduser("~"), ".cache", "mtl_lm")
  version = ".".join(str(part) for part in sys.version_info[:3])
  return os.path.join(directory, f"cpython_docs_{version}.jsonl")


def default_corpus_path() -> str:
  """Returns the cached corpus path, building the corpus first if missing.

  Raises:
    ValueError: if the cache folder cannot be created.
    RuntimeError: if the builder process fails or writes no document.
  """
  # Imported here so that the builder script needs only the standard library.
  from absl import logging  # pylint: disable=g-import-not-at-top

  path = cache_path()
  if os.path.exists(path):
    logging.info("Using CPython documentation corpus %s (%.1f MB).", path,
                 os.path.getsize(path) / 1e6)
    return path

  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
  except OSError as e:
    raise ValueError(
        f"Cannot create the corpus cache folder {os.path.dirname(path)!r}: "
        f"{e}. Set the environment variable {CACHE_ENV_VAR} to a writable "
        f"folder.") from e
  temporary = f"{path}.tmp.{os.getpid()}"
  logging.info("Building the CPython documentation corpus in %s.", path)
  start = time.monotonic()
  try:
    result = subprocess.run(
        [sys.executable, "-I", os.path.abspath(__file__), temporary],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, timeout=_BUILD_TIMEOUT_S, check=False)
    if result.returncode != 0 or not os.path.exists(temporary):
      stderr = result.stderr.decode("utf-8", errors="replace")[-2000:]
      raise RuntimeError(
          f"Building the CPython documentation corpus failed (exit code "
          f"{result.returncode}):\n{stderr}\nSet --config.data.train_files to "
          f"your own text instead.")
    # Concurrent builders (several hosts or processes) write identical files;
    # the last rename wins.
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  logging.info("Built %s (%.1f MB) in %.1f s.", path,
               os.path.getsize(path) / 1e6, time.monotonic() - start)
  return path


# ---------------------------------------------------------------------------
# Builder; runs in its own interpreter.


def _import_quietly(name: str):
  """Imports a module; returns None if that fails or prints anything."""
  captured = io.StringIO()
  try:
    with contextlib.redirect_stdout(captured), \
        contextlib.redirect_stderr(captured), warnings.catch_warnings():
      warnings.simplefilter("ignore")
      module = __import__(name, fromlist=["_"])
  except Exception:  # pylint: disable=broad-except
    # Any error: platform-specific modules (winreg), missing optional C
    # libraries, deprecated modules that raise on import.
    return None
  if captured.getvalue():
    return None
  return module


def _module_names() -> list[str]:
  """Public standard-library modules and their submodules, sorted."""
  names = []
  for name in sorted(sys.stdlib_module_names):
    # Private modules such as _pydecimal and _socket are kept: they hold
    # much of the documentation of their public counterparts.
    if (name.startswith("__") or name.startswith("_test") or
        name in _SKIPPED_MODULES):
      continue
    module = _import_quietly(name)
    if module is None:
      continue
    names.append(name)
    if not hasattr(module, "__path__"):
      continue
    for info in pkgutil.walk_packages(module.__path__, prefix=f"{name}.",
                                      onerror=lambda _: None):
      parts = info.name.split(".")
      if any(part.startswith("_") or part in _SKIPPED_SUBMODULE_PARTS
             for part in parts[1:]):
        continue
      names.append(info.name)
  return sorted(set(names))


def _docstrings_of_module(module) -> list[tuple[str, str]]:
  """(origin, docstring) of a module and its own public classes and functions."""
  name = module.__name__
  found = [(name, inspect.getdoc(module))]
  for attribute, value in sorted(vars(module).items()):
    if attribute.startswith("_"):
      continue
    if getattr(value, "__module__", None) != name:
      continue  # Re-exported from another module, documented there.
    if inspect.isclass(value):
      found.append((f"{name}.{attribute}", inspect.getdoc(value)))
      for member_name, member in sorted(vars(value).items()):
        if member_name.startswith("_") and member_name != "__init__":
          continue
        if isinstance(member, (staticmethod, classmethod)):
          member = member.__func__
        if callable(member) or isinstance(member, property):
          found.append((f"{name}.{attribute}.{member_name}",
                        inspect.getdoc(member)))
    elif inspect.isroutine(value):
      found.append((f"{name}.{attribute}", inspect.getdoc(value)))
  return found


def _topics() -> list[tuple[str, str]]:
  try:
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  return [(f"topic:{name}", text)
          for name, text in sorted(topics.topics.items())]


def build_corpus(output: str) -> int:
  """Writes the corpus to `output` as JSONL; returns the number of documents."""
  seen = set()
  count = 0
  with open(output, "w", encoding="utf-8") as f:

    def write(origin, text):
      nonlocal count
      if not isinstance(text, str):
        return
      text = text.strip()
      if len(text) < _MIN_DOCUMENT_CHARS or text in seen:
        return
      seen.add(text)
      f.write(json.dumps({"text": text, "origin": origin},
                         ensure_ascii=False) + "\n")
      count += 1

    for origin, text in _topics():
      write(origin, text)
    for name in _module_names():
      module = _import_quietly(name)
      if module is None:
        continue
      for origin, text in _docstrings_of_module(module):
        write(origin, text)
  return count


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit(f"usage: {sys.argv[0]} OUTPUT.jsonl")
  if build_corpus(sys.argv[1]) == 0:
    raise SystemExit("No documentation found in this Python installation.")
