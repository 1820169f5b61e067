r"""Runs one benchmark suite and prints its headline figure as JSON.

  python launch/benchmark.py --suite=fused_ce

Each suite is a module `mtl_lm.benchmarks.<suite>` with a `run()` function that
measures its candidates side by side in one process and returns a dict with a
`ratio` field. The last line printed is that dict as one JSON object; the
results and the machines they came from are recorded in docs/benchmarks.md.
"""

import importlib
import json
import platform

from absl import app
from absl import flags
from absl import logging
import jax

_SUITES = ("fused_ce", "weighting", "pipeline")

_SUITE = flags.DEFINE_enum("suite", None, _SUITES, "Benchmark suite to run.")
flags.mark_flag_as_required("suite")


def main(argv):
  del argv
  module = importlib.import_module(f"mtl_lm.benchmarks.{_SUITE.value}")
  logging.info("Running benchmark suite %s on %s.", _SUITE.value,
               jax.devices()[0].device_kind)
  result = module.run()
  result["suite"] = _SUITE.value
  result["machine"] = (f"{platform.machine()}, {jax.device_count()} "
                       f"{jax.devices()[0].platform} device(s), "
                       f"{_cpu_count()} CPU cores")
  print(json.dumps(result, sort_keys=True))


def _cpu_count():
  import os  # pylint: disable=g-import-not-at-top
  return len(os.sched_getaffinity(0))


if __name__ == "__main__":
  app.run(main)
