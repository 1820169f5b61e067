"""Tiny configs, corpora and batches shared by the training tests."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np

from mtl_lm import configs
from mtl_lm.benchmarks import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORDS = ("the cat dog bird sat ran flew over under near a red blue green "
          "small large quick slow tree house river hill").split()


def write_corpus(path: str, *, num_documents: int = 120, seed: int = 0) -> str:
  """Writes a .txt corpus of short English documents separated by blank lines.

  The text is drawn from a 22-word vocabulary, so a tiny model can learn it
  within tens of steps.
  """
  rng = np.random.default_rng(seed)
  documents = []
  for _ in range(num_documents):
    sentences = []
    for _ in range(rng.integers(2, 6)):
      words = rng.choice(_WORDS, size=rng.integers(4, 9))
      sentences.append(" ".join(words).capitalize() + ".")
    documents.append(" ".join(sentences))
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n\n".join(documents) + "\n")
  return path


def tiny_config(corpus: str, *, stage: str = "stage2",
                steps: int = 4) -> ml_collections.ConfigDict:
  """Returns a stage config shrunk to compile and run in seconds on a CPU."""
  config = configs.get_config(os.path.join(REPO, "configs", f"{stage}.py"))
  config.model.embed_dim = 32
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.model.num_kv_heads = 1
  config.model.head_dim = 16
  config.model.mlp_dim = 64
  config.data.train_files = corpus
  config.data.vocab_size = 300
  config.data.seq_len = 32
  config.data.batch_size = 8
  config.loss.chunk_size = 128
  config.optimizer.warmup_steps = 2
  config.train.steps = steps
  config.train.log_every = 2
  config.train.checkpoint_every = 2
  return config


def synthetic_batch(config, *, vocab_size: int, seed: int = 0):
  return synthetic.batch(config, vocab_size=vocab_size, seed=seed)


def run_on_devices(script: str, *, device_count: int) -> dict:
  """Runs `script` on `device_count` simulated CPU devices in a subprocess.

  The device count is fixed when JAX starts, so multi-device checks run in
  a fresh interpreter. The script prints one JSON object as its last line.

  Returns:
    That JSON object. The test fails with the script's stderr if it fails.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])
