r"""Trains the SentencePiece tokenizer of a config's training data.

  python launch/train_tokenizer.py --config=configs/stage2.py \
      --config.data.train_files='corpus/*.txt' --config.data.vocab_size=8000

The model is written to --output, by default runs/<config file stem>/
tokenizer.model, which is where launch/train.py looks for it when
--config.data.tokenizer is empty. An existing file there is replaced.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mtl_lm import tokenizer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/stage2.py.",
    lock_config=True)
_OUTPUT = flags.DEFINE_string(
    "output", None,
    "Path of the SentencePiece model to write; default "
    "runs/<config file stem>/tokenizer.model.")
_MAX_CHARS = flags.DEFINE_integer(
    "max_chars", tokenizer.DEFAULT_MAX_TRAINING_CHARS,
    "Characters of training text, sampled from the documents with "
    "config.data.shuffle_seed.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  output = _OUTPUT.value or os.path.join("runs", stem, "tokenizer.model")
  try:
    trained = tokenizer.train_tokenizer_on_corpus(
        _CONFIG.value.data, model_path=output, max_chars=_MAX_CHARS.value)
  except ValueError as error:
    logging.error("%s", error)
    raise SystemExit(f"error: {error}") from None
  logging.info("Wrote %s (vocab_size=%d).", output, trained.vocab_size)


if __name__ == "__main__":
  app.run(main)
