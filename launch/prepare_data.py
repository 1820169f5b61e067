r"""Tokenizes a config's training files into ArrayRecord shards.

  python launch/prepare_data.py --config=configs/stage2.py \
      --config.data.train_files='corpus/*.jsonl' \
      --tokenizer=runs/stage2/tokenizer.model --output_dir=data/corpus \
      --num_shards=16

Training then reads the shards without tokenizing at startup:

  python launch/train.py --config=configs/stage2.py \
      --config.data.train_files='data/corpus/*.array_record' \
      --config.data.tokenizer=data/corpus/tokenizer.model
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mtl_lm import tokenizer as tokenizer_lib
from mtl_lm.data import sources

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/stage2.py.",
    lock_config=True)
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None,
    "SentencePiece model to tokenize with, e.g. from "
    "launch/train_tokenizer.py.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Empty folder for the shards and a tokenizer copy.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1,
                                   "Number of ArrayRecord files to write.")
flags.mark_flags_as_required(["config", "tokenizer", "output_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    tokenizer = tokenizer_lib.Tokenizer.from_file(_TOKENIZER.value)
    documents = sources.load_documents(_CONFIG.value.data)
    sources.write_array_record_shards(documents, tokenizer,
                                      output_dir=_OUTPUT_DIR.value,
                                      num_shards=_NUM_SHARDS.value)
  except ValueError as error:
    logging.error("%s", error)
    raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
  app.run(main)
