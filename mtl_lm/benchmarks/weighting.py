"""Step time of the stage-2 train step under each task weighting strategy.

All strategies are compiled first, then timed in interleaved rounds (one step
of each per round), so that a slow spell of a shared machine hits every
strategy alike. The headline `ratio` is the median step time of the slowest
strategy over that of `static`; the goal is at most 1.1.
"""

import os
import statistics
import time

from absl import logging
import jax

from mtl_lm import configs
from mtl_lm import sharding
from mtl_lm import train
from mtl_lm import weighting
from mtl_lm.benchmarks import synthetic

_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                       "stage2.py")


def run(*, rounds: int = 30, vocab_size: int | None = None) -> dict:
  """Times the default stage-2 step with every weighting strategy."""
  config = configs.get_config(os.path.abspath(_CONFIG))
  vocab_size = vocab_size or config.data.vocab_size
  mesh = sharding.make_mesh(config.mesh)
  batches = [synthetic.batch(config, vocab_size=vocab_size, seed=seed)
             for seed in range(4)]

  trainers = {}
  states = {}
  for name in weighting.STRATEGY_NAMES:
    config.weighting.name = name
    trainer = train.Trainer(config, vocab_size=vocab_size, mesh=mesh)
    state = trainer.init(seed=0)
    state, _ = trainer.step(state, batches[0])  # Compiles.
    jax.block_until_ready(state)
    trainers[name], states[name] = trainer, state
    logging.info("Compiled the step with weighting %s.", name)

  times = {name: [] for name in trainers}
  for round_index in range(rounds):
    batch = batches[round_index % len(batches)]
    for name, trainer in trainers.items():
      start = time.perf_counter()
      states[name], _ = trainer.step(states[name], batch)
      jax.block_until_ready(states[name])
      times[name].append(time.perf_counter() - start)

  median_ms = {name: 1000 * statistics.median(values)
               for name, values in times.items()}
  slowest = max(median_ms, key=median_ms.get)
  return {
      "ratio": median_ms[slowest] / median_ms["static"],
      "slowest": slowest,
      "median_step_ms": median_ms,
      "rounds": rounds,
      "config": "configs/stage2.py",
  }
