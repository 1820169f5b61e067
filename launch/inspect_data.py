r"""Writes the first training rows of a config, decoded, as JSON lines.

  python launch/inspect_data.py --config=configs/stage2.py --num_examples=20 \
      --output=/tmp/stage2_examples.jsonl
  python launch/inspect_data.py --config=configs/stage2.py --num_examples=5 \
      --output=/tmp/sop.jsonl --config.data.task_rates.lm=0 \
      --config.data.task_rates.mlm=0 --config.data.task_rates.rtd=0

The tokenizer is the one training would use: --config.data.tokenizer if set,
else WORKDIR/tokenizer.model (trained there if missing). The rows are those of
process 0 of 1, in the order of the training batches. Each line contains the task,
the batch fields as lists, `text` and `original_text` (decoded, with special
tokens written as <s>, </s>, <mask>, <sep>), `sources` (the document of each
packed segment) and, for sop rows, `sop_label`, `sop_permutation`,
`sop_segment_spans` and `sop_segment_texts`.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mtl_lm import tokenizer as tokenizer_lib
from mtl_lm.data import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/stage2.py.",
    lock_config=True)
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 20,
                                     "Number of rows to write.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON-lines file to write.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Run folder whose tokenizer.model is used (or trained and saved); "
    "default runs/<config file stem>, as for launch/train.py.")
flags.mark_flags_as_required(["config", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  stem = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  workdir = _WORKDIR.value or os.path.join("runs", stem)
  try:
    tokenizer = tokenizer_lib.load_or_train_tokenizer(_CONFIG.value.data,
                                                      workdir)
    pipeline.write_examples(_CONFIG.value, tokenizer,
                            num_examples=_NUM_EXAMPLES.value,
                            output_path=_OUTPUT.value)
  except (ValueError, FileNotFoundError) as error:
    logging.debug("Traceback of the error below:", exc_info=True)
    raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
  app.run(main)
